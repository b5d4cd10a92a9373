"""Sampling the MAF teacher (noise → data) voxel by voxel, with the MADE updated incrementally.

Directions follow nflows (see ``flows/__init__.py``): ``inverse`` is noise → data, the teacher's slow
direction. nflows inverts a MADE block with D full passes of its network (``AutoregressiveTransform.
inverse``), each recomputing every output from scratch: O(D · D·H·M) per row and block. Here each block
is inverted once through its own autoregressive order, feature i after features < i:

- the first layer's pre-activations are kept and, once feature i is fixed, its column is added
  (a rank-1 update, O(H) per row) instead of recomputing the layer;
- only feature i's M spline parameters are computed from the hidden activations (O(H·M) per row with
  one hidden layer; deeper MADEs recompute their H×H hidden layers, not the first);
- feature i's spline inverse is the compiled one (:mod:`flows.native`) where it runs, else
  :func:`flows.fast.rqs_inverse`.

Blocks are inverted one after the other, noise side first, with the permutations between them undone as
in ``MAF.inverse``: the result equals it (same noise, same blocks) to floating-point rounding. The
sampler is a snapshot of the weights (:meth:`FastMAFSampler.refresh` after they change); dropout is
ignored (inference). The machinery (:class:`IncrementalMADE`) also serves the student's slow direction,
data → noise (:mod:`flows.student_density`), which has the same structure.

References:
    Papamakarios et al., Masked Autoregressive Flow, arXiv:1705.07057; Germain et al., MADE,
    arXiv:1502.03509; Durkan et al., Neural Spline Flows, arXiv:1906.04032.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import native
from .errors import FlowsError
from .fast import rqs_inverse
from .models import MAF

logger = logging.getLogger(__name__)

__all__ = ["FastMAFSampler", "IncrementalMADE"]


@dataclass
class _Block:
    """One MADE block's weights laid out for feature-by-feature solving."""

    first_t: Tensor                      # (D, H): row i = the first layer's masked column i
    first_b: Tensor                      # (H,): first-layer bias (+ the context layer's bias)
    ctx_w: Tensor | None                 # (C, H): context layer, transposed
    hidden: list[tuple[Tensor, Tensor]]  # deeper layers: (H, H) masked weight transposed, bias
    out_t: Tensor                        # (D, H, M): feature i's output rows, transposed
    out_b: Tensor                        # (D, M)
    activation: Callable[[Tensor], Tensor]
    next_index: Tensor | None            # gather applied to the state after this block (None: last block)


def _made_block(made: nn.Module, d: int, next_index: Tensor | None) -> _Block:
    """A MADE's masked weights, laid out per feature (see :class:`_Block`)."""
    m = made.output_multiplier
    first = made.hidden_layers[0]
    bias = first.bias.detach().clone()
    ctx_w = None
    if made.context_layer is not None:
        ctx_w = made.context_layer.weight.detach().t().contiguous()
        bias = bias + made.context_layer.bias.detach()
    hidden = [((layer.weight * layer.mask).t().contiguous(), layer.bias.detach().clone())
              for layer in made.hidden_layers[1:]]
    out = made.output_layer
    out_t = (out.weight * out.mask).view(d, m, -1).transpose(1, 2).contiguous()
    return _Block((first.weight * first.mask).t().contiguous(), bias, ctx_w, hidden, out_t,
                  out.bias.detach().view(d, m).clone(), made._activation, next_index)


