"""sd-scripts style prompt files: comments, inline overrides, and clear errors for bad lines."""

import pytest

from shared.prompts_file import PromptLine, parse_prompt_line, read_prompts_file


def test_every_inline_override_maps_to_its_setting():
    prompt, overrides = parse_prompt_line("1girl, solo --w 832 --h 1216 --d 42 --s 30 --l 4.5 --fs 2.5 --n lowres, bad hands")
    assert prompt == "1girl, solo"
    assert overrides == {
        "width": 832, "height": 1216, "seed": 42, "num_inference_steps": 30, "guidance_scale": 4.5,
        "flow_shift": 2.5, "negative_prompt": "lowres, bad hands",
    }


def test_negative_prompt_may_come_first_and_g_is_an_alias_of_l():
    assert parse_prompt_line("cat --n dog, fish --g 3") == ("cat", {"negative_prompt": "dog, fish", "guidance_scale": 3.0})


def test_resolution_completes_a_single_override_from_the_base_settings():
    base = {"resolution": "1024x768"}
    assert PromptLine(1, "a", {"width": 64}).task(base) == {"prompt": "a", "resolution": "64x768"}
    assert PromptLine(1, "a", {"height": 32, "seed": 3}).task(base) == {"prompt": "a", "seed": 3, "resolution": "1024x32"}
    assert PromptLine(1, "a").task(base) == {"prompt": "a"}


def test_file_skips_comments_and_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\ufeff# header\n\nfirst --s 2\n   # indented comment\nsecond, with #hashtag --d 7\n", encoding="utf-8")
    lines = read_prompts_file(path)
    assert [(l.line_no, l.prompt, l.overrides) for l in lines] == [
        (3, "first", {"num_inference_steps": 2}), (5, "second, with #hashtag", {"seed": 7})]


@pytest.mark.parametrize("line, message", [
    ("cat --x 3", r"line 1: unknown option '--x'"),
    ("cat --w big", r"line 1: --w needs a whole number, got 'big'"),
    ("cat --l", r"line 1: --l: guidance_scale is empty"),
    ("cat --s 3 4", r"line 1: --s: num_inference_steps must be a whole number, got '3 4'"),
    ("cat —w 256", r"line 1: '—w' is written with a dash character; options take two hyphens: --w"),
    ("cat –s 20", r"line 1: '–s' is written with a dash character"),
])
def test_bad_lines_name_the_line_and_the_problem(tmp_path, line, message):
    path = tmp_path / "p.txt"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompts_file(path)


def test_missing_or_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Prompts file not found"):
        read_prompts_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts_file(tmp_path / "empty.txt")
