"""The IAF student's exact density of external data (data → noise), voxel by voxel.

Directions follow nflows (see ``flows/__init__.py``): ``forward`` is data → noise, the student's slow
direction. Each student block core maps its noise-side y to its data-side x as ``x_i = spline⁻¹(y_i;
MADE(y)_i)``, so going back means ``y_i = spline(x_i; MADE(y_<i))``: the MADE reads the block's outputs,
as the teacher's does when it samples. nflows runs it as D full MADE passes per block
(``AutoregressiveTransform.inverse``); :class:`FastIAFDensity` solves each block once, feature by
feature, with the machinery of :class:`flows.teacher_sampling.IncrementalMADE` (first layer updated by
rank-1 steps, only feature i's parameters computed, the compiled spline forward of :mod:`flows.native`
where it runs). It equals ``IAF.forward`` / ``IAF.log_prob`` to floating-point rounding.

References:
    Kingma et al., IAF, arXiv:1606.04934; Papamakarios et al., MAF, arXiv:1705.07057;
    Durkan et al., Neural Spline Flows, arXiv:1906.04032.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import native
from .models import IAF
from .teacher_sampling import IncrementalMADE
from .transforms import rq_spline_linear_tails

logger = logging.getLogger(__name__)

__all__ = ["FastIAFDensity", "exact_log_prob"]


class FastIAFDensity(IncrementalMADE):
    """The IAF student's data → noise direction and log-density, feature by feature.

    ``density.forward(x, context)`` equals ``flow.forward(x, context)`` (``(z, log|det ∂z/∂x|)``) and
    ``density.log_prob(x, context)`` equals ``flow.log_prob(x, context)`` to floating-point rounding, for
    spline and affine students; no gradients (inference). A snapshot of the weights
    (:meth:`refresh` after they change).

    Args:
        flow: the IAF student (its dtype and device are used).
        native_spline: use the compiled spline forward on CPU; None (default) where it is available,
            True requires it, False keeps the torch spline.

    Example:
        >>> density = FastIAFDensity(student)                # doctest: +SKIP
        >>> nll = -density.log_prob(x, context).mean()       # doctest: +SKIP
    """

    flow_type = IAF

    def _schedule(self) -> list[tuple[nn.Module, Tensor | None]]:
        cores, perms = self.flow.cores(), self.flow.permutations()
        # data side first; each block's permutation follows it, as in the CompositeTransform's forward
        return [(core, perms[k]._permutation if k < len(perms) else None) for k, core in enumerate(cores)]

    def _native_available(self) -> bool:
        return native.train_spline_available()

    def _elementwise(self, x: Tensor, p: Tensor, y: Tensor, total: Tensor | None) -> None:
        """``y`` (N,) = the spline (or affine map) of ``x`` (N,) with parameters ``p`` (N, M)."""
        n = x.shape[0]
        if self.native:
            yi, lad = native.rq_spline_native(x.view(n, 1), p.view(n, 1, -1), False, *self.spline_args)
            y.copy_(yi[:, 0])
        elif self.kind == "spline":
            nb = self.num_bins
            q = p.view(n, 1, -1)
            tail_bound, min_w, min_h, min_d = self.spline_args
            yi, lad_e = rq_spline_linear_tails(x.view(n, 1), q[..., :nb], q[..., nb:2 * nb], q[..., 2 * nb:],
                                               inverse=False, tail_bound=tail_bound, min_bin_width=min_w,
                                               min_bin_height=min_h, min_derivative=min_d)
            y.copy_(yi[:, 0])
            lad = lad_e[:, 0]
        else:
            scale = F.softplus(p[:, 0]) + self.affine_epsilon
            torch.addcmul(p[:, 1], scale, x, out=y)
            lad = torch.log(scale)
        if total is not None:
            total += lad

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """data → noise: ``(z, log|det ∂z/∂x|)``."""
        z, logabsdet = self._run(x, context, need_logabsdet=True)
        assert logabsdet is not None
        return z, logabsdet

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """log q(x | c) per row: the base density of the noise plus the log-determinant."""
        z, logabsdet = self.forward(x, context)
        return self.flow.base_log_prob(z) + logabsdet

    def __call__(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """log q(x | c) per row."""
        return self.log_prob(x, context)


@torch.no_grad()
def exact_log_prob(flow: nn.Module, x: Tensor, context: Tensor | None = None) -> Tensor:
    """log p(x | c) per row under a MAF (one pass) or an IAF (:class:`FastIAFDensity`), no gradients.

    The one entry point for the exact likelihood of data, whichever model: the student's costs one
    feature-by-feature solve per block instead of nflows' D full passes.
    """
    if isinstance(flow, IAF):
        return FastIAFDensity(flow).log_prob(x, context)
    return flow.log_prob(x, context)
