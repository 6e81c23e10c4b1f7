"""Prompt -> tokens -> Qwen3 hidden states -> DiT context, against transformers and the spec (§4, §3.4).

Expected ids come from transformers' own tokenizer classes called on hand-split segment texts (plus a few
ids checked by hand), the expected hidden states from a Qwen3Model built directly from a literal config."""

import logging

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model, T5TokenizerFast

from models.anima import text_encoder as te
from models.anima.anima_model import load_anima_model
from models.anima.text_encoder import (TOKENIZER_DIR, PromptCache, PromptTokens, TextEncoderConfig,
                                       comfyui_attention_mask, encode_prompt, load_text_encoder,
                                       tokenize_prompt)
from models.anima.weights import WeightsError
from tests.tiny_dit import write_dit_file
from tests.tiny_text_encoder import make_text_encoder_state_dict, write_text_encoder_file


@pytest.fixture(scope="module")
def reference_tokenizers():
    return (Qwen2Tokenizer.from_pretrained(TOKENIZER_DIR / "qwen", local_files_only=True),
            T5TokenizerFast.from_pretrained(TOKENIZER_DIR / "t5", local_files_only=True))


@pytest.fixture(scope="module")
def te_file(tmp_path_factory):
    return write_text_encoder_file(tmp_path_factory.mktemp("te") / "qwen_3_06b_base.safetensors")


@pytest.fixture(scope="module")
def text_encoder(te_file):
    return load_text_encoder(te_file)


def spec_inv_freq(head_dim: int) -> torch.Tensor:
    """Qwen3's rotary frequencies with the spec's theta 1e6 (anima_reference.md §7.2)."""
    return 1.0 / 1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


@pytest.fixture(scope="module")
def reference():
    """Qwen3Model from a literal config (Qwen3-0.6B constants, tiny widths) and the tiny file's weights.
    theta is given in both spellings: transformers 4.x reads `rope_theta`, 5.x `rope_parameters`; the
    assertion proves the reference itself rotates with the spec's frequencies under either."""
    config = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                         rope_theta=1e6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                         tie_word_embeddings=False)
    model = Qwen3Model(config).eval()
    model.load_state_dict({k.removeprefix("model."): v.float() for k, v in make_text_encoder_state_dict().items()})
    torch.testing.assert_close(model.rotary_emb.inv_freq, spec_inv_freq(8), rtol=0, atol=0)
    return model


# (prompt, the segments ComfyUI tokenizes separately with their weights)
PROMPT_TABLE = [
    ("masterpiece, best quality, score_9, 1girl, hatsune_miku, @wlop, smile",
     [("masterpiece, best quality, score_9, 1girl, hatsune_miku, @wlop, smile", 1.0)]),
    ("1girl, name_\\(series\\), solo", [("1girl, name_(series), solo", 1.0)]),
    ("1girl, name_(series), solo", [("1girl, name_", 1.0), ("series", 1.1), (", solo", 1.0)]),
    ("(@wlop:1.3), score_9, (masterpiece)", [("@wlop", 1.3), (", score_9, ", 1.0), ("masterpiece", 1.1)]),
    ("猫耳の少女, 日本語, (着物:1.2)", [("猫耳の少女, 日本語, ", 1.0), ("着物", 1.2)]),
    ("smile 😀🎉, (sparkles:0.8)", [("smile 😀🎉, ", 1.0), ("sparkles", 0.8)]),
    ("1girl, solo   ", [("1girl, solo   ", 1.0)]),
    ("ye-pop\nA photo of a cat.  Two sentences.", [("ye-pop\nA photo of a cat.  Two sentences.", 1.0)]),
    ("((blush)), year 2025, newest", [("blush", 1.1 * 1.1), (", year 2025, newest", 1.0)]),
]


@pytest.mark.parametrize("prompt, segments", PROMPT_TABLE)
def test_ids_and_weights_match_transformers_tokenizers_per_segment(prompt, segments, reference_tokenizers):
    qwen, t5 = reference_tokenizers
    qwen_ids, t5_ids, t5_weights = [], [], []
    for text, weight in segments:
        qwen_ids += qwen(text)["input_ids"]
        ids = t5(text)["input_ids"]
        assert ids[-1] == 1  # the tokenizer's own </s>; ComfyUI drops it per segment
        t5_ids += ids[:-1]
        t5_weights += [weight] * (len(ids) - 1)
    tokens = tokenize_prompt(prompt)
    assert tokens.qwen_ids == qwen_ids
    assert tokens.t5_ids == t5_ids + [1]
    assert tokens.t5_weights == t5_weights + [1.0]


