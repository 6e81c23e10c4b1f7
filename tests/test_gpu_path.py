"""What the GPU path needs, proven on the CPU (spec: gpu_path.md): nothing depends on torch's default
device (mmgp leaves it on CUDA), every weight can be pinned, the DiT compiles to one graph, attention is
resolved once, the dtype and memory-profile policies, previews that cannot kill a generation, upstream's
per-step LoRA multipliers, and the placement and compile options of the app."""

import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from models.anima import sampling
from models.anima.anima_handler import family_handler
from models.anima.anima_main import choose_dtypes
from shared import attention, jobs, offload
from shared.images import latent_preview
from shared.runtime import Runtime, RuntimeOptions, SavedImage, StepInfo
from tests.test_pipeline import run, write_lora
from tests.tiny_ckpts import DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

GB = 1 << 30


@pytest.fixture(scope="module")
def model(ckpts):
    return load(ckpts)[0]


def load(ckpts, **kw):
    return family_handler.load_model([str(ckpts / f) for f in (DIT_FILE, TEXT_ENCODER_FILE, VAE_FILE)], **kw)


@pytest.fixture
def default_device():
    """Sets torch's default device for the test (meta stands in for mmgp's CUDA) and restores it."""
    yield torch.set_default_device
    torch.set_default_device(None)


# --- default-device independence ---------------------------------------------------------------------


def previewing(model):
    """A Wan2GP callback that makes the app's live preview at every step, as the UI does."""
    factors, bias = family_handler.get_rgb_factors("anima")
    previews = []

    def callback(step, latent=None, *args, **kwargs):
        if latent is not None:
            previews.append(latent_preview(latent.cpu(), factors, bias))

    return callback, previews


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_generation_does_not_depend_on_the_default_device(model, default_device, sampler):
    settings = dict(sample_solver=sampler, batch_size=2, seed=11, loras=[])
    callback, previews = previewing(model)
    expected = run(model, callback=callback, **settings)["x"]
    expected_previews = [p.tobytes() for p in previews]

    default_device("meta")
    model._prompt_cache.clear()  # so the text encoder runs under "meta" too
    callback, previews = previewing(model)
    got = run(model, callback=callback, **settings)["x"]
    assert got.device.type == "cpu" and torch.equal(got, expected)
    assert [p.tobytes() for p in previews] == expected_previews and len(previews) == 3


def test_loading_loras_and_tiling_do_not_depend_on_the_default_device(ckpts, model, tmp_path, default_device):
    lora = write_lora(tmp_path / "style.safetensors",
                      [("diffusion_model.blocks.0.self_attn.q_proj", (64, 64), ("lora_A", "lora_B"))], seed=1)
    settings = dict(width=128, height=96, VAE_tile_size=64, loras=[(str(lora), 0.8)], sampling_steps=2)
    expected = run(model, **settings)["x"]
    run(model, loras=[])  # the LoRA off again for the other tests
    default_device("meta")
    loaded_under_meta, _ = load(ckpts)
    assert torch.equal(run(loaded_under_meta, **settings)["x"], expected)


def test_noise_is_drawn_on_the_cpu_whatever_the_default_device(default_device):
    expected = sampling.seeded_randn([3, 4], (2, 5))
    default_device("meta")
    noise = sampling.seeded_randn([3, 4], (2, 5))
    draw = sampling.seeded_noise_source([3], torch.zeros(1, 2, 5, device="cpu"))
    assert noise.device.type == "cpu" and torch.equal(noise, expected)
    assert draw().device.type == "cpu" and sampling.simple_schedule(4).device.type == "cpu"


# --- pinnable weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_every_weight_can_be_pinned_by_mmgp(ckpts, dtype):
    # mmgp pins a weight with `tensor.view(torch.uint8)`, which needs stride(-1) == 1
    _, pipe = load(ckpts, dtype=dtype, VAE_dtype=dtype)
    for name, module in pipe.items():
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        assert tensors, name
        for key, tensor in tensors.items():
            assert tensor.stride(-1) == 1 and tensor.is_contiguous(), f"{name}.{key}"
            assert tensor.view(torch.uint8).numel() == tensor.numel() * tensor.element_size()


