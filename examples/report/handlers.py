"""A financial report pipeline: custom handlers around one ``llm`` step.

    extract ──┬── ratios ──┬── narrative (llm) ──┐
              ├── trends ──┘                      ├── report
              └── charts ─────────────────────────┘

``extract`` reads the quarterly CSV (``params.csv``); ``ratios`` and ``trends``
compute margins, liquidity and growth as Markdown tables with the key facts in
words; ``charts`` renders PNGs with matplotlib into ``params.out``; the ``llm``
step writes the narrative from the ratios and trends; ``report`` writes
``report.md`` next to the charts, embedding them, and returns its path and text.

Run it with ``make demo`` (or ``taskloom up --app examples.report.handlers:registry
--demo-plan examples/report/plan.json --demo GOAL``); see ``README.md`` here.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taskloom.worker import HandlerRegistry, SubtaskContext, SubtaskError

registry = HandlerRegistry()

COLUMNS = (
    "quarter",
    "revenue",
    "cost_of_sales",
    "operating_expenses",
    "net_income",
    "current_assets",
    "current_liabilities",
    "cash",
)
Row = dict[str, Any]


def read_rows(path: Path) -> list[Row]:
    """The CSV's rows, numbers as floats; a clear error for a file that is not it."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise SubtaskError(f"{path} lacks the column(s) {', '.join(missing)}")
            rows = [
                {c: (row[c] if c == "quarter" else float(row[c])) for c in COLUMNS}
                for row in reader
            ]
    except OSError as e:
        raise SubtaskError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise SubtaskError(f"{path} holds a value that is not a number: {e}") from None
    if len(rows) < 2:
        raise SubtaskError(f"{path} needs at least two quarters to compare")
    return rows


def ratios_of(row: Row) -> dict[str, float]:
    revenue = row["revenue"] or 1.0
    gross = row["revenue"] - row["cost_of_sales"]
    operating = gross - row["operating_expenses"]
    return {
        "gross_margin": 100 * gross / revenue,
        "operating_margin": 100 * operating / revenue,
        "net_margin": 100 * row["net_income"] / revenue,
        "current_ratio": row["current_assets"] / (row["current_liabilities"] or 1.0),
        "cash_ratio": row["cash"] / (row["current_liabilities"] or 1.0),
    }


def growth(now: float, before: float) -> float:
    return 100 * (now - before) / before if before else 0.0


def rows_of(ctx: SubtaskContext) -> list[Row]:
    """The extracted rows, from the ``extract`` step among the inputs."""
    for item in ctx.inputs:
        if item.subtask_id == "extract":
            rows: list[Row] = json.loads(item.output)["rows"]
            return rows
    raise SubtaskError("this step needs the extract step's output as an input")


def out_dir(ctx: SubtaskContext) -> Path:
    path = Path(ctx.params.get("out", "report-out")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    return "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in lines),
        ]
    )


@registry.handler("extract", cacheable=True)
async def extract(ctx: SubtaskContext) -> Mapping[str, Any]:
    path = Path(ctx.params.get("csv", "examples/report/quarterly.csv"))
    rows = await asyncio.to_thread(read_rows, path)
    await ctx.progress(f"read {len(rows)} quarters from {path}")
    return {"source": str(path), "rows": rows}


@registry.handler("ratios", cacheable=True)
async def ratios(ctx: SubtaskContext) -> str:
    rows = rows_of(ctx)
    computed = [(r["quarter"], ratios_of(r)) for r in rows]
    first, last = computed[0], computed[-1]
    facts = [
        f"Gross margin went from {first[1]['gross_margin']:.1f} % in {first[0]} to "
        f"{last[1]['gross_margin']:.1f} % in {last[0]}.",
        f"Net margin went from {first[1]['net_margin']:.1f} % to {last[1]['net_margin']:.1f} %.",
        f"The current ratio went from {first[1]['current_ratio']:.2f} to "
        f"{last[1]['current_ratio']:.2f}.",
    ]
    lines = [
        (q, f"{r['gross_margin']:.1f} %", f"{r['operating_margin']:.1f} %",
         f"{r['net_margin']:.1f} %", f"{r['current_ratio']:.2f}", f"{r['cash_ratio']:.2f}")
        for q, r in computed
    ]  # fmt: skip
    header = ("Quarter", "Gross margin", "Operating margin", "Net margin", "Current", "Cash")
    return "\n".join(facts) + "\n\n" + table(header, lines)


