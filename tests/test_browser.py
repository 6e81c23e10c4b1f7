"""The web UI in a real browser (Debian's chromium driven by Playwright), on tiny real-format weights.

One server and one page go through what a user does: generate an image, queue more while busy and remove
one, abort a long run, make a mistake and see a clear message, restore settings by dropping an image,
and reload the page with the last-used settings back. It also checks what the server exposes.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                               "(apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"wgp.py exited with {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"wgp.py did not serve {url} within {timeout} s:\n{log.read_text()}")


def _status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.tiny_ckpts import write_tiny_ckpts

    root = tmp_path_factory.mktemp("ui")
    ckpts, outputs, settings = root / "ckpts", root / "outputs", root / "settings"
    write_tiny_ckpts(ckpts)
    port = _free_port()
    log = root / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "wgp.py"), "--server-port", str(port), "--ckpts-dir", str(ckpts),
             "--output-dir", str(outputs), "--settings", str(settings)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_http(url, proc, log)
        yield {"url": url, "proc": proc, "root": root, "ckpts": ckpts, "outputs": outputs, "settings": settings,
               "log": log}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(server["url"])
        page.wait_for_selector("body[data-ready='1']")
        yield page
        browser.close()


def _set_field(page, elem_id: str, value) -> None:
    """Type into a textbox, dropdown (custom values allowed) or the number box of a slider."""
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=range])").first
    box.fill(str(value))
    box.press("Enter" if box.evaluate("e => e.tagName") == "INPUT" else "Tab")


def _outputs(server) -> list[Path]:
    return sorted(server["outputs"].glob("*.png")) if server["outputs"].exists() else []


def _wait_status(page, text: str) -> None:
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text)


def test_generate_shows_the_image_in_the_gallery(page, server):
    _set_field(page, "prompt", "1girl, smile, cherry blossoms")
    _set_field(page, "resolution", "64x48")
    _set_field(page, "num_inference_steps", 2)
    _set_field(page, "seed", 123)
    page.click("#generate-btn")
    thumb = page.locator("#gallery .thumbnail-item img").first
    thumb.wait_for()
    page.wait_for_function("() => { const i = document.querySelector('#gallery .thumbnail-item img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    assert thumb.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [64, 48]
    _wait_status(page, "done")
    assert "seed 123" in page.inner_text("#status")  # the used seed is shown
    [saved] = _outputs(server)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-\d\dh\d\dm\d\ds_seed123_1girl-smile-cherry-blossoms\.png", saved.name)
    with Image.open(saved) as im:
        assert im.size == (64, 48) and "Steps: 2" in im.info["parameters"]

    page.locator("#gallery .thumbnail-item").first.click()  # the gallery shows each image's settings
    page.wait_for_function("() => document.querySelector('#image-details textarea').value.includes('Seed: 123')")
    page.screenshot(path=str(server["root"] / "after_generate.png"), full_page=True)


def test_long_run_aborts_and_the_queue_can_be_edited(page, server):
    before = _outputs(server)
    _set_field(page, "prompt", "long run")
    _set_field(page, "resolution", "512x512")
    _set_field(page, "num_inference_steps", 100)
    page.click("#generate-btn")
    _wait_status(page, "Step")
    _set_field(page, "prompt", "queued while busy")
    page.click("#generate-btn")
    page.click("#generate-btn")
    page.wait_for_function("() => document.querySelectorAll('#queue .queue-item').length === 2")
    assert "queued while busy" in page.inner_text("#queue")
    page.locator("#queue .queue-remove").first.click()
    page.wait_for_function("() => document.querySelectorAll('#queue .queue-item').length === 1")
    page.locator("#queue button", has_text="Clear queue").click()
    page.wait_for_function("() => document.querySelectorAll('#queue .queue-item').length === 0")
    page.screenshot(path=str(server["root"] / "while_running.png"), full_page=True)
    page.click("#abort-btn")
    _wait_status(page, "aborted")
    time.sleep(1)  # nothing queued may start afterwards
    assert "aborted" in page.inner_text("#status") and _outputs(server) == before


def test_bad_settings_give_a_clear_message_and_the_server_lives_on(page, server):
    _set_field(page, "resolution", "1000x1000")
    page.click("#generate-btn")
    toast = page.locator(".toast-body", has_text="multiples of 16")
    toast.wait_for()
    assert "1000x1000" in toast.inner_text()
    assert server["proc"].poll() is None and _status(server["url"]) == 200


def test_dropping_an_image_restores_its_settings(page, server):
    first = _outputs(server)[0]
    _set_field(page, "prompt", "something else")
    _set_field(page, "seed", 999)
    page.locator("#restore-image input[type=file]").set_input_files(str(first))
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === '1girl, smile, cherry blossoms'")
    assert page.input_value("#seed input") == "123"
    assert page.input_value("#resolution input") == "64x48"


def test_last_used_settings_come_back_after_a_reload(page, server):
    stored = json.loads((server["settings"] / "anima_preview_settings.json").read_text())
    assert stored["prompt"] == "queued while busy" and stored["resolution"] == "512x512"
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#prompt textarea") == "queued while busy"


def test_server_is_local_only_and_serves_only_the_output_folder(server):
    import psutil

    ports = {c.laddr for c in psutil.Process(server["proc"].pid).net_connections(kind="tcp") if c.status == "LISTEN"}
    assert ports and all(addr.ip == "127.0.0.1" for addr in ports)
    weights = next(server["ckpts"].glob("*.safetensors"))
    assert _status(f"{server['url']}gradio_api/file={weights}") == 403
    assert _status(f"{server['url']}gradio_api/file={server['root'] / 'server.log'}") == 403
    assert _status(f"{server['url']}gradio_api/file={_outputs(server)[0]}") == 200