# --- torch.compile -----------------------------------------------------------------------------------


def test_the_dit_traces_as_one_graph_without_breaks(model):
    dit = model.transformer
    x, t, context = torch.randn(2, 16, 1, 6, 8), torch.tensor([0.5, 0.25]), torch.randn(2, 512, 32)
    explained = torch._dynamo.explain(dit)(x, t, context)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    # mmgp's --compile compiles every block tower; the adapter's blocks opt out (one run per prompt)
    assert all(block._compile_me is False for block in dit.llm_adapter.blocks)
    assert all(getattr(block, "_compile_me", None) is None for block in dit.blocks)


def test_compile_towers_follows_mmgps_rule(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn: ("compiled", fn))
    skipped = nn.Linear(1, 1)
    skipped._compile_me = False
    module = nn.Module()
    module.blocks, module.other = nn.ModuleList([nn.Linear(1, 1), nn.Linear(1, 1)]), nn.ModuleList([skipped])
    assert offload.compile_towers(module) == ["blocks.0", "blocks.1"]
    assert module.blocks[0].forward[0] == "compiled" and "forward" not in vars(skipped)  # left as it was


# --- attention ---------------------------------------------------------------------------------------


def test_attention_is_resolved_once_without_probing_packages_per_call(monkeypatch):
    monkeypatch.setattr(attention, "_resolved", {})
    probes = []
    find_spec = attention.importlib.util.find_spec
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: probes.append(name) or find_spec(name))
    monkeypatch.setattr(attention, "_available_modes", None)
    q = torch.randn(1, 4, 2, 8)
    for _ in range(5):
        attention.pay_attention([q, q, q])
    assert len(probes) == 3 and len(attention._resolved) == 1  # flash_attn, sageattention x2, then never


