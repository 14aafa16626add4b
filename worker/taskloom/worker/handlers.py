"""The handler registry and the built-in handlers ``echo`` and ``llm``.

A handler is an async function of a ``SubtaskContext`` that returns the
subtask's output: a string, or anything JSON can encode.

    registry = HandlerRegistry()

    @registry.handler("summarize")
    async def summarize(ctx: SubtaskContext) -> str:
        ...
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from taskloom.core.errors import LLMError, LLMUnavailable
from taskloom.core.llm import LLM, ChatMessage
from taskloom.core.model import AGGREGATE_PARAM, REVIEWED_PARAM, Aggregate, ContextMode
from taskloom.core.roles import ROLE_PROMPT_PARAM
from taskloom.worker.context import SubtaskContext, SubtaskError

Handler = Callable[[SubtaskContext], Awaitable[object]]

CANNOT = "CANNOT:"
"""How the model says a step cannot be done as asked: the llm handler asks for a replan."""

LLM_SYSTEM_PROMPT = (
    "You are one member of a team working towards a larger goal. Carry out only the step "
    "you are given, thoroughly and concisely, and use the results of earlier steps where "
    "they help. Reply with the result itself, without preamble. If the step cannot be done "
    "as asked (what it needs is missing, or it contradicts the goal), reply with one line "
    f"that starts with {CANNOT} and says why."
)
SUMMARY_PROMPT = (
    "Summarise the text below in at most {words} words. Keep every fact, number, name "
    "and conclusion that someone continuing the work would need; drop repetition and "
    "filler. Reply with the summary only.\n\n<text>\n{text}\n</text>"
)
LLM_HANDLER_VERSION = "llm/3"
"""Part of the cache key of llm subtasks: bump it when the prompt changes."""
MAX_DEFAULT_CONTEXT = 8192
"""The default budget is the model's context length, but no more than this: a
larger window costs the server memory for every call."""
MIN_PROMPT_TOKENS = 64


Cacheable = bool | Literal["shared"]
"""Whether a handler's outputs may be reused: not, for the same owner, or for anyone."""


@dataclass(frozen=True, slots=True)
class HandlerInfo:
    fn: Handler
    version: str
    cacheable: bool
    shared_cache: bool = False


class HandlerRegistry:
    """Capability name → handler.

    A ``cacheable`` handler's output may be reused for an identical subtask
    (same capability, instruction, params, inputs, version and model) of the
    same owner; use it for pure functions of their inputs, never for side
    effects. ``cacheable="shared"`` reuses it across owners too: only for
    pure functions of public inputs, since one tenant then gets what was
    computed for another. ``version`` defaults to a hash of the handler's
    source, so editing it invalidates what was cached.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, HandlerInfo] = {}

    def handler(
        self, name: str, *, version: str | None = None, cacheable: Cacheable = False
    ) -> Callable[[Handler], Handler]:
        """Decorator: register ``fn`` as the handler for capability ``name``."""

        def register(fn: Handler) -> Handler:
            self.add(name, fn, version=version, cacheable=cacheable)
            return fn

        return register

    def add(
        self, name: str, fn: Handler, *, version: str | None = None, cacheable: Cacheable = False
    ) -> None:
        if cacheable not in (True, False, "shared"):
            raise ValueError(f"cacheable is True, False or 'shared', not {cacheable!r}")
        self._handlers[name] = HandlerInfo(
            fn, version or _source_hash(fn), bool(cacheable), cacheable == "shared"
        )

    def update(self, other: HandlerRegistry) -> None:
        self._handlers.update(other._handlers)

    def get(self, name: str) -> Handler | None:
        info = self._handlers.get(name)
        return info.fn if info else None

    def info(self, name: str) -> HandlerInfo | None:
        return self._handlers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._handlers))


def _source_hash(fn: Handler) -> str:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = getattr(fn, "__qualname__", repr(fn))
    return hashlib.sha256(source.encode()).hexdigest()[:12]


async def echo(ctx: SubtaskContext) -> str:
    """Returns the instruction unchanged: for tests and benchmarks."""
    return ctx.instruction


def llm_handler(*, context_tokens: int, max_output_tokens: int) -> Handler:
    """The built-in ``llm`` handler: the goal, the inputs and the instruction to
    the model, fitted into the context budget, the reply streamed as it comes.

    The budget is the task's ``context_tokens``, else the worker's, else the
    model's context length (at most ``MAX_DEFAULT_CONTEXT``). A quarter of it,
    at most ``max_output_tokens``, is kept for the reply.
    """

    async def run(ctx: SubtaskContext) -> str:
        aggregate = ctx.params.get(AGGREGATE_PARAM)
        if aggregate == Aggregate.VOTE:
            return await vote(ctx)
        if aggregate == Aggregate.CRITIC and ctx.params.get(REVIEWED_PARAM) != "1":
            await review(ctx, max_output_tokens)
        llm = ctx.llm
        budget = ctx.context_tokens or context_tokens
        if not budget:
            budget = min(await llm.context_length(), MAX_DEFAULT_CONTEXT)
        elif llm.context_is_fixed:
            budget = min(budget, await llm.context_length())
        reply_tokens = min(max_output_tokens, budget // 4)
        with model_errors():
            prompt, notes = await fit_prompt(
                ctx, llm, budget - reply_tokens, summarize=ctx.context_mode == ContextMode.SUMMARIZE
            )
            for note in notes:
                await ctx.progress(note)
            temperature = float(ctx.params.get("temperature", "0") or 0)
            reply = await llm.chat(
                [ChatMessage("system", system_prompt(ctx)), ChatMessage("user", prompt)],
                temperature=temperature,
                on_text=ctx.stream,
                max_tokens=reply_tokens,
                context_tokens=budget,
            )
        answer = reply.text.strip()
        if answer[: len(CANNOT)].upper() == CANNOT:
            ctx.replan(f"the model cannot do this step as asked: {answer[len(CANNOT) :].strip()}")
        return reply.text

    return run


@contextlib.contextmanager
def model_errors() -> Iterator[None]:
    """The model's failures as the subtask's: unreachable is retried, refused is not."""
    try:
        yield
    except LLMUnavailable as e:
        raise SubtaskError(str(e), retryable=True) from None
    except LLMError as e:
        raise SubtaskError(str(e), retryable=False) from None


def system_prompt(ctx: SubtaskContext) -> str:
    """The ``llm`` handler's system prompt, after the step's role's, if it has one."""
    role = ctx.params.get(ROLE_PROMPT_PARAM, "").strip()
    return f"{role}\n\n{LLM_SYSTEM_PROMPT}" if role else LLM_SYSTEM_PROMPT


