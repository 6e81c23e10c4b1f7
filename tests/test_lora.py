"""LoRA loading: each key format in the wild, written as a real-format file for the tiny model, must give
the same outputs as a model whose weights were merged by hand with that format's formula; switching
LoRAs must restore the base weights bit for bit."""

from __future__ import annotations

import hashlib
import mmap
import random
import warnings

import pytest
import torch
from safetensors.torch import save_file

from models.anima import lora_adapters
from models.anima.anima_model import load_anima_model
from models.anima.lora import LoraPatcher
from models.anima.lora_keys import diffusers_module_name
from models.anima.lora_tags import extract_lora_tags, find_lora_file
from models.anima.text_encoder import load_text_encoder
from tests.reference import cosmos_transformer_class
from tests.tiny_dit import make_dit_state_dict, write_dit_file
from tests.tiny_text_encoder import make_text_encoder_state_dict

RANK = 4
BF16 = torch.bfloat16

# Modules a LoRA targets in these tests: attention, MLP, adaLN, embedders, final layer and the LLM adapter,
# each with the name a diffusers/PEFT/OneTrainer LoRA uses for it (anima_reference.md §7.1).
DIFFUSERS_NAMES = {
    "blocks.0.self_attn.q_proj": "transformer.transformer_blocks.0.attn1.to_q",
    "blocks.1.self_attn.output_proj": "transformer.transformer_blocks.1.attn1.to_out.0",
    "blocks.1.cross_attn.k_proj": "transformer.transformer_blocks.1.attn2.to_k",
    "blocks.0.mlp.layer1": "transformer.transformer_blocks.0.ff.net.0.proj",
    "blocks.1.adaln_modulation_cross_attn.1": "transformer.transformer_blocks.1.norm2.linear_1",
    "x_embedder.proj.1": "transformer.patch_embed.proj",
    "final_layer.linear": "transformer.proj_out",
    "llm_adapter.blocks.0.cross_attn.v_proj": "text_conditioner.blocks.0.cross_attn.v_proj",
    "llm_adapter.blocks.1.mlp.0": "text_conditioner.blocks.1.mlp.0",
}
TARGETS = list(DIFFUSERS_NAMES)


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return make_dit_state_dict(prefix="")


@pytest.fixture(scope="module")
def te_sd() -> dict[str, torch.Tensor]:
    return make_text_encoder_state_dict()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(1, 16, 1, 8, 8, generator=g), "t": torch.tensor([0.6]),
            "qwen": torch.randn(1, 5, 32, generator=g), "ids": torch.randint(0, 32128, (1, 6), generator=g),
            "qwen_ids": torch.randint(0, 151936, (1, 7), generator=g)}


@pytest.fixture(scope="module")
def base_output(base_sd, inputs) -> torch.Tensor:
    return dit_output(fresh_dit(base_sd, dtype=torch.float32), inputs)


def fresh_dit(sd: dict, dtype: torch.dtype = BF16):
    # The loader keeps the given tensors as the parameters (no copy) and LoRAs write into the
    # parameters in place, so each model gets tensors of its own.
    return load_anima_model({k: v.clone() for k, v in sd.items()}, dtype=dtype)


def fresh_text_encoder(sd: dict, dtype: torch.dtype = torch.float32):
    return load_text_encoder({k: v.clone() for k, v in sd.items()}, dtype=dtype)


def dit_output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        context = model.preprocess_text_embeds(inputs["qwen"], inputs["ids"])
        return model(inputs["x"], inputs["t"], context)


def te_output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["qwen_ids"], use_cache=False).last_hidden_state


def merged(sd: dict, deltas: dict[str, torch.Tensor]) -> dict:
    """`sd` with fp32 changes added to the named tensors ("module.weight"/"module.bias")."""
    out = dict(sd)
    for key, delta in deltas.items():
        out[key] = (sd[key].float() + delta).to(sd[key].dtype)
    return out


