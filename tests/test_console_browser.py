"""The console in a real browser: Debian's headless Chromium, driven by
selenium (``scripts/ensure-chromium`` installs both; nothing is downloaded).

A person opens a task's page, approves its plan with a click, and watches its
nodes turn SUCCEEDED live, without a reload; a graph of a thousand subtasks
is drawn and stays navigable. ``TASKLOOM_CONSOLE_SCREENSHOT=PATH`` also saves
the task page there (how docs/console.png is made)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskloom.client import TaskloomClient
from taskloom.core.model import TaskStatus
from taskloom.supervisor.app import Supervisor
from taskloom.supervisor.settings import SupervisorSettings
from tests.conftest import Processes
from tests.helpers import eventually, plan, wait_status

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="needs Debian's chromium and chromium-driver (scripts/ensure-chromium)",
    ),
    pytest.mark.timeout(240),
]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--window-size=1500,950",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
async def console(supervisor_settings: SupervisorSettings) -> AsyncIterator[Supervisor]:
    server = Supervisor(supervisor_settings.model_copy(update={"console_port": 0}))
    await server.start()
    yield server
    await server.stop(grace=0.5)


def statuses(driver: Any) -> dict[str, str]:
    # Read in one script: the page redraws as events arrive, and an element
    # found in one call may be gone by the next.
    found: dict[str, str] = driver.execute_script(
        "const s = {};"
        "for (const n of document.querySelectorAll('g.node[data-subtask-id]'))"
        "  s[n.dataset.subtaskId] = n.dataset.status;"
        "return s;"
    )
    return found


def text_of(driver: Any, element_id: str) -> str:
    text: str = driver.execute_script(
        "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';",
        element_id,
    )
    return text


async def click(driver: Any, selector: str) -> None:
    """Click what ``selector`` finds, finding it again if the page redrew it
    between finding and clicking."""

    from selenium.common.exceptions import StaleElementReferenceException

    def attempt() -> bool:
        try:
            driver.find_element("css selector", selector).click()
        except StaleElementReferenceException as e:
            raise AssertionError(f"{selector} was redrawn") from e
        return True

    await eventually(lambda: asyncio.to_thread(attempt), timeout=30)


async def test_a_person_approves_a_plan_by_clicking_and_watches_it_run_live(
    console: Supervisor, browser: Any, processes: Processes, test_dir: Path, tmp_path: Path
) -> None:
    assert console.console is not None
    base = f"http://127.0.0.1:{console.console.port}"
    processes.worker(console.address)
    async with TaskloomClient(console.address) as client:
        steps = plan(
            ("research", "gate", "gather the facts"),
            ("outline", "echo", "sketch it", "research"),
            ("examples", "echo", "pick three", "research"),
            ("write", "echo", "write it up", "outline", "examples"),
        )
        task_id = await client.submit("A guide to brewing coffee", plan=steps, approve_plan=True)
        await wait_status(client, task_id, TaskStatus.AWAITING_APPROVAL)

        await asyncio.to_thread(browser.get, f"{base}/tasks/{task_id}")
        pending = {"research": "PENDING", "outline": "PENDING", "examples": "PENDING",
                   "write": "PENDING"}  # fmt: skip
        await eventually(lambda: statuses(browser) == pending, timeout=30)
        # A mark the page keeps until it is reloaded.
        browser.execute_script("window.__same_page = true;")

        await click(browser, 'button[data-action="approve"]')
        await eventually(lambda: statuses(browser).get("research") == "RUNNING", timeout=30)
        (test_dir / "open-research").touch()
        every = dict.fromkeys(pending, "SUCCEEDED")
        await eventually(lambda: statuses(browser) == every, timeout=60)
        assert browser.execute_script("return window.__same_page === true;")
        assert (await client.get(task_id)).status == TaskStatus.SUCCEEDED

        # A subtask's detail: its instruction and the inputs it got.
        await click(browser, 'g.node[data-subtask-id="write"]')
        detail = await eventually(
            lambda: "write it up" in text_of(browser, "detail") and text_of(browser, "detail"),
            timeout=30,
        )
        assert "outline" in detail and "examples" in detail
        await asyncio.to_thread(browser.save_screenshot, str(tmp_path / "console.png"))
        assert (tmp_path / "console.png").stat().st_size > 10_000
        if os.environ.get("TASKLOOM_CONSOLE_SCREENSHOT"):
            shutil.copy(tmp_path / "console.png", os.environ["TASKLOOM_CONSOLE_SCREENSHOT"])

        # The list shows the task.
        await asyncio.to_thread(browser.get, f"{base}/")
        await eventually(
            lambda: browser.find_elements("css selector", f'tr[data-task-id="{task_id}"]'),
            timeout=30,
        )


async def test_a_graph_of_a_thousand_subtasks_is_drawn_and_stays_navigable(
    console: Supervisor, browser: Any
) -> None:
    assert console.console is not None
    fan: list[tuple[str, ...]] = [("root", "echo", "start")]
    fan += [(f"s{i}", "echo", f"step {i}", "root") for i in range(998)]
    fan += [("join", "echo", "end", *[f"s{i}" for i in range(998)])]
    async with TaskloomClient(console.address) as client:
        # No worker: the graph is drawn from the plan.
        task_id = await client.submit("wide", plan=plan(*fan))
    await asyncio.to_thread(browser.get, f"http://127.0.0.1:{console.console.port}/tasks/{task_id}")
    await eventually(lambda: len(statuses(browser)) == 1000, timeout=60)
    width, height = browser.execute_script(
        "const b = document.getElementById('graph').viewBox.baseVal; return [b.width, b.height];"
    )
    # The wide layer wraps into columns: the whole graph fits one screen's shape.
    assert 0.2 < width / height < 12, (width, height)
    await click(browser, 'button[title="zoom in"]')
    smaller = browser.execute_script(
        "return document.getElementById('graph').viewBox.baseVal.width;"
    )
    assert smaller < width
