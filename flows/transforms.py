"""Bijections: MADE networks and masked autoregressive transforms (teacher blocks and student blocks).

Directions follow nflows (see ``flows/__init__.py``): ``forward`` is data → noise, ``inverse`` is
noise → data, and every transform returns ``(outputs, logabsdet)`` both ways.

Built on nflows 0.14:

- :class:`MaskedLinear` subclasses ``nflows.transforms.made.MaskedLinear`` (same masks and degrees)
  and adds a cache of ``weight * mask`` that is used whenever gradients are off (inference): the
  student's fast path then does plain dense matrix products.
- :class:`MADE` is written here rather than taken from nflows because nflows' feed-forward MADE
  applies no activation between its initial layer and the first hidden block (two stacked linear
  maps), and its residual MADE cannot be given a plain number of hidden layers. Masks and degrees
  are nflows' own (``MaskedLinear._get_mask_and_degrees``, deterministic degrees).
- :class:`RQSAutoregressiveTransform` and :class:`AffineAutoregressiveTransform` subclass nflows'
  ``AutoregressiveTransform`` (its D-pass ``inverse`` loop is used as is) and call nflows'
  ``unconstrained_rational_quadratic_spline`` (linear tails) or nflows' affine map
  (scale = softplus(s) + 1e-3). Unlike nflows' ``MaskedPiecewiseRationalQuadratic...`` they never
  modify the MADE output in place, so it can be traced for distillation.
- On CPU the spline runs compiled, forward and inverse each with an analytic backward
  (:func:`flows.native.rq_spline_native`, ``flows/csrc/rqs_spline.cpp``): one pass per element instead
  of autograd's chain of small kernels, which took most of a training step. Elsewhere (CUDA, no
  compiler, ``RQSAutoregressiveTransform.use_native_spline = False``) :func:`rq_spline_linear_tails`
  runs: nflows' linear-tail rational-quadratic spline rewritten without boolean indexing
  (``torch.where`` blending). Both are tested equal to nflows' function, which stays selectable
  (``RQSAutoregressiveTransform.use_nflows_spline``).
- The student's blocks (:class:`SwappedRQSAutoregressiveTransform`,
  :class:`SwappedAffineAutoregressiveTransform`) swap the elementwise map: their nflows ``forward``
  computes the parameters with the MADE from its input and applies the spline *inverse*. Wrapped in
  nflows' ``InverseTransform`` they give an IAF block whose ``inverse`` (noise → data) is one pass and
  whose ``forward`` (data → noise) is the slow D-pass loop.

References:
    Germain et al., MADE: Masked Autoencoder for Distribution Estimation, arXiv:1502.03509.
    Durkan et al., Neural Spline Flows, arXiv:1906.04032.
    Krause & Shih, CaloFlow II, arXiv:2110.11377.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from nflows.transforms import made as nflows_made
from nflows.transforms.autoregressive import AutoregressiveTransform
from nflows.transforms.splines import rational_quadratic as nflows_rq
from torch import Tensor, nn
from torch.nn import functional as F

from . import native
from .errors import FlowsError

logger = logging.getLogger(__name__)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "elu": F.elu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "silu": F.silu,
}

def _softplus_inverse(y: float) -> float:
    """softplus⁻¹(y); with bias softplus⁻¹(1 − ε) the affine scale and spline slopes start at 1."""
    return float(np.log(np.expm1(y)))


def _softmax_last(x: Tensor) -> Tensor:
    """Softmax over a short last dimension (the spline's bins).

    Written out because ATen's CPU softmax over a last dimension of ~8 elements is ~6x slower
    (forward) than these three elementwise kernels, and it dominated a training step.
    """
    e = torch.exp(x - x.amax(dim=-1, keepdim=True).detach())
    return e / e.sum(dim=-1, keepdim=True)


def rq_spline_linear_tails(inputs: Tensor, unnormalized_widths: Tensor, unnormalized_heights: Tensor,
                           unnormalized_derivatives: Tensor, inverse: bool = False, tail_bound: float = 1.0,
                           min_bin_width: float = nflows_rq.DEFAULT_MIN_BIN_WIDTH,
                           min_bin_height: float = nflows_rq.DEFAULT_MIN_BIN_HEIGHT,
                           min_derivative: float = nflows_rq.DEFAULT_MIN_DERIVATIVE) -> tuple[Tensor, Tensor]:
    """Rational-quadratic spline on [−B, B] with identity (linear) tails, without boolean indexing.

    The same function as nflows' ``unconstrained_rational_quadratic_spline(tails="linear")`` (tested
    equal to it), but evaluated on every element (inputs clamped into the interval) and blended with
    ``torch.where``: no data-dependent shapes, no host syncs, no in-place edits — faster on CPU and
    GPU and usable under ``torch.compile``. Returns elementwise ``(outputs, logabsdet)``.

    References:
        Durkan et al., Neural Spline Flows, arXiv:1906.04032, eqs. 4–8 and appendix A.
    """
    num_bins = unnormalized_widths.shape[-1]
    bound = float(tail_bound)
    inside = (inputs >= -bound) & (inputs <= bound)
    x = inputs.clamp(-bound, bound)

    constant = float(np.log(np.expm1(1 - min_derivative)))
    edge = unnormalized_derivatives.new_full((*unnormalized_derivatives.shape[:-1], 1), constant)
    derivatives = min_derivative + F.softplus(torch.cat([edge, unnormalized_derivatives, edge], dim=-1))

    def knots(unnormalized: Tensor, min_size: float) -> tuple[Tensor, Tensor]:
        sizes = min_size + (1 - min_size * num_bins) * _softmax_last(unnormalized)
        cum = torch.cumsum(sizes, dim=-1)[..., :-1]
        lo = cum.new_full((*cum.shape[:-1], 1), -bound)
        hi = cum.new_full((*cum.shape[:-1], 1), bound)
        cum = torch.cat([lo, 2 * bound * cum - bound, hi], dim=-1)
        return cum, cum[..., 1:] - cum[..., :-1]

    cumwidths, widths = knots(unnormalized_widths, min_bin_width)
    cumheights, heights = knots(unnormalized_heights, min_bin_height)

    locations = cumheights if inverse else cumwidths
    bin_idx = torch.searchsorted(locations.contiguous(), x[..., None].contiguous(), right=True) - 1
    bin_idx = bin_idx.clamp(0, num_bins - 1)

    def pick(t: Tensor) -> Tensor:
        return t.gather(-1, bin_idx)[..., 0]

    in_cumwidths, in_widths = pick(cumwidths), pick(widths)
    in_cumheights, in_heights = pick(cumheights), pick(heights)
    in_delta = in_heights / in_widths
    in_d0 = pick(derivatives)
    in_d1 = derivatives[..., 1:].gather(-1, bin_idx)[..., 0]
    slope_sum = in_d0 + in_d1 - 2 * in_delta

    if inverse:
        dy = x - in_cumheights
        a = dy * slope_sum + in_heights * (in_delta - in_d0)
        b = in_heights * in_d0 - dy * slope_sum
        c = -in_delta * dy
        discriminant = (b.pow(2) - 4 * a * c).clamp_min(0.0)
        theta = (2 * c) / (-b - torch.sqrt(discriminant))
        outputs = theta * in_widths + in_cumwidths
    else:
        theta = (x - in_cumwidths) / in_widths
    theta_one_minus_theta = theta * (1 - theta)
    denominator = in_delta + slope_sum * theta_one_minus_theta
    derivative_numerator = in_delta.pow(2) * (in_d1 * theta.pow(2) + 2 * in_delta * theta_one_minus_theta
                                              + in_d0 * (1 - theta).pow(2))
    logabsdet = torch.log(derivative_numerator) - 2 * torch.log(denominator)
    if inverse:
        logabsdet = -logabsdet
    else:
        outputs = in_cumheights + in_heights * (in_delta * theta.pow(2) + in_d0 * theta_one_minus_theta) / denominator
    return torch.where(inside, outputs, inputs), torch.where(inside, logabsdet, torch.zeros_like(logabsdet))


class MaskedLinear(nflows_made.MaskedLinear):
    """nflows' masked linear layer with a cache of ``weight * mask`` for inference and frozen layers.

    The cache is used while gradients are disabled (``torch.no_grad``/``torch.inference_mode``) or the
    weight does not require them (a frozen teacher, which distillation differentiates through), and is
    rebuilt whenever the weight or mask changes (tracked by their version counters, which optimiser
    steps and ``load_state_dict`` bump), or the device, dtype or inference mode changes. PyTorch's fused
    optimisers write the weights without bumping the counter: call :meth:`clear_cache` after their
    steps (:func:`flows.optim.make_adam` registers that hook). Training
    (gradients on, weight trainable) always recomputes the product, as nflows does.

    Args:
        in_degrees: MADE degrees of the inputs.
        out_features: number of outputs.
        autoregressive_features: D, the number of autoregressive variables.
        is_output: whether this is the output layer (strict inequality in the mask).
    """

    def __init__(self, in_degrees: Tensor, out_features: int, autoregressive_features: int,
                 is_output: bool) -> None:
        super().__init__(in_degrees=in_degrees, out_features=out_features,
                         autoregressive_features=autoregressive_features, random_mask=False,
                         is_output=is_output)
        self.cache_enabled = True
        self._cache: Tensor | None = None
        self._cache_key: tuple | None = None

    def masked_weight(self) -> Tensor:
        """``weight * mask``, from the cache when gradients are off or the weight is frozen."""
        if not self.cache_enabled or (torch.is_grad_enabled() and self.weight.requires_grad):
            return self.weight * self.mask
        key = (self.weight._version, self.mask._version, self.weight.data_ptr(), self.weight.device,
               self.weight.dtype, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache_key != key:
            self._cache = self.weight * self.mask
            self._cache_key = key
        return self._cache

    def clear_cache(self) -> None:
        """Drop the cached masked weight."""
        self._cache = None
        self._cache_key = None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class MADE(nn.Module):
    """A masked MLP: output ``(N, D * output_multiplier)`` with output block i depending on inputs < i.

    Layers: masked input layer (+ a dense context layer, added), activation, then
    ``n_hidden_layers − 1`` masked hidden layers each followed by the activation, then the masked
    output layer. Output layout is nflows': ``view(N, D, output_multiplier)``.

    Args:
        features: D.
        hidden_features: width of every hidden layer.
        context_features: size of the condition vector (0 = unconditional).
        n_hidden_layers: number of hidden layers (≥ 1).
        output_multiplier: parameters per feature.
        activation: name in :data:`ACTIVATIONS`.
        dropout: dropout probability after each hidden activation.
        output_bias: initial bias per parameter slot (length ``output_multiplier``), or None.

    References:
        Germain et al., arXiv:1502.03509.
    """

    def __init__(self, features: int, hidden_features: int, context_features: int = 0,
                 n_hidden_layers: int = 1, output_multiplier: int = 1, activation: str = "relu",
                 dropout: float = 0.0, output_bias: Tensor | None = None) -> None:
        super().__init__()
        if n_hidden_layers < 1:
            raise FlowsError(f"n_hidden_layers: must be >= 1, got {n_hidden_layers}")
        if activation not in ACTIVATIONS:
            raise FlowsError(f"activation: unknown '{activation}' (known: {sorted(ACTIVATIONS)})")
        self.features = features
        self.output_multiplier = output_multiplier
        self.activation_name = activation
        self._activation = ACTIVATIONS[activation]
        degrees = torch.arange(1, features + 1)
        layers = [MaskedLinear(degrees, hidden_features, features, is_output=False)]
        for _ in range(n_hidden_layers - 1):
            layers.append(MaskedLinear(layers[-1].degrees, hidden_features, features, is_output=False))
        self.hidden_layers = nn.ModuleList(layers)
        self.context_layer = nn.Linear(context_features, hidden_features) if context_features > 0 else None
        self.output_layer = MaskedLinear(layers[-1].degrees, features * output_multiplier, features,
                                         is_output=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        with torch.no_grad():
            nn.init.uniform_(self.output_layer.weight, -1e-3, 1e-3)
            if output_bias is not None:
                self.output_layer.bias.copy_(output_bias.to(self.output_layer.bias).repeat(features))
            else:
                nn.init.uniform_(self.output_layer.bias, -1e-3, 1e-3)

    def masked_linears(self) -> list[MaskedLinear]:
        """All masked layers, input to output."""
        return [*self.hidden_layers, self.output_layer]

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.hidden_layers[0](inputs)
        if self.context_layer is not None:
            if context is None:
                raise FlowsError("context: this MADE is conditional but no context was given")
            h = h + self.context_layer(context)
        h = self._activation(h)
        if self.dropout is not None:
            h = self.dropout(h)
        for layer in self.hidden_layers[1:]:
            h = self._activation(layer(h))
            if self.dropout is not None:
                h = self.dropout(h)
        return self.output_layer(h)


class _MADETransform(AutoregressiveTransform):
    """Shared constructor: an nflows ``AutoregressiveTransform`` whose network is a :class:`MADE`."""

    def __init__(self, features: int, hidden_features: int, context_features: int = 0,
                 n_hidden_layers: int = 1, activation: str = "relu", dropout: float = 0.0) -> None:
        self.features = features
        made = MADE(features, hidden_features, context_features, n_hidden_layers,
                    self._output_dim_multiplier(), activation, dropout, self._initial_output_bias())
        super().__init__(made)

    def _initial_output_bias(self) -> Tensor:
        raise NotImplementedError

    def params(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """The MADE output ``(N, D * multiplier)`` computed from ``inputs``."""
        return self.autoregressive_net(inputs, context)


class RQSAutoregressiveTransform(_MADETransform):
    """MAF block with rational-quadratic spline elementwise maps (linear tails outside ±tail_bound).

    ``forward`` (data → noise) is one MADE pass; ``inverse`` (noise → data) is nflows' D-pass loop.
    Parameter layout per feature: ``num_bins`` widths, ``num_bins`` heights, ``num_bins − 1``
    interior derivatives (nflows' layout for linear tails).

    Args:
        features, hidden_features, context_features, n_hidden_layers, activation, dropout: see MADE.
        num_bins: spline bins.
        tail_bound: B; the spline acts on [−B, B], identity outside.

    References:
        Durkan et al., Neural Spline Flows, arXiv:1906.04032.
    """

    #: True: nflows' own (boolean-indexed) spline; False (default): :func:`rq_spline_linear_tails`.
    use_nflows_spline = False
    #: True (default): the compiled spline with its analytic backward (:func:`flows.native.rq_spline_native`)
    #: wherever it can run (CPU float32/float64, supported bins); False: the torch spline always.
    use_native_spline = True

    def __init__(self, features: int, hidden_features: int, context_features: int = 0,
                 n_hidden_layers: int = 1, num_bins: int = 8, tail_bound: float = 14.0,
                 activation: str = "relu", dropout: float = 0.0) -> None:
        self.num_bins = num_bins
        self.tail_bound = float(tail_bound)
        self.min_bin_width = nflows_rq.DEFAULT_MIN_BIN_WIDTH
        self.min_bin_height = nflows_rq.DEFAULT_MIN_BIN_HEIGHT
        self.min_derivative = nflows_rq.DEFAULT_MIN_DERIVATIVE
        super().__init__(features, hidden_features, context_features, n_hidden_layers, activation,
                         dropout)

    def _output_dim_multiplier(self) -> int:
        return 3 * self.num_bins - 1

    def _initial_output_bias(self) -> Tensor:
        bias = torch.zeros(self._output_dim_multiplier())
        bias[2 * self.num_bins:] = _softplus_inverse(1.0 - self.min_derivative)
        return bias

    def _spline(self, inputs: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        p = params.reshape(inputs.shape[0], inputs.shape[1], self._output_dim_multiplier())
        if self.use_native_spline and not self.use_nflows_spline and native.train_spline_supports(inputs, p):
            return native.rq_spline_native(inputs, p, inverse, self.tail_bound, self.min_bin_width,
                                           self.min_bin_height, self.min_derivative)
        nb = self.num_bins
        spline = nflows_rq.unconstrained_rational_quadratic_spline if self.use_nflows_spline else rq_spline_linear_tails
        kwargs = {"tails": "linear"} if self.use_nflows_spline else {}
        outputs, logabsdet = spline(
            inputs=inputs,
            unnormalized_widths=p[..., :nb],
            unnormalized_heights=p[..., nb:2 * nb],
            unnormalized_derivatives=p[..., 2 * nb:],
            inverse=inverse,
            tail_bound=self.tail_bound,
            min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative,
            **kwargs,
        )
        return outputs, logabsdet.sum(dim=1)

    def _elementwise_forward(self, inputs: Tensor, autoregressive_params: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(inputs, autoregressive_params, inverse=False)

    def _elementwise_inverse(self, inputs: Tensor, autoregressive_params: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(inputs, autoregressive_params, inverse=True)


class AffineAutoregressiveTransform(_MADETransform):
    """MAF block with affine elementwise maps ``y = scale * x + shift``, scale = softplus(s) + 1e-3.

    The map and parameter layout (per feature: unconstrained scale, shift) are nflows'
    ``MaskedAffineAutoregressiveTransform``'s; the scale starts at 1 (identity initialisation).

    References:
        Papamakarios et al., Masked Autoregressive Flow, arXiv:1705.07057.
    """

    _epsilon = 1e-3

    def _output_dim_multiplier(self) -> int:
        return 2

    def _initial_output_bias(self) -> Tensor:
        return torch.tensor([_softplus_inverse(1.0 - self._epsilon), 0.0])

    def _scale_shift(self, params: Tensor, features: int) -> tuple[Tensor, Tensor]:
        p = params.reshape(params.shape[0], features, 2)
        return F.softplus(p[..., 0]) + self._epsilon, p[..., 1]

    def _affine(self, inputs: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        scale, shift = self._scale_shift(params, inputs.shape[1])
        logabsdet = torch.log(scale).sum(dim=1)
        if inverse:
            return (inputs - shift) / scale, -logabsdet
        return scale * inputs + shift, logabsdet

    def _elementwise_forward(self, inputs: Tensor, autoregressive_params: Tensor) -> tuple[Tensor, Tensor]:
        return self._affine(inputs, autoregressive_params, inverse=False)

    def _elementwise_inverse(self, inputs: Tensor, autoregressive_params: Tensor) -> tuple[Tensor, Tensor]:
        return self._affine(inputs, autoregressive_params, inverse=True)


class SwappedRQSAutoregressiveTransform(RQSAutoregressiveTransform):
    """Student (IAF) block core: the MADE reads the noise side and the spline *inverse* is applied.

    nflows ``forward`` here maps noise-side y → data-side x in one pass:
    ``x = spline⁻¹(y; MADE(y))``; nflows ``inverse`` (x → y) is the D-pass loop. Wrap it in
    ``nflows.transforms.InverseTransform`` to get a block with the usual directions.

    If its parameters equal a teacher block's parameters at the same point, it inverts that block
    exactly: ``spline⁻¹(teacher(x); θ_T(x)) = x``.

    References:
        Krause & Shih, CaloFlow II, arXiv:2110.11377; Kingma et al., IAF, arXiv:1606.04934.
    """

    def _elementwise_forward(self, inputs: Tensor, autoregressive_params: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(inputs, autoregressive_params, inverse=True)

    def _elementwise_inverse(self, inputs: Tensor, autoregressive_params: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(inputs, autoregressive_params, inverse=False)


class SwappedAffineAutoregressiveTransform(AffineAutoregressiveTransform):
    """Student (IAF) block core with affine maps: ``x = (y − shift(y)) / scale(y)`` in one pass.

    See :class:`SwappedRQSAutoregressiveTransform`.
    """

    def _elementwise_forward(self, inputs: Tensor, autoregressive_params: Tensor) -> tuple[Tensor, Tensor]:
        return self._affine(inputs, autoregressive_params, inverse=True)

    def _elementwise_inverse(self, inputs: Tensor, autoregressive_params: Tensor) -> tuple[Tensor, Tensor]:
        return self._affine(inputs, autoregressive_params, inverse=False)


def make_block(kind: str, swapped: bool, features: int, hidden_features: int, context_features: int,
               n_hidden_layers: int, num_bins: int, tail_bound: float, activation: str,
               dropout: float) -> _MADETransform:
    """Build one MADE block: teacher (``swapped=False``) or student core (``swapped=True``)."""
    common = dict(features=features, hidden_features=hidden_features,
                  context_features=context_features, n_hidden_layers=n_hidden_layers,
                  activation=activation, dropout=dropout)
    if kind == "spline":
        cls = SwappedRQSAutoregressiveTransform if swapped else RQSAutoregressiveTransform
        return cls(num_bins=num_bins, tail_bound=tail_bound, **common)
    if kind == "affine":
        cls = SwappedAffineAutoregressiveTransform if swapped else AffineAutoregressiveTransform
        return cls(**common)
    raise FlowsError(f"kind: unknown '{kind}' (known: spline, affine)")
