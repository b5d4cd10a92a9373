"""The compiled splines (flows/native.py): the sampler's inverse equals nflows', the training spline and its backward torch's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nflows.transforms.splines.rational_quadratic import (
    unconstrained_rational_quadratic_spline,
)

from calodistill.flows import native
from calodistill.flows.config import FlowConfig
from calodistill.flows.errors import FlowsError
from calodistill.flows.fast import FastIAFSampler
from calodistill.flows.models import build_iaf_like, build_maf
from calodistill.flows.transforms import rq_spline_linear_tails

pytestmark = pytest.mark.skipif(
    os.environ.get("CALODISTILL_NATIVE", "1") == "0", reason="native spline disabled by CALODISTILL_NATIVE=0")

BOUND = 3.0


def _problem(n: int, d: int, bins: int, dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    params = 2.0 * torch.randn(n, 3 * bins - 1, d, generator=gen, dtype=torch.float64)
    y = 2.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)  # some beyond the tail bound
    y[0, 0], y[0, 1] = BOUND, -BOUND                                  # exactly on the bounds
    p = params.transpose(1, 2)                                       # nflows: (n, d, params)
    ref, ref_lad = unconstrained_rational_quadratic_spline(
        y, p[..., :bins], p[..., bins:2 * bins], p[..., 2 * bins:], inverse=True, tails="linear",
        tail_bound=BOUND)
    return y.to(dtype), params.to(dtype), ref, ref_lad


def test_library_builds() -> None:
    assert native.available(), native.unavailable_reason()
    assert native.library_path() is not None and native.library_path().exists()
    assert native.supports_bins(8) and not native.supports_bins(7)


@pytest.mark.parametrize("bins", [2, 3, 8, 16])
@pytest.mark.parametrize("d", [5, 8, 21])  # below, at and above one vector of 8, with a remainder
def test_equals_nflows_float64(bins: int, d: int) -> None:
    y, params, ref, ref_lad = _problem(40, d, bins, torch.float64)
    total = torch.full((40,), 0.5, dtype=torch.float64)
    x = native.rqs_inverse_native(y, params, BOUND, 1e-3, 1e-3, 1e-3, total)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-11)
    torch.testing.assert_close(total, 0.5 + ref_lad.sum(dim=1), rtol=0, atol=1e-9)
    assert torch.equal(x[y.abs() > BOUND], y[y.abs() > BOUND])  # identity tails


@pytest.mark.parametrize("bins", [4, 8])
def test_equals_nflows_float32(bins: int) -> None:
    """float32 (the vectorised path on AVX2 machines) against the float64 reference."""
    y, params, ref, ref_lad = _problem(300, 37, bins, torch.float32, seed=2)
    # well-conditioned parameters, as a trained flow has (the random ones above include bins of 1e-3)
    params = 0.5 * params
    p64 = params.double().transpose(1, 2)
    ref, ref_lad = unconstrained_rational_quadratic_spline(
        y.double(), p64[..., :bins], p64[..., bins:2 * bins], p64[..., 2 * bins:], inverse=True,
        tails="linear", tail_bound=BOUND)
    total = torch.zeros(300)
    x = native.rqs_inverse_native(y, params, BOUND, 1e-3, 1e-3, 1e-3, total)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(total.double(), ref_lad.sum(dim=1), rtol=2e-5, atol=2e-4)
    x_only = native.rqs_inverse_native(y, params, BOUND, 1e-3, 1e-3, 1e-3)
    assert torch.equal(x_only, x)


def test_strided_inputs_and_out() -> None:
    """Column slices of wider tensors (the sampler's per-group calls) read and write only their columns."""
    y, params, ref, ref_lad = _problem(20, 12, 8, torch.float64)
    wide = torch.zeros(20, 30, dtype=torch.float64)
    wide[:, 5:17] = y
    out = torch.full((20, 30), 7.0, dtype=torch.float64)
    native.rqs_inverse_native(wide[:, 5:17], params, BOUND, 1e-3, 1e-3, 1e-3, out=out[:, 10:22])
    torch.testing.assert_close(out[:, 10:22], ref, rtol=0, atol=1e-11)
    assert torch.all(out[:, :10] == 7.0) and torch.all(out[:, 22:] == 7.0)


def test_one_thread_equals_many() -> None:
    y, params, _, _ = _problem(64, 40, 8, torch.float32, seed=3)
    t1, t2 = torch.zeros(64), torch.zeros(64)
    a = native.rqs_inverse_native(y, params, BOUND, 1e-3, 1e-3, 1e-3, t1, threads=1)
    b = native.rqs_inverse_native(y, params, BOUND, 1e-3, 1e-3, 1e-3, t2, threads=2)
    assert torch.equal(a, b) and torch.equal(t1, t2)


def test_bad_arguments_are_one_line_errors() -> None:
    y, params, _, _ = _problem(4, 9, 8, torch.float64)
    with pytest.raises(FlowsError, match="bins"):
        native.rqs_inverse_native(y, params[:, :-3], BOUND, 1e-3, 1e-3, 1e-3)  # 20 rows: 7 bins
    with pytest.raises(FlowsError, match="float32 or float64"):
        native.rqs_inverse_native(y.half(), params.half(), BOUND, 1e-3, 1e-3, 1e-3)
    with pytest.raises(FlowsError, match="params"):
        native.rqs_inverse_native(y, params.float(), BOUND, 1e-3, 1e-3, 1e-3)
    with pytest.raises(FlowsError, match="params"):
        native.rqs_inverse_native(y, params.transpose(0, 2).contiguous().transpose(0, 2), BOUND, 1e-3, 1e-3,
                                  1e-3)
    with pytest.raises(FlowsError, match="shapes"):
        native.rqs_inverse_native(y[:3], params, BOUND, 1e-3, 1e-3, 1e-3)


def _student(dtype: torch.dtype, features: int = 20) -> torch.nn.Module:
    cfg = FlowConfig(features=features, context_features=2, n_blocks=3, hidden_features=24,
                     n_hidden_layers=1, kind="spline", num_bins=8, tail_bound=2.5, permutation="random",
                     permutation_seed=1)
    torch.manual_seed(0)
    student = build_iaf_like(build_maf(cfg).to(dtype), hidden_features=32).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return student


@pytest.mark.parametrize("groups", [1, 4])
def test_sampler_native_equals_torch_spline(groups: int) -> None:
    student = _student(torch.float64)
    gen = torch.Generator().manual_seed(0)
    z = 1.5 * torch.randn(50, 20, generator=gen, dtype=torch.float64)
    c = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    fast = FastIAFSampler(student, chunk_size=16, groups=groups)
    slow = FastIAFSampler(student, chunk_size=16, groups=groups, native_spline=False)
    assert fast.native and not slow.native
    x1, l1 = fast.sample(z, c, need_logabsdet=True)
    x2, l2 = slow.sample(z, c, need_logabsdet=True)
    with torch.no_grad():
        x3, l3 = student.inverse(z, c)
    torch.testing.assert_close(x1, x2, rtol=0, atol=1e-10)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-9)
    torch.testing.assert_close(x1, x3, rtol=0, atol=1e-10)
    torch.testing.assert_close(l1, l3, rtol=0, atol=1e-9)


