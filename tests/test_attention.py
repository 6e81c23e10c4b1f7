import math
import types

import pytest
import torch

from shared import attention
from shared.attention import available_attention_modes, check_attention_mode, pay_attention


def naive_attention(q, k, v, mask=None, causal=False):
    # [B, L, H, D] -> [B, H, L, D] and a plain softmax(QK^T / sqrt(D)) V
    q, k, v = (t.transpose(1, 2).double() for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2)


def random_qkv(lq=7, lk=5, heads=3, dim=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, n, heads, dim, generator=g) for n in (lq, lk, lk)]


def test_sdpa_matches_naive_attention_and_empties_the_list():
    q, k, v = random_qkv()
    qkv = [q, k, v]
    out = pay_attention(qkv)
    assert qkv == []
    assert out.shape == (2, 7, 3, 8)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_mask_and_causal_are_honoured():
    q, k, v = random_qkv(lq=5, lk=5)
    mask = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True  # keep one key per row so no row is fully masked
    torch.testing.assert_close(pay_attention([q, k, v], attention_mask=mask).double(),
                               naive_attention(q, k, v, mask=mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pay_attention([q, k, v], causal=True).double(),
                               naive_attention(q, k, v, causal=True), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        pay_attention([q, k, v], causal=True, attention_mask=mask)


def test_output_keeps_the_input_dtype():
    q, k, v = (t.bfloat16() for t in random_qkv())
    assert pay_attention([q, k, v]).dtype == torch.bfloat16


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown attention mode 'fastest'"):
        pay_attention(random_qkv(), force_attention="fastest")
    with pytest.raises(ValueError, match="Unknown attention mode"):
        check_attention_mode("xformers2")


def test_uninstalled_backend_is_refused_with_the_package_name():
    missing = [m for m in ("flash", "sage", "sage2") if m not in available_attention_modes()]
    if not missing:
        pytest.skip("every optional backend is installed here")
    with pytest.raises(ValueError, match="needs the package"):
        check_attention_mode(missing[0])
    assert {"auto", "sdpa"} <= set(available_attention_modes())


def test_mode_from_mmgp_shared_state_is_read(monkeypatch):
    fake_offload = types.SimpleNamespace(shared_state={"_attention": "no-such-mode"})
    monkeypatch.setitem(__import__("sys").modules, "mmgp.offload", fake_offload)
    with pytest.raises(ValueError, match="no-such-mode"):
        pay_attention(random_qkv())
    fake_offload.shared_state["_attention"] = "sdpa"
    assert pay_attention(random_qkv()).shape == (2, 7, 3, 8)


def test_set_attention_mode_validates(monkeypatch):
    monkeypatch.setattr(attention, "_configured_mode", "auto")
    attention.set_attention_mode("sdpa")
    assert attention._configured_mode == "sdpa"
    with pytest.raises(ValueError):
        attention.set_attention_mode("bogus")