@registry.handler("trends", cacheable=True)
async def trends(ctx: SubtaskContext) -> str:
    rows = rows_of(ctx)
    lines = []
    for n, r in enumerate(rows):
        qoq = growth(r["revenue"], rows[n - 1]["revenue"]) if n else 0.0
        yoy = growth(r["revenue"], rows[n - 4]["revenue"]) if n >= 4 else None
        lines.append(
            (r["quarter"], f"{r['revenue']:,.0f}", f"{qoq:+.1f} %" if n else "n/a",
             f"{yoy:+.1f} %" if yoy is not None else "n/a", f"{r['net_income']:,.0f}")
        )  # fmt: skip
    best = max(rows, key=lambda r: r["net_income"])
    worst = min(rows, key=lambda r: r["net_income"])
    last_year = rows[-4:] if len(rows) >= 8 else rows[len(rows) // 2 :]
    year_before = rows[-8:-4] if len(rows) >= 8 else rows[: len(rows) // 2]
    revenue_growth = growth(sum(r["revenue"] for r in last_year),
                            sum(r["revenue"] for r in year_before))  # fmt: skip
    income_growth = growth(sum(r["net_income"] for r in last_year),
                           sum(r["net_income"] for r in year_before))  # fmt: skip
    facts = [
        f"Revenue of the last four quarters grew {revenue_growth:+.1f} % on the four before; "
        f"net income changed {income_growth:+.1f} %.",
        f"The best quarter for net income was {best['quarter']} ({best['net_income']:,.0f}); "
        f"the worst was {worst['quarter']} ({worst['net_income']:,.0f}).",
    ]
    header = ("Quarter", "Revenue", "vs previous quarter", "vs a year before", "Net income")
    return "\n".join(facts) + "\n\n" + table(header, lines)


@registry.handler("charts")
async def charts(ctx: SubtaskContext) -> Mapping[str, str]:
    rows = rows_of(ctx)
    folder = out_dir(ctx)
    paths = await asyncio.to_thread(draw, rows, folder)
    await ctx.progress(f"drew {len(paths)} charts in {folder}")
    return paths


def draw(rows: list[Row], folder: Path) -> dict[str, str]:
    """Three PNG charts; matplotlib without a display (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quarters = [r["quarter"] for r in rows]
    figures: dict[str, tuple[str, dict[str, list[float]], str]] = {
        "revenue": ("Revenue and net income", {
            "Revenue": [r["revenue"] for r in rows],
            "Net income": [r["net_income"] for r in rows],
        }, "thousand EUR"),
        "margins": ("Margins", {
            name: [ratios_of(r)[key] for r in rows]
            for name, key in (("Gross", "gross_margin"), ("Operating", "operating_margin"),
                              ("Net", "net_margin"))
        }, "% of revenue"),
        "liquidity": ("Liquidity", {
            "Current ratio": [ratios_of(r)["current_ratio"] for r in rows],
            "Cash ratio": [ratios_of(r)["cash_ratio"] for r in rows],
        }, "ratio"),
    }  # fmt: skip
    paths = {}
    for name, (title, series, unit) in figures.items():
        fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
        for label, values in series.items():
            ax.plot(quarters, values, marker="o", label=label)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.autofmt_xdate()
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths[name] = str(path)
    return paths


@registry.handler("report")
async def report(ctx: SubtaskContext) -> str:
    parts = {item.subtask_id: item.output for item in ctx.inputs}
    missing = {"ratios", "trends", "charts", "narrative"} - parts.keys()
    if missing:
        raise SubtaskError(f"the report needs the outputs of {', '.join(sorted(missing))}")
    folder = out_dir(ctx)
    pictures: dict[str, str] = json.loads(parts["charts"])
    images = "\n\n".join(f"![{name}]({Path(path).name})" for name, path in pictures.items())
    text = (
        f"# {ctx.params.get('title', 'Quarterly report')}\n\n"
        f"## Summary\n\n{parts['narrative'].strip()}\n\n"
        f"## Charts\n\n{images}\n\n"
        f"## Profitability and liquidity\n\n{parts['ratios']}\n\n"
        f"## Growth\n\n{parts['trends']}\n"
    )
    path = folder / "report.md"
    await asyncio.to_thread(path.write_text, text)
    return f"The report is at {path} (charts beside it).\n\n{text}"
