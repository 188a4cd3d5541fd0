"""The web page in headless Chromium: upload a demo photo, get the same landmark; crop box; click a result."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cbir.index import Index
from cbir.index.embed import QueryEncoder, model_settings

pytestmark = [pytest.mark.browser, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[1] / "src" / "cbir" / "data" / "demo" / "jpg"
QUERY = "paris_eiffel_000266"  # a demo query photo (not in the index)
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900"]


def landmark(name: str) -> str:
    return name.split("_")[1]


def chrome_paths() -> tuple[str, str]:
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless browser test needs chromium + chromedriver (Debian: apt-get install chromium "
                    "chromium-driver; `make browser-deps`)")
    pytest.importorskip("selenium")
    return browser, driver


@pytest.fixture()
def driver(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = chrome_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def test_page_finds_the_same_landmark(driver, tmp_path, rparis250, rparis250_gnd, rparis250_lite0):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from cbir.model import build_model
    from cbir.server import BackgroundServer, create_app

    query = DEMO / f"{QUERY}.jpg"
    if not query.is_file():
        pytest.skip(f"bundled demo photo missing: {query}")
    lite0 = build_model("efficientnet_lite0", pooling="gem")
    source = {"model": "efficientnet_lite0", "pooling": "gem", "weights": "default", "pooling_kw": {}}
    settings = model_settings(lite0, source, 512, (1.0,))
    idx = Index(lite0.dim, "exact", settings=settings, device="cpu")
    idx.add(rparis250_lite0["db"], [str(rparis250 / "jpg" / f"{n}.jpg") for n in rparis250_gnd["imlist"]])
    app = create_app(idx, index_path=tmp_path / "ix", encoder=QueryEncoder(settings, model=lite0, device="cpu"),
                     device="cpu")

    def result_names():
        return [c.get_attribute("data-name") for c in driver.find_elements(By.CSS_SELECTOR, "#results .result")]

    with BackgroundServer(app) as url:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 180)
        wait.until(EC.text_to_be_present_in_element((By.ID, "info"), "238 images"))
        driver.find_element(By.ID, "file").send_keys(str(query))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "results in"))
        names = result_names()
        assert len(names) == 20
        assert landmark(names[0]) == landmark(QUERY), names[:5]
        assert sum(landmark(n) == landmark(QUERY) for n in names[:5]) >= 3, names[:5]
        scores = [float(s.text) for s in driver.find_elements(By.CSS_SELECTOR, "#results .score")]
        assert scores == sorted(scores, reverse=True)
        # every thumbnail loaded from the server
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        shot = os.environ.get("CBIR_SCREENSHOT") or str(tmp_path / "page.png")
        driver.save_screenshot(shot)

        # draw a crop box on the preview: the search repeats inside the box
        stage = driver.find_element(By.ID, "preview")
        w, h = stage.size["width"], stage.size["height"]
        ActionChains(driver).move_to_element_with_offset(stage, -w // 4, -h // 4).click_and_hold() \
            .move_by_offset(w // 2, h // 2).release().perform()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "inside the box"))
        assert driver.find_element(By.ID, "box").is_displayed()
        assert len(result_names()) == 20

        # click the third result: a search by that indexed image, which comes back first
        third = driver.find_elements(By.CSS_SELECTOR, "#results .result")[2]
        clicked = int(third.get_attribute("data-id"))
        third.click()
        wait.until(EC.visibility_of_element_located((By.ID, "query-by-id")))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result")
                   and int(d.find_elements(By.CSS_SELECTOR, "#results .result")[0].get_attribute("data-id")) == clicked)
