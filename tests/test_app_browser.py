"""The web UI (`python -m ldm.app`) in a real browser: headless Chromium driven by Playwright.

One server for the module, started as `python -m ldm.app` on a free port with the shipped default model.
The tests type into the page and click as a person would, then check what the page gives back: the
downloaded PNG has the pixels and text chunks `Pipeline` draws for the same settings; a non-image upload is
a message in the page and the server goes on drawing; a dropped PNG fills the fields; an unknown sampler
through the API is Pipeline's message. The run leaves a screenshot of the page in docs/ui.png.

Without Playwright or a Chromium these tests are skipped, saying which is missing.
"""
from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from gradio_client import Client  # installed with gradio
from gradio_client.exceptions import AppError

from ldm import Pipeline
from ldm.png_metadata import image_text

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default" / "model.safetensors"
CONTROLNET = ROOT / "models" / "default" / "controlnet-canny.safetensors"
SCREENSHOT = ROOT / "docs" / "ui.png"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")  # Debian's package first
START_SECONDS = 120  # gradio's import and start on a busy 2-core machine
DRAW_SECONDS = 90
WAIT_SECONDS = 30  # for anything else the page shows


def find_chromium() -> str | None:
    """A Chromium to drive: $CHROMIUM (None if it is no file), else the first of CHROMIUM on the PATH
    (Debian: /usr/bin/chromium)."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"] if Path(os.environ["CHROMIUM"]).is_file() else None
    return next((path for name in CHROMIUM if (path := shutil.which(name))), None)


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, or a skip naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests: Playwright for Python is not installed (pip install -e '.[dev]')")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("browser tests: no Chromium found (apt-get install chromium, or set $CHROMIUM)")
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium's sandbox refuses to run as root, as CI containers do.
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"], headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m ldm.app` on a free port: (its URL, the folder it writes PNGs to)."""
    outdir = tmp_path_factory.mktemp("ui-outputs")
    port = free_port()
    log = open(outdir.parent / "app.log", "w+")
    # One thread, as this process draws its references (tests/conftest.py): float sums split over another
    # number of threads may round a pixel the other way.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ldm.app", "--port", str(port), "--model", str(MODEL),
                                "--outdir", str(outdir)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"python -m ldm.app exited with {process.returncode}:\n{log.read()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"python -m ldm.app did not answer on {url} within {START_SECONDS} s")
                time.sleep(0.5)
        yield url, outdir
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def page(browser, server):
    """A fresh page of the app (its own context: no state from another test)."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    opened = context.new_page()
    opened.set_default_timeout(WAIT_SECONDS * 1000)
    opened.goto(server[0])
    yield opened
    context.close()


def set_number(page, elem_id: str, value) -> None:
    """Type into a Number field, or a Slider's number box, and leave it (gradio takes the value on change)."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def generate(page, count: int) -> None:
    """Click Generate and wait for `count` images in the gallery (the page is fresh: no earlier ones)."""
    page.locator("#generate").click()
    page.wait_for_function(f"document.querySelectorAll('#gallery img[src*=\"seed\"]').length >= {count}",
                           timeout=DRAW_SECONDS * 1000)


def save_screenshot(page) -> None:
    """docs/ui.png (README shows it): the page once its images have loaded and faded in."""
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth)"
                           " && !document.querySelector('#gallery .pending, #gallery.pending')")
    page.wait_for_timeout(1000)  # gradio's fade-in of fresh outputs has no event to wait for
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOT)


def download_first(page, tmp_path: Path) -> Path:
    """The first gallery image as the browser downloads it: open its preview, click Download."""
    page.locator("#gallery button[aria-label^='Thumbnail 1 of']").first.click()
    with page.expect_download() as download:
        page.locator("#gallery button[aria-label='Download']").first.click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    return path


def served_image(page, index: int) -> Image.Image:
    """The gallery's image `index` as the server serves it (its <img> source, fetched by the page)."""
    sources = page.locator("#gallery img[src*='seed']").evaluate_all("els => els.map(e => e.src)")
    body = page.request.get(sorted(set(sources), key=lambda s: s.rsplit("seed", 1)[1])[index]).body()
    return Image.open(io.BytesIO(body))


