"""ComfyUI prompt-weight syntax: split a prompt into segments of equal weight.

Anima's reference implementation (ComfyUI, `comfy/sd1_clip.py`: `escape_important`, `token_weights`,
`unescape_important`) parses the prompt once and feeds the same segments to both tokenizers. This module
reproduces that parse exactly, so prompts written for ComfyUI give the same token ids and weights here.

Syntax (weights are multiplied onto the LLM adapter's output rows of the segment's T5 tokens):
- `(text)` multiplies the weight by 1.1 per nesting level: `((text))` is 1.1 * 1.1.
- `(text:1.3)` sets the weight to 1.3 (instead of multiplying by 1.1); groups nested inside it multiply
  from 1.3. The weight is the part after the LAST colon and uses Python `float()` syntax
  (`2`, `0.5`, `-1`, `1e-1`). If that part is not a number, as in `(a:b)`, the colon is kept as text and
  the group is an ordinary x1.1 group: `(a:b)` gives "a:b" at 1.1. A colon at the very start, `(:2)`,
  is text too (":2" at 1.1). A weight of inf or nan raises ValueError (ComfyUI would produce NaN images).
- `\\(` and `\\)` are literal parentheses and never group. Danbooru tags like `name_(series)` must be
  written `name_\\(series\\)`; unescaped they become "name_" at 1.0 and "series" at 1.1.
- `()` is dropped.
- Unbalanced parentheses never fail:
  - an unmatched `(` stays in the text: `a (b c` gives "a " and "(b c", both at the enclosing weight;
  - a stray `)` stays in the text, and (as in ComfyUI) so does every parenthesis after it until the
    count is back to zero: `a) (b) c` is one literal segment "a) (b) c" at 1.0.
- Segments are not merged even when their weights are equal: `(a)(b)` gives "a" and "b", each at 1.1,
  and each segment is tokenized on its own, as ComfyUI does.
Differences from ComfyUI: `embedding:name` (textual inversion) is plain text here; ComfyUI looks the name
up in its embeddings folder and drops it with a warning when the file is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NESTING_FACTOR = 1.1
# ComfyUI hides escaped parentheses behind these two-character markers while it parses.
_ESCAPED_CLOSE, _ESCAPED_OPEN = "\0\1", "\0\2"


@dataclass(frozen=True)
class PromptSegment:
    text: str
    weight: float


def parse_prompt_weights(prompt: str) -> list[PromptSegment]:
    """Split `prompt` into (text, weight) segments in order; the markup is removed from the text.
    The segments' texts are never empty. See the module docstring for the syntax."""
    hidden = prompt.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)
    try:
        segments = _weighted_segments(hidden, 1.0)
    except RecursionError:
        raise ValueError("The prompt nests parentheses too deeply to parse.") from None
    return [PromptSegment(_unescape(text), weight) for text, weight in segments]


def _weighted_segments(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for piece in _split_top_level_groups(text):
        if len(piece) < 2 or piece[0] != "(" or piece[-1] != ")":
            out.append((piece, weight))
            continue
        inner, inner_weight = piece[1:-1], weight * NESTING_FACTOR
        colon = inner.rfind(":")
        if colon > 0:
            explicit = _parse_weight(inner[colon + 1:])
            if explicit is not None:
                inner, inner_weight = inner[:colon], explicit
        out += _weighted_segments(inner, inner_weight)
    return out


def _split_top_level_groups(text: str) -> list[str]:
    """Cut `text` before every `(` opened at depth 0 and after the `)` that brings the depth back to 0.
    The depth may go negative after a stray `)`; a `(` then only counts back up, as in ComfyUI."""
    pieces: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(" and depth == 0:
            if current:
                pieces.append("".join(current))
            current = ["("]
            depth = 1
        elif char == "(":
            current.append(char)
            depth += 1
        elif char == ")":
            depth -= 1
            current.append(char)
            if depth == 0:
                pieces.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        pieces.append("".join(current))
    return pieces


def _parse_weight(text: str) -> float | None:
    try:
        weight = float(text)
    except ValueError:
        return None
    if not math.isfinite(weight):
        raise ValueError(f"Prompt weight '{text.strip()}' is not a finite number; use e.g. (text:1.3).")
    return weight


def _unescape(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")
