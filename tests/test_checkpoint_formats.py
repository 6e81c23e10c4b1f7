"""Any Anima DiT a user already has: every key prefix in the wild, the community 40-block "Anima 2.9B"
(and 28-block LoRAs mapped onto it by its insertion indices), and the diffusers-format folder written by
diffusers itself."""

import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from models.anima.anima_model import load_anima_model
from models.anima.lora import LoraPatcher, to_mmgp_lora_state_dict
from models.anima.lora_blocks import (ANIMA_2B9_BASE_BLOCK_INDICES, ANIMA_2B9_INSERTED_BLOCKS,
                                      fit_lora_to_dit_depth)
from models.anima.weights import WeightsError
from tests.reference import anima_text_conditioner_class, cosmos_transformer_class
from tests.tiny_dit import make_dit_state_dict

SIZES = dict(model_channels=32, num_heads=2, text_dim=16, adapter_layers=2, adapter_heads=2, adaln_lora_dim=8)


@pytest.fixture(scope="module")
def original():
    return make_dit_state_dict(seed=5, num_blocks=2, prefix="", **SIZES)


def forward(model):
    g = torch.Generator().manual_seed(0)
    x, qwen = torch.randn(1, 16, 1, 8, 6, generator=g), torch.randn(1, 5, 16, generator=g)
    ids = torch.randint(0, 32128, (1, 7), generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.7]), model.preprocess_text_embeds(qwen, ids))


@pytest.mark.parametrize("prefix", ["net.", "model.diffusion_model.", "model.diffusion_model.net.",
                                    "diffusion_model.", ""])
def test_every_prefix_in_the_wild_loads(tmp_path, original, prefix):
    path = tmp_path / "dit.safetensors"
    save_file({prefix + k: v for k, v in original.items()}, str(path))
    loaded = load_anima_model(path, dtype=torch.bfloat16).state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], v) for k, v in original.items())


def test_the_40_block_anima_2b9_loads_with_its_depth_from_the_shapes(tmp_path):
    path = tmp_path / "anima-2.9b.safetensors"
    save_file(make_dit_state_dict(seed=6, num_blocks=40, prefix="net.", **SIZES), str(path))
    model = load_anima_model(path, dtype=torch.float32)
    assert model.config.num_blocks == 40 and len(model.blocks) == 40
    assert torch.isfinite(forward(model)).all()


# --- 28-block LoRAs on the 40-block DiT ------------------------------------------------------------------

def test_insertion_indices_are_the_published_ones():
    assert ANIMA_2B9_INSERTED_BLOCKS == (2, 5, 8, 11, 14, 17, 21, 24, 27, 30, 33, 36)
    assert ANIMA_2B9_BASE_BLOCK_INDICES[:6] == (0, 1, 3, 4, 6, 7) and ANIMA_2B9_BASE_BLOCK_INDICES[-3:] == (37, 38, 39)
    assert len(ANIMA_2B9_BASE_BLOCK_INDICES) == 28
    assert not set(ANIMA_2B9_BASE_BLOCK_INDICES) & set(ANIMA_2B9_INSERTED_BLOCKS)


def test_lora_keys_of_every_spelling_are_renumbered():
    t = torch.zeros(1)
    lora = {
        "diffusion_model.blocks.2.self_attn.q_proj.lora_down.weight": t,
        "lora_unet_blocks_27_mlp_layer1.lora_up.weight": t,
        "transformer.transformer_blocks.10.attn1.to_q.lora_A.weight": t,
        "lycoris_blocks_0_cross_attn_k_proj.alpha": t,
        "diffusion_model.llm_adapter.blocks.1.self_attn.q_proj.lora_down.weight": t,
        "lora_unet_llm_adapter_blocks_3_mlp_0.lora_down.weight": t,
        "lora_te_layers_5_mlp_up_proj.lora_down.weight": t,
        "diffusion_model.final_layer.linear.lora_down.weight": t,
    }
    assert set(fit_lora_to_dit_depth(lora, 40)) == {
        "diffusion_model.blocks.3.self_attn.q_proj.lora_down.weight",
        "lora_unet_blocks_39_mlp_layer1.lora_up.weight",
        "transformer.transformer_blocks.15.attn1.to_q.lora_A.weight",
        "lycoris_blocks_0_cross_attn_k_proj.alpha",
        "diffusion_model.llm_adapter.blocks.1.self_attn.q_proj.lora_down.weight",
        "lora_unet_llm_adapter_blocks_3_mlp_0.lora_down.weight",
        "lora_te_layers_5_mlp_up_proj.lora_down.weight",
        "diffusion_model.final_layer.linear.lora_down.weight",
    }
    assert fit_lora_to_dit_depth(lora, 28) is lora  # the 2B itself
    native = {"diffusion_model.blocks.36.self_attn.q_proj.lora_down.weight": t, **lora}
    assert fit_lora_to_dit_depth(native, 40) is native  # names a block past 27: made for the 2.9B