@pytest.mark.parametrize("capability, expected", [((7, 5), "sdpa"), ((8, 0), "flash"), ((9, 0), "flash")])
def test_fused_attention_only_from_sm80(monkeypatch, capability, expected):
    monkeypatch.setattr(attention, "_available_modes", ("auto", "sdpa", "flash"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    assert attention._resolve("auto", cuda, torch.bfloat16, False) == expected
    assert attention._resolve("flash", cuda, torch.float16, False) == expected
    assert attention._resolve("flash", cuda, torch.float32, False) == "sdpa"
    assert attention._resolve("flash", cuda, torch.float16, True) == "sdpa"  # masks need SDPA


# --- dtypes and memory profiles ----------------------------------------------------------------------


@pytest.mark.parametrize("capability, transformer, vae", [
    ((7, 5), torch.float16, torch.float32),  # T4 / RTX 20xx: no native bf16 (is_bf16_supported says yes)
    ((7, 0), torch.float16, torch.float32),  # V100
    ((8, 6), torch.bfloat16, torch.bfloat16),
])
def test_bf16_only_where_native(monkeypatch, capability, transformer, vae):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    dtypes = choose_dtypes(torch.device("cuda", 0))
    assert (dtypes.transformer, dtypes.vae, dtypes.text_encoder) == (transformer, vae, torch.float32)
    assert choose_dtypes(torch.device("cpu")).transformer == torch.float32


ANIMA_SIZES = {"transformer": int(4.2 * GB), "text_encoder": int(2.4 * GB), "vae": int(0.25 * GB)}


@pytest.mark.parametrize("vram, ram, profile", [
    (141, 256, 1.0),  # H200 in a big server
    (24, 64, 1.0),
    (24, 10, 3.0),  # big card, little RAM: pin the transformer only
    (24, 6, 3.5),
    (16, 32, 1.0),
    (8, 32, 2.0),  # small card: stream
    (8, 10, 4.0),
    (6, 6, 5.0),
])
def test_profile_is_chosen_from_free_vram_and_ram(vram, ram, profile):
    chosen, why = offload.choose_profile(ANIMA_SIZES, vram * GB, ram * GB)
    assert chosen == profile and f"{vram:.1f} GB VRAM" in why and f"{ram:.1f} GB RAM" in why
    assert chosen in offload.PROFILE_NAMES


def test_runtime_says_which_profile_it_chose(monkeypatch):
    logged = []
    runtime = Runtime(registry=None, options=RuntimeOptions(ckpts_dir=".", output_dir="."), log=logged.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("shared.runtime.auto_profile", lambda pipe: (3.0, "22.0 GB VRAM and 40.0 GB RAM free"))
    assert runtime._profile({}) == 3.0
    assert "Memory profile 3 (LowRAM_HighVRAM" in logged[-1] and "22.0 GB VRAM" in logged[-1]
    fixed = Runtime(registry=None, options=RuntimeOptions(ckpts_dir=".", output_dir=".", profile=5.0))
    assert fixed._profile({}) == 5.0


class FakeModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.moved_to = None

    def to(self, device):
        self.moved_to = device
        return self


def test_no_offload_places_every_model_on_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setitem(sys.modules, "mmgp", None)  # the no-offload path must not need mmgp
    pipe = {"transformer": FakeModule(), "text_encoder": FakeModule(), "vae": FakeModule()}
    assert offload.offload_pipe(pipe, 4.0, torch.bfloat16, offload=False) is None
    assert all(m.moved_to == torch.device("cuda", 0) for m in pipe.values())


# --- previews ----------------------------------------------------------------------------------------


class SteppingRuntime:
    """Stands in for `Runtime`: reports three steps with latents, then returns no images."""

    def generate(self, settings, on_step=None, on_status=None):
        for step in range(1, 4):
            on_step(StepInfo(step, 3, 0.0, 0.0, torch.zeros(16, 1, 2, 2)))
        return [SavedImage(Path("image.png"), 1, {}, "")]


def test_a_failing_preview_never_kills_the_generation():
    calls, logged = [], []

    def broken_preview(model_type, latent):
        calls.append(1)
        raise RuntimeError("Tensor on device cuda:0 is not on the expected device cpu!")

    queue = jobs.JobQueue(SteppingRuntime(), preview=broken_preview, log=logged.append)
    queue.submit({"model_type": "anima_preview"})
    deadline = time.monotonic() + 60  # a loaded CI machine may be slow to schedule the worker thread
    while queue.snapshot().last is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.snapshot().last.status == "done"
    assert len(calls) == 1 and "the live preview failed" in logged[0]  # tried once, then left off


# --- upstream Wan2GP's per-step LoRA multipliers -----------------------------------------------------


def test_loras_slists_go_through_upstreams_helpers(model, monkeypatch):
    updates, steps = [], []
    helpers = types.SimpleNamespace(update_loras_slists=lambda trans, slists, n: updates.append((trans, slists, n)))
    mmgp_offload = types.SimpleNamespace(set_step_no_for_lora=lambda trans, i: steps.append((trans, i)))
    monkeypatch.setitem(sys.modules, "shared.utils.loras_mutipliers", helpers)
    monkeypatch.setitem(sys.modules, "mmgp", types.SimpleNamespace(offload=mmgp_offload))
    monkeypatch.setitem(sys.modules, "mmgp.offload", mmgp_offload)
    slists = {"phase1": [[1.0, 0.5, 0.25, 0.0]]}
    run(model, sampling_steps=4, loras_slists=slists)
    assert updates == []  # no LoRA loaded through mmgp: nothing to schedule
    model.transformer._loras_model_data = {}  # what mmgp's profile(loras=["transformer"]) sets
    run(model, sampling_steps=4, loras_slists=slists)
    assert updates == [(model.transformer, slists, 4)]
    assert steps == [(model.transformer, i) for i in range(4)]  # set before each step, as Z-Image does
    del model.transformer._loras_model_data
