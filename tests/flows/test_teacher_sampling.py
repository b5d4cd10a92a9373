"""The incremental teacher sampler (flows/teacher_sampling.py) equals nflows' D-pass inverse of the MAF."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from calodistill.flows.config import FlowConfig
from calodistill.flows.errors import FlowsError
from calodistill.flows.models import MAF, build_iaf_like, build_maf
from calodistill.flows.teacher_sampling import FastMAFSampler


def _teacher(kind: str = "spline", n_hidden_layers: int = 1, dtype: torch.dtype = torch.float64,
             features: int = 9, context: int = 2, n_blocks: int = 3, hidden: int = 16, bins: int = 4,
             permutation: str = "random", activation: str = "relu", seed: int = 0) -> MAF:
    torch.manual_seed(seed)
    cfg = FlowConfig(features=features, context_features=context, n_blocks=n_blocks, hidden_features=hidden,
                     n_hidden_layers=n_hidden_layers, kind=kind, num_bins=bins, tail_bound=2.5,
                     permutation=permutation, permutation_seed=3, activation=activation)
    teacher = build_maf(cfg).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the identity initialisation, some values in the linear tails
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return teacher.eval()


def _noise(teacher: MAF, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    ref = next(teacher.parameters())
    z = 1.3 * torch.randn(n, teacher.features, generator=gen, dtype=ref.dtype)
    c = (torch.randn(n, teacher.config.context_features, generator=gen, dtype=ref.dtype)
         if teacher.config.context_features else None)
    return z, c


@pytest.mark.parametrize("kind,n_hidden_layers,permutation,activation,native_spline", [
    ("spline", 1, "random", "relu", None),
    ("spline", 1, "reverse", "relu", False),
    ("spline", 2, "random", "tanh", None),
    ("spline", 3, "none", "relu", False),
    ("affine", 1, "random", "relu", None),
    ("affine", 2, "reverse", "elu", None),
])
def test_equals_nflows_d_pass_inverse_float64(kind: str, n_hidden_layers: int, permutation: str,
                                              activation: str, native_spline: bool | None) -> None:
    teacher = _teacher(kind, n_hidden_layers, permutation=permutation, activation=activation)
    z, c = _noise(teacher, 20)
    sampler = FastMAFSampler(teacher, native_spline=native_spline)
    assert sampler.native == (kind == "spline" and native_spline is None)
    x, lad = sampler.sample(z, c, need_logabsdet=True)
    with torch.no_grad():
        x_ref, lad_ref = teacher.inverse(z, c)
    torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad, lad_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(sampler(z, c), x)
    # round trip through the teacher's fast (forward) direction
    with torch.no_grad():
        z_back, lad_fwd = teacher(x, c)
    torch.testing.assert_close(z_back, z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad_fwd, -lad, rtol=1e-10, atol=1e-10)


def test_unconditional_teacher() -> None:
    teacher = _teacher(context=0)
    z, c = _noise(teacher, 7)
    assert c is None
    with torch.no_grad():
        torch.testing.assert_close(FastMAFSampler(teacher)(z), teacher.inverse(z)[0], rtol=1e-10, atol=1e-10)


def test_quickstart_size_float32() -> None:
    """D 504, 4 spline blocks of hidden 64, 8 bins (the quickstart's teacher), float32."""
    teacher = _teacher(dtype=torch.float32, features=504, context=4, n_blocks=4, hidden=64, bins=8,
                       permutation="reverse", seed=4)
    with torch.no_grad():  # a milder perturbation than the small tests': D sequential steps compound rounding
        for p in teacher.parameters():
            p.mul_(0.3)
    z, c = _noise(teacher, 3)
    x, lad = FastMAFSampler(teacher).sample(z, c, need_logabsdet=True)
    with torch.no_grad():
        x_ref, lad_ref = teacher.inverse(z, c)
        z_back, _ = teacher(x, c)
        x64 = teacher.double().inverse(z.double(), c.double())[0]
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lad, lad_ref, rtol=1e-4, atol=1e-3)
    # as close to the float64 result as nflows' D passes in float32 are
    assert (x.double() - x64).abs().max() <= 3 * (x_ref.double() - x64).abs().max() + 1e-6
    # the forward's steep ∂z/∂x amplifies x's float32 rounding (~1e-5) in the round trip
    torch.testing.assert_close(z_back, z, rtol=1e-3, atol=1e-3)


def test_refresh_follows_weight_changes_and_bad_inputs() -> None:
    teacher = _teacher()
    z, c = _noise(teacher, 5)
    sampler = FastMAFSampler(teacher)
    before = sampler(z, c)
    with torch.no_grad():
        teacher.blocks()[0].autoregressive_net.output_layer.bias.add_(0.5)
        want = teacher.inverse(z, c)[0]
    assert torch.equal(sampler(z, c), before)  # a snapshot until refreshed
    sampler.refresh()
    torch.testing.assert_close(sampler(z, c), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(FlowsError, match="inputs"):
        sampler(z[:, :-1], c)
    with pytest.raises(FlowsError, match="context"):
        sampler(z, None)
    with pytest.raises(FlowsError, match="MAF"):
        FastMAFSampler(build_iaf_like(teacher))  # type: ignore[arg-type]


@pytest.mark.skipif(os.environ.get("CALODISTILL_NATIVE", "1") == "0", reason="native spline disabled")
def test_shower_generator_samples_the_teacher_incrementally() -> None:
    """``ShowerGenerator`` gives a teacher's showers through the fast sampler, from ``sample``'s noise."""
    from calodistill.flows.preprocessing import CaloFlowPreprocessor
    from calodistill.flows.sampling import ShowerGenerator

    layer_sizes = [3, 4]
    rng = np.random.default_rng(0)
    e_inc = rng.uniform(1e3, 1e4, 40)
    voxels = rng.gamma(1.0, 50.0, (40, 7)) * (rng.uniform(size=(40, 7)) > 0.3)
    pre = CaloFlowPreprocessor(layer_sizes).fit(e_inc, voxels)
    flow1 = build_maf(FlowConfig(features=2, context_features=1, n_blocks=2, hidden_features=8))
    teacher = _teacher(features=7, context=3, dtype=torch.float32, bins=8)
    gen = ShowerGenerator(pre, flow1, teacher, device="cpu")
    showers = gen.sample(e_inc[:6], seed=3)
    assert isinstance(gen._fast, FastMAFSampler) and showers.shape == (6, 7)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)  # the same draws as sample_with_layers: Flow I, then Flow II
    with torch.inference_mode():
        e = torch.as_tensor(e_inc[:6])
        u = flow1.sample(context=pre.flow1_context(e).float(), generator=g)
        layer_e = pre.layer_energies_from_flow1(u.double(), e)
        x = teacher.sample(context=pre.flow2_context(e, layer_e).float(), generator=g)
        want = pre.voxels_from_flow2(x.double(), layer_e).numpy()
    np.testing.assert_allclose(showers, want, rtol=1e-4, atol=1e-3)
