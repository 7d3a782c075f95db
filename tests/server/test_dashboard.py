"""The dashboard in a real headless Chromium against a live server.

Chromium is Debian's (``/usr/bin/chromium``, or ``ACCORD_CHROMIUM``), driven
by Playwright without downloading a browser. Without it these tests skip
locally and FAIL in CI (``CI`` set), which installs it (.ci/run).

With ``ACCORD_SCREENSHOT_DIR`` set, the screenshots taken under the test's
tmp dir are also copied there (``ACCORD_SCREENSHOT_DIR=docs/img`` refreshes
docs/img/dashboard.png); otherwise the source tree is never written.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from accord import Call, Outcome, Reply

from .conftest import FakeParticipants, LiveServer, order_body

pytestmark = pytest.mark.timeout(180)

CHROMIUM = os.environ.get("ACCORD_CHROMIUM", "/usr/bin/chromium")
XSS = '<img src=x onerror="window.__xss = 1">'
WAIT_MS = 15_000
EMPTY = "\u2013"  # what a counter shows before the first poll


def chromium_path() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    message = f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    problems: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        # A 401 the page provokes on purpose shows as a failed resource load.
        if msg.type == "error" and "401" not in msg.text:
            problems.append(msg.text)

    p.on("console", on_console)
    p.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    yield p
    context.close()
    assert problems == [], problems  # no script error, no CSP violation


class MarkupErrors(FakeParticipants):
    """Fake participants whose transient errors carry markup while ``markup`` is on."""

    markup = False

    def handler(self, name: str) -> Callable[[Call], Any]:
        inner = super().handler(name)

        def handle(call: Call) -> Any:
            reply = inner(call)
            if self.markup and isinstance(reply, Reply) and reply.outcome is Outcome.TRANSIENT:
                return reply._replace(error=f"{XSS} {reply.error}")
            return reply

        return handle


class Api:
    def __init__(self, live: LiveServer, http: httpx.Client) -> None:
        self.live = live
        self.http = http

    def submit(self, txid: str, **extra: Any) -> None:
        resp = self.http.post("/v1/transactions", json=order_body(txid, **extra))
        assert resp.status_code in (200, 201, 202), resp.text

    def get(self, txid: str) -> dict[str, Any]:
        resp = self.http.get(f"/v1/transactions/{txid}")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def wait_status(self, txid: str, *statuses: str, timeout_s: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            txn = self.get(txid)
            if txn["status"] in statuses:
                return txn
            if time.monotonic() > deadline:
                raise AssertionError(f"{txid} is {txn['status']}, not {statuses}")
            time.sleep(0.05)


@pytest.fixture
def connect() -> Iterator[Callable[[LiveServer], Api]]:
    """Api clients for live servers, closed at the end of the test."""
    clients: list[httpx.Client] = []

    def make(live: LiveServer) -> Api:
        http = httpx.Client(base_url=live.url, headers=live.headers, timeout=30)
        clients.append(http)
        return Api(live, http)

    yield make
    for http in clients:
        http.close()


def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not an empty image
    target = os.environ.get("ACCORD_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def sign_in(page: Page, live: LiveServer) -> None:
    page.goto(f"{live.url}/")
    expect(page.locator("#conn")).to_have_text("token needed")
    page.fill("#token", live.token)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)


def bars(page: Page) -> list[tuple[str, str, str, str]]:
    """(branch, op, attempt, outcome) of every bar drawn on the timeline."""
    found = page.eval_on_selector_all(
        "#timeline g.bar",
        "els => els.map(e => [e.dataset.branch, e.dataset.op, e.dataset.attempt,"
        " e.dataset.outcome])",
    )
    return sorted(tuple(bar) for bar in found)


def timeline_of(txn: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    return sorted(
        (b["name"], a["op"], str(a["attempt"]), a["outcome"])
        for b in txn["branches"]
        for a in b["timeline"]
    )


def test_dashboard_lists_shows_timelines_and_acts(
    live_server_factory: Callable[..., LiveServer],
    page: Page,
    connect: Callable[[LiveServer], Api],
    tmp_path: Path,
) -> None:
    """Sign in with the token, see submitted transactions appear in the list
    (and the filter work), open one and see one bar per attempt, retry a
    parked one, abort a hanging one, resolve another parked one."""
    participants = MarkupErrors()
    live = live_server_factory(participants=participants)
    api = connect(live)
    sign_in(page, live)

    # Some load first, so that the counters and the chart have something to show.
    for i in range(40):
        api.submit(f"load-{i:03d}")
        time.sleep(0.05)
    api.submit("dash-ok")
    committed = api.wait_status("dash-ok", "committed")
    row = page.locator('#txn-rows tr[data-id="dash-ok"]')
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(row.locator(".badge")).to_have_text("committed")
    expect(page.locator("#c-committed")).not_to_have_text(EMPTY, timeout=WAIT_MS)

    # One bar per attempt: four tries and four confirms, all ok.
    row.locator("a").click()
    expect(page.locator("#txn-title")).to_have_text("dash-ok")
    expect(page.locator("#timeline g.bar")).to_have_count(8, timeout=WAIT_MS)
    assert bars(page) == timeline_of(committed)
    assert {outcome for *_, outcome in bars(page)} == {"ok"}
    expect(page.locator("#act-abort")).to_be_hidden()
    expect(page.locator("#act-retry")).to_be_hidden()
    expect(page.locator("#act-resolve")).to_be_hidden()

    # A transaction whose shipping keeps failing parks as needs_attention.
    participants.mode["shipping"] = "fail"
    api.submit("dash-stuck")
    stuck = api.wait_status("dash-stuck", "needs_attention")
    page.goto(f"{live.url}/#/txn/dash-stuck")
    expect(page.locator("#txn-facts .badge")).to_have_text("needs_attention", timeout=WAIT_MS)
    expect(page.locator("#timeline g.bar")).to_have_count(
        sum(len(b["timeline"]) for b in stuck["branches"]), timeout=WAIT_MS
    )
    assert bars(page) == timeline_of(stuck)
    assert ("shipping", "try", "2", "transient") in bars(page)
    expect(page.locator('#branch-rows tr[data-branch="shipping"] td.err')).to_contain_text(
        "shipping is down"
    )
    expect(page.locator("#act-retry")).to_be_visible()
    expect(page.locator("#act-resolve")).to_be_visible()
    expect(page.locator("#act-abort")).to_be_hidden()

    # The operator repairs shipping and retries, giving a reason.
    participants.mode["shipping"] = "ok"
    page.click("#act-retry")
    page.fill("#reason", "shipping service restarted")
    page.click("#reason-ok")
    expect(page.locator("#txn-facts .badge")).to_have_text("aborted", timeout=WAIT_MS)
    expect(page.locator("#operator-actions .reason")).to_have_text("shipping service restarted")
    retried = api.get("dash-stuck")
    assert [(a["action"], a["reason"]) for a in retried["operator_actions"]] == [
        ("retry", "shipping service restarted")
    ]
    expect(page.locator("#timeline g.bar")).to_have_count(
        len(timeline_of(retried)), timeout=WAIT_MS
    )
    expect(page.locator("#call-rows tr")).to_have_count(len(timeline_of(retried)))
    expect(page.locator("#act-retry")).to_be_hidden()
    expect(page.locator("#c-aborted")).to_have_text("1", timeout=WAIT_MS)  # fresh counters
    screenshot(page, tmp_path, "dashboard.png")

    # A transaction hanging in prepare can be aborted from the page.
    participants.mode["payment"] = "hang"
    api.submit("dash-hang")
    page.goto(f"{live.url}/#/txn/dash-hang")
    expect(page.locator("#txn-facts .badge")).to_have_text("preparing", timeout=WAIT_MS)
    expect(page.locator('#timeline g.bar[data-outcome="in_flight"]')).to_have_count(
        1, timeout=WAIT_MS
    )
    page.click("#act-abort")
    page.fill("#reason", f"customer cancelled {XSS}")
    page.click("#reason-ok")
    expect(page.locator("#action-result")).to_contain_text("abort: done")
    participants.mode["payment"] = "ok"
    live.call(participants.release)  # the hanging try answers; its cancel follows
    expect(page.locator("#txn-facts .badge")).to_have_text("aborted", timeout=WAIT_MS)
    assert api.get("dash-hang")["decision"] == "abort"
    expect(page.locator("#act-abort")).to_be_hidden()
    expect(page.locator("#operator-actions .reason")).to_have_text(f"customer cancelled {XSS}")

    # Markup in a participant's error stays text; a parked one is resolved.
    participants.markup = True
    participants.mode["order"] = "fail"
    api.submit("dash-markup")
    parked = api.wait_status("dash-markup", "needs_attention")
    page.goto(f"{live.url}/#/txn/dash-markup")
    expect(page.locator("#txn-facts .badge")).to_have_text("needs_attention", timeout=WAIT_MS)
    expect(page.locator("#timeline g.bar")).to_have_count(len(timeline_of(parked)))
    expect(page.locator('#branch-rows tr[data-branch="order"] td.err')).to_contain_text(
        f"{XSS} order is down"
    )
    expect(page.locator("#call-rows")).to_contain_text(f"{XSS} order is down")
    page.click("#act-resolve")
    page.fill("#reason", "order cancelled by hand in the order service")
    page.click("#reason-ok")
    expect(page.locator("#txn-facts .badge")).to_have_text("aborted", timeout=WAIT_MS)
    resolved = api.get("dash-markup")
    assert [a["action"] for a in resolved["operator_actions"]] == ["resolve"]
    expect(page.locator("#act-resolve")).to_be_hidden()

    # Back to the list: filtering by state shows only the aborted three.
    page.click("text=← all transactions")
    page.select_option("#state-filter", "aborted")
    expect(page.locator("#txn-rows tr")).to_have_count(3, timeout=WAIT_MS)
    ids = page.eval_on_selector_all("#txn-rows tr", "rows => rows.map(r => r.dataset.id)")
    assert sorted(ids) == ["dash-hang", "dash-markup", "dash-stuck"]
    assert page.locator("img").count() == 0
    assert page.evaluate("window.__xss") is None


@pytest.mark.parametrize("ci", ["", "1"])
def test_a_missing_chromium_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str
) -> None:
    """The browser tests never pass silently in CI for want of a browser."""
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", str(tmp_path / "none"))
    if ci:
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
            chromium_path()
    else:
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
            chromium_path()


def test_dashboard_counters_follow_the_stats(
    live_server: LiveServer, page: Page, connect: Callable[[LiveServer], Api]
) -> None:
    """The counters show /v1/stats, and the chart is drawn (non-blank canvas)."""
    api = connect(live_server)
    sign_in(page, live_server)
    for i in range(5):
        api.submit(f"c-{i}")
    for i in range(5):
        api.wait_status(f"c-{i}", "committed")
    expect(page.locator("#c-committed")).to_have_text("5", timeout=WAIT_MS)
    expect(page.locator("#c-started")).to_have_text("5")
    expect(page.locator("#c-in_flight")).to_have_text("0")
    stats = api.http.get("/v1/stats").json()
    expect(page.locator("#c-calls")).to_have_text(str(stats["calls"]))
    painted = page.evaluate(
        """() => {
            const c = document.getElementById('throughput');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
            return n;
        }"""
    )
    assert painted > 100  # axes, grid and labels at least


def test_dashboard_needs_the_right_token(live_server: LiveServer, page: Page) -> None:
    """Without a token nothing is loaded; a wrong one is reported as refused;
    the token is kept for the tab (sessionStorage), not beyond."""
    page.goto(f"{live_server.url}/")
    expect(page.locator("#conn")).to_have_text("token needed")
    expect(page.locator("#txn-rows tr")).to_have_count(0)
    page.fill("#token", "not-the-token-0123456789")
    page.click("#token-form button[type=submit]")
    expect(page.locator("#conn")).to_have_text("token refused", timeout=WAIT_MS)
    expect(page.locator("#error")).to_contain_text("refused this token")
    page.fill("#token", live_server.token)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)
    page.reload()
    expect(page.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)
    stored = page.evaluate("sessionStorage.getItem('accord.token')")
    assert stored == live_server.token
    assert page.evaluate("localStorage.length") == 0


def test_dashboard_pages_through_the_list(
    live_server: LiveServer, page: Page, connect: Callable[[LiveServer], Api]
) -> None:
    """50 rows a page; "Load more" follows next_cursor until the list is complete."""
    api = connect(live_server)
    for i in range(55):
        api.submit(f"p-{i:02d}")
    api.wait_status("p-54", "committed")
    sign_in(page, live_server)
    expect(page.locator("#txn-rows tr")).to_have_count(50, timeout=WAIT_MS)
    expect(page.locator("#more")).to_be_visible()
    page.click("#more")
    expect(page.locator("#txn-rows tr")).to_have_count(55, timeout=WAIT_MS)
    expect(page.locator("#more")).to_be_hidden()
    ids = page.eval_on_selector_all("#txn-rows tr", "rows => rows.map(r => r.dataset.id)")
    assert sorted(ids) == [f"p-{i:02d}" for i in range(55)]
