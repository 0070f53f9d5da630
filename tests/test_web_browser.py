"""`diffstategrad serve` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``; no browser download) driven by Selenium loads the page of a server started
as a user would (``python -m diffstategrad.cli serve``), refuses three bad uploads with a
message, cancels a long job, runs a short one, finds both outputs and their metrics, checks that
the page made no request outside 127.0.0.1, and saves a screenshot for the README
(``docs/images/serve.png``; ``DIFFSTATEGRAD_SCREENSHOT=PATH`` writes it elsewhere).

One test function, so that under xdist a single server and browser serve every step."""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1400,1100")

MISSING = not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER))
# skipped where the browser is absent, except in CI (CI=true), where .ci/run installs it and the test must run
pytestmark = pytest.mark.skipif(MISSING and not os.environ.get("CI"),
                                reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; .ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    pytest.importorskip("gradio")
    port = _free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "diffstategrad.cli", "serve", "--port", str(port), "--device", "cpu", "--threads", "1",
                             "--max-megapixels", "1", "--max-upload-mb", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if f"http://127.0.0.1:{port}" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(240):
            pytest.fail("the server did not start:\n" + "".join(lines[-20:]))
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_in_a_browser(page_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 240, poll_frequency=0.2)
    text = lambda element_id: d.find_element(By.ID, element_id).text  # noqa: E731

    def type_into(selector: str, value) -> None:
        box = d.find_element(By.CSS_SELECTOR, selector)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)

    def upload(path: Path) -> None:
        d.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))

    d.get(page_url)
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#steps input") and d.find_elements(By.CSS_SELECTOR, "#input-preview img"))

    # bad uploads: a file over the server's 0.05 MB limit (refused by Gradio before it is stored), a text
    # file named .png, an image over the server's 1-megapixel limit
    heavy = tmp_path / "noise.png"
    Image.effect_noise((160, 160), 100).convert("RGB").save(heavy)  # ~70 KB: noise does not compress
    assert heavy.stat().st_size > 0.05 * 2**20
    upload(heavy)
    toast = lambda: " ".join(t.text for t in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']"))  # noqa: E731
    wait.until(lambda _: "noise.png" in toast())
    assert "exceed the maximum allowed size" in toast()
    d.find_element(By.CSS_SELECTOR, "[data-testid='toast-close']").click()
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not an image")
    upload(fake)
    wait.until(lambda _: "upload rejected" in text("upload-status"))
    assert "holiday.png is not an image" in text("upload-status")
    d.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    wait.until(lambda _: "rejected" not in text("upload-status"))
    huge = tmp_path / "huge.png"
    Image.new("RGB", (1200, 1000), "white").save(huge)
    upload(huge)
    wait.until(lambda _: "upload rejected" in text("upload-status"))
    assert "1200x1000 (1.2 megapixels); uploads are limited to 1 megapixels" in text("upload-status")
    assert d.find_element(By.CSS_SELECTOR, "#image-choice input[value='grace_hopper']").is_selected()
    d.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()
    wait.until(lambda _: "rejected" not in text("upload-status"))

    # cancel: a 200-step job stops and says so
    type_into("#size input[type=number]", 32)
    d.find_element(By.ID, "run").click()
    wait.until(lambda _: "step" in text("status"))
    d.find_element(By.ID, "cancel").click()
    WebDriverWait(d, 60, poll_frequency=0.2).until(lambda _: text("status").strip().endswith("cancelled"))
    assert not d.find_elements(By.CSS_SELECTOR, "#out-diffstategrad img")

    # a short DAPS job: both outputs and both sets of metrics appear
    d.find_element(By.CSS_SELECTOR, "#solver input").click()
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#solver li[role='option'][aria-label='daps']"))[0].click()
    wait.until(lambda _: d.find_element(By.CSS_SELECTOR, "#steps input").get_attribute("value") == "50")  # daps's default
    type_into("#steps input", 5)
    d.find_element(By.ID, "run").click()
    wait.until(lambda _: "PSNR" in text("metrics"))
    assert text("status").startswith("done: daps on box_inpainting at 32x32, 5 steps")
    for run in ("without", "with"):
        row = re.search(rf"^{run} DiffStateGrad\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text("metrics"), re.M)
        assert row, text("metrics")
        psnr, ssim, lpips = map(float, row.groups())
        assert 5 < psnr < 60 and 0 < ssim <= 1 and 0 <= lpips < 1.5
    for output in ("ground-truth", "measurement", "baseline", "diffstategrad"):
        image = d.find_element(By.CSS_SELECTOR, f"#out-{output} img")
        assert image.get_attribute("src") and d.execute_script("return arguments[0].naturalWidth", image) >= 256
    downloads = text("downloads")
    for name in ("ground_truth.png", "measurement.png", "without_diffstategrad.png", "with_diffstategrad.png", "comparison.png", "metrics.json"):
        assert name in downloads.replace("\n", ""), downloads

    # the page asked nothing of any host but the server
    host = urlparse(page_url).netloc
    urls = [json.loads(entry["message"])["message"]["params"]["request"]["url"] for entry in d.get_log("performance")
            if json.loads(entry["message"])["message"]["method"] == "Network.requestWillBeSent"]
    outside = {u for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).netloc != host}
    assert urls and not outside, outside

    target = Path(os.environ.get("DIFFSTATEGRAD_SCREENSHOT", ROOT / "docs" / "images" / "serve.png"))
    target.parent.mkdir(parents=True, exist_ok=True)
    size = d.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    target.write_bytes(base64.b64decode(shot["data"]))
    assert Image.open(target).size[1] >= 1000
