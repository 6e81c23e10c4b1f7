"""The web UI in a real browser (Debian's chromium driven by Playwright), on tiny real-format weights.

One server and one page go through what a user does: generate an image, queue more while busy and remove
one, abort a long run, make mistakes and see clear messages (typed values are never clamped), drop a
file that is not an image, restore settings by dropping an image, give each LoRA its own strength, look
at it on a phone, reload the page with the last-used settings back, and stop the server with Ctrl-C
during a generation. It also checks what the server exposes.
"""

import json
import os
import re
import signal
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

    from tests.tiny_ckpts import write_tiny_lora

    root = tmp_path_factory.mktemp("ui")
    ckpts, outputs, settings, loras = root / "ckpts", root / "outputs", root / "settings", root / "loras"
    write_tiny_ckpts(ckpts)
    loras.mkdir()
    write_tiny_lora(loras / "style.safetensors")
    write_tiny_lora(loras / "detail.safetensors", seed=1)
    write_tiny_lora(loras / "wrong_size.safetensors", width=32)  # made for another model: fails when merged
    port = _free_port()
    log = root / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "wgp.py"), "--server-port", str(port), "--model", "anima_preview",
             "--ckpts-dir", str(ckpts),
             "--output-dir", str(outputs), "--settings", str(settings), "--lora-dir", str(loras)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_http(url, proc, log)
        yield {"url": url, "proc": proc, "root": root, "ckpts": ckpts, "outputs": outputs, "settings": settings,
               "log": log, "port": port}
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


def _open_loras(page) -> None:
    if not page.locator("#activated_loras").is_visible():
        page.locator("button", has_text="LoRAs").first.click()
    page.locator("#activated_loras").wait_for()


def _clear_loras(page) -> None:
    _open_loras(page)
    if page.locator("#activated_loras .remove-all").count():
        page.locator("#activated_loras .remove-all").click()
    page.wait_for_function("() => [...document.querySelectorAll('.lora-strength')]"
                           ".filter(e => e.offsetParent !== null).length === 0")


def _toast(page, text: str) -> str:
    toast = page.locator(".toast-body", has_text=text).last
    toast.wait_for()
    message = toast.inner_text()
    page.evaluate("() => document.querySelectorAll('.toast-close').forEach(b => b.click())")
    return message


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
    page.keyboard.press("Escape")
    page.screenshot(path=str(server["root"] / "after_generate.png"), full_page=True)


def test_new_results_clear_the_old_images_settings_and_captions_tell_images_apart(page, server):
    assert page.input_value("#image-details textarea") != ""  # from the image clicked before
    _set_field(page, "seed", 124)
    page.click("#generate-btn")
    page.wait_for_function("() => document.querySelectorAll('#gallery .thumbnail-item').length === 2")
    page.wait_for_function("() => document.querySelector('#image-details textarea').value === ''")
    captions = page.evaluate("() => [...document.querySelectorAll('#gallery .thumbnail-item')].map("
                             "e => e.getAttribute('aria-label') || e.innerText)")
    page.locator("#gallery .thumbnail-item").first.click()
    caption = page.locator("#gallery .caption-label, #gallery figcaption").first.inner_text()
    page.keyboard.press("Escape")
    assert "seed 124 · 64x48 · 2 steps · CFG" in caption, (caption, captions)


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
    assert "1000x1000" in _toast(page, "multiples of 16")
    _set_field(page, "resolution", "64x48")
    assert server["proc"].poll() is None and _status(server["url"]) == 200


@pytest.mark.parametrize("elem_id, typed, message", [
    ("num_inference_steps", "0", "num_inference_steps must be between 1 and 1000, got 0"),
    ("num_inference_steps", "1001", "num_inference_steps must be between 1 and 1000, got 1001"),
    ("guidance_scale", "200", "guidance_scale must be between 0 and 100, got 200"),
    ("guidance_scale", "", "guidance_scale is empty"),
])
def test_typed_numbers_are_never_clamped(page, server, elem_id, typed, message):
    """What is typed stays as typed, and Generate says what is wrong with it (nothing is queued)."""
    before = page.input_value("#guidance_scale input"), page.input_value("#num_inference_steps input")
    _set_field(page, elem_id, typed)
    page.click("#generate-btn")
    _toast(page, message)
    assert page.input_value(f"#{elem_id} input") == typed
    _set_field(page, "guidance_scale", before[0])
    _set_field(page, "num_inference_steps", before[1])