@pytest.mark.parametrize("prompt, qwen_ids, t5_ids, t5_weights", [
    ("Hello world", [9707, 1879], [8774, 296, 1], [1.0] * 3),
    ("name_\\(series\\)", [606, 8361, 19880, 8], [564, 834, 599, 10833, 7, 61, 1], [1.0] * 7),
    ("(score_9:1.5)", [12338, 62, 24], [2604, 834, 1298, 1], [1.5, 1.5, 1.5, 1.0]),
    ("@wlop", [31, 86, 22288], [3320, 210, 8745, 1], [1.0] * 4),
    ("猫耳", [100472, 100229], [3, 2, 1], [1.0] * 3),  # T5 has no CJK pieces: "▁", <unk>
    ("1girl, solo  ", [16, 28552, 11, 13529, 256], [209, 18722, 6, 6729, 1], [1.0] * 5),  # Qwen keeps "  "
    ("", [151643], [1], [1.0]),  # empty prompt: <|endoftext|> and </s>
])
def test_known_ids(prompt, qwen_ids, t5_ids, t5_weights):
    assert tokenize_prompt(prompt) == PromptTokens(qwen_ids, t5_ids, t5_weights)


def test_t5_ids_follow_the_bundled_tokenizer_json_as_stored():
    # transformers' T5Tokenizer rebuilds the pre-tokenizer and splits text glued to a special token otherwise.
    raw = Tokenizer.from_file(str(TOKENIZER_DIR / "t5" / "tokenizer.json"))
    for prompt in ["</s>hello", "<extra_id_0>cat, dog"]:
        assert tokenize_prompt(prompt).t5_ids == raw.encode(prompt).ids


def test_tokenizers_load_once_and_tensors_have_adapter_dtypes():
    assert te.bundled_tokenizers() is te.bundled_tokenizers()
    ids, weights = tokenize_prompt("(cat:2) dog").t5_tensors()
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.tolist() == [[1712, 1782, 1]] and weights.tolist() == [[2.0, 1.0, 1.0]]


def test_long_prompts_are_not_truncated_and_warn_once(caplog):
    te._warn_long_prompt.cache_clear()
    prompt = " ".join(["cat,"] * 300)
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        tokens = tokenize_prompt(prompt)
        tokenize_prompt(prompt + "dog")
    assert len(tokens.t5_ids) == 601 and len(tokens.qwen_ids) == 600
    assert len([r for r in caplog.records if "512 T5 tokens" in r.message]) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        tokenize_prompt(" ".join(["cat,"] * 300))
    assert not caplog.records


def test_non_finite_weight_is_a_clear_error():
    with pytest.raises(ValueError, match="finite"):
        tokenize_prompt("1girl, (smile:inf)")


def test_tiny_file_matches_transformers_qwen3model(text_encoder, reference):
    for prompt in ["masterpiece, best quality, 1girl, (smile:1.3), @wlop", ""]:
        tokens = tokenize_prompt(prompt)
        expected = reference(torch.tensor([tokens.qwen_ids])).last_hidden_state
        got = encode_prompt(text_encoder, tokens)
        assert got.shape == (1, len(tokens.qwen_ids), 32) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert encode_prompt(text_encoder, tokenize_prompt("")).abs().sum() > 0  # real <|endoftext|> state
    torch.testing.assert_close(text_encoder.rotary_emb.inv_freq, spec_inv_freq(8), rtol=0, atol=0)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in text_encoder.parameters())


EOT = 151643


