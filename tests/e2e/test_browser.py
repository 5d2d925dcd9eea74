"""End to end in a real browser: `medmix serve` in a subprocess on 127.0.0.1, Debian's headless Chromium driven by
Selenium + chromedriver, a BreastMNIST test image uploaded through the page's file input.

Skips only when Chromium, chromedriver or Selenium is absent — unless ``MEDMIX_REQUIRE_BROWSER=1`` (set by
``.ci/run``, which installs them), where their absence fails the test. The screenshot goes to
``results/serve_page.png`` when ``MEDMIX_SAVE_SCREENSHOT=1`` or that file does not exist yet, else to a temporary
folder, so CI does not change the working tree.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("MEDMIX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("MEDMIX_CHROMEDRIVER") or shutil.which("chromedriver")


def _need_browser():
    missing = [n for n, v in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not v]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        msg = (f"browser test needs {', '.join(missing)}: apt-get install -y chromium chromium-driver; "
               f"pip install selenium (.ci/run does both)")
        if os.environ.get("MEDMIX_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    import httpx

    _need_browser()
    # MEDMIX_E2E_CHECKPOINT: serve this run instead (e.g. a `medmix quickstart` run for the committed screenshot)
    ckpt = os.environ.get("MEDMIX_E2E_CHECKPOINT") or str(request.getfixturevalue("trained_run").run_dir)
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medmix", "serve", ckpt, "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"medmix serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"medmix serve did not answer /health in 90 s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="medmix-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--window-size=1280,900", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def test_png(tmp_path_factory) -> Path:
    """A real BreastMNIST test image (the embedded copy's first test image), as a PNG file."""
    from PIL import Image

    from medmix.data.medmnist import ASSETS

    with np.load(ASSETS / "breastmnist.npz") as d:
        a = d["test_images"][0]
    path = tmp_path_factory.mktemp("upload") / "breastmnist_test_0.png"
    Image.fromarray(a).save(path)
    return path


def _wait_state(driver, states: tuple[str, ...], timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = driver.execute_script("return document.body.dataset.state")
        if s in states:
            return s
        time.sleep(0.1)
    raise AssertionError(f"page state stayed {s!r}, expected one of {states}")


def test_upload_shows_label_and_gradcam(server, browser, test_png):
    import httpx
    from selenium.webdriver.common.by import By

    api = httpx.post(f"{server}/v1/predict", files={"files": (test_png.name, test_png.read_bytes(), "image/png")},
                     timeout=60).json()["predictions"][0]

    browser.get(server + "/")
    _wait_state(browser, ("idle",))
    browser.find_element(By.ID, "file").send_keys(str(test_png))
    assert _wait_state(browser, ("done", "error")) == "done", browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "label").text == api["label"]
    assert browser.find_element(By.ID, "confidence").text.endswith(f"{100 * api['confidence']:.1f}%")
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == len(api["probabilities"])
    cam = browser.find_element(By.ID, "cam")
    assert cam.is_displayed()
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", cam) > 0
    assert not browser.find_element(By.ID, "error").is_displayed()

    target = ROOT / "results" / "serve_page.png"
    if os.environ.get("MEDMIX_SAVE_SCREENSHOT") != "1" and target.exists():
        target = Path(tempfile.mkdtemp(prefix="medmix-shot-")) / "serve_page.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    height, chrome = browser.execute_script("return [document.documentElement.scrollHeight, "
                                            "window.outerHeight - window.innerHeight]")
    browser.set_window_size(1280, min(int(height) + int(chrome) + 4, 2000))  # the whole page, footer included
    assert browser.save_screenshot(str(target)) and target.stat().st_size > 1000


def test_rejected_file_shows_clear_error(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not an image")
    browser.get(server + "/")
    _wait_state(browser, ("idle",))
    browser.find_element(By.ID, "file").send_keys(str(bad))
    assert _wait_state(browser, ("done", "error")) == "error"
    err = browser.find_element(By.ID, "error")
    assert err.is_displayed()
    assert "415" in err.text and "notes.png" in err.text and "not a readable image" in err.text
    assert not browser.find_element(By.ID, "results").is_displayed()


def test_ood_warning_matches_the_api(server, browser, tmp_path):
    """Noise is nothing like a breast ultrasound: the page shows the OOD warning exactly when the API flags it."""
    import httpx
    from PIL import Image
    from selenium.webdriver.common.by import By

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(noise)
    api = httpx.post(f"{server}/v1/predict", files={"files": (noise.name, noise.read_bytes())},
                     timeout=60).json()["predictions"][0]
    browser.get(server + "/")
    _wait_state(browser, ("idle",))
    browser.find_element(By.ID, "file").send_keys(str(noise))
    assert _wait_state(browser, ("done", "error")) == "done"
    warning = browser.find_element(By.ID, "ood")
    assert warning.is_displayed() == (api.get("in_distribution") is False)
    if api.get("in_distribution") is False:
        assert "does not look like" in warning.text
