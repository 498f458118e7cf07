"""The page at GET / in a real headless browser (Debian's chromium through chromium-driver): a digit
is uploaded and classified, every conv layer shows its feature maps, filters and arithmetic, errors
are one readable line and the page keeps working after them, and nothing breaks its security policy."""

import os
import shutil

import pytest

from .conftest import ROOT

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install chromium-driver)"
)
DIGIT = os.path.join(ROOT, "examples", "digits", "3-test13.png")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _upload(driver, path):
    from selenium.webdriver.common.by import By

    driver.execute_script(
        "document.getElementById('bars').innerHTML = ''; document.getElementById('layers').innerHTML = ''"
    )
    driver.find_element(By.ID, "file").send_keys(path)


def test_the_page_classifies_a_digit_and_shows_every_conv_layer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{server.http_port}/")
    _wait(browser, lambda d: "digits" in [o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")])
    assert browser.find_elements(By.CSS_SELECTOR, "#examples img")  # the example digits are offered
    _upload(browser, DIGIT)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .bar"))
    top = browser.find_element(By.CSS_SELECTOR, "#bars .bar .label").text
    assert top == "3"
    metrics = browser.find_element(By.ID, "metrics").text
    assert "batch" in metrics and "compute" in metrics and "server total" in metrics
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".layer .filters canvas")) > 0)
    layers = browser.find_elements(By.CSS_SELECTOR, ".layer")
    assert [layer.get_attribute("data-layer") for layer in layers][:1] == ["conv1"]
    first = layers[0]
    assert len(first.find_elements(By.CSS_SELECTOR, ".grid:not(.filters) canvas")) == 32  # one tile per channel
    tile = first.find_element(By.CSS_SELECTOR, ".grid canvas")
    assert tile.get_attribute("title").startswith("channel 0, 32×32, min ")
    assert "floor((32 + 2·1 − 3)/1) + 1 = 32" in first.find_element(By.CSS_SELECTOR, ".arith").text
    # not an image: one readable line, and the page keeps working
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is no picture")
    _upload(browser, str(junk))
    _wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    error = browser.find_element(By.ID, "error").text
    assert "\n" not in error and ("PNG" in error or "image" in error), error
    browser.find_element(By.ID, "fp16").click()  # half the bytes, the same answer
    _upload(browser, DIGIT)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .bar"))
    assert browser.find_element(By.CSS_SELECTOR, "#bars .bar .label").text == "3"
    assert not browser.find_element(By.ID, "error").is_displayed()
    violations = [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert violations == []
