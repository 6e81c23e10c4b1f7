"""Reference implementations from diffusers, for parity tests only (the app never imports diffusers)."""

import types

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
