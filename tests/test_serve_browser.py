"""The web page in a real headless browser (Debian's chromium + chromedriver, driven by selenium):
start ``t2l-fast serve --clip test-tiny``, upload the bundled sample, run a 2-step edit, check the
result images and the download; start a 500-step edit and press Cancel: it stops within a few steps
and keeps its result; then check that a bad upload and an image too small to edit show their
message (without error badges on the outputs).

Never skipped: without the browser (``apt-get install chromium chromium-driver``) or selenium this
test fails and says what to install. ``T2L_SCREENSHOT=docs/serve.png`` also saves the finished page.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from t2l_fast.serve import samples

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)
INSTALL = "install the browser: apt-get install -y chromium chromium-driver (and pip install selenium)"


def _which(names: tuple[str, ...]) -> str:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
        if path:
            return path
    pytest.fail(f"{names[0]} not found: {INSTALL}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``t2l-fast serve`` in a subprocess; yields its URL (read from the line it prints)."""
    port = _free_port()
    workdir = tmp_path_factory.mktemp("serve")
    cmd = [sys.executable, "-m", "t2l_fast.cli", "serve", "--clip", "test-tiny", "--device", "cpu"]
    cmd += ["--port", str(port), "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "open http://" in line and not url:
                url.append(line.split("open ", 1)[1].split()[0])
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(120)
    if not url:
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(lines))
    yield url[0]
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = _which(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,2300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=_which(DRIVER)), options=options)
    yield driver
    driver.quit()


def _wait(condition, timeout: float, what: str, driver):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = condition()
        except Exception:  # the element is not there yet, or was re-rendered
            value = None
        if value:
            return value
        time.sleep(0.3)
    body = driver.find_element("tag name", "body").text
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; the page says:\n{body[-3000:]}")


def _type(driver, selector: str, text: str) -> None:
    field = driver.find_element("css selector", selector)
    field.clear()
    field.send_keys(text)