def test_a_28_block_lora_changes_the_2b9_blocks_it_was_trained_for(tmp_path):
    dit = make_dit_state_dict(seed=7, num_blocks=40, prefix="", dtype=torch.float32, **SIZES)
    g = torch.Generator().manual_seed(3)
    lora, deltas = {}, {}
    for old in (0, 2, 27):
        module = f"blocks.{old}.self_attn.q_proj"
        down, up = torch.randn(4, 32, generator=g) * 0.1, torch.randn(32, 4, generator=g) * 0.1
        lora[f"diffusion_model.{module}.lora_down.weight"] = down
        lora[f"diffusion_model.{module}.lora_up.weight"] = up
        deltas[f"blocks.{ANIMA_2B9_BASE_BLOCK_INDICES[old]}.self_attn.q_proj.weight"] = up @ down
    path = tmp_path / "style_2b.safetensors"
    save_file(lora, str(path))
    model = load_anima_model({k: v.clone() for k, v in dit.items()}, dtype=torch.float32)
    assert LoraPatcher(model).set_loras([(str(path), 1.0)]) == []
    after = model.state_dict()
    for key, value in dit.items():
        expected = value + deltas[key] if key in deltas else value
        torch.testing.assert_close(after[key], expected, rtol=0, atol=1e-6)
    assert set(deltas) == {"blocks.0.self_attn.q_proj.weight", "blocks.3.self_attn.q_proj.weight",
                           "blocks.39.self_attn.q_proj.weight"}
    mmgp = to_mmgp_lora_state_dict(lora, model)  # upstream Wan2GP's path
    assert {k.rsplit(".", 2)[0] for k in mmgp} == {k.removesuffix(".weight") for k in deltas}


# --- the diffusers-format folder ---------------------------------------------------------------------------

def write_diffusers_folder(folder, original, max_shard_size=None):
    """`original` converted by diffusers' converter and saved by diffusers' own classes, as
    circlestone-labs/Anima-Base-v1.0-Diffusers is laid out: transformer/ and text_conditioner/."""
    dit = {"net." + k: v.float() for k, v in original.items() if not k.startswith("llm_adapter.")}
    transformer = cosmos_transformer_class()(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=4.0,
        text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=True, extra_pos_embed_type=None)
    transformer.load_state_dict(convert_cosmos_transformer_checkpoint_to_diffusers(dit), strict=True)
    conditioner = anima_text_conditioner_class()(source_dim=16, target_dim=16, model_dim=16, num_layers=2, num_attention_heads=2)
    conditioner.load_state_dict({k.removeprefix("llm_adapter."): v.float() for k, v in original.items()
                                 if k.startswith("llm_adapter.")}, strict=True)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    transformer.save_pretrained(folder / "transformer", **kw)
    conditioner.save_pretrained(folder / "text_conditioner")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AnimaPipeline"}))


@pytest.mark.parametrize("shards", [None, "100KB"])
def test_diffusers_folder_gives_the_outputs_of_the_original_file(tmp_path, original, shards):
    folder = tmp_path / "Anima-Base-v1.0-Diffusers"
    write_diffusers_folder(folder, original, shards)
    if shards:
        assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    reference = load_anima_model({k: v.float() for k, v in original.items()}, dtype=torch.float32)
    for source in (folder, folder / "transformer"):
        model = load_anima_model(source, dtype=torch.float32)
        loaded = model.state_dict()
        assert loaded.keys() == reference.state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
        assert torch.equal(forward(model), forward(reference))


def test_incomplete_diffusers_folder_is_a_clear_error(tmp_path, original):
    folder = tmp_path / "diffusers"
    write_diffusers_folder(folder, original)
    for path in (folder / "text_conditioner").iterdir():
        path.unlink()
    (folder / "text_conditioner").rmdir()
    with pytest.raises(WeightsError, match="has no 'text_conditioner/'"):
        load_anima_model(folder)
