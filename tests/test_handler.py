"""The Wan2GP family-handler contract, the model definition JSON, weight-file location and downloads
(hub mocked or offline), and the CPU path of the offload helper."""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.anima import sampling
from models.anima.anima_handler import family_handler as handler
from shared import files
from shared.offload import offload_pipe
from tests.tiny_ckpts import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE

ROOT = Path(__file__).resolve().parents[1]
DEFINITION = ROOT / "defaults" / "anima_preview.json"
HUB = "https://huggingface.co/circlestone-labs/Anima/resolve/main/split_files"


def test_family_identity():
    assert handler.query_supported_types() == ["anima"]
    assert handler.query_model_family() in handler.query_family_infos()
    order, name = handler.query_family_infos()["anima"]
    assert isinstance(order, int) and name == "Anima"
    assert handler.query_family_maps() == ({}, {})


def test_model_def_for_an_image_model():
    model_def = handler.query_model_def("anima", {})
    assert model_def["image_outputs"] is True and model_def["guidance_max_phases"] == 1
    assert model_def["flow_shift"] is True and model_def["vae_block_size"] == 16
    for _, solver in model_def["sample_solvers"]:
        sampling.canonical_sampler(solver)  # every offered sampler runs
    assert [v for _, v in model_def["sample_solvers"]] == list(sampling.SAMPLERS)  # the one registry
    assert model_def["sample_solvers"][0] == ("ER-SDE (default)", "er_sde")
    assert {"euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "res_multistep",
            "uni_pc", "lcm"} <= set(sampling.SAMPLERS)
    presets = [value for _, value in model_def["resolutions"]]
    assert {"1024x1024", "896x1152", "1152x896", "832x1216", "1216x832"} <= set(presets)
    for preset in presets:
        width, height = map(int, preset.split("x"))
        assert width % 16 == 0 and height % 16 == 0
        assert 0.95e6 <= width * height <= 1.1e6  # the card: about 1 MP


def test_default_settings_on_an_empty_dict():
    settings = {}
    handler.update_default_settings("anima", {}, settings)
    assert settings == {
        "image_mode": 1, "resolution": "1024x1024", "batch_size": 1, "num_inference_steps": 30,
        "guidance_scale": 4.0, "flow_shift": 3.0, "sample_solver": "er_sde", "scheduler": "simple",
        "negative_prompt": "worst quality, low quality, score_1, score_2, score_3, blurry, jpeg artifacts, sepia",
        "denoising_strength": 0.7, "masking_strength": 1.0, "model_mode": 0,
    }


@pytest.mark.parametrize("given,fixed", [("euler_a", "euler_ancestral"), ("unipc", "er_sde"), (None, "er_sde"),
                                         ("dpmpp_2m_sde", "dpmpp_2m_sde"), ("uni_pc", "uni_pc")])
def test_fix_settings_maps_samplers(given, fixed):
    settings = {"sample_solver": given}
    handler.fix_settings("anima", 2.74, {}, settings)
    assert settings == {"sample_solver": fixed, "image_mode": 1}


def test_schedulers_and_upstream_custom_settings_come_from_the_registry():
    from models.anima import schedulers

    model_def = handler.query_model_def("anima", {})
    assert [v for _, v in model_def["schedulers"]] == list(schedulers.SCHEDULERS)
    scheduler, truncation, *hires = model_def["custom_settings"]  # upstream Wan2GP's per-model settings
    assert scheduler["id"] == "scheduler" and scheduler["type"] == "dropdown"
    assert [v for _, v in scheduler["choices"]] == list(schedulers.SCHEDULERS) and scheduler["default"] == "simple"
    assert (truncation["id"], truncation["type"], truncation["min"], truncation["max"], truncation["default"]) == (
        "cfg_truncation", "float", 0.0, 1.0, 1.0)  # generate() reads it as the fraction of guided steps
    assert model_def["license"]["id"] and len(model_def["license"]["urls"]) == 2