CRITIC_PROMPT = (
    "You are a demanding critic reviewing a team's results before they are merged into "
    "the final answer to the goal. If one result is wrong, misses something the goal "
    "needs, or is too weak to use, name that one step and say exactly what to fix; "
    "otherwise accept. Reply with the JSON object only."
)
REVIEW_ITEM = 1500
"""Characters of each result the critic reads."""


async def review(ctx: SubtaskContext, max_output_tokens: int) -> None:
    """The critic pass of ``aggregate=critic``: accept, or send one input back
    with a critique (``ctx.send_back``, which ends this attempt)."""
    steps = [i.subtask_id for i in ctx.inputs]
    if not steps:
        return
    results = "\n\n".join(
        f'<result step="{i.subtask_id}" title="{i.title}">\n{i.output[:REVIEW_ITEM]}\n</result>'
        for i in ctx.inputs
    )
    schema = {
        "type": "object",
        "properties": {
            "verdict": {"type": "string", "enum": ["accept", "revise"]},
            "step": {"type": "string", "enum": steps},
            "critique": {"type": "string", "maxLength": 600},
        },
        "required": ["verdict", "step", "critique"],
        "additionalProperties": False,
    }
    with model_errors():
        reply = await ctx.llm.chat(
            [
                ChatMessage("system", CRITIC_PROMPT),
                ChatMessage("user", f"Goal:\n{ctx.goal}\n\nResults:\n{results}"),
            ],
            schema=schema,
            max_tokens=min(max_output_tokens, 400),
        )
    try:
        verdict = json.loads(reply.text)
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict):  # a model that ignored the schema: accepted
        verdict = {}
    step, critique = str(verdict.get("step", "")), str(verdict.get("critique", "")).strip()
    if verdict.get("verdict") == "revise" and step in steps and critique:
        await ctx.progress(f"the critic sends {step} back: {critique}")
        ctx.send_back(step, critique)
    await ctx.progress("the critic accepts the results" + (f": {critique}" if critique else ""))


def _ballot(text: str) -> str:
    """An answer as it is counted: case, spacing and end punctuation aside."""
    return " ".join(text.casefold().split()).rstrip(".!?;:")


