"""The HTML leaderboards in a real headless Chromium: sorting by a header click, plots loaded, no console errors.

Needs Debian's `chromium` and `chromium-driver` and selenium (`make test` installs them where it can);
without them the test is skipped with one line saying what to install. Screenshots go to tmp_path, and
also to $SAEBENCH_SCREENSHOTS when set.
"""

import os
import shutil
from pathlib import Path

import pytest

from saebench.leaderboard import write_leaderboards
from saebench.runner import RunConfig, evaluate

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install selenium (make test installs it)")
    if not CHROMIUM or not DRIVER:
        pytest.skip("no headless Chromium: apt-get install chromium chromium-driver (make test does, as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1366,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_tokenizer):
    """Leaderboards of ce_kl on a tiny Llama (a TopK SAE and the baselines) and of a small synthetic grid."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from tests.conftest import make_tiny

    tmp = tmp_path_factory.mktemp("site")
    TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_pre"))
            ).save_model(tmp / "sae")
    runs = tmp / "runs"
    config = RunConfig(output_dir=runs, limit=512, context_len=32, progress=False)
    evaluate(make_tiny("llama", tiny_tokenizer), [f"sae:{tmp / 'sae'}", f"ito:sae:{tmp / 'sae'}", "identity", "zero",
                                                   "mean"], ["ce_kl"], config)
    evaluate(None, ["linear_sae", "ito"], ["synthetic?seeds=2&steps=50&regimes=known_dict&train_samples=64&test_samples=64"
                                    "&grid=8,4,2"], RunConfig(output_dir=runs, progress=False))
    write_leaderboards(runs, tmp / "lb")
    return tmp / "lb"


def _screenshot(driver, tmp_path: Path, name: str) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1366, min(max(900, height), 6000))
    driver.save_screenshot(str(tmp_path / name))
    if folder := os.environ.get("SAEBENCH_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(folder) / name)
    driver.set_window_size(1366, 900)


def _column(driver, table, index: int) -> list[str]:
    return [row.find_elements("tag name", "td")[index].text for row in table.find_elements("css selector", "tbody tr")]


def _numbers(texts: list[str]) -> list[float | None]:
    return [None if t in ("—", "") else float(t.split("±")[0]) for t in texts]


def test_clicking_a_header_sorts_the_table(browser, site, tmp_path):
    browser.get((site / "ce_kl.html").as_uri())
    table = browser.find_element("tag name", "table")
    headers = [th.text for th in table.find_elements("css selector", "thead th")]
    kl = headers.index("kl")
    before = _column(browser, table, kl)
    table.find_elements("css selector", "thead th")[kl].click()
    ascending = _numbers(_column(browser, table, kl))
    assert ascending != _numbers(before)  # the page is ranked by ce_loss_recovered; kl ascending differs
    present = [v for v in ascending if v is not None]
    assert present == sorted(present) and ascending[:len(present)] == present  # numbers up, missing last
    table.find_elements("css selector", "thead th")[kl].click()
    descending = _numbers(_column(browser, table, kl))
    assert [v for v in descending if v is not None] == sorted(present, reverse=True)
    encoder = headers.index("encoder")
    table.find_elements("css selector", "thead th")[encoder].click()
    names = _column(browser, table, encoder)
    assert names == sorted(names, key=str.lower)
    _screenshot(browser, tmp_path, "ce_kl-sorted-by-encoder.png")


@pytest.mark.parametrize("page", ["index.html", "ce_kl.html", "synthetic.html"])
def test_every_plot_loads_and_the_console_is_clean(browser, site, page, tmp_path):
    browser.get((site / page).as_uri())
    images = browser.execute_script("return Array.from(document.images).map(i => [i.src, i.naturalWidth])")
    if page != "index.html":  # ce_kl: two trade-off plots; synthetic: the grid's heatmap
        assert len(images) >= {"ce_kl.html": 2, "synthetic.html": 1}[page]
    assert all(width > 0 for _, width in images), images
    links = browser.execute_script("return Array.from(document.querySelectorAll('a')).map(a => a.href)")
    assert all(link.startswith("file://") for link in links)  # no network: every link is local
    assert not [line for line in browser.get_log("browser") if line["level"] == "SEVERE"]
    assert "saebench" in browser.find_element("tag name", "footer").text
    _screenshot(browser, tmp_path, page.replace(".html", ".png"))
