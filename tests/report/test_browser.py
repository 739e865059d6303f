"""Each study's report page loaded in a real headless browser (Debian's chromium through selenium):
every figure has rendered, and the regime checks and claims tables are there.

Run by .ci/run after scripts/install-browser; skipped where chromium is absent, unless
BATCHSCOPE_REQUIRE_BROWSER=1 (as in CI), when its absence is a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

from batchscope import reproduce as rp
from batchscope.studies import STUDIES, Options

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("BATCHSCOPE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium or chromedriver not found: run scripts/install-browser")
        pytest.skip("chromium not installed (scripts/install-browser)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=opts)
    yield drv
    drv.quit()


PAGE_STATE = """
const imgs = Array.from(document.images);
return {
  ready: document.readyState,
  images: imgs.map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
  claim_rows: document.querySelectorAll('tr[id^="claim-"]').length,
  claims_heading: Array.from(document.querySelectorAll('h2')).some(h => h.textContent === 'Claims'),
  regime_rows: document.querySelectorAll('#regime tr[id^="regime-"]').length,
  first_section: document.querySelector('main section') ? document.querySelector('main section').id : null,
};
"""


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_report_renders_in_a_browser(study, browser, tmp_path, request):
    request.getfixturevalue(f"tiny_{study}")  # the study's tiny configuration (tests/conftest.py)
    out = tmp_path / "report"
    rp.reproduce(study, Options(scale="quick", seeds=3), tmp_path / "s.db", out, log=lambda s: None)
    browser.get((out / "index.html").resolve().as_uri())
    state = browser.execute_script(PAGE_STATE)
    assert state["ready"] == "complete"
    assert state["images"], f"{study}: the report has no figure"
    broken = [i["alt"][:60] for i in state["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, f"{study}: figures that did not render: {broken}"
    assert state["claims_heading"] and state["claim_rows"] > 0
    assert state["regime_rows"] > 0 and state["first_section"] == "regime"  # regime checks come first
    if os.environ.get("BATCHSCOPE_SCREENSHOTS"):
        browser.save_screenshot(os.path.join(os.environ["BATCHSCOPE_SCREENSHOTS"], f"{study}.png"))


def test_advice_report_renders_in_a_browser(browser, tmp_path):
    """`batchscope advise`'s page: its five figures render and its tables are there."""
    from batchscope.advise import advise
    from batchscope.spec import validate_run

    body = {"data": {"name": "mnist1d", "n_train": 1000, "n_test": 200}, "model": {"name": "mlp", "width": 0.25, "depth": 2},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "train": {"batch_size": 16, "epochs": 8}}
    advise(validate_run(body), "train_loss<=1.0", store=tmp_path / "s.db", out=tmp_path / "report", doublings=3,
           checkpoints=3, noise_pairs=10, noise_examples=512, executor="serial")
    browser.get((tmp_path / "report" / "index.html").resolve().as_uri())
    state = browser.execute_script(PAGE_STATE)
    assert state["ready"] == "complete" and len(state["images"]) == 5
    broken = [i["alt"][:60] for i in state["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, f"figures that did not render: {broken}"
    headings = browser.execute_script("return Array.from(document.querySelectorAll('h2, h3')).map(h => h.textContent)")
    assert {"Recommendation", "Figures", "Tables", "checkpoints", "recipe arms"} <= set(headings)
