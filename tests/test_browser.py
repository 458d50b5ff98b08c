"""The report in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by ``.ci/run``) through Selenium renders it without console
errors and shows every plot. Skipped, with the reason, where the browser is not installed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_audit_fixtures import synthetic_audit, tiny_experiment

from prunescope.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None)
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed (pip install '.[test]')")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="headless Chromium is not installed: apt-get install chromium chromium-driver",
)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,3000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, path: Path) -> dict:
    browser.get(path.resolve().as_uri())
    state = browser.execute_script("""
        const images = Array.from(document.images);
        return {
            ready: document.readyState,
            images: images.length,
            broken: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
            shown: images.filter(i => i.getBoundingClientRect().width > 100).length,
            headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
            text: document.body.innerText,
        };
    """)
    state["errors"] = [entry for entry in browser.get_log("browser")
                       if entry["level"] in ("SEVERE", "ERROR")]
    return state


def test_experiment_report_renders_with_its_plots(browser):
    state = _open(browser, tiny_experiment() / "report.html")
    assert state["ready"] == "complete"
    assert state["errors"] == []
    assert state["broken"] == []
    assert state["images"] >= 7 and state["shown"] == state["images"]
    assert state["headings"][:2] == ["Headline", "Figures"]
    assert "compression-identified" in state["text"]


def test_group_report_renders(browser, tmp_path):
    path = tmp_path / "report.html"
    write_report(synthetic_audit(), path)
    state = _open(browser, path)
    assert state["errors"] == [] and state["broken"] == []
    assert state["images"] >= 5
    assert "Bias amplification" in state["text"]