def majority(answers: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """Of ``(id, answer)`` pairs, the answer given most often (ties: the one
    given first) and the ids that gave it."""
    counts = Counter(_ballot(a) for _, a in answers)
    best = max(counts.values())
    winner = next(a for _, a in answers if counts[_ballot(a)] == best)
    return winner, [i for i, a in answers if _ballot(a) == _ballot(winner)]


async def vote(ctx: SubtaskContext) -> str:
    """The ``vote`` aggregation: the answer most inputs gave, no model call."""
    answers = [(i.subtask_id, i.output.strip()) for i in ctx.inputs if i.output.strip()]
    if not answers:
        raise SubtaskError("nothing to vote on: no earlier step gave an answer", retryable=False)
    winner, voters = majority(answers)
    if 2 * len(voters) > len(answers):
        note = f"{len(voters)} of {len(answers)} answers agree ({', '.join(voters)})"
    else:
        note = (
            f"no majority among {len(answers)} answers; the most common, given by "
            f"{', '.join(voters)}, is taken"
        )
    await ctx.progress(note)
    return winner


async def fit_prompt(
    ctx: SubtaskContext, llm: LLM, available: int, *, summarize: bool
) -> tuple[str, list[str]]:
    """The user message for an llm subtask within ``available`` tokens, and notes
    on what had to be cut or summarised to get there.

    The goal and the instruction are never cut: if they alone do not fit, the
    subtask fails for good with a message that says so. Dependency outputs
    share what is left: each gets an equal share, and what small ones leave
    unused goes to the larger ones. An output over its share is summarised by
    the model first (``summarize``), then cut with a visible marker.
    """
    head = f"Overall goal:\n{ctx.goal}"
    step = f"Your step: {ctx.title}\n{ctx.instruction}" if ctx.title else ctx.instruction
    fixed = llm.count_tokens(system_prompt(ctx)) + llm.count_tokens(head) + llm.count_tokens(step)
    if fixed + MIN_PROMPT_TOKENS > available:
        raise SubtaskError(
            f"the goal and this step's instruction take about {fixed} tokens, but the context "
            f"budget leaves {available} for the prompt; raise it (--context-tokens, "
            "TASKLOOM_CONTEXT_TOKENS) or shorten the goal",
            retryable=False,
        )
    notes: list[str] = []
    parts = [head]
    if ctx.inputs:
        outputs = [i.output for i in ctx.inputs]
        headers = [f"### {i.title or i.subtask_id} ({i.subtask_id})" for i in ctx.inputs]
        left = available - fixed - sum(llm.count_tokens(h) + 2 for h in headers) - 16
        sizes = [llm.count_tokens(o) for o in outputs]
        shares = fair_shares(sizes, max(left, 0))
        for n, item in enumerate(ctx.inputs):
            if sizes[n] <= shares[n]:
                continue
            text, size = outputs[n], sizes[n]
            if summarize and shares[n] >= MIN_PROMPT_TOKENS:
                text = await summarize_text(llm, text, shares[n], available)
                size = llm.count_tokens(text)
                notes.append(
                    f"input {item.subtask_id} summarised from about {sizes[n]} "
                    f"to {size} tokens to fit the context budget"
                )
            if size > shares[n]:
                text = cut(text, size, shares[n])
                notes.append(
                    f"input {item.subtask_id} cut from about {sizes[n]} to {shares[n]} "
                    "tokens to fit the context budget"
                )
            outputs[n] = text
        parts.append("Results of earlier steps:")
        parts += [f"{h}\n{o}" for h, o in zip(headers, outputs, strict=True)]
    parts.append(step)
    return "\n\n".join(parts), notes


def fair_shares(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` among items wanting ``sizes``: equal shares, and what an
    item needs less than its share goes to the others (max-min fairness)."""
    shares = [0] * len(sizes)
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    left = total
    for rank, i in enumerate(order):
        share = left // (len(sizes) - rank)
        shares[i] = min(sizes[i], share)
        left -= shares[i]
    return shares


def cut_marker(kept: int, total: int) -> str:
    return f"\n[… cut: about {kept} of {total} tokens kept to fit the context budget]"


def cut(text: str, tokens: int, keep: int) -> str:
    """``text`` (about ``tokens`` long) cut to about ``keep`` tokens, marker included."""
    marker = cut_marker(keep, tokens)
    room = max(0, keep - (len(marker) + 2) // 3)
    chars = len(text) * room // max(tokens, 1)
    return text[:chars] + marker


async def summarize_text(llm: LLM, text: str, target: int, budget: int) -> str:
    """``text`` summarised to about ``target`` tokens. Text too long for one call is
    summarised in pieces, and the pieces' summaries joined."""
    piece_tokens = max(budget // 2, MIN_PROMPT_TOKENS)
    total = llm.count_tokens(text)
    pieces = max(1, -(-total // piece_tokens))
    step = -(-len(text) // pieces)
    chunks = [text[i : i + step] for i in range(0, len(text), step)]
    words = max(20, target * 2 // 3 // len(chunks))
    summaries = []
    for chunk in chunks:
        reply = await llm.chat(
            [ChatMessage("user", SUMMARY_PROMPT.format(words=words, text=chunk))],
            max_tokens=max(target // len(chunks), 32),
            context_tokens=budget,
        )
        summaries.append(reply.text.strip())
    return "\n".join(summaries)
