"""Prompt to Qwen3 hidden states: the two bundled tokenizers and the Qwen3-0.6B text encoder.

Anima tokenizes every prompt twice (anima_reference.md §4). Qwen3-0.6B-Base encodes the Qwen2 BPE ids
(no BOS, no EOS, no template) and its final-norm hidden states are the adapter's source. The same text's
T5 v1.1 ids (ending in `</s>`) are only indices into the LLM adapter's embedding; no T5 encoder runs.
The semantics follow ComfyUI (`comfy/text_encoders/anima.py`, `comfy/sd1_clip.py`):
- the prompt is split by the weight syntax (`prompt.py`) and every segment is tokenized on its own;
- prompt weights apply to T5 tokens only; the final `</s>` has weight 1.0;
- an empty prompt gives Qwen ids [<|endoftext|>] (its real hidden state is used) and T5 ids [</s>];
- nothing is truncated: a prompt of more than 512 T5 tokens gives a longer context (warned once);
- a literal `<|endoftext|>` in a prompt is masked out of the Qwen attention with every token after it.

Shapes: L_q Qwen tokens, L_t T5 tokens, D the Qwen hidden size (1024 for Qwen3-0.6B).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer, Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from .gguf_file import has_llama_cpp_names, llama_cpp_to_qwen3
from .prompt import parse_prompt_weights
from .quant import QuantizationError
from .weights import (WeightsError, load_module_strict, open_state_dict, require_kind, required_shape,
                      source_name, strip_prefix)

logger = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizers"
QWEN_ENDOFTEXT_ID = 151643
T5_EOS_ID = 1
# The adapter was trained on T5 sequences of at most this length (the DiT context is padded to it).
T5_TRAINED_LENGTH = 512
WHAT = "Qwen3 text encoder"
# Qwen3-0.6B constants the file's shapes cannot tell (anima_reference.md §4.2, §7.2).
ROPE_THETA = 1_000_000.0
RMS_NORM_EPS = 1e-6
MAX_POSITION_EMBEDDINGS = 32768


@dataclass(frozen=True)
class PromptTokens:
    """Both tokenizations of one prompt. `t5_weights` has one weight per T5 id."""

    qwen_ids: list[int]
    t5_ids: list[int]
    t5_weights: list[float]

    def t5_tensors(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """T5 ids [1, L_t] int64 and weights [1, L_t] float32, as the adapter takes them."""
        ids = torch.tensor([self.t5_ids], dtype=torch.int64, device=device)
        weights = torch.tensor([self.t5_weights], dtype=torch.float32, device=device)
        return ids, weights


@functools.cache
def bundled_tokenizers() -> tuple[Qwen2Tokenizer, PreTrainedTokenizerFast]:
    """The Qwen2 and T5 tokenizers from `tokenizers/`, loaded once per process, never from the hub.
    The T5 one is built from `tokenizer.json` exactly as stored; transformers' `T5Tokenizer` would rebuild
    its pre-tokenizer and split text glued to a special token (`</s>hello`) differently."""
    qwen = Qwen2Tokenizer.from_pretrained(TOKENIZER_DIR / "qwen", local_files_only=True)
    t5 = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "t5" / "tokenizer.json"))
    return qwen, t5


def tokenize_prompt(text: str) -> PromptTokens:
    """Qwen ids, T5 ids and per-T5-token weights of `text`, parsed with ComfyUI's weight syntax.
    Raises ValueError for a non-finite weight such as `(a:inf)`."""
    qwen, t5 = bundled_tokenizers()
    qwen_ids: list[int] = []
    t5_ids: list[int] = []
    t5_weights: list[float] = []
    for segment in parse_prompt_weights(text):
        qwen_ids += qwen(segment.text, add_special_tokens=False)["input_ids"]
        segment_t5 = t5(segment.text, add_special_tokens=False)["input_ids"]
        t5_ids += segment_t5
        t5_weights += [segment.weight] * len(segment_t5)
    t5_ids.append(T5_EOS_ID)
    t5_weights.append(1.0)
    if len(t5_ids) > T5_TRAINED_LENGTH:
        _warn_long_prompt()
    return PromptTokens(qwen_ids=qwen_ids or [QWEN_ENDOFTEXT_ID], t5_ids=t5_ids, t5_weights=t5_weights)


@functools.cache
def _warn_long_prompt() -> None:
    logger.warning(
        "A prompt is longer than %d T5 tokens. It is used in full (as in ComfyUI), which makes the context "
        "longer than Anima was trained on; shorten it if results look off. (Shown once.)", T5_TRAINED_LENGTH)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Qwen3 sizes read from a state dict's shapes; Qwen3-0.6B is vocab 151936, hidden 1024, 28 layers,
    16 query heads and 8 KV heads of 128, MLP 3072."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> TextEncoderConfig:
        """`sd` has the `model.` prefix already removed."""
        vocab_size, hidden_size = _shape(sd, "embed_tokens.weight")
        (head_dim,) = _shape(sd, "layers.0.self_attn.q_norm.weight")
        layer_indices = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=max(layer_indices) + 1,
            num_heads=_shape(sd, "layers.0.self_attn.q_proj.weight")[0] // head_dim,
            num_kv_heads=_shape(sd, "layers.0.self_attn.k_proj.weight")[0] // head_dim,
            head_dim=head_dim,
            intermediate_size=_shape(sd, "layers.0.mlp.gate_proj.weight")[0],
        )

    def to_qwen3_config(self) -> Qwen3Config:
        return Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=MAX_POSITION_EMBEDDINGS,
            rms_norm_eps=RMS_NORM_EPS,
            rope_theta=ROPE_THETA,  # transformers 4.x reads this
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},  # and 5.x this
            attention_bias=False,
            tie_word_embeddings=False,
            use_cache=False,
        )


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    return required_shape(sd, key, what=WHAT)


def load_text_encoder(source: str | os.PathLike | Mapping[str, Tensor], dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> Qwen3Model:
    """Qwen3 text encoder from `qwen_3_06b_base.safetensors` (keys `model.*`, no `lm_head`; unprefixed keys
    work too), or from an already-opened state dict. The architecture is read from the tensor shapes.

    `dtype` is the compute dtype. float32 (default) reproduces ComfyUI, which runs this model with fp32
    activations; it needs 0.6 B params * 4 bytes = 2.4 GB of memory (the bf16 file is 1.2 GB).
    bfloat16 halves that and drifts slightly from the reference (as diffusers does).
    Quantized files (ComfyUI fp8/int8, GGUF from llama.cpp with its tensor names) stay quantized.
    Raises WeightsError for a missing, corrupt or wrong file (e.g. the DiT or the VAE)."""
    sd = open_state_dict(source, what=WHAT)
    if has_llama_cpp_names(sd):
        try:
            sd = llama_cpp_to_qwen3(sd)
        except QuantizationError as error:
            raise WeightsError(f"{source_name(source)} is not a Qwen3 text encoder: {error}.") from None
    require_kind(sd, "qwen3_text_encoder", what=WHAT, source=source)
    sd = strip_prefix(sd, ("model.",))
    config = TextEncoderConfig.from_state_dict(sd).to_qwen3_config()
    with torch.device("meta"):
        model = Qwen3Model(config)
    # inv_freq is a computed, non-persistent buffer: build it for real, since loading cannot fill it.
    with torch.device(device):
        model.rotary_emb = Qwen3RotaryEmbedding(config)
    return load_module_strict(model, sd, dtype=dtype, device=device, what=WHAT)


def encode_prompt(text_encoder: Qwen3Model, tokens: PromptTokens,
                  device: torch.device | str | None = None) -> Tensor:
    """Final-norm hidden states [1, L_q, D] of `tokens.qwen_ids`, computed in the encoder's dtype and
    returned as float32. `device` (default: where the embedding weights are) is where the ids go; pass the
    execution device when an offloader moves the weights on demand."""
    if device is None:
        device = text_encoder.embed_tokens.weight.device
    ids = torch.tensor([tokens.qwen_ids], dtype=torch.int64, device=device)  # [1, L_q]
    mask = comfyui_attention_mask(tokens.qwen_ids, text_encoder.embed_tokens.weight.dtype, device)
    with torch.no_grad():
        hidden = text_encoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return hidden.float()  # [1, L_q, D]


def comfyui_attention_mask(qwen_ids: list[int], dtype: torch.dtype,
                           device: torch.device | str) -> Tensor | None:
    """ComfyUI's additive Qwen attention mask [1, 1, L_q, L_q], or None where it is plain causal.

    ComfyUI (`SDClipModel.process_tokens`, with `<|endoftext|>` as its pad and end token) masks a leading
    run of `<|endoftext|>`, then the first later `<|endoftext|>` and every token after it. Masked keys and
    future keys each add finfo.min / 4, so a row that sees only masked keys spreads its attention evenly
    over them and over the unmasked future keys. An empty prompt ([<|endoftext|>]) is unaffected."""
    length = len(qwen_ids)
    start = next((i for i, t in enumerate(qwen_ids) if t != QWEN_ENDOFTEXT_ID), length)
    end = next((i for i in range(start, length) if qwen_ids[i] == QWEN_ENDOFTEXT_ID), length)
    if start == 0 and end == length:
        return None
    masked = torch.ones(length, dtype=dtype, device=device)
    masked[start:end] = 0.0
    blocked = torch.finfo(dtype).min / 4
    causal = torch.full((length, length), blocked, dtype=dtype, device=device).triu(1)
    return (causal + masked * blocked)[None, None]  # [1, 1, L_q, L_q]


@dataclass(frozen=True)
class EncodedPrompt:
    tokens: PromptTokens
    qwen_hidden: Tensor  # [1, L_q, D] float32; shared between cache hits, do not modify in place


class PromptCache:
    """Encodings of recent prompts, so a batch that repeats prompts runs the text encoder once per prompt.

    Keys are (prompt text, `extra_key`). `extra_key` must name everything else that changes the encoding:
    the text-encoder file and dtype, and active text-encoder LoRAs with their strengths. The least recently
    used entry is dropped beyond `max_entries`."""

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, Hashable], EncodedPrompt] = OrderedDict()

    def encode(self, text: str, get_text_encoder: Callable[[], Qwen3Model], extra_key: Hashable = None,
               device: torch.device | str | None = None) -> EncodedPrompt:
        """The cached encoding of `text`, or a new one. `get_text_encoder` is only called on a miss, so a
        pipeline that freed the encoder need not reload it for prompts it has seen."""
        key = (text, extra_key)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        tokens = tokenize_prompt(text)
        encoded = EncodedPrompt(tokens, encode_prompt(get_text_encoder(), tokens, device=device))
        self._entries[key] = encoded
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return encoded

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
