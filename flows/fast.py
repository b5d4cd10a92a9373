"""A lean inference path for the IAF student: sampling (noise → data) as a chain of dense matmuls.

Directions follow nflows (see ``flows/__init__.py``): ``inverse`` is noise → data, the student's fast
direction. :class:`FastIAFSampler` computes exactly what ``IAF.inverse(z, context)`` computes (the same
blocks, permutations, spline and floating-point dtype), with the per-call overhead taken out:

- **Precomputed weights.** Every masked MADE layer's ``weight * mask`` is materialised once, transposed
  for ``torch.addmm``; the permutations between blocks are folded into the weights (columns of the
  input layer, rows of the output layer), so the state never moves in memory and one gather at the end
  restores the data order.
- **Masked zeros skipped.** With one hidden layer per MADE, hidden units are sorted by their MADE
  degree and the output layer is split into groups of consecutive features, each group multiplying
  only the hidden units it is connected to: ~55 % of the dense FLOPs, the same result (only exact
  zeros of the autoregressive mask are left out). ``groups=1`` keeps the dense product.
- **Fused conditioning.** The context enters every block through a dense layer; the K context
  layers (and the input-layer biases) are stacked into one matrix, one ``addmm`` per batch.
- **Parameter layout.** The output layer's rows are reordered so that the MADE output of a block is
  ``(N, 3·bins − 1, D)``: each spline parameter is a contiguous ``(N, D)`` slab, so the spline is a few
  vectorised ops over the bins axis rather than nflows' per-call masking and boolean indexing.
- **Fused spline.** On CPU the spline runs as one compiled pass per element (:mod:`flows.native`,
  ``flows/csrc/rqs_inverse.cpp``: AVX2 for float32), about 7× faster than the dozen torch kernels it
  replaces. Elsewhere (CUDA, no compiler) :func:`rqs_inverse` is nflows' linear-tail rational-quadratic
  spline inverse (Durkan et al., arXiv:1906.04032, appendix A) written for that layout: no boolean
  indexing, no host synchronisation, in-place arithmetic. Both are tested equal to nflows' function.
- **Chunking.** Large batches run in chunks (``chunk_size`` rows) so that a block's MADE output stays in
  cache between the matmul that writes it and the spline that reads it; outputs are written in place.

The sampler is a snapshot: call :meth:`FastIAFSampler.refresh` after the flow's weights change.
Dropout is ignored (inference). :func:`matmul_floor_shapes` lists the dense products it performs, for
the benchmark's floor (``pipeline/bench.py``).

References:
    Kingma et al., IAF, arXiv:1606.04934; Krause & Shih, CaloFlow II, arXiv:2110.11377;
    Durkan et al., Neural Spline Flows, arXiv:1906.04032.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from . import native
from .errors import FlowsError
from .models import IAF

logger = logging.getLogger(__name__)

__all__ = ["FastIAFSampler", "rqs_inverse", "rqs_knots", "matmul_floor_shapes", "fast_inverse",
           "dense_flops_per_sample"]


def rqs_knots(unnormalized: Tensor, min_size: float, tail_bound: float) -> tuple[Tensor, Tensor]:
    """Knot positions and bin sizes of one spline axis, bins along dim 1: ``(N, K+1, D)``, ``(N, K, D)``.

    Follows nflows' ``rational_quadratic_spline``: softmax, minimum size, cumulative sum, affine map onto
    ``[−B, B]`` with the end knots set exactly, sizes as differences of the knots.
    """
    num_bins = unnormalized.shape[1]
    sizes = F.softmax(unnormalized, dim=1)
    sizes.mul_(1 - min_size * num_bins).add_(min_size)
    n, _, d = sizes.shape
    knots = sizes.new_empty((n, num_bins + 1, d))
    torch.cumsum(sizes, dim=1, out=knots[:, 1:])
    knots[:, 1:].mul_(2 * tail_bound).sub_(tail_bound)
    knots[:, 0] = -tail_bound
    knots[:, num_bins] = tail_bound
    return knots, knots[:, 1:] - knots[:, :-1]


def rqs_inverse(inputs: Tensor, unnormalized_widths: Tensor, unnormalized_heights: Tensor,
                unnormalized_derivatives: Tensor, tail_bound: float, min_bin_width: float,
                min_bin_height: float, min_derivative: float,
                need_logabsdet: bool = True) -> tuple[Tensor, Tensor | None]:
    """Inverse of the rational-quadratic spline with linear tails, bins along dim 1.

    The same function as ``nflows.transforms.splines.unconstrained_rational_quadratic_spline(...,
    inverse=True, tails="linear")`` with the parameters laid out ``(N, bins, D)`` instead of
    ``(N, D, bins)``: identity outside ``[−B, B]``, spline inside.

    Args:
        inputs: ``(N, D)`` noise-side values y.
        unnormalized_widths, unnormalized_heights: ``(N, K, D)``.
        unnormalized_derivatives: ``(N, K − 1, D)`` (interior knots; the end derivatives are nflows'
            constant, so that the spline joins the identity tails).
        tail_bound, min_bin_width, min_bin_height, min_derivative: as in nflows.
        need_logabsdet: also return the elementwise ``log|dx/dy|``.

    Returns:
        ``(x, logabsdet)``: ``(N, D)`` each; logabsdet is None when not asked for.

    References:
        Durkan et al., Neural Spline Flows, arXiv:1906.04032, eqs. (4)–(8) and appendix A.
    """
    bound = float(tail_bound)
    num_bins = unnormalized_widths.shape[1]
    n, d = inputs.shape
    cumwidths, widths = rqs_knots(unnormalized_widths, min_bin_width, bound)
    cumheights, heights = rqs_knots(unnormalized_heights, min_bin_height, bound)
    derivatives = inputs.new_empty((n, num_bins + 1, d))
    edge = math.log(math.expm1(1 - min_derivative))
    derivatives[:, 1:num_bins] = F.softplus(unnormalized_derivatives)
    derivatives[:, 0] = F.softplus(inputs.new_full((1,), edge))
    derivatives[:, num_bins] = derivatives[:, 0]
    derivatives.add_(min_derivative)

    y = inputs.clamp(-bound, bound)
    # bin index: how many interior height knots lie at or below y (nflows' searchsorted, last knot + eps)
    idx = (y.unsqueeze(1) >= cumheights[:, 1:num_bins]).sum(dim=1, keepdim=True)
    idx1 = idx + 1
    in_cumwidths = cumwidths.gather(1, idx).squeeze(1)
    in_widths = widths.gather(1, idx).squeeze(1)
    in_cumheights = cumheights.gather(1, idx).squeeze(1)
    in_heights = heights.gather(1, idx).squeeze(1)
    in_d0 = derivatives.gather(1, idx).squeeze(1)
    in_d1 = derivatives.gather(1, idx1).squeeze(1)
    delta = in_heights / in_widths

    slope_sum = in_d0 + in_d1 - 2 * delta        # d_k + d_{k+1} − 2δ
    dy = y.sub_(in_cumheights)                   # y − y_k (y is a fresh tensor from clamp)
    a = in_heights * (delta - in_d0)
    a.addcmul_(dy, slope_sum)
    b = in_heights * in_d0
    b.addcmul_(dy, slope_sum, value=-1.0)
    c = delta * dy                               # −c of nflows
    disc = b * b
    disc.addcmul_(a, c, value=4.0)               # b² − 4ac with c → −c
    disc.clamp_min_(0.0).sqrt_()
    root = c.mul_(2.0).div_(disc.add_(b))        # 2c / (−b − √disc), both signs flipped
    outside = (inputs < -bound) | (inputs > bound)
    outputs = torch.addcmul(in_cumwidths, root, in_widths)
    outputs = torch.where(outside, inputs, outputs)
    if not need_logabsdet:
        return outputs, None
    t1 = root * (1 - root)
    denominator = torch.addcmul(delta, slope_sum, t1)
    numerator = in_d1 * root * root
    numerator.addcmul_(t1, delta, value=2.0)
    one_minus = 1 - root
    numerator.addcmul_(in_d0, one_minus * one_minus)
    numerator.mul_(delta * delta)
    logabsdet = 2 * torch.log(denominator) - torch.log(numerator)
    logabsdet.masked_fill_(outside, 0.0)
    return outputs, logabsdet


@dataclass
class _Block:
    """One student block in sampling order, with weights ready for ``addmm`` (``(in, out)`` layout)."""

    w_in: Tensor                 # (D, H), columns follow the physical state layout
    hidden: list[tuple[Tensor, Tensor]]  # (W (H, H), b (H,)) for hidden layers 2..L
    w_out: Tensor | None         # (H, M·D), output ordered (param slot, physical feature); None if grouped
    b_out: Tensor | None         # (M·D,)
    activation: Callable[[Tensor], Tensor]
    inplace_relu: bool
    # structured output layer: (first feature, last feature + 1, hidden units used, W (h, M·n), b (M·n,))
    groups: list[tuple[int, int, int, Tensor, Tensor]] | None = None
    pre_index: Tensor | None = None  # gather applied to the state before the block (structured mode)


class FastIAFSampler:
    """Samples the IAF student (noise → data) through precomputed dense weights and a lean spline.

    ``sampler(z, context)`` equals ``flow.inverse(z, context)[0]`` (and, with ``need_logabsdet``, its
    logabsdet) to floating-point tolerance, for spline and affine students.

    With ``groups`` > 1 (one-hidden-layer MADEs), the output layer skips the products that its
    autoregressive mask zeroes: hidden units are sorted by MADE degree and the D outputs split into
    ``groups`` contiguous ranges, range g using only the hidden units it is connected to (about
    (groups + 1) / (2·groups) of the dense FLOPs). Only exact zeros are skipped.

    Args:
        flow: the IAF student (its dtype and device are used).
        chunk_size: rows per chunk for large batches (None: no chunking).
        groups: output-layer groups (1: the dense product).
        native_spline: use the compiled spline (:mod:`flows.native`) on CPU; None (default) uses it where
            it is available and supports the flow's bins, True requires it, False keeps the torch spline.

    Example:
        >>> sampler = FastIAFSampler(student)            # doctest: +SKIP
        >>> x = sampler(torch.randn(10_000, D), context)  # doctest: +SKIP
    """

    def __init__(self, flow: IAF, chunk_size: int | None = 256, groups: int = 16,
                 native_spline: bool | None = None) -> None:
        if not isinstance(flow, IAF):
            raise FlowsError(f"flow: FastIAFSampler needs an IAF student, got {type(flow).__name__}")
        if chunk_size is not None and chunk_size < 1:
            raise FlowsError(f"chunk_size: must be positive or None, got {chunk_size}")
        if groups < 1:
            raise FlowsError(f"groups: must be positive, got {groups}")
        self.flow = flow
        self.chunk_size = chunk_size
        self.groups = min(groups, flow.config.features)
        self.structured = self.groups > 1 and flow.config.n_hidden_layers == 1
        self.native_spline = native_spline
        self.refresh()

    # -- weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> None:
        """(Re)build the dense weights from the flow's current parameters."""
        flow = self.flow
        cfg = flow.config
        self.config = cfg
        self.features = cfg.features
        self.kind = cfg.kind
        self.multiplier = 3 * cfg.num_bins - 1 if cfg.kind == "spline" else 2
        cores, perms = flow.cores(), flow.permutations()
        ref = next(flow.parameters())
        self.dtype, self.device = ref.dtype, ref.device
        d, m = cfg.features, self.multiplier
        idx = torch.arange(d, device=self.device)  # logical feature j lives in physical column idx[j]
        blocks: list[_Block] = []
        ctx_w: list[Tensor] = []
        ctx_b: list[Tensor] = []
        for k in range(len(cores) - 1, -1, -1):
            pre_index = None
            if k < len(perms):
                perm = perms[k]._permutation.to(self.device)
                if self.structured:                     # keep the state in the block's own order
                    pre_index = torch.argsort(perm)
                else:
                    idx = idx[torch.argsort(perm)]      # logical state ← state[:, argsort(perm)]
            pos = torch.argsort(idx)                    # physical column c holds logical feature pos[c]
            made = cores[k].autoregressive_net
            if self.structured:
                ctx_part = self._structured_block(made, pre_index, d, m, blocks)
                if ctx_part[0] is not None:
                    ctx_w.append(ctx_part[0])
                ctx_b.append(ctx_part[1])
                continue
            layers = made.hidden_layers
            first = layers[0]
            w_in = (first.weight * first.mask)[:, pos]
            bias = first.bias.detach().clone()
            if made.context_layer is not None:
                ctx_w.append(made.context_layer.weight.detach())
                bias = bias + made.context_layer.bias.detach()
            ctx_b.append(bias)
            hidden = [((layer.weight * layer.mask).t().contiguous(), layer.bias.detach().clone())
                      for layer in layers[1:]]
            out = made.output_layer
            w_out = (out.weight * out.mask).view(d, m, -1)[pos].permute(1, 0, 2).reshape(m * d, -1)
            b_out = out.bias.detach().view(d, m)[pos].t().reshape(-1)
            act = made._activation
            blocks.append(_Block(w_in.t().contiguous(), hidden, w_out.t().contiguous(), b_out.contiguous(),
                                 act, act is F.relu))
        self.blocks = blocks
        self.hidden_features = cfg.hidden_features
        self.ctx_w = torch.cat(ctx_w, dim=0).t().contiguous() if ctx_w else None  # (C, K·H)
        self.ctx_b = torch.cat(ctx_b, dim=0).contiguous()                          # (K·H,)
        self.output_index = idx.clone()    # x_data = state[:, output_index]
        if cfg.kind == "spline":
            core = cores[0]
            self.num_bins = core.num_bins
            self.tail_bound = float(core.tail_bound)
            self.min_bin_width = float(core.min_bin_width)
            self.min_bin_height = float(core.min_bin_height)
            self.min_derivative = float(core.min_derivative)
        else:
            self.affine_epsilon = float(cores[0]._epsilon)
        self.native = self._use_native()
        self._native = (native.NativeSpline(self.num_bins, self.dtype, self.tail_bound, self.min_bin_width,
                                            self.min_bin_height, self.min_derivative) if self.native else None)

    def _use_native(self) -> bool:
        """Whether the spline runs through the compiled kernel (CPU, float32/64, supported bins)."""
        if self.native_spline is False or self.kind != "spline":
            return False
        ok = (self.device.type == "cpu" and self.dtype in (torch.float32, torch.float64)
              and native.available() and native.supports_bins(self.num_bins))
        if self.native_spline and not ok:
            why = native.unavailable_reason() or (
                f"needs a CPU float32/float64 flow with supported bins, got {self.device.type}, "
                f"{self.dtype}, {self.num_bins} bins")
            raise FlowsError(f"native_spline: the compiled spline cannot be used ({why})")
        return ok

    def _structured_block(self, made: torch.nn.Module, pre_index: Tensor | None, d: int, m: int,
                          blocks: list[_Block]) -> tuple[Tensor | None, Tensor]:
        """Append one block with hidden units sorted by degree and a grouped output layer."""
        first, out = made.hidden_layers[0], made.output_layer
        order = torch.argsort(first.degrees, stable=True)
        w_in = (first.weight * first.mask)[order]
        bias = first.bias.detach()[order]
        ctx_w = None
        if made.context_layer is not None:
            ctx_w = made.context_layer.weight.detach()[order]
            bias = bias + made.context_layer.bias.detach()[order]
        w3 = (out.weight * out.mask).view(d, m, -1)[:, :, order]      # (D, M, H), hidden sorted
        b2 = out.bias.detach().view(d, m)
        used = (w3 != 0).any(dim=1)                                     # (D, H) connections
        connected = (out.mask.view(d, m, -1)[:, :, order] != 0).any(dim=1)
        bounds = [round(g * d / self.groups) for g in range(self.groups + 1)]
        groups = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            if e <= s:
                continue
            cols = (connected[s:e] | used[s:e]).any(dim=0).nonzero()
            h = int(cols.max()) + 1 if cols.numel() else 1
            wg = w3[s:e, :, :h].permute(1, 0, 2).reshape(m * (e - s), h).t().contiguous()
            bg = b2[s:e].t().reshape(-1).contiguous()
            groups.append((s, e, h, wg, bg))
        act = made._activation
        blocks.append(_Block(w_in.t().contiguous(), [], None, None, act, act is F.relu, groups, pre_index))
        return ctx_w, bias

    def matmul_shapes(self, batch: int) -> list[tuple[int, int, int]]:
        """The dense products of one call at ``batch`` rows: ``(rows, inner, cols)`` each."""
        return matmul_floor_shapes(self, batch)

    def flops_per_sample(self) -> int:
        """Multiply–adds × 2 of the dense products per sample (masked zeros counted: dense shapes)."""
        return sum(2 * k * n for _, k, n in self.matmul_shapes(1))

    # -- sampling --------------------------------------------------------------------------------
    def _check(self, z: Tensor, context: Tensor | None) -> None:
        if z.dim() != 2 or z.shape[1] != self.features:
            raise FlowsError(f"inputs: expected shape (N, {self.features}), got {tuple(z.shape)}")
        if self.ctx_w is not None:
            if context is None or context.shape != (z.shape[0], self.ctx_w.shape[0]):
                got = None if context is None else tuple(context.shape)
                raise FlowsError(f"context: expected shape ({z.shape[0]}, {self.ctx_w.shape[0]}), got {got}")

    def _chunk(self, z: Tensor, context: Tensor | None, need_logabsdet: bool) -> tuple[Tensor, Tensor | None]:
        n, d = z.shape
        hid = self.hidden_features
        if self.ctx_w is not None:
            ctx_all = torch.addmm(self.ctx_b, context, self.ctx_w)        # (n, K·H)
        else:
            ctx_all = self.ctx_b.expand(n, -1)
        h = z
        total = z.new_zeros(n) if need_logabsdet else None
        for j, blk in enumerate(self.blocks):
            if blk.pre_index is not None:
                h = h[:, blk.pre_index]
            elif self._native is not None:
                h = h.contiguous()
            a = torch.addmm(ctx_all[:, j * hid:(j + 1) * hid], h, blk.w_in)
            a = a.clamp_min_(0.0) if blk.inplace_relu else blk.activation(a)
            for w, b in blk.hidden:
                a = torch.addmm(b, a, w)
                a = a.clamp_min_(0.0) if blk.inplace_relu else blk.activation(a)
            if blk.groups is not None and self._native is not None:
                # each group's parameters go straight from its matmul to the spline (cache-resident)
                x_new = h.new_empty((n, d))
                for s, e, hg, wg, bg in blk.groups:
                    pg = torch.addmm(bg, a[:, :hg], wg).view(n, self.multiplier, e - s)
                    self._native(h[:, s:e], pg, x_new[:, s:e], total)
                h = x_new
                continue
            if blk.groups is not None:
                p = a.new_empty((n, self.multiplier, d))
                for s, e, hg, wg, bg in blk.groups:
                    p[:, :, s:e] = torch.addmm(bg, a[:, :hg], wg).view(n, self.multiplier, e - s)
            else:
                p = torch.addmm(blk.b_out, a, blk.w_out).view(n, self.multiplier, d)
            if self._native is not None:
                h = self._native(h, p, h.new_empty((n, d)), total)
            elif self.kind == "spline":
                nb = self.num_bins
                h, lad = rqs_inverse(h, p[:, :nb], p[:, nb:2 * nb], p[:, 2 * nb:], self.tail_bound,
                                     self.min_bin_width, self.min_bin_height, self.min_derivative,
                                     need_logabsdet)
                if need_logabsdet:
                    total += lad.sum(dim=1)
            else:
                scale = F.softplus(p[:, 0]) + self.affine_epsilon
                h = (h - p[:, 1]) / scale
                if need_logabsdet:
                    total -= torch.log(scale).sum(dim=1)
        return h[:, self.output_index], total

    def sample(self, z: Tensor, context: Tensor | None = None,
               need_logabsdet: bool = False) -> tuple[Tensor, Tensor | None]:
        """noise → data: ``(x, log|det ∂x/∂z|)`` (the second None unless ``need_logabsdet``).

        Runs under ``torch.inference_mode``; large batches are processed in ``chunk_size`` rows.
        """
        self._check(z, context)
        z = z.to(device=self.device, dtype=self.dtype)
        if context is not None:
            context = context.to(device=self.device, dtype=self.dtype)
        n = z.shape[0]
        with torch.inference_mode():
            step = self.chunk_size or n
            if n <= step:
                return self._chunk(z, context, need_logabsdet)
            x = z.new_empty(z.shape)
            total = z.new_empty(n) if need_logabsdet else None
            for start in range(0, n, step):
                sl = slice(start, start + step)
                xc, lc = self._chunk(z[sl], None if context is None else context[sl], need_logabsdet)
                x[sl] = xc
                if total is not None:
                    total[sl] = lc
            return x, total

    def __call__(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """noise → data, x only."""
        return self.sample(z, context)[0]


def fast_inverse(flow: IAF, z: Tensor, context: Tensor | None = None,
                 chunk_size: int | None = 256) -> tuple[Tensor, Tensor]:
    """One-off ``(x, logabsdet)`` of ``flow.inverse(z, context)`` through :class:`FastIAFSampler`."""
    x, lad = FastIAFSampler(flow, chunk_size).sample(z, context, need_logabsdet=True)
    assert lad is not None
    return x, lad


def matmul_floor_shapes(sampler: FastIAFSampler, batch: int) -> list[tuple[int, int, int]]:
    """``(rows, inner, cols)`` of every dense product the sampler performs on ``batch`` rows."""
    shapes: list[tuple[int, int, int]] = []
    if sampler.ctx_w is not None:
        shapes.append((batch, sampler.ctx_w.shape[0], sampler.ctx_w.shape[1]))
    for blk in sampler.blocks:
        shapes.append((batch, blk.w_in.shape[0], blk.w_in.shape[1]))
        for w, _ in blk.hidden:
            shapes.append((batch, w.shape[0], w.shape[1]))
        if blk.groups is not None:
            shapes.extend((batch, wg.shape[0], wg.shape[1]) for _, _, _, wg, _ in blk.groups)
        else:
            assert blk.w_out is not None
            shapes.append((batch, blk.w_out.shape[0], blk.w_out.shape[1]))
    return shapes


def dense_flops_per_sample(flow: IAF) -> int:
    """2 × multiply–adds of the student's MADEs as dense layers (masked zeros counted), per sample."""
    cfg = flow.config
    m = 3 * cfg.num_bins - 1 if cfg.kind == "spline" else 2
    h, d = cfg.hidden_features, cfg.features
    per_block = d * h + cfg.context_features * h + (cfg.n_hidden_layers - 1) * h * h + h * m * d
    return 2 * cfg.n_blocks * per_block