@pytest.mark.parametrize("ids, masked_keys", [
    ([EOT], [True]),  # the empty prompt: one masked key, which changes nothing
    ([EOT, EOT, 5, 6], [True, True, False, False]),  # leading <|endoftext|> run
    ([5, EOT, 6], [False, True, True]),  # the first later <|endoftext|> and all after it
    ([EOT, 5, EOT, 6], [True, False, True, True]),
    ([5, 6, EOT], [False, False, True]),
])
def test_attention_mask_masks_the_keys_comfyui_masks(ids, masked_keys):
    n, blocked = len(ids), torch.finfo(torch.float32).min / 4
    mask = comfyui_attention_mask(ids, torch.float32, "cpu")
    assert mask.shape == (1, 1, n, n)
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    key_bias = torch.tensor([blocked if m else 0.0 for m in masked_keys]).expand(n, n)
    assert torch.equal(mask[0, 0][~future], key_bias[~future])
    assert (mask[0, 0][future] <= blocked).all()
    assert comfyui_attention_mask([5, 6, 7], torch.float32, "cpu") is None


def test_literal_endoftext_in_a_prompt_masks_the_rest_like_a_padding_mask(text_encoder, reference):
    tokens = tokenize_prompt("1girl, smile<|endoftext|>, blush")
    cut = tokens.qwen_ids.index(EOT)
    padding_mask = torch.tensor([[1] * cut + [0] * (len(tokens.qwen_ids) - cut)])
    expected = reference(torch.tensor([tokens.qwen_ids]), attention_mask=padding_mask).last_hidden_state
    torch.testing.assert_close(encode_prompt(text_encoder, tokens), expected, rtol=1e-6, atol=1e-6)
    leading = tokenize_prompt("<|endoftext|>1girl")
    hidden = encode_prompt(text_encoder, leading)
    unmasked = reference(torch.tensor([leading.qwen_ids])).last_hidden_state
    assert hidden.isfinite().all() and not torch.allclose(hidden[0, 0], unmasked[0, 0])


def test_bf16_option_stays_close_to_fp32(te_file, text_encoder):
    tokens = tokenize_prompt("masterpiece, 1girl, smile, looking at viewer")
    bf16 = load_text_encoder(te_file, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    got = encode_prompt(bf16, tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, encode_prompt(text_encoder, tokens), rtol=0.05, atol=0.1)


def test_config_inferred_from_shapes():
    sd = make_text_encoder_state_dict(hidden=48, layers=3, heads=6, kv_heads=3, head_dim=16, intermediate=80)
    assert TextEncoderConfig.from_state_dict({k.removeprefix("model."): v for k, v in sd.items()}) == \
        TextEncoderConfig(vocab_size=151936, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=3,
                          head_dim=16, intermediate_size=80)
    model = load_text_encoder(sd)
    assert model.config.num_key_value_heads == 3
    torch.testing.assert_close(model.rotary_emb.inv_freq, spec_inv_freq(16), rtol=0, atol=0)
    assert model.config.rms_norm_eps == 1e-6 and len(model.layers) == 3


def test_real_qwen3_06b_shapes_give_the_spec_config():
    shapes = {"embed_tokens.weight": (151936, 1024), "norm.weight": (1024,)}
    for i in range(28):
        p = f"layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (2048, 1024), p + "self_attn.k_proj.weight": (1024, 1024),
                   p + "self_attn.v_proj.weight": (1024, 1024), p + "self_attn.o_proj.weight": (1024, 2048),
                   p + "self_attn.q_norm.weight": (128,), p + "self_attn.k_norm.weight": (128,),
                   p + "mlp.gate_proj.weight": (3072, 1024), p + "mlp.up_proj.weight": (3072, 1024),
                   p + "mlp.down_proj.weight": (1024, 3072), p + "input_layernorm.weight": (1024,),
                   p + "post_attention_layernorm.weight": (1024,)}
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = TextEncoderConfig.from_state_dict(sd)
    assert config == TextEncoderConfig(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16,
                                       num_kv_heads=8, head_dim=128, intermediate_size=3072)
    with torch.device("meta"):
        model = Qwen3Model(config.to_qwen3_config())
    # The module takes exactly the file's 310 tensors, 1.19 GB in bf16 (anima_reference.md §7.2).
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) * 2 == pytest.approx(1.19e9, rel=0.01)