class IncrementalMADE:
    """A flow's MADE blocks solved feature by feature, the first layer updated incrementally.

    The shared machinery of the slow direction of both flows: a subclass says which blocks run in which
    order with which permutation after each (:meth:`_schedule`) and what the elementwise map of one
    feature is (:meth:`_elementwise`); the MADE of every block reads the block's *outputs*, so output i
    is found after outputs < i. The object is a snapshot of the weights (:meth:`refresh` after they
    change); dropout is ignored (inference).

    Args:
        flow: the flow (its dtype and device are used).
        native_spline: use the compiled spline on CPU; None (default) where it is available, True
            requires it, False keeps the torch spline.
    """

    flow_type: type = nn.Module

    def __init__(self, flow: nn.Module, native_spline: bool | None = None) -> None:
        if not isinstance(flow, self.flow_type):
            raise FlowsError(f"flow: {type(self).__name__} needs a {self.flow_type.__name__}, "
                             f"got {type(flow).__name__}")
        self.flow = flow
        self.native_spline = native_spline
        self.refresh()

    def _schedule(self) -> list[tuple[nn.Module, Tensor | None]]:
        """``(block transform, gather after it or None)`` in the order the blocks are solved."""
        raise NotImplementedError

    def _native_available(self) -> bool:
        """Whether the compiled spline this direction needs can be loaded."""
        raise NotImplementedError

    def _elementwise(self, v: Tensor, p: Tensor, out: Tensor, total: Tensor | None) -> None:
        """Write ``out`` (N,) = one feature's elementwise map of ``v`` (N,) with parameters ``p`` (N, M),
        adding its log|det| to ``total`` when given."""
        raise NotImplementedError

    @torch.no_grad()
    def refresh(self) -> None:
        """(Re)build the per-feature weights from the flow's current parameters."""
        cfg = self.flow.config
        self.features, self.kind = cfg.features, cfg.kind
        self.context_features = cfg.context_features
        ref = next(self.flow.parameters())
        self.dtype, self.device = ref.dtype, ref.device
        schedule = self._schedule()
        self.blocks = [_made_block(t.autoregressive_net, cfg.features,
                                   None if idx is None else idx.to(self.device)) for t, idx in schedule]
        first = schedule[0][0]
        if self.kind == "spline":
            self.num_bins = first.num_bins
            self.spline_args = (float(first.tail_bound), float(first.min_bin_width), float(first.min_bin_height),
                                float(first.min_derivative))
        else:
            self.affine_epsilon = float(first._epsilon)
        self.native = self._use_native()

    def _use_native(self) -> bool:
        if self.native_spline is False or self.kind != "spline":
            return False
        ok = (self.device.type == "cpu" and self.dtype in (torch.float32, torch.float64)
              and self._native_available() and native.supports_bins(self.num_bins))
        if self.native_spline and not ok:
            raise FlowsError(f"native_spline: the compiled spline cannot be used "
                             f"({native.unavailable_reason() or 'needs a CPU float32/float64 flow with supported bins'})")
        return ok

    def _check(self, v: Tensor, context: Tensor | None) -> None:
        if v.dim() != 2 or v.shape[1] != self.features:
            raise FlowsError(f"inputs: expected shape (N, {self.features}), got {tuple(v.shape)}")
        if self.context_features > 0 and (context is None or context.shape != (v.shape[0], self.context_features)):
            got = None if context is None else tuple(context.shape)
            raise FlowsError(f"context: expected shape ({v.shape[0]}, {self.context_features}), got {got}")

    def _solve_block(self, blk: _Block, v: Tensor, context: Tensor | None, total: Tensor | None) -> Tensor:
        n, d = v.shape
        pre = blk.first_b.expand(n, -1).clone() if blk.ctx_w is None else torch.addmm(blk.first_b, context, blk.ctx_w)
        v_t = v.t().contiguous()  # feature-major: each feature's N values contiguous
        out_t = torch.empty_like(v_t)
        relu = blk.activation is F.relu
        for i in range(d):
            a = torch.relu(pre) if relu else blk.activation(pre)
            for w, b in blk.hidden:
                a = torch.addmm(b, a, w)
                a = a.clamp_min_(0.0) if relu else blk.activation(a)
            p = torch.addmm(blk.out_b[i], a, blk.out_t[i])  # (N, M): feature i's parameters only
            self._elementwise(v_t[i], p, out_t[i], total)
            if i + 1 < d:
                pre.addr_(out_t[i], blk.first_t[i])         # output i enters the first layer
        return out_t.t()

    def _run(self, v: Tensor, context: Tensor | None, need_logabsdet: bool) -> tuple[Tensor, Tensor | None]:
        """Every block in :meth:`_schedule` order: ``(outputs, summed log|det| or None)``."""
        self._check(v, context)
        v = v.to(device=self.device, dtype=self.dtype)
        if context is not None:
            context = context.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            total = v.new_zeros(v.shape[0]) if need_logabsdet else None
            h = v.contiguous()
            for blk in self.blocks:
                h = self._solve_block(blk, h, context, total)
                if blk.next_index is not None:
                    h = h[:, blk.next_index]
            return h.contiguous(), total


class FastMAFSampler(IncrementalMADE):
    """Samples a MAF teacher feature by feature with incremental MADE updates.

    ``sampler(z, context)`` equals ``flow.inverse(z, context)[0]`` (and, with ``need_logabsdet``, its
    logabsdet) to floating-point rounding, for spline and affine teachers.

    Args:
        flow: the MAF teacher (its dtype and device are used).
        native_spline: use the compiled spline inverse on CPU; None (default) where it is available,
            True requires it, False keeps the torch spline.

    Example:
        >>> sampler = FastMAFSampler(teacher)                 # doctest: +SKIP
        >>> x = sampler(teacher.sample_noise(100), context)   # doctest: +SKIP
    """

    flow_type = MAF

    def _schedule(self) -> list[tuple[nn.Module, Tensor | None]]:
        blocks, perms = self.flow.blocks(), self.flow.permutations()
        # noise side first; the permutation before block k is undone after it
        return [(blocks[k], perms[k - 1]._inverse_permutation if k > 0 else None)
                for k in range(len(blocks) - 1, -1, -1)]

    def _native_available(self) -> bool:
        return native.available()

    def refresh(self) -> None:
        """(Re)build the per-feature weights from the flow's current parameters."""
        super().refresh()
        self._native = native.NativeSpline(self.num_bins, self.dtype, *self.spline_args) if self.native else None

    def _elementwise(self, y: Tensor, p: Tensor, x: Tensor, total: Tensor | None) -> None:
        """``x`` (N,) = the elementwise inverse of ``y`` (N,) with parameters ``p`` (N, M)."""
        n = y.shape[0]
        if self._native is not None:  # one thread below a few thousand rows: no OpenMP start-up per feature
            self._native(y.view(n, 1), p.view(n, -1, 1), x.view(n, 1), total, 1 if n < 4096 else None)
            return
        if self.kind == "spline":
            nb = self.num_bins
            q = p.view(n, -1, 1)
            xi, lad = rqs_inverse(y.view(n, 1), q[:, :nb], q[:, nb:2 * nb], q[:, 2 * nb:], *self.spline_args,
                                  need_logabsdet=total is not None)
            x.copy_(xi[:, 0])
        else:
            scale = F.softplus(p[:, 0]) + self.affine_epsilon
            torch.div(y - p[:, 1], scale, out=x)
            lad = -torch.log(scale)[:, None]
        if total is not None:
            total += lad[:, 0]

    def sample(self, z: Tensor, context: Tensor | None = None,
               need_logabsdet: bool = False) -> tuple[Tensor, Tensor | None]:
        """noise → data: ``(x, log|det ∂x/∂z|)`` (the second None unless ``need_logabsdet``)."""
        return self._run(z, context, need_logabsdet)

    def __call__(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """noise → data, x only."""
        return self.sample(z, context)[0]
