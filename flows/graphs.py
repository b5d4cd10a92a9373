"""The generator as plain torch graphs for export: no searchsorted, no compiled kernels, no host syncs.

:class:`SamplerGraph` maps ``(incident_energy, noise)`` to showers in MeV (Flow I, the student's one
pass, the inverse preprocessing); :class:`TeacherLogProbGraph` maps ``(showers, incident_energy)`` to the
log-likelihood (the preprocessing, Flow I and the teacher in their fast ``forward`` direction, data →
noise). Both are fixed-shape dense products, gathers and elementwise maps, which ONNX expresses; the
spline's bin search is a count of knots at or below the value. Preprocessing runs in float64 as in
:class:`flows.sampling.ShowerGenerator`, the flows in float32.

References:
    Krause & Shih, CaloFlow, arXiv:2106.05285; CaloFlow II, arXiv:2110.11377;
    Durkan et al., Neural Spline Flows, arXiv:1906.04032.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .fast import FastIAFSampler, _Block
from .models import IAF, MAF
from .preprocessing import ENERGY_UNIT_MEV, LOG_FLOOR, CaloFlowPreprocessor

__all__ = ["SamplerGraph", "StudentFlowGraph", "TeacherLogProbGraph", "rqs_spline", "rqs_spline_packed",
           "spline_bin_index"]

F32, F64 = torch.float32, torch.float64


def spline_bin_index(knots: Tensor, values: Tensor) -> Tensor:
    """Bin of each value: how many interior knots lie at or below it, ``(N, D, 1)`` int64.

    Equals ``searchsorted(knots, values, right=True) − 1`` clamped to ``[0, K − 1]`` for values inside
    ``[knots_0, knots_K]`` (the spline clamps its inputs there), written with a comparison and a sum
    because ONNX has no searchsorted.

    Args:
        knots: ``(N, D, K + 1)``, increasing along the last axis.
        values: ``(N, D)``.
    """
    return (values.unsqueeze(-1) >= knots[..., 1:-1]).to(torch.int64).sum(dim=-1, keepdim=True)


def _knot_table(unnormalized: Tensor, min_sizes: tuple[float, float], bound: float) -> Tensor:
    """Knot positions of both spline axes, ``(N, D, 2, K + 1)``: widths' ``[..., 0, :]``, heights' ``[..., 1, :]``.

    nflows' construction and arithmetic (``2B · [0, cumsum(sizes)] − B``) for the two axes in one pass;
    the last knot is set to exactly ``B`` (the first, ``2B · 0 − B``, already is ``−B``).
    """
    num_bins = unnormalized.shape[-1]
    lo: float | Tensor = min_sizes[0]
    scale: float | Tensor = 1 - min_sizes[0] * num_bins
    if min_sizes[1] != min_sizes[0]:
        lo = torch.tensor([[m] for m in min_sizes], dtype=unnormalized.dtype, device=unnormalized.device)
        scale = torch.tensor([[1 - m * num_bins] for m in min_sizes], dtype=unnormalized.dtype,
                             device=unnormalized.device)
    sizes = lo + scale * F.softmax(unnormalized, dim=-1)
    knots = 2 * bound * F.pad(torch.cumsum(sizes, dim=-1), (1, 0)) - bound
    last = torch.tensor([False] * num_bins + [True], device=knots.device)
    return torch.where(last, torch.tensor(bound, dtype=knots.dtype, device=knots.device), knots)


def rqs_spline_packed(inputs: Tensor, params: Tensor, inverse: bool, tail_bound: float, min_bin_width: float,
                      min_bin_height: float, min_derivative: float,
                      need_logabsdet: bool = True) -> tuple[Tensor, Tensor | None]:
    """Rational-quadratic spline with linear tails, out of place and exportable, in few graph nodes.

    The arithmetic of :func:`flows.transforms.rq_spline_linear_tails` (tested equal to nflows') on a
    MADE's output as it comes, ``params`` ``(N, D, 3K − 1)`` (unnormalised widths, heights, interior
    derivatives). Few nodes, because an exported graph pays a fixed cost per node at batch 1: the knots
    of both axes in one softmax and cumsum, the bin search of :func:`spline_bin_index`, and one gather
    of the six numbers a bin needs (its two width knots, two height knots, two derivatives) from one
    table. Returns elementwise ``(outputs, logabsdet)``, identity outside ``[−B, B]``; logabsdet is None
    unless asked for.
    """
    bound = float(tail_bound)
    num_bins = (params.shape[-1] + 1) // 3
    d, k1 = inputs.shape[1], num_bins + 1
    clamped = inputs.clamp(-bound, bound)
    inside = clamped == inputs
    x = clamped.unsqueeze(-1)
    wh, raw_derivatives = params.split([2 * num_bins, num_bins - 1], dim=-1)
    # .contiguous(): a reshape of a view exports with the batch size read at run time (three more nodes)
    knots = _knot_table(wh.contiguous().reshape(-1, d, 2, num_bins), (min_bin_width, min_bin_height), bound)
    knots = knots.contiguous().reshape(-1, d, 2 * k1)  # widths' knots, then heights'
    first = k1 if inverse else 0  # search the heights' knots going backwards, the widths' going forwards
    idx = (x >= knots[..., first + 1:first + num_bins]).to(torch.int64).sum(dim=-1, keepdim=True)
    edge = math.log(math.expm1(1 - min_derivative))  # nflows' end derivatives: the identity tails join
    table = torch.cat([knots, F.pad(raw_derivatives, (1, 1), value=edge)], dim=-1)  # (N, D, 3K + 3)
    cols = idx + torch.tensor([0, 1, k1, k1 + 1, 2 * k1, 2 * k1 + 1], device=idx.device)
    in_cumwidths, right_w, in_cumheights, right_h, derivatives = table.gather(-1, cols).split([1, 1, 1, 1, 2], dim=-1)
    in_d0, in_d1 = (min_derivative + F.softplus(derivatives)).split(1, dim=-1)
    in_widths = right_w - in_cumwidths
    in_heights = right_h - in_cumheights
    in_delta = in_heights / in_widths
    slope_sum = in_d0 + in_d1 - 2 * in_delta
    if inverse:  # the root of a·θ² + b·θ − c = 0 in [0, 1], signs as in flows.fast.rqs_inverse
        dy = x - in_cumheights
        dy_slope = dy * slope_sum
        a = dy_slope + in_heights * (in_delta - in_d0)
        b = in_heights * in_d0 - dy_slope
        c = in_delta * dy
        discriminant = (b * b + 4 * (a * c)).clamp_min(0.0)
        theta = (2 * c) / (b + torch.sqrt(discriminant))
        outputs = theta * in_widths + in_cumwidths
    else:
        theta = (x - in_cumwidths) / in_widths
    t1 = theta * (1 - theta)
    denominator = in_delta + slope_sum * t1
    if not inverse:
        outputs = in_cumheights + in_heights * (in_delta * theta * theta + in_d0 * t1) / denominator
    outputs = torch.where(inside, outputs.squeeze(-1), inputs)
    if not need_logabsdet:
        return outputs, None
    numerator = in_delta * in_delta * (in_d1 * theta * theta + 2 * in_delta * t1
                                       + in_d0 * (1 - theta) * (1 - theta))
    logabsdet = (torch.log(numerator) - 2 * torch.log(denominator)).squeeze(-1)
    if inverse:
        logabsdet = -logabsdet
    return outputs, torch.where(inside, logabsdet, torch.zeros_like(logabsdet))


def rqs_spline(inputs: Tensor, unnormalized_widths: Tensor, unnormalized_heights: Tensor,
               unnormalized_derivatives: Tensor, inverse: bool, tail_bound: float, min_bin_width: float,
               min_bin_height: float, min_derivative: float,
               need_logabsdet: bool = True) -> tuple[Tensor, Tensor | None]:
    """:func:`rqs_spline_packed` with nflows' three parameter tensors (``(N, D, K)``, ``(N, D, K)``,
    ``(N, D, K − 1)``)."""
    params = torch.cat([unnormalized_widths, unnormalized_heights, unnormalized_derivatives], dim=-1)
    return rqs_spline_packed(inputs, params, inverse, tail_bound, min_bin_width, min_bin_height, min_derivative,
                             need_logabsdet)


class _Linear(nn.Module):
    """``x @ weight + bias`` with constant buffers (``weight`` laid out ``(in, out)``)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(F32).contiguous().clone())
        self.register_buffer("bias", bias.detach().to(F32).contiguous().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)