def test_a_lora_name_outside_the_folder_is_refused_without_a_look_at_the_disk(page, server):
    _set_field(page, "prompt", "1girl <lora:../ckpts/anima-preview:1>")
    page.click("#generate-btn")
    message = _toast(page, "must stay inside the LoRA folder")
    assert "safetensors file" not in message
    _set_field(page, "prompt", "1girl, smile")


def test_each_chosen_lora_gets_its_own_strength(page, server):
    _open_loras(page)
    loras = page.locator("#activated_loras input")
    for name in ("style.safetensors", "detail.safetensors"):
        loras.click()
        page.locator("[role=option]", has_text=name).click()
    page.keyboard.press("Escape")
    boxes = page.locator(".lora-strength:visible")
    page.wait_for_function("() => [...document.querySelectorAll('.lora-strength')]"
                           ".filter(e => e.offsetParent !== null).length === 2")
    labels = [boxes.nth(i).inner_text() for i in range(2)]
    assert "style strength" in labels[0] and "detail strength" in labels[1]
    page.screenshot(path=str(server["root"] / "loras.png"), full_page=True)
    boxes.nth(0).locator("input").fill("0.5")
    boxes.nth(0).locator("input").press("Enter")
    before = set(_outputs(server))
    page.click("#generate-btn")
    page.wait_for_function("n => document.querySelectorAll('#gallery .thumbnail-item').length === n",
                           arg=len(before) + 1)
    [made] = set(_outputs(server)) - before
    from shared.images import read_image_settings

    settings = read_image_settings(made)[0]
    assert (settings["activated_loras"], settings["loras_multipliers"]) == (
        ["style.safetensors", "detail.safetensors"], "0.5 1")


def test_a_failed_task_shows_its_whole_message(page, server):
    """A LoRA made for another model passes the file check and fails when merged: the status card shows
    the full message (wrapped, not cut with an ellipsis)."""
    loras = page.locator("#activated_loras input")
    _clear_loras(page)
    loras.click()
    page.locator("[role=option]", has_text="wrong_size.safetensors").click()
    page.keyboard.press("Escape")
    page.click("#generate-btn")
    _wait_status(page, "failed")
    detail = page.locator("#status .sub")
    text = detail.inner_text()
    assert "does not fit this model" in text and "made for another model" in text
    assert detail.evaluate("e => e.scrollWidth <= e.clientWidth && getComputedStyle(e).whiteSpace") == "pre-wrap"
    _clear_loras(page)


def test_dropping_a_file_that_is_not_an_image_warns_and_leaves_every_field_usable(page, server):
    (server["root"] / "notes.txt").write_text("not an image")
    page.locator("#restore-image input[type=file]").set_input_files(str(server["root"] / "notes.txt"))
    assert "No settings restored" in _toast(page, "not an image file")
    assert page.locator("#settings-column .error").count() == 0
    _set_field(page, "prompt", "still editable")
    assert page.input_value("#prompt textarea") == "still editable"


def test_buttons_look_like_what_they_do(page, server):
    """Random and Last used are small buttons, not tall boxes; Abort is red like a stop button."""
    for button in ("#random-seed", "#last-seed"):
        assert page.locator(button).bounding_box()["height"] < 40
    background = page.locator("#abort-btn").evaluate("e => getComputedStyle(e).backgroundColor")
    red, green, blue = (int(v) for v in re.findall(r"\d+", background)[:3])
    assert red > 180 and green < 110 and blue < 110, background


def test_on_a_phone_progress_and_results_come_before_the_form(page, server):
    phone = page.context.browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(server["url"])
    phone.wait_for_selector("body[data-ready='1']")
    status, prompt = (phone.locator(sel).bounding_box() for sel in ("#status", "#prompt"))
    phone.screenshot(path=str(server["root"] / "phone.png"), full_page=True)
    phone.close()
    assert status["y"] < prompt["y"]


def test_dropping_an_image_restores_its_settings(page, server):
    first = _outputs(server)[0]
    _set_field(page, "prompt", "something else")
    _set_field(page, "seed", 999)
    page.locator("#restore-image input[type=file]").set_input_files(str(first))
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === '1girl, smile, cherry blossoms'")
    _toast(page, "Settings restored")
    assert page.input_value("#seed input") == "123"
    assert page.input_value("#resolution input") == "64x48"


def test_last_used_settings_come_back_after_a_reload(page, server):
    stored = json.loads((server["settings"] / "anima_preview_settings.json").read_text())
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#prompt textarea") == stored["prompt"] != ""
    assert page.input_value("#resolution input") == stored["resolution"]


def _open_image_input(page) -> None:
    if not page.locator("#image_guide").is_visible():
        page.locator("button", has_text="Image input").first.click()
    page.locator("#image_guide").wait_for()