def test_sampler_float32_native_equals_iaf_inverse() -> None:
    student = _student(torch.float32, features=40)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 40, generator=gen)
    c = torch.randn(200, 2, generator=gen)
    x, lad = FastIAFSampler(student, chunk_size=64).sample(z, c, need_logabsdet=True)
    with torch.inference_mode():
        xr, ladr = student.inverse(z, c)
    torch.testing.assert_close(x, xr, rtol=0, atol=1e-5)
    torch.testing.assert_close(lad, ladr, rtol=1e-5, atol=2e-4)


def test_disabled_falls_back_and_cache_dir_is_used(tmp_path: Path) -> None:
    """CALODISTILL_NATIVE=0 keeps the torch spline; CALODISTILL_CACHE_DIR is where the library is built."""
    code = (
        "import torch\n"
        "from flows import native\n"
        "from flows.fast import FastIAFSampler\n"
        "from flows.config import FlowConfig\n"
        "from flows.models import build_iaf_like, build_maf\n"
        "cfg = FlowConfig(features=9, context_features=0, n_blocks=2, hidden_features=8, kind='spline')\n"
        "s = FastIAFSampler(build_iaf_like(build_maf(cfg)))\n"
        "print(native.available(), s.native, native.library_path())\n"
        "try:\n"
        "    FastIAFSampler(build_iaf_like(build_maf(cfg)), native_spline=True)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, CALODISTILL_NATIVE="0", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "None", "FlowsError"]

    env = dict(os.environ, CALODISTILL_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    available, used, path = out.stdout.split()[:3]
    assert available == used == "True"
    assert Path(path).parent == tmp_path / "cache" and Path(path).exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporaries left


# ------------------------------------------------------------------ training spline (rqs_spline.cpp)
def _train_problem(n: int, d: int, bins: int, dtype: torch.dtype, seed: int = 5, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    v = 2.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)  # some beyond the tail bound
    v[0, 0], v[0, 1 % d] = BOUND, -BOUND
    p = scale * torch.randn(n, d, 3 * bins - 1, generator=gen, dtype=torch.float64)
    return v.to(dtype), p.to(dtype)


def _with_grads(fn, v: torch.Tensor, p: torch.Tensor, g_out: torch.Tensor, g_lad: torch.Tensor):
    v, p = v.clone().requires_grad_(), p.clone().requires_grad_()
    out, lad = fn(v, p)
    ((out * g_out).sum() + (lad * g_lad).sum()).backward()
    return out.detach(), lad.detach(), v.grad, p.grad


def _torch_spline(inverse: bool, bins: int):
    def fn(v: torch.Tensor, p: torch.Tensor):
        out, lad = rq_spline_linear_tails(v, p[..., :bins], p[..., bins:2 * bins], p[..., 2 * bins:],
                                          inverse=inverse, tail_bound=BOUND)
        return out, lad.sum(dim=1)
    return fn


def _native_spline(inverse: bool):
    return lambda v, p: native.rq_spline_native(v, p, inverse, BOUND, 1e-3, 1e-3, 1e-3)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("bins", [2, 3, 8])
@pytest.mark.parametrize("d", [5, 8, 21])  # below, at and above the vector lanes, with remainders
def test_training_spline_and_backward_equal_torch_float64(inverse: bool, bins: int, d: int) -> None:
    assert native.train_spline_available()
    v, p = _train_problem(30, d, bins, torch.float64)
    gen = torch.Generator().manual_seed(9)
    g_out, g_lad = torch.randn(30, d, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen, dtype=torch.float64)
    got = _with_grads(_native_spline(inverse), v, p, g_out, g_lad)
    ref = _with_grads(_torch_spline(inverse, bins), v, p, g_out, g_lad)
    for a, b, name in zip(got, ref, ("outputs", "logabsdet", "grad inputs", "grad params")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    outside = v.abs() > BOUND
    assert torch.equal(got[0][outside], v[outside]) and torch.equal(got[2][outside], g_out[outside])


@pytest.mark.parametrize("inverse", [False, True])
def test_training_spline_gradcheck(inverse: bool) -> None:
    """The analytic backward against finite differences (float64)."""
    v, p = _train_problem(3, 6, 4, torch.float64, scale=0.5)
    v = v.clamp(-2.9, 2.9).requires_grad_()  # keep away from the kinks at ±B
    p.requires_grad_()
    assert torch.autograd.gradcheck(_native_spline(inverse), (v, p), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("inverse", [False, True])
def test_training_spline_float32_against_float64(inverse: bool) -> None:
    v, p = _train_problem(64, 37, 8, torch.float32, scale=0.5)
    gen = torch.Generator().manual_seed(2)
    g_out, g_lad = torch.randn(64, 37, generator=gen), torch.randn(64, generator=gen)
    got = _with_grads(_native_spline(inverse), v, p, g_out, g_lad)
    ref = _with_grads(_torch_spline(inverse, 8), v.double(), p.double(), g_out.double(), g_lad.double())
    assert got[0].dtype == got[3].dtype == torch.float32
    for a, b, name in zip(got, ref, ("outputs", "logabsdet", "grad inputs", "grad params")):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)


def test_training_spline_partial_gradients_and_threads() -> None:
    """Only the gradients asked for are computed; one thread and several give the same numbers."""
    v, p = _train_problem(16, 13, 8, torch.float32)
    out, lad = native.rq_spline_native(v, p.clone().requires_grad_(), True, BOUND, 1e-3, 1e-3, 1e-3)
    (out.sum() + lad.sum()).backward()
    vg = v.clone().requires_grad_()
    out, lad = native.rq_spline_native(vg, p, False, BOUND, 1e-3, 1e-3, 1e-3)
    (out.sum() + lad.sum()).backward()
    assert vg.grad is not None and torch.isfinite(vg.grad).all()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _with_grads(_native_spline(True), v, p, torch.ones(16, 13), torch.ones(16))
    finally:
        torch.set_num_threads(threads)
    one = _with_grads(_native_spline(True), v, p, torch.ones(16, 13), torch.ones(16))
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_training_spline_rejects_what_it_cannot_take() -> None:
    v, p = _train_problem(4, 5, 8, torch.float64)
    assert native.train_spline_supports(v, p)
    assert not native.train_spline_supports(v.half(), p.half())
    assert not native.train_spline_supports(v, p[..., :-3])  # 20 parameters: 7 bins
    with pytest.raises(FlowsError, match="cannot take"):
        native.rq_spline_native(v.float(), p, False, BOUND, 1e-3, 1e-3, 1e-3)
    with pytest.raises(FlowsError, match="expected"):
        native.rq_spline_native(v[:3], p, False, BOUND, 1e-3, 1e-3, 1e-3)