class _Elementwise(nn.Module):
    """A block's elementwise map from its MADE output ``(N, D, M)``, nflows' layout (spline or affine)."""

    def __init__(self, core: nn.Module, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "spline":
            self.num_bins = int(core.num_bins)
            self.spline = {"tail_bound": float(core.tail_bound), "min_bin_width": float(core.min_bin_width),
                           "min_bin_height": float(core.min_bin_height),
                           "min_derivative": float(core.min_derivative)}
        else:
            self.epsilon = float(core._epsilon)

    def forward(self, h: Tensor, p: Tensor, inverse: bool,
                need_logabsdet: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(outputs, logabsdet per row or None)``; ``inverse`` selects the spline (or affine) inverse."""
        if self.kind == "spline":
            out, lad = rqs_spline_packed(h, p, inverse, **self.spline, need_logabsdet=need_logabsdet)
            return out, lad.sum(dim=1) if lad is not None else None
        scale = F.softplus(p[..., 0]) + self.epsilon
        out = (h - p[..., 1]) / scale if inverse else scale * h + p[..., 1]
        if not need_logabsdet:
            return out, None
        lad = torch.log(scale).sum(dim=1)
        return out, -lad if inverse else lad


class _MADE(nn.Module):
    """One MADE with its masks multiplied in; output ``(N, D, M)``."""

    def __init__(self, made: nn.Module) -> None:
        super().__init__()
        first, out = made.hidden_layers[0], made.output_layer
        d, m = made.features, made.output_multiplier
        bias = first.bias.detach()
        self.context = None
        if made.context_layer is not None:
            bias = bias + made.context_layer.bias.detach()
            self.context = _Linear(made.context_layer.weight.detach().t(), torch.zeros_like(bias))
        self.first = _Linear((first.weight * first.mask).detach().t(), bias)
        self.hidden = nn.ModuleList(_Linear((layer.weight * layer.mask).detach().t(), layer.bias)
                                    for layer in made.hidden_layers[1:])
        self.out = _Linear((out.weight * out.mask).detach().t(), out.bias)
        self.activation: Callable[[Tensor], Tensor] = made._activation
        self.m, self.d = m, d

    def forward(self, x: Tensor | None, context: Tensor | None) -> Tensor:
        return self.with_context_term(x, self.context_term(context))

    def context_term(self, context: Tensor | None) -> Tensor | None:
        """The context's share of the first layer: the same in each of a block's D inverse passes."""
        return self.context(context) if self.context is not None and context is not None else None

    def with_context_term(self, x: Tensor | None, term: Tensor | None) -> Tensor:
        """The MADE output for ``x`` (None: all zeros, whose first layer is its bias) and a context term."""
        if x is None:
            assert term is not None, "an all-zero input needs the context term for its batch size"
            a = self.first.bias + term
        else:
            a = self.first(x)
            if term is not None:
                a = a + term
        a = self.activation(a)
        for layer in self.hidden:
            a = self.activation(layer(a))
        return self.out(a).reshape(-1, self.d, self.m)


class _MAFGraph(nn.Module):
    """A MAF (Flow I or the teacher): ``forward`` data → noise in one pass, ``inverse`` D passes per block."""

    def __init__(self, flow: MAF) -> None:
        super().__init__()
        blocks = flow.blocks()
        self.made = nn.ModuleList(_MADE(b.autoregressive_net) for b in blocks)
        self.maps = nn.ModuleList(_Elementwise(b, flow.config.kind) for b in blocks)
        for k, perm in enumerate(flow.permutations()):
            p = perm._permutation.detach().cpu()
            self.register_buffer(f"perm{k}", p.clone())
            self.register_buffer(f"unperm{k}", torch.argsort(p))
        self.n_perms = len(blocks) - 1
        self.features = flow.config.features

    def forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """data → noise: ``(z, log|det ∂z/∂x|)``, as ``MAF.forward``."""
        h = x
        total = torch.zeros_like(x[:, 0])
        for k, (made, fmap) in enumerate(zip(self.made, self.maps)):
            h, lad = fmap(h, made(h, context), inverse=False)
            assert lad is not None
            total = total + lad
            if k < self.n_perms:
                h = h.index_select(1, getattr(self, f"perm{k}"))
        return h, total

    def inverse(self, z: Tensor, context: Tensor | None) -> Tensor:
        """noise → data, as ``MAF.inverse``: nflows' loop of D MADE passes per block, unrolled."""
        h = z
        for k in range(len(self.made) - 1, -1, -1):
            if k < self.n_perms:
                h = h.index_select(1, getattr(self, f"unperm{k}"))
            made, term = self.made[k], self.made[k].context_term(context)
            out: Tensor | None = None if term is not None else torch.zeros_like(h)  # first pass: from zeros
            for _ in range(self.features):
                out, _ = self.maps[k](h, made.with_context_term(out, term), inverse=True, need_logabsdet=False)
            assert out is not None
            h = out
        return h


def _feature_major(t: Tensor, m: int, n: int) -> Tensor:
    """Last axis ``(parameter m, feature n)`` → ``(feature n, parameter m)``."""
    return t.reshape(*t.shape[:-1], m, n).transpose(-1, -2).reshape(*t.shape[:-1], n * m)


class _StudentBlock(nn.Module):
    """One block of :class:`flows.fast.FastIAFSampler`, in sampling order, with its weights as buffers.

    The output layer's columns go back from the sampler's ``(parameter, feature)`` order to nflows'
    ``(feature, parameter)`` order, so that the spline's bins lie along the last axis.
    """

    def __init__(self, blk: _Block, hidden_features: int, offset: int, m: int) -> None:
        super().__init__()
        pre_index = blk.pre_index.detach().cpu().clone() if blk.pre_index is not None else None
        self.register_buffer("pre_index", pre_index)
        self.first = _Linear(blk.w_in.cpu(), torch.zeros(blk.w_in.shape[1]))
        self.ctx_slice = (offset, offset + hidden_features)
        self.hidden = nn.ModuleList(_Linear(w.cpu(), b.cpu()) for w, b in blk.hidden)
        self.activation: Callable[[Tensor], Tensor] = blk.activation
        if blk.groups is not None:
            groups = blk.groups
        else:
            groups = [(0, blk.w_in.shape[0], blk.w_out.shape[0], blk.w_out, blk.b_out)]
        merged: list[tuple[int, int, int, Tensor, Tensor]] = []
        for s, e, hg, wg, bg in groups:
            wg, bg = _feature_major(wg.cpu(), m, e - s), _feature_major(bg.cpu(), m, e - s)
            if merged and merged[-1][2] == hg:  # neighbours using the same hidden units: one product
                s0, _, _, w0, b0 = merged.pop()
                s, wg, bg = s0, torch.cat([w0, wg], dim=1), torch.cat([b0, bg])
            merged.append((s, e, hg, wg, bg))
        self.groups = [(s, e, hg) for s, e, hg, _, _ in merged]
        self.features = merged[-1][1] - merged[0][0]
        self.out = nn.ModuleList(_Linear(wg, bg) for _, _, _, wg, bg in merged)

    def forward(self, h: Tensor, ctx_all: Tensor, m: int) -> Tensor:
        """The MADE output ``(N, D, M)`` of the (re-indexed) state ``h``."""
        lo, hi = self.ctx_slice
        a = self.activation(self.first(h) + ctx_all.narrow(1, lo, hi - lo))  # narrow: one Slice node
        for layer in self.hidden:
            a = self.activation(layer(a))
        parts = [lin(a.narrow(1, 0, hg)) for (_, _, hg), lin in zip(self.groups, self.out)]  # feature-major
        flat = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return flat.reshape(-1, self.features, m)


class _StudentGraph(nn.Module):
    """The student's one pass (noise → data) as :class:`flows.fast.FastIAFSampler` computes it.

    The same folded permutations, fused context product and grouped output layer (the MADE mask's zeros
    skipped), with :func:`rqs_spline` in place of the compiled spline.
    """

    def __init__(self, flow: IAF, groups: int) -> None:
        super().__init__()
        snap = FastIAFSampler(flow, chunk_size=None, groups=groups, native_spline=False)
        hid = snap.hidden_features
        self.blocks = nn.ModuleList(_StudentBlock(b, hid, j * hid, snap.multiplier)
                                    for j, b in enumerate(snap.blocks))
        ctx_w = snap.ctx_w.cpu() if snap.ctx_w is not None else torch.zeros(0, snap.ctx_b.shape[0])
        self.ctx = _Linear(ctx_w, snap.ctx_b.cpu())
        self.has_context = snap.ctx_w is not None
        index = snap.output_index.detach().cpu().clone()
        identity = torch.equal(index, torch.arange(index.numel()))
        self.register_buffer("output_index", None if identity else index)
        self.map = _Elementwise(flow.cores()[0], snap.kind)
        self.m = snap.multiplier

    def forward(self, z: Tensor, context: Tensor) -> Tensor:
        if self.has_context:
            ctx_all = self.ctx(context)
        else:
            ctx_all = self.ctx.bias.expand(z.shape[0], -1)
        h = z
        for blk in self.blocks:
            if blk.pre_index is not None:
                h = h.index_select(1, blk.pre_index)
            h, _ = self.map(h, blk(h, ctx_all, self.m), inverse=True, need_logabsdet=False)
        return h if self.output_index is None else h.index_select(1, self.output_index)


class _Preprocessing(nn.Module):
    """:class:`flows.preprocessing.CaloFlowPreprocessor`'s maps in float64, as graph operations.

    Its constants are float64 buffers, not Python numbers: the exporter writes Python scalars in float32
    (the voxel threshold 1e-3 would become 1.0000000475e-3 and 1e-300 would become 0).
    """

    def __init__(self, pre: CaloFlowPreprocessor) -> None:
        super().__init__()
        a = pre.alpha
        constants = {"alpha": a, "scale": 1 - 2 * a, "one_minus_alpha": 1 - a, "ratio": pre.energy_ratio_scale,
                     "threshold": pre.voxel_threshold, "unit": ENERGY_UNIT_MEV, "floor": LOG_FLOOR,
                     "tiny": 1e-300, "snap": 1e-15, "one_minus_snap": 1 - 1e-15, "ln10": math.log(10.0)}
        for name, value in constants.items():
            self.register_buffer(name, torch.tensor(value, dtype=F64))
        self.has_threshold = pre.voxel_threshold > 0
        self.n_layers = pre.n_layers
        self.bounds = list(zip(pre._bounds[:-1], pre._bounds[1:]))
        self.register_buffer("mean", torch.tensor(pre.cond_mean, dtype=F64))
        self.register_buffer("std", torch.tensor(pre.cond_std, dtype=F64))
        self.register_buffer("layer_index", pre._layer_index(torch.device("cpu")))

    def scaled_log(self, energies: Tensor) -> Tensor:
        n = energies.shape[1]
        log10 = torch.log(energies / self.unit + self.floor) / self.ln10  # torch.log10 exports a float32 ln 10
        return (log10 - self.mean[:n]) / self.std[:n]

    def layer_sums(self, voxels: Tensor) -> Tensor:
        return torch.stack([voxels.narrow(1, a, b - a).sum(dim=1) for a, b in self.bounds], dim=1)

    def logit(self, u: Tensor) -> Tensor:
        y = torch.clamp(self.alpha + self.scale * u, self.alpha, self.one_minus_alpha)
        return torch.log(y) - torch.log(1 - y)

    def expit(self, t: Tensor) -> Tensor:
        x = ((torch.sigmoid(t) - self.alpha) / self.scale).clamp(0.0, 1.0)
        x = torch.where(x < self.snap, torch.zeros_like(x), x)
        return torch.where(x > self.one_minus_snap, torch.ones_like(x), x)

    def layer_energies(self, u_logit: Tensor, e_inc: Tensor) -> Tensor:
        """(N, L) Flow I output → layer energies, as ``layer_energies_from_flow1``."""
        u = self.expit(u_logit)
        remaining = u[:, 0] * e_inc * self.ratio
        layers = []
        for k in range(self.n_layers - 1):
            e_k = u[:, k + 1] * remaining
            layers.append(e_k)
            remaining = (remaining - e_k).clamp_min(0.0)
        layers.append(remaining)
        return torch.stack(layers, dim=1)

    def voxels(self, x_logit: Tensor, layer_e: Tensor) -> Tensor:
        """(N, D) Flow II output → voxel energies, as ``voxels_from_flow2``."""
        layer_e = layer_e.clamp_min(0.0)
        vox = self.expit(x_logit) * layer_e[:, self.layer_index]
        if self.has_threshold:
            vox = torch.where(vox >= self.threshold, vox, torch.zeros_like(vox))
        sums = self.layer_sums(vox)
        factor = torch.where(sums > 0, layer_e / torch.clamp(sums, min=self.tiny), torch.zeros_like(sums))
        return vox * factor[:, self.layer_index]

    def transform(self, e_inc: Tensor, voxels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flow I input, Flow II input and Flow II context, as ``transform(add_noise=False)``."""
        layer_e = self.layer_sums(voxels)
        total = layer_e.sum(dim=1)
        u, remaining = [total / (e_inc * self.ratio)], total
        for k in range(self.n_layers - 1):
            u.append(torch.where(remaining > 0, layer_e[:, k] / torch.clamp(remaining, min=self.tiny),
                                 torch.zeros_like(remaining)))
            remaining = remaining - layer_e[:, k]
        per_voxel = layer_e[:, self.layer_index]
        x = torch.where(per_voxel > 0, voxels / torch.clamp(per_voxel, min=self.tiny), torch.zeros_like(voxels))
        ctx2 = self.scaled_log(torch.cat([e_inc[:, None], layer_e], dim=1))
        return self.logit(torch.stack(u, dim=1)), self.logit(x), ctx2


def _cpu_float32(flow: nn.Module) -> nn.Module:
    return copy.deepcopy(flow).to(device="cpu", dtype=F32).eval()


class SamplerGraph(nn.Module):
    """``(incident_energy (N, 1) MeV, noise (N, L + D)) → showers (N, D) MeV``, all float32.

    ``noise[:, :L]`` is Flow I's standard normal noise and ``noise[:, L:]`` the student's, as
    :class:`flows.sampling.ShowerGenerator` draws them (Flow I first).

    Args:
        preprocessor: the fitted preprocessor.
        flow1: Flow I.
        student: the IAF Flow II.
        groups: output-layer groups of the student's MADEs (see :class:`flows.fast.FastIAFSampler`).
    """

    def __init__(self, preprocessor: CaloFlowPreprocessor, flow1: MAF, student: IAF, groups: int = 16) -> None:
        super().__init__()
        self.pre = _Preprocessing(preprocessor)
        self.flow1 = _MAFGraph(_cpu_float32(flow1))
        self.student = _StudentGraph(_cpu_float32(student), groups)
        self.n_layers = preprocessor.n_layers

    def forward(self, incident_energy: Tensor, noise: Tensor) -> Tensor:
        e = incident_energy[:, 0].to(F64)
        c1 = self.pre.scaled_log(e[:, None]).to(F32)
        u = self.flow1.inverse(noise.narrow(1, 0, self.n_layers), c1)
        layer_e = self.pre.layer_energies(u.to(F64), e)
        c2 = self.pre.scaled_log(torch.cat([e[:, None], layer_e], dim=1).clamp_min(0.0)).to(F32)
        x = self.student(noise.narrow(1, self.n_layers, noise.shape[1] - self.n_layers), c2)
        return self.pre.voxels(x.to(F64), layer_e).to(F32)


class StudentFlowGraph(nn.Module):
    """The student's Flow II alone: ``(noise (N, D), context (N, C)) → x (N, D)``, float32.

    ``x`` is in the preprocessed (logit) space, as ``IAF.inverse`` returns it; what the benchmark times
    against :class:`flows.fast.FastIAFSampler` (Flow I and the preprocessing are left out on both sides).

    Args:
        student: the IAF.
        groups: output-layer groups of its MADEs (see :class:`flows.fast.FastIAFSampler`).
    """

    def __init__(self, student: IAF, groups: int = 16) -> None:
        super().__init__()
        self.student = _StudentGraph(_cpu_float32(student), groups)

    def forward(self, noise: Tensor, context: Tensor) -> Tensor:
        return self.student(noise, context)


class TeacherLogProbGraph(nn.Module):
    """``(showers (N, D) MeV, incident_energy (N, 1) MeV) → log_prob (N,)``, float32.

    Flow I's and the teacher's log-likelihood in the preprocessed space, summed: what
    ``ShowerGenerator.log_prob(..., add_noise=False)["total"]`` returns (add the preprocessing's
    uniform noise to the showers first to reproduce ``add_noise=True``).
    """

    def __init__(self, preprocessor: CaloFlowPreprocessor, flow1: MAF, teacher: MAF) -> None:
        super().__init__()
        self.pre = _Preprocessing(preprocessor)
        self.flow1 = _MAFGraph(_cpu_float32(flow1))
        self.teacher = _MAFGraph(_cpu_float32(teacher))
        self.log_norm = (0.5 * math.log(2 * math.pi) * preprocessor.n_layers,
                         0.5 * math.log(2 * math.pi) * preprocessor.n_voxels)

    def forward(self, showers: Tensor, incident_energy: Tensor) -> Tensor:
        e = incident_energy[:, 0].to(F64)
        x1, x2, ctx2 = self.pre.transform(e, showers.to(F64))
        ctx2 = ctx2.to(F32)
        z1, lad1 = self.flow1(x1.to(F32), ctx2[:, :1])
        z2, lad2 = self.teacher(x2.to(F32), ctx2)
        lp1 = -0.5 * (z1 * z1).sum(dim=1) - self.log_norm[0] + lad1
        lp2 = -0.5 * (z2 * z2).sum(dim=1) - self.log_norm[1] + lad2
        return lp1 + lp2