def test_fix_settings_gives_upstream_the_definitions_scheduler_and_truncation():
    upstream = {"sample_solver": "euler", "scheduler": "sgm_uniform", "cfg_truncation_perc": 80.0,
                "custom_settings": {"speech_speed": 1.0}}  # upstream's baseline holds other families' values
    handler.fix_settings("anima", 2.74, {}, upstream)
    assert upstream["custom_settings"] == {"speech_speed": 1.0, "scheduler": "sgm_uniform", "cfg_truncation": 0.8}
    chosen = {"scheduler": "sgm_uniform", "custom_settings": {"scheduler": "karras"}}  # the user's pick stays
    handler.fix_settings("anima", 2.74, {}, chosen)
    assert chosen["custom_settings"] == {"scheduler": "karras", "cfg_truncation": 1.0}
    unknown = {"scheduler": "align_your_steps"}
    handler.fix_settings("anima", 2.74, {}, unknown)
    assert unknown == {"scheduler": "simple", "sample_solver": "er_sde", "image_mode": 1}  # no custom_settings here


VALID = {"resolution": "896x1152", "sample_solver": "er_sde", "flow_shift": 3.0, "num_inference_steps": 30}


@pytest.mark.parametrize("change,message", [
    ({}, None),
    ({"sample_solver": "euler_a"}, None),
    ({"resolution": "1000x1000"}, "multiples of 16; 1000x1000 is not (try 992x992)"),
    ({"resolution": "big"}, "must look like 1024x1024"),
    ({"sample_solver": "unipc"}, "no sampler 'unipc'"),
    ({"flow_shift": 0}, "Shift must be above 0"),
    ({"num_inference_steps": 0}, "at least 1 sampling step"),
    ({"scheduler": "karras"}, None),
    ({"scheduler": "ays"}, "no scheduler 'ays'"),
    ({"custom_settings": {"scheduler": "ays"}}, "no scheduler 'ays'"),
])
def test_validate_generative_settings(change, message):
    problem = handler.validate_generative_settings("anima_preview", {}, VALID | change)
    assert problem is None if message is None else message in problem


def test_rgb_factors_are_wan21():
    factors, bias = handler.get_rgb_factors("anima")
    assert len(factors) == 16 and all(len(row) == 3 for row in factors)
    # anima_reference.md §6.3: first and last rows and the bias
    assert factors[0] == [-0.1299, -0.1692, 0.2932] and factors[15] == [0.1984, 0.0913, 0.1861]
    assert bias == [-0.1835, -0.0868, -0.3360]


def test_lora_dir_flag_and_default():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-dir")  # the app's own flag (and upstream Wan2GP's Wan flag): must not clash
    handler.register_lora_cli_args(parser, "loras")
    args = parser.parse_args(["--lora-dir-anima", "/my/loras"])
    assert handler.get_lora_dir("anima", args, "loras") == "/my/loras"
    assert handler.get_lora_dir("anima", SimpleNamespace(), "loras") == str(Path("loras") / "anima")


def test_model_files_and_definition():
    (entry,) = handler.query_model_files(lambda f: [f], "anima", {})
    assert entry["repoId"] == "circlestone-labs/Anima"
    urls = [f.url for f in files.files_of_definition(entry)]
    assert urls == [f"{HUB}/text_encoders/qwen_3_06b_base.safetensors", f"{HUB}/vae/qwen_image_vae.safetensors"]
    data = json.loads(DEFINITION.read_text())
    model = data.pop("model")
    assert model["name"] == "Anima Preview" and model["architecture"] == "anima" and model["description"]
    assert model["URLs"] == [f"{HUB}/diffusion_models/anima-preview.safetensors"]
    # Wan2GP format: settings beside "model", each one a key the handler's defaults also set
    defaults = {}
    handler.update_default_settings("anima", model, defaults)
    assert set(data) - {"prompt"} <= set(defaults)
    assert data["sample_solver"] == "er_sde" and data["num_inference_steps"] == 30


