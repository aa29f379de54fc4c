"""The console in a real browser (headless Chromium driven by Playwright) against one real
`tidegate up` for the whole module: what an operator does at 00:05.

Chromium comes from Debian (`/usr/bin/chromium`; `.ci/run` installs it). Outside CI these tests
are skipped where no browser can be had; with CI=true a missing browser is a failure. Every
page's screenshot is saved under tests/screenshots/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from harness import wait_for
from receiver import Receiver
from upharness import START_S, Up, processes_of, tidegate_script, up_env

from tidegate.client import TidegateClient
from tidegate.embedded.servers import free_port
from tidegate.wire import TaskSpec

playwright_api = pytest.importorskip("playwright.async_api")

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(__file__).resolve().parents[1] / "screenshots"
T = TypeVar("T")


def _browser_or_skip() -> str:
    found = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("no Chromium: CI must have /usr/bin/chromium (apt-get install chromium)")
    pytest.skip("no Chromium on this machine (apt-get install chromium)")


@dataclass
class System:
    up: Up
    endpoints: dict[str, Any]
    username: str
    password: str

    @property
    def url(self) -> str:
        return str(self.endpoints["console_url"])

    @property
    def nats_url(self) -> str:
        return str(self.endpoints["nats_url"])

    def cli(self, *args: str) -> str:
        done = self.up.tidegate(*args)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    def task(self, task_id: str) -> dict[str, Any] | None:
        done = self.up.tidegate("task", "show", task_id, "--json")
        return json.loads(done.stdout) if done.returncode == 0 else None


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    _browser_or_skip()
    root = tmp_path_factory.mktemp("browser")
    data = root / "data"
    env = up_env(data)
    # Callbacks give up fast here, so a dead letter appears within seconds.
    env.update(
        TIDEGATE_RETRY_MAX_ATTEMPTS="2",
        TIDEGATE_RETRY_BASE_S="0.2",
        TIDEGATE_RETRY_CAP_S="0.5",
    )
    up = Up(
        script=tidegate_script(),
        data_dir=data,
        console_port=free_port(),
        env=env,
        cwd=root,
        extra=("--slots", "8"),
    )
    up.start()
    try:
        endpoints = up.wait_endpoints(START_S)
        # The login as `up` printed it, not only as it wrote it.
        printed = re.search(r"operator login: (\S+) \(password (\S+)\)", up.out.read_text())
        assert printed, up.diagnostics()
        assert endpoints["operator"] == {
            "username": printed.group(1),
            "password": printed.group(2),
        }
        yield System(up, endpoints, printed.group(1), printed.group(2))
    finally:
        if up.proc is not None and up.proc.poll() is None:
            up.interrupt()
        for proc in processes_of(data):
            proc.kill()


@pytest.fixture
async def page(system: System) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=_browser_or_skip(), args=ARGS)
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        tab = await context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.on(
            "console",
            lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
        )
        await login(tab, system)
        yield tab
        await browser.close()
        assert not errors, errors  # no script error, nothing the CSP had to block


async def login(tab: Any, system: System) -> None:
    await tab.goto(system.url + "/")
    assert "/login" in tab.url  # pages need a login
    await tab.fill("input[name=username]", system.username)
    await tab.fill("input[name=password]", system.password)
    await tab.click("button[type=submit]")
    await tab.wait_for_url(system.url + "/")


async def shot(tab: Any, name: str) -> Path:
    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / f"{name}.png"
    await tab.screenshot(path=str(path), full_page=True)
    return path


async def poll(check: Callable[[], Awaitable[T | None]], *, timeout: float, what: str) -> T:
    result: T = await wait_for(check, timeout=timeout, interval=0.3, what=what)
    return result


async def submit(system: System, client: str, *specs: TaskSpec) -> list[str]:
    async with await TidegateClient.connect(system.nats_url, client) as tg:
        receipts = await tg.submit_many(specs)
    return [r.task_id for r in receipts]


def states_of(receiver: Receiver, task_id: str) -> list[str]:
    return [cb.state for cb in receiver.delivered() if cb.task_id == task_id]


# --- the tests -----------------------------------------------------------------------------------


async def test_log_in_with_the_printed_operator(page: Any, system: System) -> None:
    assert await page.locator("header .account").inner_text() != ""
    assert system.username in await page.locator("header").inner_text()
    await page.wait_for_selector("#overview-live [data-figure=running]")
    await shot(page, "overview")


async def test_the_overview_backlog_falls_while_2000_tasks_run(page: Any, system: System) -> None:
    system.cli("client", "add", "flood")
    ids = await submit(
        system, "flood", *(TaskSpec(key=f"f{i}", argv=["true"]) for i in range(2000))
    )
    assert len(ids) == 2000

    async def backlog() -> int | None:
        total = 0
        for figure in ("submitted", "ready", "work"):
            text = (await page.locator(f"[data-figure={figure}]").inner_text()).replace(",", "")
            if not text.isdigit():
                return None
            total += int(text)
        return total

    seen: list[int] = []

    async def drained() -> bool:
        value = await backlog()
        if value is not None:
            seen.append(value)
        return bool(seen) and seen[-1] == 0 and max(seen) > 0

    await poll(drained, timeout=180, what="the overview's backlog to fall to 0")
    peak = seen.index(max(seen))
    assert max(seen) >= 100, seen  # the page saw the flood waiting
    assert seen[peak:] == sorted(seen[peak:], reverse=True) or seen[-1] < max(seen), seen
    # The charts are drawn from the drivers' counters, live: the flood's line appears without
    # a reload (two complete 20 s buckets make a line).
    await page.locator("#chart-finished polyline").wait_for(timeout=90_000)
    await shot(page, "overview-after-flood")


async def test_flipping_sensitivity_changes_the_next_tasks_callbacks(
    page: Any, system: System
) -> None:
    async with Receiver() as receiver:
        system.cli("client", "add", "flip", "--callback-url", receiver.url())

        async def run_one(key: str) -> list[str]:
            (task_id,) = await submit(system, "flip", TaskSpec(key=key, argv=["true"]))

            async def terminal() -> list[str] | None:
                states = states_of(receiver, task_id)
                return states if "succeeded" in states else None

            return await poll(terminal, timeout=60, what=f"the callbacks of {task_id}")

        assert await run_one("before") == ["succeeded"]  # non-sensitive: terminal only

        await page.goto(system.url + "/clients")
        row = page.locator("#client-flip")
        await row.locator("button[name=toggle-sensitive]").click()
        # Not has_text="sensitive": "non-sensitive" contains it, and matches before the swap.
        await row.locator("button[name=toggle-sensitive]", has_text="make non-sensitive").wait_for()
        assert (await row.locator(".mode").inner_text()).strip() == "sensitive"
        await shot(page, "clients")
        assert await run_one("after") == ["dispatched", "running", "succeeded"]

        await page.locator("#client-flip button[name=toggle-sensitive]").click()
        await page.locator("#client-flip .mode", has_text="non-sensitive").wait_for()
        assert (await page.locator("#client-flip .mode").inner_text()).strip() == "non-sensitive"
        assert await run_one("again") == ["succeeded"]


async def test_a_paused_clients_tasks_show_as_its_backlog_and_run_on_resume(
    page: Any, system: System
) -> None:
    system.cli("client", "add", "sleepy")
    await page.goto(system.url + "/clients")
    await page.locator("#client-sleepy button[name=toggle-paused]").click()
    await page.locator("#client-sleepy strong", has_text="paused").wait_for()
    specs = [TaskSpec(key=f"s{i}", argv=["true"]) for i in range(20)]
    ids = await submit(system, "sleepy", *specs)

    async def backlog_shown() -> bool:
        await page.goto(system.url + "/clients")
        return (await page.locator("#client-sleepy .backlog").inner_text()).strip() == "20"

    await poll(backlog_shown, timeout=30, what="the paused client's 20 tasks as its backlog")
    # Held back, not run: the database knows them as queued (or not yet at all).
    assert (system.task(ids[0]) or {}).get("state") in (None, "queued")
    await shot(page, "clients-paused")

    await page.locator("#client-sleepy button[name=toggle-paused]").click()
    await page.locator("#client-sleepy button[name=toggle-paused]", has_text="pause").wait_for()

    async def all_ran() -> bool:
        return all((system.task(i) or {}).get("state") == "succeeded" for i in ids)

    await poll(all_ran, timeout=60, what="the resumed client's tasks to succeed")


async def test_a_dead_lettered_callback_is_re_driven_and_delivered(
    page: Any, system: System
) -> None:
    healthy = False

    def respond(path: str, body: bytes) -> int:
        return 200 if healthy else 500

    async with Receiver(respond=respond) as receiver:
        system.cli("client", "add", "flaky", "--callback-url", receiver.url())
        (task_id,) = await submit(system, "flaky", TaskSpec(key="dl", argv=["true"]))

        async def dead_letter_shown() -> bool:
            await page.goto(system.url + "/callbacks?client=flaky")
            return await page.locator("button[name=redrive]").count() > 0

        await poll(dead_letter_shown, timeout=60, what="the callback in the dead letters")
        assert not receiver.delivered()
        await shot(page, "callbacks")

        healthy = True
        await page.locator("button[name=redrive]").first.click()

        async def delivered() -> bool:
            return "succeeded" in states_of(receiver, task_id)

        await poll(delivered, timeout=30, what="the re-driven callback to arrive")


async def test_cancel_a_running_task(page: Any, system: System) -> None:
    (task_id,) = await submit(
        system, "demo", TaskSpec(key=f"long-{time.time_ns()}", argv=["sleep", "60"])
    )

    async def running() -> bool:
        return (system.task(task_id) or {}).get("state") == "running"

    await poll(running, timeout=60, what=f"{task_id} to run")
    await page.goto(system.url + "/tasks?client=demo")
    await shot(page, "tasks")
    await page.locator(f'[data-task="{task_id}"] a').click()
    await page.wait_for_selector("#task-state")
    page.once("dialog", lambda dialog: dialog.accept())
    await page.locator("button[name=cancel]").click()
    await page.locator("#task-actions", has_text="cancel requested").wait_for()
    await shot(page, "task")

    async def cancelled() -> bool:
        return (system.task(task_id) or {}).get("state") == "cancelled"

    await poll(cancelled, timeout=30, what=f"{task_id} to be cancelled")


async def test_every_other_page_renders(page: Any, system: System) -> None:
    for path, name in (("/executors", "executors"), ("/audit", "audit"), ("/account", "account")):
        answer = await page.goto(system.url + path)
        assert answer is not None and answer.status == 200, path
        await shot(page, name)
    # The audit log holds what the tests above did through the console.
    await page.goto(system.url + "/audit")
    assert "client.sensitive" in await page.content()