def test_edit_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(server)
    upload = _wait(
        lambda: driver.find_element(By.CSS_SELECTOR, "#image-upload input[type=file]"), 60, "the page", driver
    )
    upload.send_keys(str(samples()["chelsea"]))
    _wait(
        lambda: driver.find_element(By.CSS_SELECTOR, "#source img").get_attribute("src"),
        60,
        "the source",
        driver,
    )

    _type(driver, "#prompt textarea", "a golden cat")
    _type(driver, "#steps input", "2")
    _type(driver, "#preview-every input", "1")
    driver.find_element(By.CSS_SELECTOR, "#advanced button").click()  # open the advanced panel
    size = _wait(lambda: driver.find_element(By.CSS_SELECTOR, "#data-size input"), 10, "the panel", driver)
    _wait(size.is_displayed, 10, "the advanced panel to open", driver)
    _type(driver, "#data-size input", "160")
    driver.find_element(By.CSS_SELECTOR, "#run").click()

    link = _wait(
        lambda: driver.find_element(By.CSS_SELECTOR, "#download a[href*='.zip']"), 300, "the download", driver
    )
    status = driver.find_element(By.CSS_SELECTOR, "#status").text
    assert "done: 2 steps" in status, status
    for name in ("composite", "edit-layer", "alpha", "greenscreen"):
        src = driver.find_element(By.CSS_SELECTOR, f"#{name} img").get_attribute("src")
        assert src and src.startswith("http"), (name, src)
        with urllib.request.urlopen(src, timeout=30) as reply:
            assert reply.read(8) == b"\x89PNG\r\n\x1a\n", name  # a real PNG is served
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as reply:
        names = set(zipfile.ZipFile(io.BytesIO(reply.read())).namelist())
    assert {"composite.png", "edit_layer.png", "config.yaml", "generator.safetensors"} <= names, names

    shot = os.environ.get("T2L_SCREENSHOT")
    if shot:
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(shot)

    # Variants: two prompts in the variants box, "Edit variants": the gallery shows the comparison
    # sheet and each composite (each served as a PNG: downloadable), and the zip holds them all
    driver.find_element(By.CSS_SELECTOR, "#variants button").click()  # open the variants box
    box = _wait(
        lambda: driver.find_element(By.CSS_SELECTOR, "#variant-prompts textarea"), 10, "the box", driver
    )
    _wait(box.is_displayed, 10, "the variants box to open", driver)
    _type(driver, "#variant-prompts textarea", "a golden cat\nan icy cat")
    driver.find_element(By.CSS_SELECTOR, "#run-variants").click()
    variants_link = _wait(
        lambda: driver.find_element(By.CSS_SELECTOR, "#variants-download a[href*='.zip']"),
        300,
        "the variants' download",
        driver,
    )
    status = driver.find_element(By.CSS_SELECTOR, "#status").text
    assert "done: 2 of 2 variants, 2 steps" in status, status
    sources = {
        img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "#variants-gallery img")
    }
    assert len(sources) >= 3, sources  # the sheet and the two composites
    for src in sources:
        with urllib.request.urlopen(src, timeout=30) as reply:
            assert reply.read(8) == b"\x89PNG\r\n\x1a\n", src
    with urllib.request.urlopen(variants_link.get_attribute("href"), timeout=30) as reply:
        names = set(zipfile.ZipFile(io.BytesIO(reply.read())).namelist())
    assert {
        "variants.png",
        "variants.json",
        "a-golden-cat-s0/composite.png",
        "an-icy-cat-s0/composite.png",
    } <= names

    # Cancel during a long run: it stops within a few steps and keeps its result (a new download)
    first_zip = link.get_attribute("href")
    _type(driver, "#steps input", "500")
    _type(driver, "#preview-every input", "0")
    driver.find_element(By.CSS_SELECTOR, "#run").click()
    running = re.compile(r"step (\d+) / 500")
    seen = _wait(
        lambda: running.search(driver.find_element(By.CSS_SELECTOR, "#status").text), 300, "step 1", driver
    )
    driver.find_element(By.CSS_SELECTOR, "#cancel").click()
    at_click = int(seen.group(1))
    cancelled = re.compile(r"cancelled after (\d+) of 500 steps")
    done = _wait(
        lambda: cancelled.search(driver.find_element(By.CSS_SELECTOR, "#status").text),
        300,
        "the run to stop",
        driver,
    )
    assert at_click <= int(done.group(1)) <= at_click + 3, (at_click, done.group(0))

    def new_download():
        found = driver.find_element(By.CSS_SELECTOR, "#download a[href*='.zip']")
        return found if found.get_attribute("href") != first_zip else None

    link = _wait(new_download, 60, "the cancelled run's download", driver)
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as reply:
        names = set(zipfile.ZipFile(io.BytesIO(reply.read())).namelist())
    assert {"composite.png", "generator.safetensors"} <= names, names
    src = driver.find_element(By.CSS_SELECTOR, "#composite img").get_attribute("src")
    with urllib.request.urlopen(src, timeout=30) as reply:
        assert reply.read(8) == b"\x89PNG\r\n\x1a\n"

    # a bad upload, on a fresh page: one readable message, and the server keeps serving
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not an image")
    driver.get(server)
    upload = _wait(
        lambda: driver.find_element(By.CSS_SELECTOR, "#image-upload input[type=file]"), 60, "the page", driver
    )
    upload.send_keys(str(bad))
    message = "notes.txt is not an image file"
    _wait(lambda: message in driver.find_element(By.TAG_NAME, "body").text, 60, "the message", driver)
    assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text

    # an image too small to edit: refused on upload; pressing Edit then leaves no "waiting for the
    # device" and no error badge on the outputs (the notices' own title is the one "Error" on the page)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 120, 40)).save(tiny)
    driver.get(server)
    upload = _wait(
        lambda: driver.find_element(By.CSS_SELECTOR, "#image-upload input[type=file]"), 60, "the page", driver
    )
    upload.send_keys(str(tiny))
    message = "tiny.png is 1x1 px; the generator needs at least 129 px on each side"
    _wait(lambda: message in driver.find_element(By.TAG_NAME, "body").text, 60, "the message", driver)
    _type(driver, "#prompt textarea", "a golden cat")
    driver.find_element(By.CSS_SELECTOR, "#run").click()
    _wait(
        lambda: "upload an image" in driver.find_element(By.TAG_NAME, "body").text,
        60,
        "Edit's answer",
        driver,
    )
    time.sleep(2)  # time for a wrong update to arrive
    assert "waiting for the device" not in driver.find_element(By.CSS_SELECTOR, "#status").text
    lines = driver.find_element(By.TAG_NAME, "body").text.splitlines()
    assert lines.count("Error") <= 1, lines

    with urllib.request.urlopen(server, timeout=30) as reply:
        assert reply.status == 200
