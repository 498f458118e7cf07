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


def _in_process_label(repository) -> str:
    """The top label in-process onnxruntime gives the digit, preprocessed as the contract says."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    from convserve.contract import ModelCard, normalize, resize_image

    folder = os.path.join(str(repository), "digits", "1")
    card = ModelCard.read(folder)
    with Image.open(DIGIT) as image:
        batch = normalize(resize_image(image, card.preprocess)[None], card.preprocess)
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": batch})
    return card.labels[int(np.argmax(logits[0]))]


def test_the_page_classifies_a_digit_and_shows_every_conv_layer(server, served_repository, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from convserve.contract import ModelCard

    card = ModelCard.read(os.path.join(str(served_repository), "digits", "1"))

    browser.get(f"http://127.0.0.1:{server.http_port}/")
    _wait(browser, lambda d: "digits" in [o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")])
    assert browser.find_elements(By.CSS_SELECTOR, "#examples img")  # the example digits are offered
    _upload(browser, DIGIT)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .bar"))
    top = browser.find_element(By.CSS_SELECTOR, "#bars .bar .label").text
    assert top == _in_process_label(served_repository)
    metrics = browser.find_element(By.ID, "metrics").text
    assert "batch" in metrics and "compute" in metrics and "server total" in metrics
    assert "version 1 (FP32)" in metrics  # the served version and its precision
    maps = {f["name"]: f["shape"] for f in card.feature_maps}
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".layer .filters")) == len(maps))
    layers = browser.find_elements(By.CSS_SELECTOR, ".layer")
    assert [layer.get_attribute("data-layer") for layer in layers] == list(maps)  # every conv layer, in order
    for layer in layers:  # one grid per layer, one tile per channel, its arithmetic row
        channels = maps[layer.get_attribute("data-layer")][1]
        assert len(layer.find_elements(By.CSS_SELECTOR, ".grid:not(.filters) canvas")) == channels
        assert "parameters" in layer.find_element(By.CSS_SELECTOR, ".arith").text
    first = layers[0]
    tile = first.find_element(By.CSS_SELECTOR, ".grid canvas")
    assert tile.get_attribute("title").startswith("channel 0, 32×32, min ")
    # conv1's tiles (the largest maps) are drawn at least as large as any deeper layer's
    sizes = [layer.find_element(By.CSS_SELECTOR, ".grid canvas").size["width"] for layer in layers]
    assert sizes[0] >= max(sizes) and sizes[0] >= 32, sizes
    # the image as the model saw it (the server's preprocessing), beside the one sent
    assert browser.find_element(By.ID, "seen").is_displayed()
    assert browser.execute_script("return document.getElementById('preprocessed').naturalWidth") == 32
    assert "floor((32 + 2·1 − 3)/1) + 1 = 32" in first.find_element(By.CSS_SELECTOR, ".arith").text
    shot = tmp_path / "page.png"
    browser.set_window_size(1200, 1600)
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # not an image: one readable line, and the page keeps working
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is no picture")
    _upload(browser, str(junk))
    _wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    error = browser.find_element(By.ID, "error").text
    assert "\n" not in error and ("PNG" in error or "image" in error), error
    # the previous answer went with the failed request: no stale prediction stands beside the error
    assert not browser.find_element(By.ID, "answer").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, "#bars .bar, .layer")
    assert not browser.find_element(By.ID, "seen").is_displayed()
    browser.find_element(By.ID, "fp16").click()  # half the bytes, the same answer
    _upload(browser, DIGIT)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .bar"))
    assert browser.find_element(By.CSS_SELECTOR, "#bars .bar .label").text == "3"
    assert not browser.find_element(By.ID, "error").is_displayed()
    # the console: nothing but the refused upload's own 400 (a CSP violation would be an error too)
    logged = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert [e for e in logged if "the server responded with a status of 400" not in e["message"]] == []


def test_a_digit_drawn_on_the_pad_with_the_pointer_is_read(server, browser):
    """A '7' drawn with pointer events (dark strokes on white, unlike the light-on-dark 8x8 digits the
    model learned): the ink step makes it look like them, and the page shows what the model saw."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{server.http_port}/")
    _wait(browser, lambda d: "digits" in [o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")])
    pad = browser.find_element(By.ID, "pad")
    width = pad.size["width"]
    # offsets from the pad's centre: across the top, then down to the lower left
    points = [(-0.23, -0.29), (0.23, -0.29), (-0.08, 0.33)]
    steps = [(round(x * width), round(y * width)) for x, y in points]
    chain = ActionChains(browser).move_to_element_with_offset(pad, *steps[0]).click_and_hold()
    previous = steps[0]
    for point in steps[1:]:
        for k in range(1, 11):  # many small moves: each is one pointermove, one segment of the stroke
            x = previous[0] + (point[0] - previous[0]) * k // 10
            y = previous[1] + (point[1] - previous[1]) * k // 10
            chain.move_to_element_with_offset(pad, x, y)
        previous = point
    chain.release().perform()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .bar"))
    assert browser.find_element(By.CSS_SELECTOR, "#bars .bar .label").text == "7"
    assert browser.find_element(By.ID, "seen").is_displayed()
    assert browser.execute_script("return document.getElementById('preprocessed').naturalWidth") == 32
    # what the model saw: light strokes on a dark ground, as its training digits (the pad is white)
    corner = browser.execute_script(
        "const img = document.getElementById('preprocessed'); const c = document.createElement('canvas');"
        "c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d');"
        "g.drawImage(img, 0, 0); return Array.from(g.getImageData(31, 31, 1, 1).data).slice(0, 3);"
    )
    assert max(corner) < 64, corner
