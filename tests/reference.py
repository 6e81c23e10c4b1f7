"""Reference implementations from diffusers, for parity tests only (the app never imports diffusers)."""

import types

import pytest
import torch.nn.functional as F


def _nearest_resize(tensor, size, interpolation=None, **_):
    return F.interpolate(tensor, size=list(size), mode="nearest")


def cosmos_transformer_class():
    """diffusers' `CosmosTransformer3DModel`, usable without torchvision.

    Its forward resizes the padding mask with `torchvision.transforms.functional.resize` (nearest), and
    torchvision cannot be imported beside the CPU torch used here; a nearest `F.interpolate` is the same
    operation for that call.
    """
    from diffusers.models.transformers import transformer_cosmos

    if not hasattr(transformer_cosmos, "transforms"):
        transformer_cosmos.transforms = types.SimpleNamespace(
            functional=types.SimpleNamespace(resize=_nearest_resize),
            InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
        )
    return transformer_cosmos.CosmosTransformer3DModel


def anima_text_conditioner_class():
    """diffusers' `AnimaTextConditioner` (the LLM adapter), added in diffusers 0.40. The upstream-pins CI
    leg runs upstream Wan2GP's diffusers 0.36 (a newer one needs a huggingface_hub that transformers 4.54
    refuses), so the tests that need it skip there and run in the main leg."""
    module = pytest.importorskip("diffusers.models.condition_embedders.condition_embedder_anima",
                                 reason="this diffusers has no Anima adapter (added in 0.40)")
    return module.AnimaTextConditioner
