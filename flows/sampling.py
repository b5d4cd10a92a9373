"""Shower generation: incident energies (MeV) → Flow I → Flow II → voxel energies (MeV).

Flow I samples the layer energies given E_inc; Flow II (the IAF student in one pass, or the MAF
teacher voxel by voxel) samples the normalised voxels given E_inc and those layer energies; the
preprocessor maps both back to MeV (Krause & Shih, CaloFlow, arXiv:2106.05285).
"""

from __future__ import annotations

import logging
from typing import Union

import numpy as np
import torch
from torch import Tensor

from .device import resolve_device
from .errors import FlowsError
from .fast import FastIAFSampler
from .models import IAF, MAF
from .preprocessing import CaloFlowPreprocessor
from .student_density import exact_log_prob
from .teacher_sampling import FastMAFSampler

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, Tensor]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return resolve_device(None)


class ShowerGenerator:
    """Samples showers in MeV and evaluates their likelihood under Flow I + Flow II.

    Args:
        preprocessor: fitted :class:`CaloFlowPreprocessor`.
        flow1: MAF over the L layer energies (context 1).
        flow2: teacher MAF or student IAF over the D voxels (context 1 + L).
        layer_sizes: voxels per layer; must equal the preprocessor's (taken from it when None).
        device: where the flows run (CUDA when available if None).
    """

    def __init__(self, preprocessor: CaloFlowPreprocessor, flow1: MAF, flow2: MAF | IAF,
                 layer_sizes: list[int] | None = None, device: str | torch.device | None = None) -> None:
        if layer_sizes is not None and list(layer_sizes) != list(preprocessor.layer_sizes):
            raise FlowsError(f"layer_sizes: {list(layer_sizes)} differ from the preprocessor's "
                             f"{preprocessor.layer_sizes}")
        if flow1.config.features != preprocessor.n_layers or flow1.config.context_features != 1:
            raise FlowsError(f"flow1: expected {preprocessor.n_layers} features and 1 context, got "
                             f"{flow1.config.features} and {flow1.config.context_features}")
        if (flow2.config.features != preprocessor.n_voxels
                or flow2.config.context_features != 1 + preprocessor.n_layers):
            raise FlowsError(f"flow2: expected {preprocessor.n_voxels} features and "
                             f"{1 + preprocessor.n_layers} context, got {flow2.config.features} and "
                             f"{flow2.config.context_features}")
        self.preprocessor = preprocessor
        self.layer_sizes = list(preprocessor.layer_sizes)
        self.device = torch.device(device) if device is not None else default_device()
        self.flow1 = flow1.to(self.device).eval()
        self.flow2 = flow2.to(self.device).eval()
        self._fast: FastIAFSampler | FastMAFSampler | None = None

    @property
    def kind(self) -> str:
        """"student" (IAF Flow II) or "teacher" (MAF Flow II)."""
        return "student" if isinstance(self.flow2, IAF) else "teacher"

    def to(self, device: str | torch.device) -> ShowerGenerator:
        """Move both flows (in place) and return self."""
        self.device = torch.device(device)
        self.flow1.to(self.device)
        self.flow2.to(self.device)
        self._fast = None
        return self

    def _sample_flow2(self, context: Tensor, generator: torch.Generator | None) -> Tensor:
        """Flow II noise → data, from the same noise and to the same result as ``flow2.sample``: a student
        through :class:`flows.fast.FastIAFSampler` (without the per-call overhead), a teacher through
        :class:`flows.teacher_sampling.FastMAFSampler` (voxel by voxel, the MADE updated incrementally,
        instead of nflows' D full passes)."""
        if self._fast is None:
            self._fast = FastIAFSampler(self.flow2) if isinstance(self.flow2, IAF) else FastMAFSampler(self.flow2)
        z = self.flow2.sample_noise(context.shape[0], generator)
        return self._fast(z, context)

    def _dtype(self, flow: torch.nn.Module) -> torch.dtype:
        return next(flow.parameters()).dtype

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(int(seed))

    @staticmethod
    def _energies(e_inc_mev: ArrayLike) -> np.ndarray:
        e = (e_inc_mev.detach().cpu().numpy() if isinstance(e_inc_mev, Tensor)
             else np.asarray(e_inc_mev, dtype=np.float64))
        e = e.astype(np.float64).reshape(-1)
        if e.size and (not np.isfinite(e).all() or (e <= 0).any()):
            raise FlowsError("incident_energy: must be finite and positive")
        return e

    def sample_with_layers(self, e_inc_mev: ArrayLike, batch_size: int = 10_000, seed: int | None = 0,
                           progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Voxels (N, D) and layer energies (N, L), both MeV float32, one shower per incident energy."""
        e_inc = self._energies(e_inc_mev)
        if batch_size < 1:
            raise FlowsError(f"batch_size: must be positive, got {batch_size}")
        gen = self._generator(seed)
        pre = self.preprocessor
        voxels = np.zeros((e_inc.size, pre.n_voxels), dtype=np.float32)
        layers = np.zeros((e_inc.size, pre.n_layers), dtype=np.float32)
        starts = range(0, e_inc.size, batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc=f"sampling ({self.kind})", unit="batch", disable=None)
        with torch.inference_mode():
            for start in starts:
                e = torch.as_tensor(e_inc[start:start + batch_size], device=self.device)
                c1 = pre.flow1_context(e).to(self._dtype(self.flow1))
                u = self.flow1.sample(context=c1, generator=gen)
                layer_e = pre.layer_energies_from_flow1(u.to(torch.float64), e)
                c2 = pre.flow2_context(e, layer_e).to(self._dtype(self.flow2))
                x = self._sample_flow2(c2, gen)
                v = pre.voxels_from_flow2(x.to(torch.float64), layer_e)
                voxels[start:start + e.shape[0]] = v.cpu().numpy()
                layers[start:start + e.shape[0]] = layer_e.cpu().numpy()
        return voxels, layers

    def sample(self, e_inc_mev: ArrayLike, batch_size: int = 10_000, seed: int | None = 0,
               progress: bool = False, device: str | torch.device | None = None) -> np.ndarray:
        """Voxel energies (N, D) MeV float32, one shower per incident energy (MeV).

        ``device`` moves the flows there first (they stay there).
        """
        if device is not None:
            self.to(device)
        return self.sample_with_layers(e_inc_mev, batch_size, seed, progress)[0]

    def log_prob(self, e_inc_mev: ArrayLike, voxels_mev: ArrayLike, batch_size: int = 10_000,
                 seed: int = 0, add_noise: bool = True, progress: bool = False) -> dict[str, np.ndarray]:
        """Log-likelihood of showers in preprocessed space: ``{"flow1", "flow2", "total"}`` (N,) each.

        The preprocessing noise is drawn from ``seed``. For a student Flow II this is its exact density
        solved voxel by voxel (:func:`flows.student_density.exact_log_prob`): slower than sampling.
        """
        e_inc = self._energies(e_inc_mev)
        vox = (voxels_mev.detach().cpu().numpy() if isinstance(voxels_mev, Tensor)
               else np.asarray(voxels_mev)).astype(np.float64)
        if vox.shape != (e_inc.size, self.preprocessor.n_voxels):
            raise FlowsError(f"voxels: expected shape ({e_inc.size}, {self.preprocessor.n_voxels}), "
                             f"got {vox.shape}")
        rng = np.random.default_rng(seed)
        out1 = np.zeros(e_inc.size)
        out2 = np.zeros(e_inc.size)
        starts = range(0, e_inc.size, batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="log-likelihood", unit="batch", disable=None)
        with torch.inference_mode():
            for start in starts:
                sl = slice(start, start + batch_size)
                t = self.preprocessor.transform(e_inc[sl], vox[sl], rng=rng, add_noise=add_noise)
                d1, d2 = self._dtype(self.flow1), self._dtype(self.flow2)
                lp1 = self.flow1.log_prob(torch.as_tensor(t.flow1_x, device=self.device, dtype=d1),
                                          torch.as_tensor(t.flow1_context, device=self.device, dtype=d1))
                lp2 = exact_log_prob(self.flow2, torch.as_tensor(t.flow2_x, device=self.device, dtype=d2),
                                     torch.as_tensor(t.flow2_context, device=self.device, dtype=d2))
                out1[sl] = lp1.double().cpu().numpy()
                out2[sl] = lp2.double().cpu().numpy()
        return {"flow1": out1, "flow2": out2, "total": out1 + out2}
