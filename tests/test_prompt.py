"""ComfyUI weight-syntax parsing. Expected segments are worked out by hand from ComfyUI's rules
(sd1_clip.token_weights / escape_important): x1.1 per group, `:w` after the last colon replaces it."""

import pytest

from models.anima.prompt import PromptSegment, parse_prompt_weights


def segments(prompt):
    return [(s.text, s.weight) for s in parse_prompt_weights(prompt)]


@pytest.mark.parametrize("prompt, expected", [
    ("1girl, solo, smile", [("1girl, solo, smile", 1.0)]),
    ("(smile)", [("smile", 1.1)]),
    ("((smile))", [("smile", 1.1 * 1.1)]),
    ("(((smile)))", [("smile", 1.1 * 1.1 * 1.1)]),
    ("(smile:1.3)", [("smile", 1.3)]),
    ("1girl, (smile:1.3), solo", [("1girl, ", 1.0), ("smile", 1.3), (", solo", 1.0)]),
    ("(chibi:2)", [("chibi", 2.0)]),
    ("((smile):1.5)", [("smile", 1.5 * 1.1)]),  # the explicit weight sits outside the inner group
    ("((smile:1.5))", [("smile", 1.5)]),  # an explicit weight replaces the enclosing x1.1
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 2.0), (" c", 0.5)]),
    ("(a (b) c)", [("a ", 1.1), ("b", 1.1 * 1.1), (" c", 1.1)]),
    ("(a)(b)", [("a", 1.1), ("b", 1.1)]),  # equal weights are not merged
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a: 2 )", [("a", 2.0)]),
    ("(a:1e-1)", [("a", 0.1)]),
    ("(a:1:2)", [("a:1", 2.0)]),  # the last colon holds the weight
])
def test_nested_and_explicit_weights(prompt, expected):
    assert segments(prompt) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("(a:b)", [("a:b", 1.1)]),  # not a number: the colon is text, the group is x1.1
    ("(12:00 clock)", [("12:00 clock", 1.1)]),
    ("(:2)", [(":2", 1.1)]),  # a colon at the start is never a weight
    ("()", []),
    ("a () b", [("a ", 1.0), (" b", 1.0)]),
    ("", []),
])
def test_groups_whose_colon_is_not_a_weight_and_empty_groups(prompt, expected):
    assert segments(prompt) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("hatsune miku, name_\\(series\\)", [("hatsune miku, name_(series)", 1.0)]),
    ("(name_\\(series\\):1.2)", [("name_(series)", 1.2)]),
    ("\\(a:1.5\\)", [("(a:1.5)", 1.0)]),
    ("\\)\\(", [(")(", 1.0)]),
    ("a\\b", [("a\\b", 1.0)]),  # a backslash before anything else stays
    # Unescaped Danbooru parentheses are weight syntax, as in ComfyUI.
    ("name_(series)", [("name_", 1.0), ("series", 1.1)]),
])
def test_escaped_parentheses_are_literal(prompt, expected):
    assert segments(prompt) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("a (b c", [("a ", 1.0), ("(b c", 1.0)]),  # an unmatched "(" stays as text
    ("(a (b)", [("a ", 1.1), ("(b", 1.1)]),  # the first "(" pairs with the only ")"
    ("((a)", [("(a", 1.1)]),
    ("a) (b) c", [("a) (b) c", 1.0)]),  # after a stray ")" the parentheses stay text ...
    ("a) ((b))", [("a) (", 1.0), ("b", 1.1), (")", 1.0)]),  # ... until the count is back to zero
    (")", [(")", 1.0)]),
    ("(", [("(", 1.0)]),
    (")))(((", [(")))(((", 1.0)]),
])
def test_unbalanced_parentheses_follow_comfyui_and_never_fail(prompt, expected):
    assert segments(prompt) == expected


def test_segment_texts_are_never_empty_and_keep_every_character_outside_the_markup():
    prompt = "masterpiece, ((best quality)), (score_9:1.2), 1girl, \\(tag\\), (a:b) end"
    result = parse_prompt_weights(prompt)
    assert all(s.text for s in result)
    assert "".join(s.text for s in result) == "masterpiece, best quality, score_9, 1girl, (tag), a:b end"
    assert result[1] == PromptSegment("best quality", 1.1 * 1.1)


@pytest.mark.parametrize("prompt", ["(a:inf)", "(a:nan)", "(a:-inf)", "x (y:1e999)"])
def test_non_finite_weights_are_a_clear_error(prompt):
    with pytest.raises(ValueError, match="not a finite number"):
        parse_prompt_weights(prompt)


def test_absurd_nesting_is_a_clear_error():
    with pytest.raises(ValueError, match="too deeply"):
        parse_prompt_weights("(" * 5000 + "a" + ")" * 5000)