def test_the_architecture_has_a_definition_of_its_own_name():
    # upstream Wan2GP reads get_model_def(<architecture>) for every model of a family (validation, its
    # model list): the base model, Anima Base v1.0, is that definition, as flux.json is Flux dev
    definitions = {p.stem: json.loads(p.read_text()) for p in (ROOT / "defaults").glob("anima*.json")}
    assert {"anima", "anima_preview"} <= set(definitions)
    assert all(d["model"]["architecture"] == "anima" for d in definitions.values())
    base = definitions["anima"]
    assert base["model"]["name"] == "Anima Base v1.0"
    assert base["model"]["URLs"][0] == f"{HUB}/diffusion_models/anima-base-v1.0.safetensors"  # bf16 first
    assert (base["resolution"], base["num_inference_steps"], base["guidance_scale"]) == ("1024x1024", 30, 4.0)
    names = [d["model"]["name"] for d in definitions.values()]
    assert len(names) == len(set(names))  # no model listed twice


# --- loading ---------------------------------------------------------------------------------------


def move(ckpts, tmp_path, layout):
    """The tiny files rearranged into `layout` {file: folder relative to tmp_path}; returns the DiT path."""
    for name, folder in layout.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_bytes((ckpts / name).read_bytes())
    return tmp_path / layout[DIT_FILE] / DIT_FILE


@pytest.mark.parametrize("layout", [
    {DIT_FILE: "ckpts", TEXT_ENCODER_FILE: "ckpts/split_files/text_encoders", VAE_FILE: "ckpts/split_files/vae"},
    {DIT_FILE: "models/diffusion_models", TEXT_ENCODER_FILE: "models/text_encoders", VAE_FILE: "models/vae"},
])
def test_load_model_finds_components_in_wan2gp_and_comfyui_layouts(ckpts, tmp_path, layout):
    dit = move(ckpts, tmp_path, layout)
    model, pipe = handler.load_model(str(dit), "anima_preview", "anima", {}, dtype=None)
    assert pipe == {"transformer": model.transformer, "text_encoder": model.text_encoder, "vae": model.vae}
    assert model.dtypes.transformer == torch.float32  # CPU policy
    assert model.transformer._model_dtype == torch.float32  # mmgp keeps it
    assert model._interrupt is False


def test_load_model_names_a_missing_component(ckpts, tmp_path):
    dit = move(ckpts, tmp_path, {DIT_FILE: "ckpts", TEXT_ENCODER_FILE: "ckpts"})
    with pytest.raises(ValueError, match=r"needs 'qwen_image_vae.safetensors'.*split_files/vae/qwen_image_vae"):
        handler.load_model([str(dit)], "anima_preview", "anima", {})


def test_explicit_dtype_overrides_policy(ckpts):
    model, _ = handler.load_model([str(ckpts / f) for f in (DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE)],
                                  dtype=torch.bfloat16)
    assert model.dtypes.transformer == torch.bfloat16
    assert model.transformer.t_embedding_norm.weight.dtype == torch.bfloat16
    assert model.dtypes.vae == torch.float32 and model.dtypes.text_encoder == torch.float32


@pytest.mark.parametrize("host_vae_dtype, vae_dtype", [
    (torch.float16, torch.float32),  # upstream's default "16": the policy (fp32 here, on the CPU)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (None, torch.float32),
])
def test_host_vae_dtype_maps_to_the_policy(ckpts, host_vae_dtype, vae_dtype):
    model, pipe = handler.load_model([str(ckpts / DIT_FILE)], VAE_dtype=host_vae_dtype)
    assert model.dtypes.vae == vae_dtype and pipe["vae"].conv2.weight.dtype == vae_dtype


# --- files -----------------------------------------------------------------------------------------


def test_hub_urls_round_trip():
    url = files.build_hf_url("circlestone-labs/Anima", "split_files/vae", "qwen_image_vae.safetensors")
    assert url == f"{HUB}/vae/qwen_image_vae.safetensors"
    hub_file = files.parse_hf_url(url)
    assert (hub_file.repo_id, hub_file.path, hub_file.name) == (
        "circlestone-labs/Anima", "split_files/vae/qwen_image_vae.safetensors", "qwen_image_vae.safetensors")
    assert files.parse_hf_url("https://example.com/a/b/resolve/main/c") is None


