"""Conditional flows: the MAF (Flow I and the Flow II teacher) and the IAF student.

Directions follow nflows (see ``flows/__init__.py``): ``forward`` is data → noise, ``inverse`` is
noise → data. A flow of K blocks is the nflows ``CompositeTransform``
``[B_1, P_1, B_2, P_2, …, P_{K−1}, B_K]`` (data → noise) with permutations ``P_k`` between blocks
and a standard normal base. The MAF's blocks ``B_k`` are MADE transforms (fast ``forward``); the
IAF's are ``InverseTransform(Swapped…Transform)`` (fast ``inverse``: sampling in one pass).

Tracing (for fully-guided distillation, CaloFlow II): both models report
``states = [s_0 = x, s_1, …, s_K = z]`` where ``s_k`` is the state after block k and its
permutation, and ``params[k]`` (k = 0 … K−1) is the MADE output of block k+1. The teacher's block
computes its parameters from its data-side input ``s_k``; the student's from its noise-side state
(block k+1's output before the permutation). Student and teacher agree exactly when their states and
params agree pairwise.

References:
    Papamakarios et al., MAF, arXiv:1705.07057; Kingma et al., IAF, arXiv:1606.04934;
    Krause & Shih, CaloFlow, arXiv:2106.05285; CaloFlow II, arXiv:2110.11377.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import torch
from nflows.transforms.base import CompositeTransform, InverseTransform
from nflows.transforms.permutations import Permutation
from torch import Tensor, nn

from .config import FlowConfig
from .errors import FlowsError
from .transforms import MaskedLinear, make_block

logger = logging.getLogger(__name__)


class FlowTrace(NamedTuple):
    """One traced pass through a flow (see the module docstring for the pairing of states/params).

    Attributes:
        outputs: z for ``MAF.forward_trace``; x for ``IAF.inverse_trace``.
        logabsdet: log|det| of the traced direction ((N,)).
        states: K + 1 tensors (N, D); ``states[0]`` data side, ``states[-1]`` noise side.
        params: K tensors (N, D * multiplier); ``params[k]`` is the MADE output of block k+1.
    """

    outputs: Tensor
    logabsdet: Tensor
    states: list[Tensor]
    params: list[Tensor]


def _sized(cfg: FlowConfig) -> FlowConfig:
    """``cfg`` if its sizes are known (a flow needs them), else a FlowsError."""
    if cfg.features is None:
        raise FlowsError("features: not set (FlowConfig.resolve fills it in from the data)")
    return cfg


def make_permutations(cfg: FlowConfig) -> list[Permutation]:
    """The K − 1 permutations between blocks (seeded when random)."""
    perms = []
    gen = torch.Generator().manual_seed(cfg.permutation_seed)
    for _ in range(cfg.n_blocks - 1):
        if cfg.permutation == "reverse":
            idx = torch.arange(cfg.features - 1, -1, -1)
        elif cfg.permutation == "random":
            idx = torch.randperm(cfg.features, generator=gen)
        else:
            idx = torch.arange(cfg.features)
        perms.append(Permutation(idx))
    return perms


class _ConditionalFlow(nn.Module):
    """Shared machinery: a ``CompositeTransform`` (data → noise) and a standard normal base.

    The base's noise is drawn with ``torch.randn`` on the flow's device and dtype, from an optional
    ``torch.Generator`` (nflows' ``StandardNormal`` takes no generator, so it is not used for sampling).
    """

    def __init__(self, cfg: FlowConfig, blocks: list[nn.Module], permutations: list[Permutation]) -> None:
        super().__init__()
        if len(permutations) != len(blocks) - 1:
            raise FlowsError("permutations: need exactly one between consecutive blocks")
        self.config = cfg
        layers: list[nn.Module] = []
        for k, block in enumerate(blocks):
            layers.append(block)
            if k < len(permutations):
                layers.append(permutations[k])
        self.transform = CompositeTransform(layers)

    # -- structure ------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return self.config.n_blocks

    @property
    def features(self) -> int:
        return self.config.features

    def blocks(self) -> list[nn.Module]:
        """The K block transforms, data side first."""
        return list(self.transform._transforms[0::2])

    def permutations(self) -> list[Permutation]:
        """The K − 1 permutations; ``permutations()[k]`` follows block k (0-based)."""
        return list(self.transform._transforms[1::2])

    def masked_linears(self) -> list[MaskedLinear]:
        """Every masked layer of every MADE (for weight caching or inspection)."""
        return [m for m in self.modules() if isinstance(m, MaskedLinear)]

    def set_weight_cache(self, enabled: bool) -> None:
        """Use (default) or stop using cached ``weight * mask`` when gradients are off."""
        for layer in self.masked_linears():
            layer.cache_enabled = enabled
            layer.clear_cache()

    def _ref(self) -> Tensor:
        return next(self.parameters())

    def _check(self, inputs: Tensor, context: Tensor | None) -> None:
        if inputs.dim() != 2 or inputs.shape[1] != self.features:
            raise FlowsError(f"inputs: expected shape (N, {self.features}), got {tuple(inputs.shape)}")
        if self.config.context_features > 0:
            if context is None or context.dim() != 2 or context.shape != (inputs.shape[0], self.config.context_features):
                got = None if context is None else tuple(context.shape)
                raise FlowsError(f"context: expected shape ({inputs.shape[0]}, {self.config.context_features}), got {got}")

    def base_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, I) per row (the base distribution; equals nflows' ``StandardNormal.log_prob``)."""
        return -0.5 * (z * z).sum(dim=1) - 0.5 * self.features * math.log(2 * math.pi)

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` standard normal rows on the flow's device and dtype."""
        ref = self._ref()
        return torch.randn(n, self.features, generator=generator, device=ref.device, dtype=ref.dtype)

    # -- nflows directions --------------------------------------------------------------------------
    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """data → noise: ``(z, log|det ∂z/∂x|)``."""
        self._check(inputs, context)
        return self.transform(inputs, context)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """noise → data: ``(x, log|det ∂x/∂z|)``."""
        self._check(inputs, context)
        return self.transform.inverse(inputs, context)

    def transform_to_noise(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """data → noise, z only."""
        return self.forward(inputs, context)[0]

    def log_prob(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """log p(x | c) = log N(f(x)) + log|det ∂f/∂x| per row."""
        z, logabsdet = self.forward(inputs, context)
        return self.base_log_prob(z) + logabsdet

    def _expand(self, num_samples: int | None, context: Tensor | None) -> tuple[int, Tensor | None]:
        if context is None:
            if num_samples is None:
                raise FlowsError("num_samples: needed when no context is given")
            return num_samples, None
        if num_samples is None:
            return context.shape[0], context
        return context.shape[0] * num_samples, context.repeat_interleave(num_samples, dim=0)

    def sample_and_log_prob(self, context: Tensor | None = None, num_samples: int | None = None,
                            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Samples and their log-density: one per context row when ``num_samples`` is None.

        Returns ``(x, log p(x))`` of shape ((N, D), (N,)), or ((N, S, D), (N, S)) with a context and
        ``num_samples = S``, or ((S, D), (S,)) without a context.
        """
        n, ctx = self._expand(num_samples, context)
        z = self.sample_noise(n, generator)
        x, logabsdet = self.inverse(z, ctx)
        log_prob = self.base_log_prob(z) - logabsdet
        if context is not None and num_samples is not None:
            return x.reshape(context.shape[0], num_samples, -1), log_prob.reshape(context.shape[0], num_samples)
        return x, log_prob

    def sample(self, num_samples: int | None = None, context: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Samples (noise → data); shapes as in :meth:`sample_and_log_prob`."""
        n, ctx = self._expand(num_samples, context)
        z = self.sample_noise(n, generator)
        x, _ = self.inverse(z, ctx)
        if context is not None and num_samples is not None:
            return x.reshape(context.shape[0], num_samples, -1)
        return x


class MAF(_ConditionalFlow):
    """Masked autoregressive flow (Flow I, the Flow II teacher): fast ``forward`` (data → noise).

    ``log_prob`` is one pass; ``sample`` runs D sequential MADE passes per block.

    Args:
        cfg: the flow's configuration.
        permutations: permutations to use instead of those made from ``cfg``.

    References:
        Papamakarios et al., arXiv:1705.07057; Krause & Shih, arXiv:2106.05285.
    """

    def __init__(self, cfg: FlowConfig, permutations: list[Permutation] | None = None) -> None:
        cfg = _sized(cfg)
        blocks = [make_block(cfg.kind, False, cfg.features, cfg.hidden_features, cfg.context_features,
                             cfg.n_hidden_layers, cfg.num_bins, cfg.tail_bound, cfg.activation,
                             cfg.dropout) for _ in range(cfg.n_blocks)]
        super().__init__(cfg, blocks, permutations if permutations is not None else make_permutations(cfg))

    def forward_trace(self, inputs: Tensor, context: Tensor | None = None) -> FlowTrace:
        """data → noise, recording every state and every MADE output (see the module docstring)."""
        self._check(inputs, context)
        blocks, perms = self.blocks(), self.permutations()
        h = inputs
        total = inputs.new_zeros(inputs.shape[0])
        states, params = [h], []
        for k, block in enumerate(blocks):
            p = block.params(h, context)
            h, logabsdet = block._elementwise_forward(h, p)
            total = total + logabsdet
            if k < len(perms):
                h, _ = perms[k](h)
            states.append(h)
            params.append(p)
        return FlowTrace(h, total, states, params)


class IAF(_ConditionalFlow):
    """Inverse autoregressive flow (the student): fast ``inverse`` (noise → data, one pass).

    Each block is ``InverseTransform(Swapped…Transform)``: sampling computes each block's parameters
    from its noise-side input; ``forward`` (exact density of external data) is D passes per block.

    Args:
        cfg: the flow's configuration (features, context, blocks must match the teacher's).
        permutations: permutations to use instead of those made from ``cfg`` (the teacher's).

    References:
        Kingma et al., arXiv:1606.04934; Krause & Shih, CaloFlow II, arXiv:2110.11377.
    """

    def __init__(self, cfg: FlowConfig, permutations: list[Permutation] | None = None) -> None:
        cfg = _sized(cfg)
        blocks = [InverseTransform(make_block(cfg.kind, True, cfg.features, cfg.hidden_features,
                                              cfg.context_features, cfg.n_hidden_layers, cfg.num_bins,
                                              cfg.tail_bound, cfg.activation, cfg.dropout))
                  for _ in range(cfg.n_blocks)]
        super().__init__(cfg, blocks, permutations if permutations is not None else make_permutations(cfg))

    def cores(self) -> list[nn.Module]:
        """The swapped MADE transforms inside the K ``InverseTransform`` blocks, data side first."""
        return [b._transform for b in self.blocks()]

    def inverse_trace(self, inputs: Tensor, context: Tensor | None = None) -> FlowTrace:
        """noise → data (one pass), recording states and MADE outputs in the teacher's order."""
        self._check(inputs, context)
        cores, perms = self.cores(), self.permutations()
        h = inputs
        total = inputs.new_zeros(inputs.shape[0])
        states, params = [h], []
        for k in range(len(cores) - 1, -1, -1):
            if k < len(perms):
                h, _ = perms[k].inverse(h)
            p = cores[k].params(h, context)
            h, logabsdet = cores[k]._elementwise_forward(h, p)
            total = total + logabsdet
            states.append(h)
            params.append(p)
        states.reverse()
        params.reverse()
        return FlowTrace(h, total, states, params)


def build_maf(cfg: FlowConfig) -> MAF:
    """A MAF (Flow I or teacher) from its configuration."""
    return MAF(cfg)


def build_iaf(cfg: FlowConfig) -> IAF:
    """An IAF from its configuration (permutations from ``cfg``; a saved state overrides them)."""
    return IAF(cfg)


def build_iaf_like(teacher: MAF, hidden_features: int | None = None, n_hidden_layers: int | None = None,
                   dropout: float | None = None, activation: str | None = None) -> IAF:
    """A student with the teacher's blocks, kind, bins and (copied) permutations.

    Args:
        teacher: the MAF to mirror.
        hidden_features, n_hidden_layers, dropout, activation: student MADE sizes (teacher's if None).
    """
    changes: dict[str, Any] = {}
    for name, value in (("hidden_features", hidden_features), ("n_hidden_layers", n_hidden_layers),
                        ("dropout", dropout), ("activation", activation)):
        if value is not None:
            changes[name] = value
    cfg = teacher.config.replace(**changes)
    perms = [Permutation(p._permutation.detach().clone().cpu()) for p in teacher.permutations()]
    ref = teacher._ref()
    return IAF(cfg, permutations=perms).to(device=ref.device, dtype=ref.dtype)


def build_flow(model: str, cfg: FlowConfig) -> MAF | IAF:
    """``model`` = "MAF" or "IAF"."""
    if model == "MAF":
        return MAF(cfg)
    if model == "IAF":
        return IAF(cfg)
    raise FlowsError(f"model: unknown '{model}' (known: MAF, IAF)")


def count_parameters(flow: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in flow.parameters() if p.requires_grad)