def test_wrong_files_give_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_text_encoder(tmp_path / "missing.safetensors")
    dit = write_dit_file(tmp_path / "anima-preview.safetensors")
    with pytest.raises(WeightsError, match="is an Anima DiT checkpoint, not the Qwen3 text encoder"):
        load_text_encoder(dit)
    with pytest.raises(WeightsError, match="Wan 2.1"):
        load_text_encoder({"decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1)})
    sd = make_text_encoder_state_dict()
    incomplete = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(WeightsError, match="1 missing key.*layers.1.mlp.up_proj.weight"):
        load_text_encoder(incomplete)
    with pytest.raises(WeightsError, match="1 unexpected key.*lm_head.weight"):
        load_text_encoder(sd | {"lm_head.weight": sd["model.embed_tokens.weight"]})
    no_embedding = {k: v for k, v in sd.items() if k != "model.embed_tokens.weight"}
    save_file(no_embedding, tmp_path / "no_embedding.safetensors")
    with pytest.raises(WeightsError, match="lack 'embed_tokens.weight'"):
        load_text_encoder(tmp_path / "no_embedding.safetensors")


def test_prompt_cache_encodes_each_prompt_once_per_extra_key(text_encoder):
    calls = []

    def get_text_encoder():
        calls.append(1)
        return text_encoder

    cache = PromptCache(max_entries=2)
    first = cache.encode("1girl, smile", get_text_encoder)
    assert cache.encode("1girl, smile", get_text_encoder) is first and len(calls) == 1
    torch.testing.assert_close(first.qwen_hidden, encode_prompt(text_encoder, tokenize_prompt("1girl, smile")))
    assert first.tokens == tokenize_prompt("1girl, smile")
    cache.encode("1girl, smile", get_text_encoder, extra_key=("te_lora.safetensors", 0.8))
    assert len(calls) == 2
    cache.encode("another prompt", get_text_encoder)  # evicts the least recently used entry
    assert len(cache) == 2 and len(calls) == 3
    cache.encode("1girl, smile", get_text_encoder)
    assert len(calls) == 4
    cache.clear()
    assert len(cache) == 0


@pytest.fixture(scope="module")
def anima(tmp_path_factory):
    path = write_dit_file(tmp_path_factory.mktemp("dit") / "anima-preview.safetensors", text_dim=32)
    return load_anima_model(path, dtype=torch.float32)


def test_context_weights_scale_exactly_the_weighted_rows(anima, text_encoder, reference_tokenizers):
    tokens = tokenize_prompt("1girl, (smile:1.5), ((blush)), score_9")
    hidden = encode_prompt(text_encoder, tokens)
    ids, weights = tokens.t5_tensors()
    context = anima.preprocess_text_embeds(hidden, ids, weights)
    unweighted = anima.preprocess_text_embeds(hidden, ids, None)
    length = len(tokens.t5_ids)
    assert context.shape == (1, 512, 32)
    # Independently: which T5 positions belong to "smile" and "blush".
    t5 = reference_tokenizers[1]
    n = [len(t5(text)["input_ids"]) - 1 for text in ("1girl, ", "smile", ", ", "blush", ", score_9")]
    expected = [1.0] * n[0] + [1.5] * n[1] + [1.0] * n[2] + [1.1 * 1.1] * n[3] + [1.0] * n[4] + [1.0]
    assert weights[0].tolist() == pytest.approx(expected) and len(expected) == length
    for i, w in enumerate(expected):
        if w == 1.0:
            assert torch.equal(context[0, i], unweighted[0, i])
        else:
            torch.testing.assert_close(context[0, i], unweighted[0, i] * w)
            assert not torch.allclose(context[0, i], unweighted[0, i])
    assert unweighted[0, :length].abs().amin(dim=-1).gt(0).any()
    assert torch.count_nonzero(context[0, length:]) == 0


def test_context_of_empty_and_long_prompts(anima, text_encoder):
    tokens = tokenize_prompt("")
    hidden = encode_prompt(text_encoder, tokens)
    assert hidden.shape == (1, 1, 32) and hidden.abs().sum() > 0  # not zeroed (ComfyUI, unlike diffusers)
    context = anima.preprocess_text_embeds(hidden, *tokens.t5_tensors())
    assert context.shape == (1, 512, 32)
    assert context[0, 0].abs().sum() > 0 and torch.count_nonzero(context[0, 1:]) == 0
    long_tokens = tokenize_prompt(" ".join(["cat,"] * 300))
    long_context = anima.preprocess_text_embeds(encode_prompt(text_encoder, long_tokens),
                                                *long_tokens.t5_tensors())
    assert long_context.shape == (1, 601, 32) and torch.count_nonzero(long_context[0, -1]) > 0