class Factory:
    """Random bf16 LoRA tensors (as trainers save them) sized for the modules of the tiny models."""

    def __init__(self, sd: dict, seed: int):
        self.sd, self.g = sd, torch.Generator().manual_seed(seed)

    def t(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.g) * scale).to(BF16)

    def shape(self, module: str) -> tuple[int, int]:
        return tuple(self.sd[module + ".weight"].shape)

    def low_rank(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        out_f, in_f = self.shape(module)
        return self.t(RANK, in_f, scale=in_f**-0.5), self.t(out_f, RANK, scale=0.5 * RANK**-0.5)


# ---------------------------------------------------------------------------------------------------
# One synthetic file per format: (LoRA state dict, the hand-merged weight changes at strength 1)
# ---------------------------------------------------------------------------------------------------


def lora_format(sd, seed, key_of, down_suffix, up_suffix, alpha_suffix=".alpha", alpha=RANK / 2):
    f, lora, deltas = Factory(sd, seed), {}, {}
    for module in TARGETS:
        down, up = f.low_rank(module)
        lora[key_of(module) + down_suffix], lora[key_of(module) + up_suffix] = down, up
        scale = 1.0
        if alpha is not None:
            lora[key_of(module) + alpha_suffix] = torch.tensor(alpha, dtype=BF16)
            scale = alpha / RANK
        deltas[module + ".weight"] = scale * up.float() @ down.float()
    return lora, deltas


def kohya(sd, seed=10):
    return lora_format(sd, seed, lambda m: "lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight")


def comfy(sd, seed=11):
    return lora_format(sd, seed, lambda m: "diffusion_model." + m, ".lora_A.weight", ".lora_B.weight")


def diffusers_peft(sd, seed=12):
    return lora_format(sd, seed, DIFFUSERS_NAMES.get, ".lora_A.weight", ".lora_B.weight", alpha=None)


def onetrainer(sd, seed=13):
    return lora_format(sd, seed, DIFFUSERS_NAMES.get, ".lora_down.weight", ".lora_up.weight")


def diffsynth(sd, seed=14):
    return lora_format(sd, seed, lambda m: "diffusion_model." + m, ".lora_A.weight", ".lora_B.weight", alpha=None)


def peft_adapter_named(sd, seed=15):
    return lora_format(sd, seed, lambda m: "base_model.model." + m, ".lora_A.default.weight",
                       ".lora_B.default.weight", alpha=None)


def net_prefixed(sd, seed=16):
    return lora_format(sd, seed, lambda m: "net." + m, ".lora_A.weight", ".lora_B.weight")


def loha(sd, seed=17):
    f, lora, deltas = Factory(sd, seed), {}, {}
    for module in TARGETS:
        out_f, in_f = f.shape(module)
        k = "lora_unet_" + module.replace(".", "_")
        w1a, w1b, w2a, w2b = (f.t(out_f, RANK, scale=0.7), f.t(RANK, in_f, scale=0.7 * in_f**-0.5),
                              f.t(out_f, RANK, scale=0.7), f.t(RANK, in_f, scale=0.7 * in_f**-0.5))
        lora |= {k + ".hada_w1_a": w1a, k + ".hada_w1_b": w1b, k + ".hada_w2_a": w2a, k + ".hada_w2_b": w2b,
                 k + ".alpha": torch.tensor(2.0, dtype=BF16)}
        deltas[module + ".weight"] = (2.0 / RANK) * (w1a.float() @ w1b.float()) * (w2a.float() @ w2b.float())
    return lora, deltas


def lokr(sd, seed=18):
    """LoKr in four shapes: both factors whole (alpha is ignored), w2 factorised (alpha / rank of w2),
    w1 factorised (alpha / rank of w1), and w1 factorised with w2 a Tucker decomposition (lokr_t2)."""
    f, lora, deltas = Factory(sd, seed), {}, {}
    for n, module in enumerate(TARGETS):
        out_f, in_f = f.shape(module)
        a, b = 4, 2  # w1 is [a, b]; w2 is [out/a, in/b]
        k = "lora_unet_" + module.replace(".", "_")
        lora[k + ".alpha"] = torch.tensor(3.0, dtype=BF16)
        variant = n % 4
        if variant in (0, 1):
            w1 = f.t(a, b)
            lora[k + ".lokr_w1"] = w1
        else:
            w1a, w1b = f.t(a, 2), f.t(2, b)
            lora[k + ".lokr_w1_a"], lora[k + ".lokr_w1_b"] = w1a, w1b
            w1 = w1a.float() @ w1b.float()
        w2_scale = 0.3 * (in_f // b) ** -0.5
        if variant == 0 or variant == 2:
            w2 = f.t(out_f // a, in_f // b, scale=w2_scale)
            lora[k + ".lokr_w2"] = w2
            scale = 1.0 if variant == 0 else 3.0 / 2
        elif variant == 1:
            w2a, w2b = f.t(out_f // a, RANK), f.t(RANK, in_f // b, scale=w2_scale)
            lora[k + ".lokr_w2_a"], lora[k + ".lokr_w2_b"] = w2a, w2b
            w2, scale = w2a.float() @ w2b.float(), 3.0 / RANK
        else:
            w2a, t2, w2b = f.t(RANK, out_f // a), f.t(RANK, RANK, 1, 1), f.t(RANK, in_f // b, scale=w2_scale)
            lora[k + ".lokr_w2_a"], lora[k + ".lokr_t2"], lora[k + ".lokr_w2_b"] = w2a, t2, w2b
            w2, scale = w2a.float().T @ t2.float()[:, :, 0, 0] @ w2b.float(), 3.0 / RANK
        deltas[module + ".weight"] = scale * torch.kron(w1.float(), w2.float())
    return lora, deltas


def full_diff(sd, seed=19):
    """LyCORIS full-weight diffs, including the q/k norms (InvokeAI issue 9264) and biases."""
    f, lora, deltas = Factory(sd, seed), {}, {}
    for key in ("blocks.0.self_attn.q_proj.weight", "blocks.0.self_attn.q_norm.weight",
                "blocks.1.cross_attn.k_norm.weight", "t_embedding_norm.weight",
                "llm_adapter.blocks.0.self_attn.k_norm.weight", "llm_adapter.blocks.1.mlp.0.bias",
                "llm_adapter.out_proj.bias", "llm_adapter.out_proj.weight"):
        module, param = key.rsplit(".", 1)
        diff = f.t(*sd[key].shape, scale=0.05)
        lora["lycoris_" + module.replace(".", "_") + (".diff" if param == "weight" else ".diff_b")] = diff
        deltas[key] = diff.float()
    return lora, deltas


def dora(sd, seed=20):
    """DoRA on a LoRA: the magnitude per output row ([out, 1], or PEFT's [out] magnitude vector) or per
    input column ([1, in])."""
    f, lora, deltas = Factory(sd, seed), {}, {}
    for n, module in enumerate(TARGETS[:4]):
        down, up = f.low_rank(module)
        k = "diffusion_model." + module
        lora |= {k + ".lora_A.weight": down, k + ".lora_B.weight": up}
        w = sd[module + ".weight"].float()
        calc = w + up.float() @ down.float()
        norm = calc.norm(dim=1, keepdim=True) if n % 2 == 0 else calc.norm(dim=0, keepdim=True)
        magnitude = (norm * (1 + 0.2 * torch.rand(norm.shape, generator=f.g))).to(BF16)
        if n == 2:
            lora[k + ".lora_magnitude_vector"] = magnitude.flatten()
        else:
            lora[k + ".dora_scale"] = magnitude
        deltas[module + ".weight"] = calc * magnitude.float() / norm - w
    return lora, deltas


FORMATS = [kohya, comfy, diffusers_peft, onetrainer, diffsynth, peft_adapter_named, net_prefixed,
           loha, lokr, full_diff, dora]


def write(tmp_path, name: str, lora: dict) -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in lora.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("make", FORMATS, ids=lambda f: f.__name__)
def test_each_format_equals_hand_merged_weights(make, base_sd, base_output, inputs, tmp_path):
    base32 = {k: v.float() for k, v in base_sd.items()}
    lora, deltas = make(base_sd)
    model = fresh_dit(base32, dtype=torch.float32)

    reported = LoraPatcher(model).set_loras([(write(tmp_path, make.__name__, lora), 1.0)])

    reference = fresh_dit(merged(base32, deltas), dtype=torch.float32)
    assert reported == []
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=1e-6, atol=1e-6)
    after, expected = dit_output(model, inputs), dit_output(reference, inputs)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert (after - base_output).abs().max() > 1e-2


def test_two_loras_with_strengths_add_up(base_sd, inputs, tmp_path):
    base32 = {k: v.float() for k, v in base_sd.items()}
    (lora_a, deltas_a), (lora_b, deltas_b) = kohya(base_sd), loha(base_sd)
    model = fresh_dit(base32, dtype=torch.float32)

    LoraPatcher(model).set_loras([(write(tmp_path, "a", lora_a), 0.7), (write(tmp_path, "b", lora_b), -0.4)])

    deltas = {k: 0.7 * deltas_a.get(k, 0) - 0.4 * deltas_b.get(k, 0) for k in {*deltas_a, *deltas_b}}
    reference = fresh_dit(merged(base32, deltas), dtype=torch.float32)
    torch.testing.assert_close(dit_output(model, inputs), dit_output(reference, inputs), rtol=1e-5, atol=1e-5)


# kohya names with `lora_te_` / `lora_te1_`, ComfyUI's sd-scripts converter (`text_encoder.qwen3.`),
# ComfyUI's own text-encoder state-dict names, and diffusers/PEFT (`text_encoder.`).
TE_KEYS = {
    "kohya": lambda m: "lora_te_" + m.replace(".", "_"),
    "kohya_te1": lambda m: "lora_te1_" + m.replace(".", "_"),
    "comfy": lambda m: "text_encoder.qwen3." + m,
    "comfy_native": lambda m: "text_encoders.qwen3_06b.transformer.model." + m,
    "diffusers": lambda m: "text_encoder." + m,
}


@pytest.mark.parametrize("style", TE_KEYS)
def test_text_encoder_lora_changes_text_states_like_hand_merge(style, base_sd, te_sd, inputs, tmp_path):
    te32 = {k: v.float() for k, v in te_sd.items()}
    f, lora, deltas = Factory(te_sd, 30), {}, {}
    for module in ("layers.0.self_attn.q_proj", "layers.1.self_attn.o_proj", "layers.0.mlp.down_proj"):
        down, up = f.low_rank("model." + module)
        key = TE_KEYS[style](module)
        lora |= {key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(2.0)}
        deltas["model." + module + ".weight"] = (2.0 / RANK) * up.float() @ down.float()
    if style == "kohya":  # kohya LoRAs trained with the text encoder change the DiT in the same file
        lora |= kohya(base_sd)[0]
    text_encoder = fresh_text_encoder(te32, dtype=torch.float32)
    before = te_output(text_encoder, inputs)
    patcher = LoraPatcher(fresh_dit(base_sd), text_encoder)

    path = write(tmp_path, style, lora)
    assert patcher.set_loras([(path, 0.8)]) == []

    reference = load_text_encoder(merged(te32, {k: 0.8 * d for k, d in deltas.items()}), dtype=torch.float32)
    after = te_output(text_encoder, inputs)
    torch.testing.assert_close(after, te_output(reference, inputs), rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-2
    assert patcher.active_text_encoder == [(path, 0.8)]


def test_text_encoder_keys_without_text_encoder_are_reported(base_sd, tmp_path):
    dit_lora, _ = comfy(base_sd)
    te_key = "lora_te_layers_0_self_attn_q_proj.lora_down.weight"
    path = write(tmp_path, "with_te", dit_lora | {te_key: torch.zeros(RANK, 32, dtype=BF16)})

    reported = LoraPatcher(fresh_dit(base_sd)).set_loras([(path, 1.0)])

    assert len(reported) == 1 and te_key in reported[0]


def test_unknown_keys_are_named_in_one_warning(base_sd, tmp_path):
    lora, _ = comfy(base_sd)
    unknown = ["diffusion_model.blocks.7.self_attn.q_proj.lora_A.weight", "lora_unet_no_such_module.lora_up.weight",
               "diffusion_model.blocks.0.self_attn.q_proj.lora_mid.weight", "not_a_lora_key"]
    lora |= {k: torch.zeros(2, 2, dtype=BF16) for k in unknown}
    lora["lora_unet_blocks_0_mlp_layer2.lora_down.weight"] = torch.zeros(RANK, 256, dtype=BF16)  # its up is missing
    path = write(tmp_path, "partly_unknown", lora)

    reported = LoraPatcher(fresh_dit(base_sd)).set_loras([(path, 1.0)])

    assert len(reported) == 1
    assert "5 of" in reported[0] and all(k in reported[0] for k in unknown)
    assert "lora_unet_blocks_0_mlp_layer2.lora_down.weight" in reported[0]


def test_lora_without_usable_key_is_an_error(base_sd, tmp_path):
    path = write(tmp_path, "sdxl", {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(ValueError, match="no key that fits"):
        LoraPatcher(fresh_dit(base_sd)).set_loras([(path, 1.0)])


def test_lora_for_another_model_size_is_an_error(base_sd, tmp_path):
    wide = make_dit_state_dict(prefix="", model_channels=128)
    path = write(tmp_path, "wide", comfy(wide)[0])
    with pytest.raises(ValueError, match="does not fit this model"):
        LoraPatcher(fresh_dit(base_sd)).set_loras([(path, 1.0)])


def test_strength_zero_is_no_lora(base_sd, inputs, tmp_path):
    model = fresh_dit(base_sd)
    base_out = dit_output(model, inputs)
    patcher = LoraPatcher(model)
    patcher.set_loras([(write(tmp_path, "k", kohya(base_sd)[0]), 0.0)])
    assert torch.equal(dit_output(model, inputs), base_out)
    assert all(torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())


def test_fifty_switches_restore_base_weights_exactly(base_sd, te_sd, tmp_path):
    model, text_encoder = fresh_dit(base_sd), fresh_text_encoder(te_sd, dtype=BF16)
    te_lora = {"lora_te_layers_0_mlp_up_proj.lora_down.weight": torch.randn(RANK, 32).to(BF16),
               "lora_te_layers_0_mlp_up_proj.lora_up.weight": torch.randn(64, RANK).to(BF16)}
    paths = [write(tmp_path, "a", kohya(base_sd)[0] | te_lora), write(tmp_path, "b", lokr(base_sd)[0]),
             write(tmp_path, "c", full_diff(base_sd)[0])]
    patcher = LoraPatcher(model, text_encoder)
    rng = random.Random(0)
    first_seen = {}
    for _ in range(50):
        chosen = rng.sample(paths, rng.randint(0, 3))
        config = [(p, rng.choice([1.0, 0.5, -0.3])) for p in chosen]
        patcher.set_loras(config)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        assert all(torch.equal(weights[k], v) for k, v in first_seen.setdefault(tuple(config), weights).items())
    patcher.set_loras([])
    assert all(torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, te_sd["model." + k]) for k, v in text_encoder.state_dict().items())
    assert patcher.active == []


def test_failed_switch_leaves_previous_loras_in_place(base_sd, tmp_path):
    model = fresh_dit(base_sd)
    patcher = LoraPatcher(model)
    good = write(tmp_path, "good", comfy(base_sd)[0])
    patcher.set_loras([(good, 1.0)])
    patched = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(ValueError, match="not found"):
        patcher.set_loras([(good, 0.5), (str(tmp_path / "missing.safetensors"), 1.0)])

    assert patcher.active == [(good, 1.0)]
    assert all(torch.equal(v, patched[k]) for k, v in model.state_dict().items())


def test_failure_while_merging_leaves_base_weights(base_sd, tmp_path, monkeypatch):
    model = fresh_dit(base_sd)
    patcher = LoraPatcher(model)
    patcher.set_loras([(write(tmp_path, "comfy", comfy(base_sd)[0]), 1.0)])
    calls = []

    def out_of_memory_on_third_module(self, merged, strength, original):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError
        merged.add_(1.0)

    monkeypatch.setattr(lora_adapters.Adapter, "add_to", out_of_memory_on_third_module)
    with pytest.raises(MemoryError):
        patcher.set_loras([(write(tmp_path, "kohya", kohya(base_sd)[0]), 1.0)])

    assert patcher.active == []
    assert all(torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())


def test_memory_mapped_model_is_patched_without_touching_its_file(base_sd, inputs, tmp_path):
    dit_file = write_dit_file(tmp_path / "anima.safetensors")
    digest = hashlib.sha256(dit_file.read_bytes()).hexdigest()
    model = load_anima_model(dit_file)
    base_out = dit_output(model, inputs)
    patcher = LoraPatcher(model)

    patcher.set_loras([(write(tmp_path, "k", kohya(base_sd)[0]), 1.0)])
    assert not torch.equal(dit_output(model, inputs), base_out)
    patcher.set_loras([])

    assert torch.equal(dit_output(model, inputs), base_out)
    assert hashlib.sha256(dit_file.read_bytes()).hexdigest() == digest


def test_weights_that_cannot_be_written_are_refused(base_sd, tmp_path):
    model = fresh_dit(base_sd)
    lora_path = write(tmp_path, "k", kohya(base_sd)[0])
    model.blocks[0].self_attn.q_proj.weight.data = torch.zeros(64, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="quantized"):
        LoraPatcher(model).set_loras([(lora_path, 1.0)])

    # What mmgp's writable_tensors=False gives: a read-only map of the file, where a write would crash.
    weights_file = tmp_path / "q_proj.bin"
    weights_file.write_bytes(base_sd["blocks.0.self_attn.q_proj.weight"].view(torch.int16).numpy().tobytes())
    with open(weights_file, "rb") as f:
        read_only = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings(action="ignore"):  # torch warns that the buffer is not writable
        model.blocks[0].self_attn.q_proj.weight.data = torch.frombuffer(read_only, dtype=BF16).view(64, 64)
    with pytest.raises(ValueError, match="read-only memory map"):
        LoraPatcher(model).set_loras([(lora_path, 1.0)])


def test_diffusers_names_are_those_of_the_diffusers_cosmos_model(base_sd):
    diffusers_model = cosmos_transformer_class()(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        mlp_ratio=4.0, text_embed_dim=32, adaln_lora_dim=8, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True, extra_pos_embed_type=None)
    expected = {n for n, m in diffusers_model.named_modules() if n and m._parameters.get("weight") is not None}
    ours = {diffusers_module_name(n) for n, m in fresh_dit(base_sd).named_modules()
            if n and not n.startswith("llm_adapter.") and m._parameters.get("weight") is not None}
    assert ours == expected


def test_mmgp_conversion_is_read_by_mmgp_as_the_same_change(base_sd, tmp_path):
    """mmgp's runtime LoRAs must add the same weight change as the merge (B @ A * alpha / rank, the
    Kronecker product, the diff), so both routes give the same image."""
    from mmgp import offload

    model = fresh_dit(base_sd, dtype=torch.float32)
    model._loras_model_data = {m: {} for _, m in model.named_modules() if "weight" in m._parameters}
    model._loras_model_shortcuts = {}
    lora = {}
    for make, modules in ((kohya, TARGETS[:2]), (dora, TARGETS[2:3]), (lokr, TARGETS[3:6]), (loha, TARGETS[6:])):
        heads = tuple(h for m in modules for h in (f"lora_unet_{m.replace('.', '_')}.", f"diffusion_model.{m}."))
        lora |= {k: v for k, v in make(base_sd)[0].items() if k.startswith(heads)}
    lora |= {k: v for k, v in full_diff(base_sd)[0].items() if "out_proj" in k}
    path = write(tmp_path, "mixed", lora)

    # upstream Wan2GP's route: its LoRA preprocessor is the transformer's own `preprocess_loras`
    offload.load_loras_into_model(model, [path], preprocess_sd=lambda sd: model.preprocess_loras("anima", sd))

    assert model._loras_errors == []
    patched = fresh_dit(base_sd, dtype=torch.float32)
    LoraPatcher(patched).set_loras([(path, 1.0)])
    loaded = {name: module for name, module in model.named_modules() if model._loras_model_data.get(module)}
    assert set(loaded) == {*TARGETS, "llm_adapter.out_proj"}
    for name, module in loaded.items():
        data = model._loras_model_data[module]["0"]
        first, second, _, _, scaling = data[:5]
        kind = data[5].get("type")
        change = (torch.kron(first, second) if kind == "lokr" else second if first is None
                  else second.float() @ first.float()) * scaling
        torch.testing.assert_close(patched.get_submodule(name).weight - module.weight, change.float(),
                                   rtol=1e-4, atol=1e-5)


def test_mmgp_conversion_keeps_its_tensors_off_the_default_device(base_sd):
    """mmgp leaves torch's default device on CUDA: the converted LoRA (alphas too) stays where the file's
    tensors are, never on the default device (here `meta`, which would lose the values)."""
    model = fresh_dit(base_sd, dtype=torch.float32)
    lora, _ = kohya(base_sd)
    with torch.device("meta"):
        converted = model.preprocess_loras("anima", lora)
    assert any(k.endswith(".alpha") for k in converted)
    assert {v.device.type for v in converted.values()} == {"cpu"}
    assert all(float(converted[k]) == RANK / 2 for k in converted if k.endswith(".alpha"))


@pytest.mark.parametrize("prompt, clean, loras", [
    ("1girl, <lora:style:0.8>, smile", "1girl, smile", [("style", 0.8)]),
    ("<lora:turbo> 1girl", "1girl", [("turbo", 1.0)]),
    ("1girl,<lora:a:-0.5>,<lora:b:1.2>", "1girl", [("a", -0.5), ("b", 1.2)]),
    ("masterpiece <lora:sub/dir name:.5> (smile:1.2)", "masterpiece (smile:1.2)", [("sub/dir name", 0.5)]),
    ("no tags, (weighted:1.1),  spaces ", "no tags, (weighted:1.1),  spaces ", []),
    ("<LORA:x:2>", "", [("x", 2.0)]),
])
def test_prompt_tags_are_extracted(prompt, clean, loras):
    assert extract_lora_tags(prompt) == (clean, loras)


def test_bad_prompt_tag_is_a_clear_error():
    with pytest.raises(ValueError, match="must be a number"):
        extract_lora_tags("1girl <lora:style:strong>")


def test_lora_names_resolve_in_the_lora_folder_by_one_rule(tmp_path):
    """The folder's own file first, then the name in a subfolder; a path of its own only when allowed."""
    (tmp_path / "styles").mkdir()
    nested = tmp_path / "styles" / "ink.safetensors"
    top = tmp_path / "turbo.safetensors"
    nested.write_bytes(b"")
    top.write_bytes(b"")
    (tmp_path / "styles" / "turbo.safetensors").write_bytes(b"")  # loses to the top-level file of that name
    (tmp_path / "odd[1].safetensors").write_bytes(b"")  # glob characters are plain characters
    assert find_lora_file("turbo", tmp_path) == top
    assert find_lora_file("turbo.safetensors", tmp_path) == top
    assert find_lora_file("ink", tmp_path) == nested
    assert find_lora_file("styles/ink", tmp_path) == nested
    assert find_lora_file("odd[1]", tmp_path) == tmp_path / "odd[1].safetensors"
    assert find_lora_file(str(top), None, allow_paths=True) == top
    with pytest.raises(ValueError, match="not found"):
        find_lora_file("missing", tmp_path)
    with pytest.raises(ValueError, match="not found"):
        find_lora_file("o*", tmp_path)


@pytest.mark.parametrize("name", ["../secret", "sub/../../secret", "/etc/secret", "~/secret"])
def test_lora_names_cannot_leave_the_lora_folder(tmp_path, name):
    """Names from settings files, prompts or the UI never reach (or reveal) a file outside the folder."""
    folder = tmp_path / "loras"
    folder.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="must stay inside the LoRA folder") as error:
        find_lora_file(name, folder)
    assert "secret.safetensors" not in str(error.value).replace(name, "")
