"""Image inputs in the app (shared/image_inputs.py, the settings, the metadata, the command line): files read as
a viewer shows them, the canvas, mask and outpainting prepared as upstream Wan2GP prepares them (its numbers,
computed with its code and OpenCV, are written down here), the cross-setting rules, A1111 fields where they
apply, re-making from recorded files, and every bad input a clear message with nothing written."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wgp
from shared import image_inputs
from shared.images import a1111_parameters, parse_a1111_parameters, read_image_metadata
from shared.settings import ModelRegistry, SettingsError, resolve_task
from shared.settings_schema import SETTINGS, guide_letters

ROOT = Path(__file__).resolve().parents[1]
MODEL = "anima_preview"


@pytest.fixture(scope="module")
def registry():
    handlers = [__import__(path, fromlist=["family_handler"]).family_handler for path in wgp.family_handlers]
    return ModelRegistry(handlers, [ROOT / "defaults"])


def picture(path, size=(64, 48), mode="RGB", color=None, seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) if color is None else \
        Image.new("RGB", size, color)
    image.convert(mode).save(path)
    return str(path)


def mask_file(path, size=(64, 48), box=(32, 0, 64, 48)):
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(mask).save(path)
    return str(path)


def task(registry, **settings):
    return resolve_task(registry, dict({"prompt": "1girl", "model_type": MODEL}, **settings), where="")


# ------------------------------------------------------------------------------------------------ files


def test_sources_are_read_as_a_viewer_shows_them(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    image = image_inputs.open_image(tmp_path / "rgba.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((1, 0)) == (255, 255, 255)

    deep = np.array([[0, 32896, 65535]], dtype=np.uint16)  # a 16-bit grey PNG
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert [image_inputs.open_image(tmp_path / "deep.png").getpixel((x, 0)) for x in range(3)] == [
        (0, 0, 0), (128, 128, 128), (255, 255, 255)]

    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    red = image_inputs.open_image(tmp_path / "cmyk.jpg").getpixel((1, 1))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60

    tall = Image.new("RGB", (6, 4), "black")
    tall.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    tall.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    shown = image_inputs.open_image(tmp_path / "rotated.jpg")
    assert shown.size == (4, 6) and shown.getpixel((3, 0))[0] > 200


def test_masks_are_their_brightness_or_the_painted_opaque_pixels(tmp_path):
    assert np.asarray(image_inputs.open_mask(mask_file(tmp_path / "m.png"))).max() == 255
    layer = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    layer.putpixel((2, 1), (255, 255, 255, 255))
    layer.save(tmp_path / "layer.png")
    mask = np.asarray(image_inputs.open_mask(tmp_path / "layer.png"))
    assert mask[1, 2] == 255 and mask.sum() == 255


@pytest.mark.parametrize("content, message", [
    (b"not an image at all", "is not an image"),
    (None, "cannot be read"),  # a PNG cut short
])
def test_a_source_that_is_not_an_image_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "source.png"
    if content is None:
        picture(path, size=(64, 64))
        content = path.read_bytes()[:120]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"image_guide: .*source.png {message}"):
        image_inputs.open_image(path)


# ------------------------------------------------------------------------------------- upstream's numbers


@pytest.mark.parametrize("canvas, margins, placed", [
    # (height, width), "top bottom left right" %, upstream's get_outpainting_frame_location(..., quantize 16)
    ((48, 64), (0, 25, 50, 0), (32, 48, 0, 16)),
    ((1024, 1024), (10, 10, 10, 10), (864, 864, 80, 80)),
    ((96, 128), (0, 0, 25, 25), (96, 96, 0, 16)),
    ((1152, 896), (50, 0, 0, 0), (768, 896, 384, 0)),
    ((768, 1344), (0, 100, 0, 100), (384, 672, 0, 0)),
    ((64, 64), (100, 100, 100, 100), (32, 32, 16, 16)),
])
def test_outpainting_places_the_source_where_upstream_does(canvas, margins, placed):
    place = image_inputs.outpaint_placement(canvas[1], canvas[0], margins)
    assert (place.height, place.width, place.top, place.left) == placed


def test_the_mask_is_grown_and_shrunk_as_opencv_does_it():
    # cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    assert image_inputs.ellipse_kernel(4).astype(int).tolist() == [
        [0, 0, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert image_inputs.ellipse_kernel(6).astype(int).tolist() == [
        [0, 0, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1]]
    mask = np.zeros((24, 32), np.uint8)
    mask[6:14, 9:20] = 255
    mask[18, 3] = 255
    mask[0:3, 28:32] = 255
    # upstream's expand_or_shrink_mask (cv2.dilate / cv2.erode, 3 iterations): pixel count, SHA-256 prefix
    for pixels, count, digest in [(3, 275, "b372bf93b33fe0ca"), (4, 443, "8a09ea87a7a15908"),
                                  (5, 539, "e1064be03fe633f7"), (-3, 10, "8c8b72dcbd56dbe3"),
                                  (-4, 0, "ef115a0e0c15cdc4"), (7, 681, "8f8189c9cbeb618d")]:
        grown = image_inputs.expand_mask(mask, pixels) > 0
        assert (int(grown.sum()), hashlib.sha256(grown.astype(np.uint8).tobytes()).hexdigest()[:16]) == (count, digest)


# -------------------------------------------------------------------------------------------- settings


def test_the_letters_follow_from_the_files_unless_given():
    assert guide_letters({"image_guide": "a.png", "video_prompt_type": ""}) == "GUV"
    assert guide_letters({"image_guide": "a.png", "image_mask": "m.png", "video_prompt_type": ""}) == "VAG"
    assert guide_letters({"image_guide": "a.png", "video_guide_outpainting": "0 0 10 10"}) == "VAG"
    assert guide_letters({"image_guide": "a.png", "image_mode": 2}) == "VAG"
    assert guide_letters({"image_guide": "a.png", "video_prompt_type": "VA"}) == "VA"
    assert guide_letters({"video_prompt_type": ""}) == ""


def test_without_a_resolution_the_output_takes_the_source_size(registry, tmp_path):
    source = picture(tmp_path / "s.png", size=(100, 60))
    assert task(registry, image_guide=source)[0]["resolution"] == "96x64"
    assert task(registry, image_guide=source, video_guide_outpainting="0 0 50 50")[0]["resolution"] == "192x64"
    assert task(registry, image_guide=source, resolution="128x128")[0]["resolution"] == "128x128"
    huge = picture(tmp_path / "huge.png", size=(4200, 16), color="white")
    with pytest.raises(SettingsError, match="past the 4096-pixel limit: give a resolution"):
        task(registry, image_guide=huge)


@pytest.mark.parametrize("settings, message", [
    (dict(image_mask="MASK"), "image_mask is set but image_guide is not"),
    (dict(video_prompt_type="GUV"), "uses a source image .V. but image_guide is empty"),
    (dict(image_guide="SOURCE", image_mode=2), "Inpainting needs a mask"),
    (dict(image_guide="SOURCE", video_guide_outpainting="0 0 150 0"), "each margin must be at most 100%"),
    (dict(image_guide="SOURCE", video_guide_outpainting="1 2 3"), "four whole percentages"),
    (dict(image_guide="SOURCE", denoising_strength=1.5), "denoising_strength must be between 0 and 1, got 1.5"),
    (dict(image_guide="SOURCE", denoising_strength=-0.1), "denoising_strength must be between 0 and 1"),
    (dict(image_guide="NOWHERE"), "image_guide: no such file"),
    (dict(hires_scale=0.5), "hires_scale must be between 1 and 4"),
])
def test_settings_that_cannot_run_are_clear_errors(registry, tmp_path, settings, message):
    files = {"SOURCE": picture(tmp_path / "s.png"), "MASK": mask_file(tmp_path / "m.png"),
             "NOWHERE": str(tmp_path / "nowhere.png")}
    settings = {k: files.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(SettingsError, match=message):
        task(registry, resolution="64x48", **settings)


def test_upstreams_custom_settings_fill_the_hires_scheduler_and_truncation_settings(registry):
    clean, warnings = task(registry, custom_settings={"hires_scale": 1.5, "hires_steps": 3, "other": 1,
                                                      "scheduler": "beta", "cfg_truncation": 0.35})
    assert (clean["hires_scale"], clean["hires_steps"], warnings) == (1.5, 3, [])
    # upstream's CFG truncation is the fraction of guided steps, this app's the percentage
    assert (clean["scheduler"], clean["cfg_truncation_perc"]) == ("beta", 35.0)
    assert task(registry, hires_scale=1.25, custom_settings={"hires_scale": 1.5})[0]["hires_scale"] == 1.25


def test_files_a_task_will_not_use_are_named(registry, tmp_path):
    source, mask = picture(tmp_path / "s.png"), mask_file(tmp_path / "m.png")
    _, warnings = task(registry, image_guide=source, image_mask=mask, video_prompt_type="GUV", resolution="64x48")
    assert warnings == ["image_mask is not used: video_prompt_type 'GUV' has no A (or has U)."]
    _, warnings = task(registry, image_guide=source, video_prompt_type="T", resolution="64x48")
    assert warnings == ["image_guide is not used: video_prompt_type 'T' has no V (a control image)."]


# ------------------------------------------------------------------------------------------- preparing


def prepared(registry, **settings):
    clean, _ = task(registry, **settings)
    width, height = map(int, clean["resolution"].split("x"))
    return image_inputs.prepare(clean.values, width, height)


def test_img2img_gives_the_source_pixels_with_comfyuis_arithmetic(registry, tmp_path):
    source = picture(tmp_path / "s.png")
    out = prepared(registry, image_guide=source, denoising_strength=0.6)
    pixels = torch.from_numpy(np.array(Image.open(source))).permute(2, 0, 1)[:, None]
    assert torch.equal(out.kwargs["input_frames"], pixels.float() / 255.0 * 2.0 - 1.0)
    assert out.kwargs["input_masks"] is None and out.kwargs["video_prompt_type"] == "GUV" and out.notices == ()
    assert "denoising_strength" not in out.kwargs  # the task's own value goes through


def test_a_source_of_another_size_is_resized_with_a_notice(registry, tmp_path):
    source = picture(tmp_path / "s.png", size=(80, 40))
    out = prepared(registry, image_guide=source, resolution="64x48")
    expected = np.array(Image.open(source).resize((64, 48), Image.Resampling.LANCZOS))
    assert torch.equal(out.kwargs["input_frames"], torch.from_numpy(expected).permute(2, 0, 1)[:, None] / 255.0 * 2 - 1)
    assert out.notices == ("image_guide 80x40 resized to 64x48 (the output size) (stretched: aspect 2.00 -> 1.33).",)


def test_outpainting_pads_with_upstreams_grey_and_marks_the_margins(registry, tmp_path):
    source = picture(tmp_path / "s.png", size=(96, 96))
    mask = mask_file(tmp_path / "m.png", size=(96, 96), box=(40, 40, 56, 56))
    out = prepared(registry, image_guide=source, image_mask=mask, video_guide_outpainting="0 0 25 25",
                   resolution="128x96")
    frames, masks = out.kwargs["input_frames"], out.kwargs["input_masks"]
    assert frames.shape == (3, 1, 96, 128) and masks.shape == (1, 1, 96, 128)
    grey = torch.tensor(127.0) / 255.0 * 2.0 - 1.0
    assert torch.all(frames[..., :16] == grey) and torch.all(frames[..., 112:] == grey)  # 16 px each side
    assert torch.all(masks[..., :16] == 1) and torch.all(masks[..., 112:] == 1)
    assert torch.all(masks[..., 16 + 40:16 + 56][..., 40:56, :] == 1) and masks[..., 16:112].sum() == 16 * 16
    assert (out.kwargs["video_prompt_type"], out.kwargs["image_mode"], out.kwargs["outpainting_dims"]) == (
        "VAG", 2, [0, 0, 25, 25])


def test_a_mask_of_another_size_is_resized_and_an_empty_one_means_img2img(registry, tmp_path):
    source = picture(tmp_path / "s.png")
    out = prepared(registry, image_guide=source, image_mask=mask_file(tmp_path / "big.png", size=(128, 96),
                                                                      box=(64, 0, 128, 96)))
    assert out.notices == ("image_mask 128x96 is not the size of the source image (64x48): resized to it.",)
    assert out.kwargs["input_masks"][..., 32:].min() == 1 and out.kwargs["input_masks"][..., :32].max() == 0
    empty = prepared(registry, image_guide=source, image_mask=mask_file(tmp_path / "empty.png", box=(0, 0, 0, 0)))
    assert empty.kwargs["input_masks"] is None
    assert empty.notices == ("image_mask has no white (repaint) pixel: the whole image is denoised (image to image).",)


def test_expand_blur_and_negation_shape_the_mask(registry, tmp_path):
    source, mask = picture(tmp_path / "s.png"), mask_file(tmp_path / "m.png", box=(24, 16, 40, 32))
    plain = prepared(registry, image_guide=source, image_mask=mask).kwargs["input_masks"]
    grown = prepared(registry, image_guide=source, image_mask=mask, mask_expand=3).kwargs["input_masks"]
    blurred = prepared(registry, image_guide=source, image_mask=mask, mask_blur=4).kwargs["input_masks"]
    negated = prepared(registry, image_guide=source, image_mask=mask, video_prompt_type="VANG").kwargs["input_masks"]
    assert plain.sum() == 256 and grown.sum() > plain.sum() and torch.equal(negated, 1 - plain)
    assert 0 < blurred[0, 0, 24, 20] < 1 and blurred.sum() == pytest.approx(256, rel=0.02)  # soft edge


def test_without_g_the_strengths_are_one_as_upstream_sets_them(registry, tmp_path):
    out = prepared(registry, image_guide=picture(tmp_path / "s.png"), image_mask=mask_file(tmp_path / "m.png"),
                   video_prompt_type="VA", denoising_strength=0.3, masking_strength=0.2)
    assert (out.kwargs["denoising_strength"], out.kwargs["masking_strength"]) == (1.0, 1.0)


def test_the_widest_outpainting_keeps_16_pixels_of_source(registry, tmp_path):
    out = prepared(registry, image_guide=picture(tmp_path / "s.png"), video_guide_outpainting="100 100 100 100",
                   resolution="32x32")
    assert out.kwargs["input_masks"][0, 0].eq(0).sum() == 16 * 16


# -------------------------------------------------------------------------------------------- metadata


def fields(text):
    return dict(f.split(": ", 1) for f in text.splitlines()[-1].split(", ") if ": " in f)


def test_a1111_fields_are_written_where_they_apply(registry, tmp_path):
    source, mask = picture(tmp_path / "s.png"), mask_file(tmp_path / "m.png")
    txt2img = fields(a1111_parameters(task(registry)[0].settings(), model_name="m"))
    assert not {"Denoising strength", "Mask blur", "Hires upscale", "Hires steps", "Hires upscaler"} & set(txt2img)
    img2img = fields(a1111_parameters(task(registry, image_guide=source, denoising_strength=0.55)[0].settings(),
                                      model_name="m"))
    assert img2img["Denoising strength"] == "0.55" and "Mask blur" not in img2img
    inpaint = fields(a1111_parameters(task(registry, image_guide=source, image_mask=mask, mask_blur=4)[0].settings(),
                                      model_name="m"))
    assert inpaint["Mask blur"] == "4" and inpaint["Denoising strength"] == "0.7"
    hires = task(registry, hires_scale=1.5, hires_denoise=0.45, hires_steps=12)[0].settings()
    text = a1111_parameters(hires, model_name="m")
    assert {k: fields(text)[k] for k in ("Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler")} == {
        "Denoising strength": "0.45", "Hires upscale": "1.5", "Hires steps": "12", "Hires upscaler": "Lanczos"}
    back, warnings = parse_a1111_parameters(text)  # A1111's txt2img hires text: its denoise is the hires one
    assert warnings == [] and (back["hires_scale"], back["hires_denoise"], back["hires_steps"]) == (1.5, 0.45, 12)
    assert "denoising_strength" not in back


# ------------------------------------------------------------------------------------- the command line


def run(capsys, *argv):
    if "--process" not in argv:  # the tiny checkpoints are the preview's files
        argv = ("--model", MODEL, *argv)
    code = wgp.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_cli_inpainting_records_its_files_and_remakes_only_with_them(capsys, ckpts, tmp_path):
    source, mask = picture(tmp_path / "s.png"), mask_file(tmp_path / "m.png")
    out = tmp_path / "out"
    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", out, "--prompt", "1girl", "--image", source,
                           "--mask", mask, "--denoise", "0.8", "--mask-blur", "2", "--steps", "2", "--seed", "5")
    assert code == 0, err
    [made] = [Path(line) for line in lines]
    settings, parameters = read_image_metadata(made)
    with Image.open(made) as im:
        assert im.size == (64, 48)  # the source's size: no --resolution
    assert settings["image_guide"] == source and settings["image_mask"] == mask
    assert settings["image_guide_sha256"] == hashlib.sha256(Path(source).read_bytes()).hexdigest()
    assert "Denoising strength: 0.8" in parameters and "Mask blur: 2" in parameters

    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", out, "--process", made)
    assert code == 0, err
    with Image.open(made) as a, Image.open(lines[0]) as b:
        assert a.tobytes() == b.tobytes()  # re-made from the image, exactly

    picture(source, seed=9)  # the source changed: a warning; gone: a clear error and nothing written
    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", out, "--process", made, "--dry-run")
    assert code == 0 and "image_guide" in err and "has changed since these settings were made" in err
    Path(source).unlink()
    before = sorted(out.iterdir())
    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", out, "--process", made)
    assert code == 1 and lines == [] and sorted(out.iterdir()) == before
    assert f"image_guide: {source} is missing; these settings were made from that file" in err


@pytest.mark.parametrize("argv, message", [
    (["--image", "TEXT"], "is not an image"),
    (["--image", "SOURCE", "--denoise", "1.5"], "denoising_strength must be between 0 and 1, got 1.5"),
    (["--image", "SOURCE", "--denoise", "-0.2"], "denoising_strength must be between 0 and 1"),
    (["--image", "SOURCE", "--outpaint", "0 0 500 500", "--resolution", "4096x64"], "at most 100% of the source"),
    (["--image", "HUGE", "--outpaint", "0 0 100 100"], "past the 4096-pixel limit"),
    (["--mask", "SOURCE"], "image_mask is set but image_guide is not"),
])
def test_bad_image_inputs_exit_1_with_one_line_and_write_nothing(capsys, ckpts, tmp_path, argv, message):
    (tmp_path / "notes.txt").write_text("hello")
    files = {"TEXT": tmp_path / "notes.txt", "SOURCE": picture(tmp_path / "s.png"),
             "HUGE": picture(tmp_path / "h.png", size=(2100, 64), color="white")}
    out = tmp_path / "out"
    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", out, "--prompt", "x", "--steps", "1",
                           *[files.get(a, a) for a in argv])
    assert code == 1 and lines == [] and not (out.exists() and any(out.iterdir()))
    assert message in err and "Traceback" not in err


def test_cli_hires_fix_makes_the_upscaled_image(capsys, ckpts, tmp_path):
    code, lines, err = run(capsys, "--ckpts-dir", ckpts, "--output-dir", tmp_path, "--prompt", "1girl",
                           "--resolution", "64x48", "--steps", "2", "--hires-scale", "1.5", "--hires-steps", "1")
    assert code == 0, err
    with Image.open(lines[0]) as im:
        assert im.size == (96, 80)
        parameters = fields(im.info["parameters"])
    assert {k: parameters[k] for k in ("Hires upscale", "Denoising strength", "Hires steps", "Hires upscaler")} == {
        "Hires upscale": "1.5", "Denoising strength": "0.5", "Hires steps": "1", "Hires upscaler": "Lanczos"}


# ------------------------------------------------------------------------------------------------ the UI


def test_the_ui_only_takes_uploads_and_results_and_restores_only_kept_files(tmp_path, monkeypatch):
    from shared import ui

    uploads, outputs = tmp_path / "gradio", tmp_path / "outputs"
    uploads.mkdir()
    monkeypatch.setattr(ui, "gradio_upload_folder", lambda: str(uploads))
    inputs = ui.UploadedInputs(outputs)
    upload = picture(uploads / "a.png")
    kept = inputs.keep(upload)
    assert Path(kept).parent == (outputs / "inputs").resolve() and Path(kept).read_bytes() == Path(upload).read_bytes()
    assert inputs.keep(upload) == kept and inputs.keep(kept) == kept  # kept once, by content
    secret = picture(tmp_path / "elsewhere.png")
    with pytest.raises(ui.gr.Error, match="Only an uploaded image or one of the results"):
        inputs.keep(secret)
    assert not inputs.served(secret) and not inputs.served(str(tmp_path / "missing.png"))
    settings = {"image_guide": secret, "image_mask": kept, "prompt": "x"}
    notices = inputs.only_kept(settings, SETTINGS)
    assert settings["image_guide"] is None and settings["image_mask"] == kept and notices == [
        "image_guide not restored: only images uploaded here can be used; upload it again."]
    assert inputs.shown(secret) is None and inputs.editor_value(secret, None) is None


def test_a_painted_mask_is_the_strokes_opacity_at_the_source_size(tmp_path, monkeypatch):
    from shared import ui

    monkeypatch.setattr(ui, "gradio_upload_folder", lambda: str(tmp_path))
    inputs = ui.UploadedInputs(tmp_path / "outputs")
    source = inputs.keep(picture(tmp_path / "s.png", size=(64, 48)))
    layer = Image.new("RGBA", (128, 96), (255, 255, 255, 0))  # the editor's canvas at twice the size
    layer.paste((255, 255, 255, 255), (64, 0, 128, 96))
    layer.save(tmp_path / "layer.png")
    mask = inputs.painted_mask({"background": source, "layers": [str(tmp_path / "layer.png")]}, source)
    grey = np.asarray(Image.open(mask))
    assert grey.shape == (48, 64) and grey[:, 36:].min() == 255 and grey[:, :29].max() == 0  # Lanczos edge
    Image.new("RGBA", (64, 48), (0, 0, 0, 0)).save(tmp_path / "blank.png")
    assert inputs.painted_mask({"layers": [str(tmp_path / "blank.png")]}, source) is None
    shown = inputs.editor_value(source, mask)
    assert shown["background"] == source and np.asarray(Image.open(shown["layers"][0]).getchannel("A"))[0, 40] == 255
