"""Saving generated images: pixels, names, no overwrite, and metadata that reads back in every format."""

import json
import os
from datetime import datetime

import pytest
import torch
from PIL import ExifTags, Image

from shared import images
from shared.images import (
    a1111_parameters, image_stem, parse_a1111_parameters, prompt_slug, read_image_metadata,
    read_image_settings, save_image, tensor_to_pil,
)

SETTINGS = {
    "model_type": "anima_preview", "prompt": "1girl, solo, <lora:style:0.5> smile", "negative_prompt": "lowres, bad",
    "resolution": "64x48", "num_inference_steps": 2, "guidance_scale": 4.5, "flow_shift": 3.0,
    "sample_solver": "er_sde", "scheduler": "simple", "cfg_truncation_perc": 100.0, "seed": 1234, "batch_size": 1, "activated_loras": ["detail.safetensors"],
    "loras_multipliers": "0.8",
}
WHEN = datetime(2026, 9, 1, 13, 5, 9)


def _params(settings=SETTINGS):
    return a1111_parameters(settings, model_name="anima-preview", loras=[("detail", 0.8, "0123456789ab")])


def test_tensor_to_pil_maps_minus_one_to_one_onto_0_to_255_as_comfyui_saves():
    x = torch.tensor([-1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 5).expand(3, 2, 5)  # [3, H=2, W=5]
    im = tensor_to_pil(x)
    assert im.size == (5, 2) and im.mode == "RGB"
    # ComfyUI: clamp((x + 1) / 2, 0, 1) * 255, truncated by astype(uint8): 0.5 -> 127, 0.9995 -> 254
    assert [im.getpixel((i, 0))[0] for i in range(5)] == [0, 127, 254, 255, 255]


def test_file_name_follows_wan2gp_pattern_with_index_suffix():
    assert image_stem(WHEN, 42, "1girl, Solo!  smile", 0) == "2026-09-01-13h05m09s_seed42_1girl-solo-smile"
    assert image_stem(WHEN, 42, "x", 2) == "2026-09-01-13h05m09s_seed42_x_2"
    assert prompt_slug("  ,,, ") == "image"
    assert prompt_slug("猫 と 犬") == "猫-と-犬"  # letters of any script survive
    long = prompt_slug("word " * 40)
    assert len(long) <= 50 and not long.endswith("-")


def test_a1111_text_has_every_field_and_parses_back():
    text = _params()
    prompt_line, negative_line, fields = text.split("\n")
    assert prompt_line == "1girl, solo, <lora:style:0.5> smile <lora:detail:0.8>"
    assert negative_line == "Negative prompt: lowres, bad"
    assert fields == (
        "Steps: 2, Sampler: er_sde, Schedule type: simple, CFG scale: 4.5, Shift: 3, Seed: 1234, "
        'Size: 64x48, Model: anima-preview, Lora hashes: "detail: 0123456789ab"'
    )
    back, warnings = parse_a1111_parameters(text)
    assert warnings == [] and back == {
        "prompt": prompt_line, "negative_prompt": "lowres, bad", "num_inference_steps": 2,
        "sample_solver": "er_sde", "scheduler": "simple", "guidance_scale": 4.5, "flow_shift": 3.0, "seed": 1234,
        "resolution": "64x48",
    }


def test_a1111_parser_reads_multiline_prompts_and_other_apps_fields():
    text = 'a\nb\nNegative prompt: c\nd\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x768, Model hash: abc'
    assert parse_a1111_parameters(text)[0] == {
        "prompt": "a\nb", "negative_prompt": "c\nd", "num_inference_steps": 20, "sample_solver": "Euler a",
        "guidance_scale": 7.0, "seed": 5, "resolution": "512x768",
    }


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_metadata_round_trips_in_every_format(tmp_path, fmt):
    im = Image.new("RGB", (64, 48), (10, 200, 30))
    settings = dict(SETTINGS, prompt="猫, café")  # non-Latin-1 text must survive too
    params = _params(settings)
    path = save_image(im, tmp_path, stem="s", fmt=fmt, parameters=params, settings=settings)
    assert path.name == "s" + images.IMAGE_FORMATS[fmt]
    with Image.open(path) as back:
        assert back.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt] and back.size == (64, 48)
    stored, text = read_image_metadata(path)
    assert stored == settings and text == params
    assert read_image_settings(path) == (settings, [])


def test_png_pixels_are_lossless_and_chunks_are_named_for_other_tools(tmp_path):
    im = Image.effect_noise((32, 16), 60).convert("RGB")
    path = save_image(im, tmp_path, stem="n", fmt="png", parameters="p\nSteps: 1", settings={"seed": 1})
    with Image.open(path) as back:
        assert back.tobytes() == im.tobytes()
        assert back.info["parameters"] == "p\nSteps: 1" and json.loads(back.info["comment"]) == {"seed": 1}


def test_saving_never_overwrites_and_leaves_no_temp_files(tmp_path):
    im = Image.new("RGB", (8, 8))
    paths = [save_image(im, tmp_path, stem="same", fmt="png", parameters="", settings={"n": n}) for n in range(3)]
    assert [p.name for p in paths] == ["same.png", "same-2.png", "same-3.png"]
    assert [read_image_settings(p)[0]["n"] for p in paths] == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["same-2.png", "same-3.png", "same.png"]


def test_saving_falls_back_when_hard_links_are_unsupported(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError("operation not permitted")

    monkeypatch.setattr(images.os, "link", no_links)
    im = Image.new("RGB", (8, 8))
    first = save_image(im, tmp_path, stem="x", fmt="png", parameters="", settings={"n": 1})
    second = save_image(im, tmp_path, stem="x", fmt="png", parameters="", settings={"n": 2})
    assert (first.name, second.name) == ("x.png", "x-2.png")
    assert read_image_settings(first)[0] == {"n": 1} and len(os.listdir(tmp_path)) == 2


def test_a1111_only_images_give_their_settings(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "cat\nSteps: 12, Sampler: euler, CFG scale: 5, Seed: 9, Size: 64x64")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    assert read_image_settings(tmp_path / "a.png")[0] == {
        "prompt": "cat", "num_inference_steps": 12, "sample_solver": "euler", "guidance_scale": 5.0,
        "seed": 9, "resolution": "64x64",
    }


def test_wan2gp_jpegs_with_json_in_user_comment_give_their_settings(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[0x9286] = b"UNICODE\x00" + json.dumps({"prompt": "cat", "seed": 4}).encode("utf-16-be")
    Image.new("RGB", (8, 8)).save(tmp_path / "w.jpg", exif=exif)
    assert read_image_settings(tmp_path / "w.jpg") == ({"prompt": "cat", "seed": 4}, [])


def test_images_without_settings_or_not_images_give_clear_errors(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="carries no generation settings"):
        read_image_settings(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="not an image file"):
        read_image_settings(tmp_path / "text.png")