def assert_same_image(file_image: Image.Image, drawn: Image.Image) -> None:
    """Same pixel array (exact bytes) and the same PNG text chunks."""
    assert file_image.format == "PNG"
    assert np.asarray(file_image.convert("RGB")).tobytes() == np.asarray(drawn).tobytes()
    assert dict(file_image.text) == image_text(drawn)


def test_text_to_image_downloads_what_pipeline_draws(page, server, tmp_path):
    page.locator("#prompt textarea").fill("grinning face")
    page.locator("#negative textarea").fill("blurry")
    set_number(page, "seed", 7)
    set_number(page, "steps", 8)
    set_number(page, "count", 2)
    generate(page, 2)
    save_screenshot(page)
    downloaded = download_first(page, tmp_path)
    expected = Pipeline.from_file(MODEL)("grinning face", negative_prompt="blurry", seed=7, steps=8, num_images=2)
    with Image.open(downloaded) as image:
        assert_same_image(image, expected[0])
    assert_same_image(served_image(page, 1), expected[1])  # seed 8: the second image of the batch
    assert "Seed: 7" in page.locator("#info textarea").input_value()


def test_non_image_control_upload_is_a_message_and_the_server_goes_on(page, server, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    photo = tmp_path / "photo.png"
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 20:44] = (250, 200, 40)
    Image.fromarray(pixels).save(photo)
    page.get_by_role("tab", name="ControlNet").click()
    page.locator("#control-file input[type=file]").set_input_files(notes)
    error = page.locator(".toast-body", has_text="cannot read control image notes.png")
    error.wait_for()
    page.locator("#control-file button[aria-label='Clear']").click()
    page.locator("#control-file input[type=file]").set_input_files(photo)
    page.locator("#edges img").wait_for()  # the Canny condition, shown before drawing
    page.locator("#prompt textarea").fill("crying cat face")
    set_number(page, "steps", 4)
    set_number(page, "count", 1)
    generate(page, 1)
    controlled = Pipeline.from_file(MODEL, controlnets=[CONTROLNET])
    expected = controlled("crying cat face", steps=4, control_image=photo, control="canny")[0]
    assert_same_image(served_image(page, 0), expected)


def test_a_dropped_png_fills_the_fields(page, tmp_path):
    a1111 = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", "a cat, sitting\nNegative prompt: blurry\nSteps: 12, Sampler: Euler, Schedule type: "
                                "Karras, CFG scale: 5.5, Seed: 1234, Size: 64x64, Model hash: 0123456789, Clip skip: 2")
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    page.get_by_text("Read settings from a PNG").click()
    page.locator("#png-file input[type=file]").set_input_files(a1111)
    page.wait_for_function("document.querySelector('#seed input').value === '1234'")
    assert page.locator("#prompt textarea").input_value() == "a cat, sitting"
    assert page.locator("#negative textarea").input_value() == "blurry"
    assert page.locator("#steps input[type=number]").input_value() == "12"
    assert page.locator("#guidance input[type=number]").input_value() == "5.5"
    assert page.locator("#sampler input").input_value() == "euler"
    assert page.locator("#width input").input_value() == "64"
    assert "Clip skip: 2" in page.locator("#png-notes textarea").input_value()


def test_an_unknown_sampler_through_the_api_is_a_message(server):
    client = Client(server[0], verbose=False)
    with pytest.raises(AppError, match="unknown sampler 'nope'"):
        client.predict("text to image", "default", "", "", "a cat", "", "nope", 2, 3, 0, 1, 0, 0, None, 0.6, None,
                       None, None, None, 100, 200, 1.0, api_name="/generate")
    gallery, _ = client.predict("text to image", "default", "", "", "a cat", "", "euler", 2, 3, 0, 1, 0, 0, None,
                                0.6, None, None, None, None, 100, 200, 1.0, api_name="/generate")
    assert len(gallery) == 1