def test_upload_a_source_paint_a_mask_and_generate(page, server):
    """Image input: upload a picture, paint the right half of its mask with mouse strokes, generate; the
    result is made from that source and that mask, both kept and named (with their SHA-256) in its settings."""
    _clear_loras(page)  # the reloaded page holds the misfit LoRA of the failed task
    source = server["root"] / "source.png"
    Image.effect_noise((256, 192), 60).convert("RGB").save(source)  # resized to the output size
    _set_field(page, "prompt", "1girl, inpainted")
    _set_field(page, "resolution", "64x48")
    _set_field(page, "num_inference_steps", 2)
    _open_image_input(page)
    page.locator("#image_guide input[type=file]").set_input_files(str(source))
    page.wait_for_selector("#image_mask canvas")
    page.wait_for_timeout(1000)  # the editor draws the picture
    page.locator("#image_mask button[aria-label=Brush]").click()
    box = page.locator("#image_mask canvas").last.bounding_box()
    for row in (0.2, 0.5, 0.8):  # three horizontal strokes over the right half
        page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * row)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + box["height"] * row, steps=8)
        page.mouse.up()
    page.screenshot(path=str(server["root"] / "mask_painted.png"), full_page=True)
    before = set(_outputs(server))
    page.click("#generate-btn")
    page.wait_for_function("n => document.querySelectorAll('#gallery .thumbnail-item').length >= n",
                           arg=len(before) + 1)
    _wait_status(page, "done")
    [made] = set(_outputs(server)) - before
    from shared.images import read_image_metadata

    settings, parameters = read_image_metadata(made)
    assert Path(settings["image_guide"]).read_bytes() == source.read_bytes()  # the upload, unchanged
    assert settings["image_guide_sha256"] and settings["image_mask_sha256"]
    with Image.open(settings["image_mask"]) as im:
        mask = im.convert("L")
    assert mask.size == (256, 192)  # the source's
    painted = [x for x in range(256) if any(mask.getpixel((x, y)) > 127 for y in range(0, 192, 4))]
    assert painted and min(painted) >= 128  # strokes on the right half only (a 25-pixel brush)
    assert "Denoising strength: 0.7" in parameters and "Mask blur: 0" in parameters
    with Image.open(made) as im:
        assert im.size == (64, 48)


def test_a_result_becomes_the_source_and_the_hires_toggle_sets_the_scale(page, server):
    page.locator("#gallery .thumbnail-item").first.click()
    page.keyboard.press("Escape")
    page.click("#use-input-btn")
    _toast(page, "source image now")
    page.wait_for_function("() => document.querySelector('#image_guide img') !== null")
    page.click("#hires-toggle input")
    page.wait_for_function("() => document.querySelector('#hires_scale input').value === '1.5'")
    page.click("#hires-toggle input")
    page.wait_for_function("() => document.querySelector('#hires_scale input').value === '1'")
    page.locator("#image_guide button[aria-label='Remove Image']").click()
    page.wait_for_function("() => document.querySelector('#image_guide img') === null")


def test_server_is_local_only_and_serves_only_the_output_folder(server):
    import psutil

    ports = {c.laddr for c in psutil.Process(server["proc"].pid).net_connections(kind="tcp") if c.status == "LISTEN"}
    assert ports and all(addr.ip == "127.0.0.1" for addr in ports)
    weights = next(server["ckpts"].glob("*.safetensors"))
    assert _status(f"{server['url']}gradio_api/file={weights}") == 403
    assert _status(f"{server['url']}gradio_api/file={server['root'] / 'server.log'}") == 403
    assert _status(f"{server['url']}gradio_api/file={_outputs(server)[0]}") == 200


def test_ctrl_c_during_a_generation_exits_130(page, server):
    """Last: it stops the server. The running step ends and the process exits cleanly, not by SIGABRT."""
    _clear_loras(page)  # the last Generate stored the misfit LoRA
    _set_field(page, "prompt", "long run")
    _set_field(page, "resolution", "512x512")
    _set_field(page, "num_inference_steps", 200)
    last_job = int(re.search(r"#(\d+)", page.inner_text("#status .line")).group(1))
    job = f"#{last_job + 1} "
    page.click("#generate-btn")
    page.wait_for_function("j => { const t = document.querySelector('#status .line').innerText;"
                           " return t.includes(j) && /Step|failed/.test(t); }", arg=job)
    assert "Step" in page.inner_text("#status"), page.inner_text("#status")
    server["proc"].send_signal(signal.SIGINT)
    assert server["proc"].wait(timeout=60) == 130
    assert server["log"].read_text().rstrip().endswith("Interrupted.")
