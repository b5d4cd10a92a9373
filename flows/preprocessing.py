"""CaloFlow preprocessing: an object you fit once, save as JSON, and invert.

Flow I models the layer energies given the incident energy; Flow II the voxel energies normalised by
their layer energy, given the incident energy and the layer energies (Krause & Shih, CaloFlow,
arXiv:2106.05285). With energies in units of 100 GeV (inputs and outputs of this module are MeV):

- noise: each voxel gets uniform noise in [0, ``noise_level``) MeV (seeded), before anything else;
  layer energies E_k are then sums of the noisy voxels, so both flows see the same E_k;
- Flow I input: u_0 = ΣE_k / (E_inc · r), u_k = E_k / Σ_{j≥k} E_j for k = 0 … L−2 (0 when the
  denominator is 0), each through ``logit(clip(α + (1−2α)·u, α, 1−α))``. ``r`` is 1, or the largest
  ΣE_k/E_inc seen by :meth:`fit` times 1.05 if that exceeds 1 (keeps u_0 ≤ 1 and the map invertible);
- Flow II input: x_i = v_i / E_layer(i) (0 in an empty layer), then ``logit(α + (1−2α)·x)``;
- conditions: log10(E_inc / 100 GeV) for Flow I; that and log10(E_k / 100 GeV + 1e-8) for Flow II,
  each standardised by the mean and standard deviation found by :meth:`fit`.

Inverses clip to the valid range, zero voxels below ``voxel_threshold`` MeV, and renormalise each
layer to its layer energy. Functions accept numpy arrays or torch tensors and return the same kind
(numpy → float64 numpy, torch → the input's dtype and device).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from .config import PreprocessingConfig
from .errors import FlowsError

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, Tensor]
Rng = Union[np.random.Generator, torch.Generator, None]

ENERGY_UNIT_MEV = 1.0e5  # 100 GeV
LOG_FLOOR = 1.0e-8  # in units of 100 GeV (1 keV), keeps log10 of an empty layer finite
STATE_VERSION = 1


@dataclass
class PreprocessedShowers:
    """Flow inputs from one noise draw.

    Attributes:
        flow1_x: (N, L) logit u-space layer energies.
        flow1_context: (N, 1) scaled log10 incident energy.
        flow2_x: (N, D) logit normalised voxels.
        flow2_context: (N, 1 + L) scaled log10 incident and layer energies.
        layer_energies: (N, L) layer energies (MeV) of the noisy voxels.
    """

    flow1_x: ArrayLike
    flow1_context: ArrayLike
    flow2_x: ArrayLike
    flow2_context: ArrayLike
    layer_energies: ArrayLike


def _as_tensor(a: ArrayLike, name: str) -> tuple[Tensor, bool]:
    """(float64 CPU-or-device tensor, was_numpy)."""
    if isinstance(a, Tensor):
        return a.detach().to(torch.float64), False
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FlowsError(f"{name}: not a numeric array ({exc})") from None
    if not arr.flags.writeable:  # e.g. a zero-copy view of a Parquet column: torch must not share it
        arr = arr.copy()
    return torch.as_tensor(arr), True


def _out(t: Tensor, like: ArrayLike) -> ArrayLike:
    if isinstance(like, Tensor):
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return t.to(dtype=dtype, device=like.device)
    return t.cpu().numpy()


class CaloFlowPreprocessor:
    """Fit/transform/invert the CaloFlow preprocessing of showers (see the module docstring).

    Args:
        layer_sizes: voxels per layer, in voxel order.
        alpha, noise_level, voxel_threshold: the fields of :class:`flows.config.PreprocessingConfig`,
            checked by it.

    References:
        Krause & Shih, CaloFlow, arXiv:2106.05285, section 3.
    """

    def __init__(self, layer_sizes: list[int], alpha: float = 1e-6, noise_level: float = 1e-3,
                 voxel_threshold: float = 1e-3) -> None:
        sizes = [int(s) for s in layer_sizes]
        if not sizes or any(s < 1 for s in sizes):
            raise FlowsError(f"layer_sizes: need positive sizes, got {layer_sizes!r}")
        cfg = PreprocessingConfig(alpha=alpha, noise_level=noise_level, voxel_threshold=voxel_threshold)
        self.layer_sizes = sizes
        self.alpha = float(cfg.alpha)
        self.noise_level = float(cfg.noise_level)
        self.voxel_threshold = float(cfg.voxel_threshold)
        self.fitted = False
        self.energy_ratio_scale = 1.0
        self.cond_mean = [0.0] * (1 + len(sizes))
        self.cond_std = [1.0] * (1 + len(sizes))
        self._bounds = np.cumsum([0, *sizes]).tolist()

    # -- shapes --------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layer_sizes)

    @property
    def n_voxels(self) -> int:
        return int(sum(self.layer_sizes))

    def _layer_index(self, device: torch.device) -> Tensor:
        return torch.repeat_interleave(torch.arange(self.n_layers, device=device),
                                       torch.tensor(self.layer_sizes, device=device))

    def _check_showers(self, e_inc: Tensor, voxels: Tensor) -> None:
        if voxels.dim() != 2 or voxels.shape[1] != self.n_voxels:
            raise FlowsError(f"voxels: expected shape (N, {self.n_voxels}), got {tuple(voxels.shape)}")
        if e_inc.shape != (voxels.shape[0],):
            raise FlowsError(f"incident_energy: expected shape ({voxels.shape[0]},), got {tuple(e_inc.shape)}")
        if not torch.isfinite(voxels).all() or not torch.isfinite(e_inc).all():
            raise FlowsError("showers: non-finite energies")
        if (e_inc <= 0).any():
            raise FlowsError("incident_energy: must be positive")
        if (voxels < 0).any():
            raise FlowsError("voxels: negative energies")

    def _layer_sums(self, voxels: Tensor) -> Tensor:
        return torch.stack([voxels[:, a:b].sum(dim=1) for a, b in zip(self._bounds[:-1], self._bounds[1:])],
                           dim=1)

    # -- pieces --------------------------------------------------------------------------------------
    def _logit(self, u: Tensor) -> Tensor:
        a = self.alpha
        y = (a + (1 - 2 * a) * u).clamp(a, 1 - a)
        return torch.log(y) - torch.log1p(-y)

    def _expit(self, t: Tensor) -> Tensor:
        a = self.alpha
        x = ((torch.sigmoid(t) - a) / (1 - 2 * a)).clamp(0.0, 1.0)
        # logit(α) and logit(1 − α) come back within rounding of 0 and 1: make them exact
        x = torch.where(x < 1e-15, torch.zeros_like(x), x)
        return torch.where(x > 1 - 1e-15, torch.ones_like(x), x)

    def _noisy(self, voxels: Tensor, rng: Rng, add_noise: bool) -> Tensor:
        if not add_noise or self.noise_level == 0:
            return voxels
        if isinstance(rng, torch.Generator):
            noise = torch.rand(voxels.shape, generator=rng, dtype=torch.float64, device=rng.device)
            noise = noise.to(voxels.device)
        else:
            gen = rng if rng is not None else np.random.default_rng(0)
            noise = torch.as_tensor(gen.random(tuple(voxels.shape)), device=voxels.device)
        return voxels + self.noise_level * noise

    def _u_space(self, e_inc: Tensor, layer_e: Tensor) -> Tensor:
        total = layer_e.sum(dim=1)
        u = [total / (e_inc * self.energy_ratio_scale)]
        remaining = total
        for k in range(self.n_layers - 1):
            u.append(torch.where(remaining > 0, layer_e[:, k] / remaining.clamp_min(1e-300),
                                 torch.zeros_like(remaining)))
            remaining = remaining - layer_e[:, k]
        return torch.stack(u, dim=1)

    def _scaled_log(self, energies_mev: Tensor, columns: slice) -> Tensor:
        mean = torch.tensor(self.cond_mean[columns], dtype=torch.float64, device=energies_mev.device)
        std = torch.tensor(self.cond_std[columns], dtype=torch.float64, device=energies_mev.device)
        return (torch.log10(energies_mev / ENERGY_UNIT_MEV + LOG_FLOOR) - mean) / std

    def _require_fit(self) -> None:
        if not self.fitted:
            raise FlowsError("preprocessor: call fit() (or load a fitted state) before transforming")

    # -- public API ----------------------------------------------------------------------------------
    def fit(self, incident_energy: ArrayLike, voxels: ArrayLike) -> CaloFlowPreprocessor:
        """Find the condition scaling and the energy-ratio scale from training showers (no noise)."""
        e_inc, _ = _as_tensor(incident_energy, "incident_energy")
        vox, _ = _as_tensor(voxels, "voxels")
        self._check_showers(e_inc, vox)
        if vox.shape[0] == 0:
            raise FlowsError("showers: cannot fit on zero showers")
        layer_e = self._layer_sums(vox + 0.5 * self.noise_level)
        ratio = float((layer_e.sum(dim=1) / e_inc).max())
        self.energy_ratio_scale = 1.0 if ratio <= 1.0 else 1.05 * ratio
        logs = torch.log10(torch.cat([e_inc[:, None], layer_e], dim=1) / ENERGY_UNIT_MEV + LOG_FLOOR)
        mean = logs.mean(dim=0)
        std = logs.std(dim=0, unbiased=False) if logs.shape[0] > 1 else torch.ones_like(mean)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.cond_mean = [float(v) for v in mean]
        self.cond_std = [float(v) for v in std]
        self.fitted = True
        logger.info("preprocessor fitted on %d showers (energy ratio scale %.4g)", vox.shape[0],
                    self.energy_ratio_scale)
        return self

    def flow1_context(self, incident_energy: ArrayLike) -> ArrayLike:
        """(N, 1) scaled log10 incident energy."""
        self._require_fit()
        e_inc, _ = _as_tensor(incident_energy, "incident_energy")
        return _out(self._scaled_log(e_inc[:, None], slice(0, 1)), incident_energy)

    def flow2_context(self, incident_energy: ArrayLike, layer_energies: ArrayLike) -> ArrayLike:
        """(N, 1 + L) scaled log10 incident and layer energies (MeV inputs)."""
        self._require_fit()
        e_inc, _ = _as_tensor(incident_energy, "incident_energy")
        layer_e, _ = _as_tensor(layer_energies, "layer_energies")
        if layer_e.dim() != 2 or layer_e.shape != (e_inc.shape[0], self.n_layers):
            raise FlowsError(f"layer_energies: expected shape ({e_inc.shape[0]}, {self.n_layers}), "
                             f"got {tuple(layer_e.shape)}")
        both = torch.cat([e_inc[:, None], layer_e.to(e_inc.device)], dim=1)
        return _out(self._scaled_log(both.clamp_min(0.0), slice(0, None)), layer_energies)

    def transform(self, incident_energy: ArrayLike, voxels: ArrayLike, rng: Rng = None,
                  add_noise: bool = True) -> PreprocessedShowers:
        """Both flows' inputs and contexts from one noise draw.

        Args:
            incident_energy: (N,) MeV.
            voxels: (N, D) MeV.
            rng: numpy or torch generator for the noise (a fresh one seeded 0 when None).
            add_noise: False gives the exact, invertible map (used by round-trip tests).
        """
        self._require_fit()
        e_inc, _ = _as_tensor(incident_energy, "incident_energy")
        vox, _ = _as_tensor(voxels, "voxels")
        e_inc = e_inc.to(vox.device)
        self._check_showers(e_inc, vox)
        vox = self._noisy(vox, rng, add_noise)
        layer_e = self._layer_sums(vox)
        u = self._u_space(e_inc, layer_e)
        per_voxel = layer_e[:, self._layer_index(vox.device)]
        x = torch.where(per_voxel > 0, vox / per_voxel.clamp_min(1e-300), torch.zeros_like(vox))
        ctx2 = self._scaled_log(torch.cat([e_inc[:, None], layer_e], dim=1), slice(0, None))
        return PreprocessedShowers(
            flow1_x=_out(self._logit(u), voxels),
            flow1_context=_out(ctx2[:, :1], voxels),
            flow2_x=_out(self._logit(x), voxels),
            flow2_context=_out(ctx2, voxels),
            layer_energies=_out(layer_e, voxels),
        )

    def flow1_inputs(self, incident_energy: ArrayLike, voxels: ArrayLike, rng: Rng = None,
                     add_noise: bool = True) -> tuple[ArrayLike, ArrayLike]:
        """(u_logit (N, L), context (N, 1)); see :meth:`transform`."""
        t = self.transform(incident_energy, voxels, rng, add_noise)
        return t.flow1_x, t.flow1_context

    def flow2_inputs(self, incident_energy: ArrayLike, voxels: ArrayLike, rng: Rng = None,
                     add_noise: bool = True) -> tuple[ArrayLike, ArrayLike]:
        """(x_logit (N, D), context (N, 1 + L)); see :meth:`transform`."""
        t = self.transform(incident_energy, voxels, rng, add_noise)
        return t.flow2_x, t.flow2_context

    def layer_energies_from_flow1(self, u_logit: ArrayLike, incident_energy: ArrayLike) -> ArrayLike:
        """Invert Flow I's space: (N, L) logit u → (N, L) layer energies in MeV (non-negative)."""
        u_t, _ = _as_tensor(u_logit, "u")
        e_inc, _ = _as_tensor(incident_energy, "incident_energy")
        if u_t.dim() != 2 or u_t.shape != (e_inc.shape[0], self.n_layers):
            raise FlowsError(f"u: expected shape ({e_inc.shape[0]}, {self.n_layers}), got {tuple(u_t.shape)}")
        u = self._expit(u_t)
        remaining = u[:, 0] * e_inc.to(u.device) * self.energy_ratio_scale
        layers = []
        for k in range(self.n_layers - 1):
            e_k = u[:, k + 1] * remaining
            layers.append(e_k)
            remaining = (remaining - e_k).clamp_min(0.0)
        layers.append(remaining)
        return _out(torch.stack(layers, dim=1), u_logit)

    def voxels_from_flow2(self, x_logit: ArrayLike, layer_energies: ArrayLike,
                          voxel_threshold: float | None = None) -> ArrayLike:
        """Invert Flow II's space: (N, D) logit x and (N, L) layer energies (MeV) → voxels (MeV).

        Voxels below the threshold (``voxel_threshold`` or the preprocessor's) become 0; each layer
        is then rescaled to sum to its layer energy (a layer with nothing left stays 0).
        """
        x_t, _ = _as_tensor(x_logit, "x")
        layer_e, _ = _as_tensor(layer_energies, "layer_energies")
        layer_e = layer_e.to(x_t.device)
        if x_t.dim() != 2 or x_t.shape[1] != self.n_voxels:
            raise FlowsError(f"x: expected shape (N, {self.n_voxels}), got {tuple(x_t.shape)}")
        if layer_e.shape != (x_t.shape[0], self.n_layers):
            raise FlowsError(f"layer_energies: expected shape ({x_t.shape[0]}, {self.n_layers}), "
                             f"got {tuple(layer_e.shape)}")
        threshold = self.voxel_threshold if voxel_threshold is None else float(voxel_threshold)
        idx = self._layer_index(x_t.device)
        layer_e = layer_e.clamp_min(0.0)
        vox = self._expit(x_t) * layer_e[:, idx]
        vox = torch.where(vox >= threshold, vox, torch.zeros_like(vox)) if threshold > 0 else vox
        sums = self._layer_sums(vox)
        factor = torch.where(sums > 0, layer_e / sums.clamp_min(1e-300), torch.zeros_like(sums))
        return _out(vox * factor[:, idx], x_logit)

    # -- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state."""
        return {
            "kind": "CaloFlowPreprocessor",
            "version": STATE_VERSION,
            "layer_sizes": list(self.layer_sizes),
            "alpha": self.alpha,
            "noise_level": self.noise_level,
            "voxel_threshold": self.voxel_threshold,
            "fitted": self.fitted,
            "energy_ratio_scale": self.energy_ratio_scale,
            "cond_mean": list(self.cond_mean),
            "cond_std": list(self.cond_std),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], source: str = "preprocessing state") -> CaloFlowPreprocessor:
        """Rebuild from :meth:`state_dict` output (unknown keys rejected)."""
        known = {"kind", "version", "layer_sizes", "alpha", "noise_level", "voxel_threshold", "fitted",
                 "energy_ratio_scale", "cond_mean", "cond_std"}
        for key in state:
            if key not in known:
                raise FlowsError(f"{source}: unknown key '{key}'")
        if state.get("kind") != "CaloFlowPreprocessor":
            raise FlowsError(f"{source}: kind is {state.get('kind')!r}, expected 'CaloFlowPreprocessor'")
        if state.get("version") != STATE_VERSION:
            raise FlowsError(f"{source}: unsupported version {state.get('version')!r}")
        try:
            pre = cls(state["layer_sizes"], state["alpha"], state["noise_level"], state["voxel_threshold"])
            pre.fitted = bool(state["fitted"])
            pre.energy_ratio_scale = float(state["energy_ratio_scale"])
            pre.cond_mean = [float(v) for v in state["cond_mean"]]
            pre.cond_std = [float(v) for v in state["cond_std"]]
        except KeyError as exc:
            raise FlowsError(f"{source}: missing key {exc}") from None
        n = 1 + pre.n_layers
        if len(pre.cond_mean) != n or len(pre.cond_std) != n:
            raise FlowsError(f"{source}: cond_mean/cond_std need {n} entries")
        if not all(math.isfinite(v) for v in [*pre.cond_mean, *pre.cond_std, pre.energy_ratio_scale]):
            raise FlowsError(f"{source}: non-finite scaling values")
        return pre

    def save(self, path: Path) -> None:
        """Write the state as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.state_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> CaloFlowPreprocessor:
        """Read a state written by :meth:`save`."""
        path = Path(path)
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise FlowsError(f"{path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise FlowsError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return cls.from_state_dict(state, source=str(path))
