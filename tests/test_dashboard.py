"""The dashboard at /ui/ (docs/operations.md, "The dashboard"), in Debian's headless Chromium
driven by selenium, against a real ``poolq api`` with tokens on, placement, and a real node
agent running the jobs.

The test takes the screenshots in docs/screenshots/ as it goes, so they show the
dashboard as it is. Without chromium and chromedriver (``make test`` installs them as
root, tools/ensure_packages.sh) it does not run, and says so.
"""

from __future__ import annotations

import http.client
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis

from api_shim.app import App
from poolq import tokens
from poolq.embedded import free_port
from tests import kit
from tests.kit import Placement
from tests.procs import Proc, wait_for
from tests.wsgi import call

pytestmark = [pytest.mark.browser, pytest.mark.processes]

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
STEP_S = 30.0  # a functional deadline: each thing the page should show, it shows well within it
HOSTILE = "<script>window.pwned = 1</script><img src=x onerror=window.pwned=2>"
TALKER = "for i in $(seq 1 600); do echo line $i; sleep 0.1; done"


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium and chromedriver on PATH (apt-get install chromium chromium-driver, as make test does as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                     "--disable-gpu", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(STEP_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def stack(start_proc: Callable[..., Proc], placement: Placement, app: App) -> int:
    """A ``poolq api`` with tokens on, placement in-process and a node agent ``n1``; the API's port."""
    node = start_proc(["node", "--id", "n1", "--cpus", "4", "--memory", "4Gi"],
                      env={"POOLQ_STOP_GRACE_S": "1", "POOLQ_HEARTBEAT_S": "0.5"}, name="node-n1")
    port = free_port()
    api = start_proc(["api", "--port", str(port), "--workers", "1"], env={"POOLQ_AUTH": "tokens"}, name="api")

    def ready() -> bool:
        assert api.alive(), f"poolq api exited:\n{api.output()}"
        assert node.alive(), f"poolq node exited:\n{node.output()}"
        try:
            status = _get(port, "/livez")[0]
        except OSError:
            return False
        return status == 200 and any(n["alive"] for n in call(app, "GET", "/api/nodes").json)

    wait_for(ready, kit.START_S, 0.2, what="poolq api and node n1")
    return port


def _get(port: int, path: str) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, {name.lower(): value for name, value in response.getheaders()}
    finally:
        conn.close()


class Page:
    """The dashboard in the browser, in the words of what a person does and sees."""

    def __init__(self, driver: Any, port: int):
        from selenium.webdriver.common.by import By

        self.driver, self.port, self.by = driver, port, By

    def open(self, hash_: str = "#/jobs") -> None:
        self.driver.get(f"http://127.0.0.1:{self.port}/ui/{hash_}")

    def sign_in(self, token: str) -> None:
        field = self.find("#token")
        field.clear()
        field.send_keys(token)
        self.click("#identity button")
        self.wait(lambda: self.text("#whoami").startswith("tenant "), "the page to know its tenant")

    def find(self, css: str) -> Any:
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        """The rendered text of the first match, read in one step: the page replaces a row
        when its job changes, so an element found a moment ago may be gone."""
        script = "const found = document.querySelector(arguments[0]); return found ? found.innerText : '';"
        return str(self.driver.execute_script(script, css))

    def click(self, css: str) -> None:
        from selenium.common.exceptions import StaleElementReferenceException

        def clicked() -> bool:
            try:
                self.find(css).click()
                return True
            except StaleElementReferenceException:  # replaced between finding and clicking: find it again
                return False

        self.wait(clicked, f"{css} to click")

    def wait(self, predicate: Callable[[], Any], what: str) -> None:
        wait_for(lambda: bool(predicate()), STEP_S, 0.2, what=f"the dashboard to show {what}")

    def row(self, submission_id: str) -> str:
        return self.text(f'#jobs tr[data-id="{submission_id}"]')

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def test_the_dashboard_follows_jobs_live_stops_one_escapes_everything_and_keeps_tenants_apart(
        browser: Any, stack: int, app: App, redis_client: redis.Redis) -> None:
    alice, mallory = tokens.create(redis_client, "alice"), tokens.create(redis_client, "mallory")
    status, headers = _get(stack, "/ui/")
    assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    done = kit.submit(app, {**kit.JOB, "submission_id": "app-done", "metadata": {"note": HOSTILE}}, tenant="alice")
    kit.wait_status(app, done, "SUCCEEDED", tenant="alice")

    page = Page(browser, stack)
    page.open()
    page.wait(lambda: "tokens on" in page.text("#notice"), "that it needs a token")
    page.sign_in(alice)
    page.wait(lambda: "SUCCEEDED" in page.row(done), "the job submitted before it opened")
    assert HOSTILE in page.row(done)  # metadata shown as the text it is
    assert browser.execute_script("return window.pwned") is None and not page.all("#jobs img")
    browser.execute_script("window.stillTheSamePage = true")

    # A job submitted while the page is open appears, and changes status, without a reload.
    talker = kit.submit(app, {**kit.JOB, "submission_id": "app-talker", "entrypoint": TALKER}, tenant="alice")
    page.wait(lambda: "RUNNING" in page.row(talker), "the new job running")
    assert browser.execute_script("return window.stillTheSamePage") is True
    page.shot("jobs")

    # Its page: the record and the log, which grows as the job writes it.
    page.click(f'#jobs tr[data-id="{talker}"] a')
    page.wait(lambda: "line 3" in page.text("#log"), "the running job's output")
    first = len(page.text("#log"))
    page.wait(lambda: len(page.text("#log")) > first and "line 12" in page.text("#log"), "the output growing")
    assert "RUNNING" in page.text("#record")
    page.shot("job")

    # A stop from the page stops the job.
    page.click("#stop")
    page.wait(lambda: "STOPPED" in page.text("#record"), "the job stopped")
    assert kit.record(app, talker, tenant="alice")["status"] == "STOPPED"
    assert browser.execute_script("return window.stillTheSamePage") is True

    page.click("#nav-pools")
    page.wait(lambda: page.all('#nodes tr[data-node="n1"] meter'), "node n1 with its resources")
    assert "live" in page.text('#nodes tr[data-node="n1"]')
    page.shot("pools")
    page.click("#nav-overview")
    page.wait(lambda: page.all("#queue-chart") and "alice" in page.text("h2"), "the queue and quota page")
    page.shot("overview")

    # Another tenant's token sees none of it: not in the list, and its page is a 404.
    page.click("#nav-jobs")
    page.sign_in(mallory)
    page.wait(lambda: page.text("#whoami") == "tenant mallory" and page.all("#jobs"), "mallory's empty list")
    page.wait(lambda: not page.all("#jobs tbody tr"), "no rows for mallory")
    page.open(f"#/jobs/{done}")
    page.wait(lambda: "No such job" in page.text("#record"), "another tenant's job as not found")
    assert HOSTILE not in page.text("body") and "app-talker" not in page.text("body")
