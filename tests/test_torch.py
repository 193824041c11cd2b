"""The reference on PyTorch tensors: families made the ordinary way (NumPy parameters) follow torch inputs.

Selected by CI's torch stage (``-m torch``); skipped where torch is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.families import FAMILIES, example_family
from relpos_ref.families import base as families_base
from relpos_ref.tolerances import ATTENTION_FLOORS, ATTENTION_K, BIAS_TOLERANCES

torch = pytest.importorskip("torch", reason="needs PyTorch (CI installs it in its torch stage)")

pytestmark = pytest.mark.torch

SQ, SK, D, H = 6, 9, 8, 4
NAMES = list(FAMILIES)
DTYPES = {"float32": (np.float32, torch.float32), "float64": (np.float64, torch.float64)}


def make_family(name: str, dtype: str = "float64") -> rp.BiasFamily:
    fam = example_family(name, H, head_dim=D, shape=(SQ, SK) if name == "tensor" else None)
    return fam if dtype == "float64" else fam.astype(np.float32)


def host(x) -> np.ndarray:
    assert isinstance(x, torch.Tensor), type(x)
    return x.detach().cpu().numpy()


def qkv(dtype: str, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    shapes = ((2, H, SQ, D), (2, H, SK, D), (2, H, SK, D), (2, H, SQ, D))  # q, k, v, d_out
    return tuple(rng.standard_normal(s).astype(DTYPES[dtype][0]) for s in shapes)


def attention_tol(dtype: str, plain: np.ndarray, ref64: np.ndarray) -> float:
    """The attention rule: K times NumPy's own same-dtype error, plus the dtype's floor times max(1, max |ref|)."""
    err = float(np.max(np.abs(plain.astype(np.float64) - ref64))) if dtype != "float64" else 0.0
    return ATTENTION_K * err + ATTENTION_FLOORS[dtype] * max(1.0, float(np.max(np.abs(ref64))))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_bias_on_torch_positions(name, dtype):
    fam = make_family(name, dtype)
    q_np, k_np = rp.positions(SQ, SK)
    q_t, k_t = rp.positions(SQ, SK, xp=torch)
    got = fam.bias(q_t, k_t)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == DTYPES[dtype][1]
    ref64 = np.asarray(make_family(name).bias(q_np, k_np))
    if dtype == "float64":
        np.testing.assert_allclose(host(got), ref64, rtol=1e-12, atol=1e-12 * max(1.0, float(np.max(np.abs(ref64)))))
    else:
        mag = np.asarray(make_family(name).bias_magnitude(q_np, k_np))
        err = np.abs(host(got).astype(np.float64) - ref64)
        assert np.all(err <= BIAS_TOLERANCES["float32"] * np.maximum(1.0, mag)), float(np.max(err))
    # The NumPy family itself is untouched: it still computes on NumPy positions, bitwise as before.
    assert isinstance(fam.bias(q_np, k_np), np.ndarray)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_attention_on_torch(name, dtype):
    fam = make_family(name, dtype)
    q, k, v, _ = qkv(dtype)
    got = rp.attention(*(torch.from_numpy(a) for a in (q, k, v)), bias=fam, causal=True)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == DTYPES[dtype][1]
    plain = np.asarray(rp.attention(q, k, v, bias=fam, causal=True))
    ref64 = np.asarray(rp.attention(*(a.astype(np.float64) for a in (q, k, v)), bias=make_family(name), causal=True))
    err = float(np.max(np.abs(host(got).astype(np.float64) - ref64)))
    assert err <= attention_tol(dtype, plain, ref64), err


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_attention_vjp_on_torch(name, dtype):
    fam = make_family(name, dtype)
    arrays = qkv(dtype, seed=1)
    got = rp.attention_vjp(*(torch.from_numpy(a) for a in arrays), bias=fam, causal=True)
    plain = rp.attention_vjp(*arrays, bias=fam, causal=True)
    ref64 = rp.attention_vjp(*(a.astype(np.float64) for a in arrays), bias=make_family(name), causal=True)
    pairs = [(got.dq, plain.dq, ref64.dq), (got.dk, plain.dk, ref64.dk), (got.dv, plain.dv, ref64.dv)]
    assert set(got.dbias) == set(ref64.dbias) == set(fam.parameters())
    pairs += [(got.dbias[n], plain.dbias[n], ref64.dbias[n]) for n in ref64.dbias]
    for g, p, r in pairs:
        assert g.dtype == DTYPES[dtype][1]
        err = float(np.max(np.abs(host(g).astype(np.float64) - np.asarray(r))))
        assert err <= attention_tol(dtype, np.asarray(p), np.asarray(r)), err


@pytest.mark.parametrize("name", [n for n in NAMES if n != "tensor"])
def test_bias_vjp_on_torch(name):
    fam = make_family(name)
    d_bias = np.random.default_rng(2).standard_normal((H, SQ, SK))
    got = fam.bias_vjp(*rp.positions(SQ, SK, xp=torch), torch.from_numpy(d_bias))
    ref = fam.bias_vjp(*rp.positions(SQ, SK), d_bias)
    assert set(got) == set(ref)
    for n, r in ref.items():
        r = np.asarray(r)
        np.testing.assert_allclose(host(got[n]), r, rtol=1e-12, atol=1e-12 * max(1.0, float(np.max(np.abs(r)))))


def test_plain_torch_module_as_xp():
    q_pos, k_pos = rp.positions(3, 4, xp=torch)
    assert isinstance(q_pos, torch.Tensor)
    assert isinstance(k_pos, torch.Tensor)
    fam = rp.ALiBi.from_num_heads(2, xp=torch)
    assert fam.xp.__name__ == "array_api_compat.torch"
    assert isinstance(fam.bias(q_pos, k_pos), torch.Tensor)
    t5 = rp.T5Bias([[0.0] * 32] * 2, xp=torch, bidirectional=False, layout="heads_buckets")
    assert isinstance(t5.parameters()["table"], torch.Tensor)
    assert rp.Sandwich(2, 8, xp=torch).xp is fam.xp
    assert rp.KerplePower([0.5, 1.0], [1.0, 1.5], xp=torch).xp is fam.xp
    assert rp.ALiBi.from_num_heads(2).astype(xp=torch).xp is fam.xp
    assert rp.ALiBi.from_num_heads(2, xp=np).xp.__name__ == "array_api_compat.numpy"


@pytest.mark.parametrize("name", NAMES)
def test_example_family_with_plain_torch(name):
    fam = example_family(name, H, head_dim=D, shape=(SQ, SK) if name == "tensor" else None, xp=torch)
    assert fam.xp.__name__ == "array_api_compat.torch"
    got = fam.bias(*rp.positions(SQ, SK, xp=torch))
    assert isinstance(got, torch.Tensor)
    assert not fam.__dict__.get("_followers")  # torch parameters: nothing to convert


def test_torch_family_with_numpy_inputs_is_an_error():
    fam = rp.ALiBi.from_num_heads(2, xp=torch)
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(TypeError, match=r"^bias: expected a family whose parameters live in .*numpy, got .*torch$"):
        rp.attention(q, q, q, bias=fam)
    with pytest.raises(TypeError, match=r"^q_pos, k_pos: expected arrays of torch .*, got arrays of numpy$"):
        fam.bias(*rp.positions(3, 3))


def test_conversion_is_cached(monkeypatch):
    calls = []
    convert = families_base._follow_convert

    def counting(family, xp, dtype, device):
        calls.append((xp.__name__, dtype))
        return convert(family, xp, dtype, device)

    monkeypatch.setattr(families_base, "_follow_convert", counting)
    fam = rp.ALiBi.from_num_heads(H)
    q_pos, k_pos = rp.positions(SQ, SK, xp=torch)
    first = fam.bias(q_pos, k_pos)
    q = torch.zeros((1, H, SQ, D), dtype=torch.float64)
    rp.attention(q, q, q, bias=fam, causal=True)
    second = fam.bias(q_pos, k_pos)
    assert calls == [("array_api_compat.torch", torch.float64)]
    assert list(fam.__dict__["_followers"]) == [("torch", "cpu", "float64")]
    assert torch.equal(first, second)
    fam.bias(*rp.positions(SQ, SK))  # NumPy inputs use the family itself: nothing converted
    assert len(calls) == 1


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_autograd_matches_attention_vjp(name):
    # The value checks read max |q| as a Python float, which torch warns about for tensors that require grad; the
    # number only bounds the logits and takes no part in the graph.
    fam = make_family(name)
    q, k, v, d_out = (torch.from_numpy(a) for a in qkv("float64", seed=3))
    leaves = tuple(a.clone().requires_grad_(True) for a in (q, k, v))
    out = rp.attention(*leaves, bias=fam, causal=True)
    grads = torch.autograd.grad((out * d_out).sum(), leaves)
    ref = rp.attention_vjp(q, k, v, d_out, bias=fam, causal=True)
    for g, r in zip(grads, (ref.dq, ref.dk, ref.dv), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