def fake_hub(calls):
    def download(repo_id, filename, *, revision, local_dir):
        calls.append((repo_id, filename))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"weights of " + filename.encode())
        return str(target)

    return download


def test_fetch_downloads_missing_files_flat_into_ckpts(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(files, "hf_hub_download", fake_hub(calls))
    monkeypatch.setattr(files, "hub_unreachable_reason", lambda: None)
    (tmp_path / VAE_FILE).write_bytes(b"placed by hand")
    paths = files.fetch_model_files(handler, "anima", json.loads(DEFINITION.read_text())["model"], tmp_path)
    assert paths == [tmp_path / DIT_FILE, tmp_path / TEXT_ENCODER_FILE, tmp_path / VAE_FILE]
    assert calls == [("circlestone-labs/Anima", "split_files/diffusion_models/anima-preview.safetensors"),
                     ("circlestone-labs/Anima", "split_files/text_encoders/qwen_3_06b_base.safetensors")]
    assert (tmp_path / VAE_FILE).read_bytes() == b"placed by hand"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE])
    calls.clear()
    assert files.fetch_model_files(handler, "anima", {"URLs": [f"{HUB}/x.safetensors", DIT_FILE]}, tmp_path)[0] \
        == tmp_path / DIT_FILE  # an alternative already present is used, nothing is downloaded
    assert calls == []


def test_missing_files_offline_are_all_named_at_once_with_where_to_put_them(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(files, "hf_hub_download", lambda *a, **k: pytest.fail("no download may be tried"))
    with pytest.raises(files.DownloadError) as error:
        files.fetch_model_files(handler, "anima", json.loads(DEFINITION.read_text())["model"], tmp_path)
    message = str(error.value)
    assert message.startswith("3 weight files are missing and cannot be downloaded: HF_HUB_OFFLINE is set.")
    for name, folder in ((DIT_FILE, "diffusion_models"), (TEXT_ENCODER_FILE, "text_encoders"), (VAE_FILE, "vae")):
        assert f"{HUB}/{folder}/{name}  ->  {tmp_path / name}" in message


def test_an_unreachable_hub_is_found_in_one_quick_attempt(tmp_path, monkeypatch):
    """No network: one refused connection, not the hub client's 25 s of retries for each file."""
    import time

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: closed
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    with pytest.raises(files.DownloadError, match="3 weight files .* 127.0.0.1 is unreachable"):
        files.fetch_model_files(handler, "anima", json.loads(DEFINITION.read_text())["model"], tmp_path)
    assert time.monotonic() - start < 3


def test_a_checkpoints_folder_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "ckpts").write_text("not a folder")
    with pytest.raises(files.DownloadError, match="is not a folder"):
        files.fetch_model_files(handler, "anima", json.loads(DEFINITION.read_text())["model"], tmp_path / "ckpts")
    assert (tmp_path / "ckpts").read_text() == "not a folder"


def test_offload_without_cuda_stays_on_cpu_and_never_imports_mmgp(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "mmgp", None)  # any `import mmgp` would now raise ImportError
    layer = torch.nn.Linear(2, 2)
    assert offload_pipe({"transformer": layer}, 4, torch.float32) is None
    assert layer.weight.device.type == "cpu"


def test_settings_accept_every_sampler_spelling_and_store_comfyuis_name():
    from shared.settings import validate_settings
    from wgp import load_registry

    registry = load_registry()
    entry = registry.entry(registry.model_types[0])
    base = registry.factory_settings(entry.model_type) | {"prompt": "a cat"}
    for given, stored in [("euler_a", "euler_ancestral"), ("euler_ancestral", "euler_ancestral"), ("uni_pc", "uni_pc"),
                          ("dpmpp_3m_sde_gpu", "dpmpp_3m_sde_gpu")]:
        assert validate_settings(entry, base | {"sample_solver": given})["sample_solver"] == stored
