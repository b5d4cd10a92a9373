"""ONNX export of the generator, for simulators that call a model once per shower (Geant4, key4hep DDML).

:func:`export_sampler` writes the student sampler as one graph — ``incident_energy (N, 1) MeV`` and
``noise (N, L + D)`` standard normal in, ``showers (N, D) MeV`` out, float32, dynamic batch — with the
host passing the latent noise in; :func:`export_teacher_log_prob` writes the teacher's likelihood (its fast
direction, data → noise); :func:`export_student_flow` the student's Flow II alone (what the benchmark
times). :func:`sample_from_noise` is the torch sampler on explicit noise and :func:`draw_noise` the noise
:meth:`ShowerGenerator.sample` draws for a seed, so both paths can be compared on the same noise.
:class:`OnnxSampler` runs an exported sampler with ONNX Runtime. onnx, onnxscript and onnxruntime are
imported only when used.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import FlowsError
from .fast import FastIAFSampler
from .graphs import SamplerGraph, StudentFlowGraph, TeacherLogProbGraph
from .models import IAF
from .sampling import ArrayLike, ShowerGenerator

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPSET",
    "LOG_PROB_INPUTS",
    "LOG_PROB_OUTPUT",
    "SAMPLER_INPUTS",
    "SAMPLER_OUTPUT",
    "STUDENT_FLOW_INPUTS",
    "STUDENT_FLOW_OUTPUT",
    "OnnxSampler",
    "default_providers",
    "draw_noise",
    "export_sampler",
    "export_student_flow",
    "export_teacher_log_prob",
    "iter_noise",
    "onnx_session",
    "sample_from_noise",
]

DEFAULT_OPSET = 18  # the lowest opset torch's exporter writes: its converter cannot take these graphs to 17
SAMPLER_INPUTS = ("incident_energy", "noise")
SAMPLER_OUTPUT = "showers"
LOG_PROB_INPUTS = ("showers", "incident_energy")
LOG_PROB_OUTPUT = "log_prob"
STUDENT_FLOW_INPUTS = ("noise", "context")
STUDENT_FLOW_OUTPUT = "x"
_EXAMPLE_ROWS = 3  # torch.export specialises batch sizes 0 and 1


# -- the torch path on explicit noise ------------------------------------------------------------------

def _energies(incident_energy: ArrayLike) -> np.ndarray:
    e = (incident_energy.detach().cpu().numpy() if isinstance(incident_energy, torch.Tensor)
         else np.asarray(incident_energy))
    e = e.astype(np.float64).reshape(-1)
    if e.size and (not np.isfinite(e).all() or (e <= 0).any()):
        raise FlowsError("incident_energy: must be finite and positive")
    return e


def iter_noise(generator: ShowerGenerator, n: int, batch_size: int = 10_000,
               seed: int = 0) -> Iterator[tuple[slice, np.ndarray]]:
    """:func:`draw_noise` batch by batch: ``(rows, noise (b, L + D) float32)`` for each batch of ``n``."""
    if batch_size < 1:
        raise FlowsError(f"batch_size: must be positive, got {batch_size}")
    gen = torch.Generator(device=generator.device).manual_seed(int(seed))
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z1 = generator.flow1.sample_noise(b, gen)
        z2 = generator.flow2.sample_noise(b, gen)
        yield slice(start, start + b), torch.cat([z1.float(), z2.float()], dim=1).cpu().numpy()


def draw_noise(generator: ShowerGenerator, n: int, batch_size: int = 10_000, seed: int = 0) -> np.ndarray:
    """The noise ``generator.sample(e, batch_size, seed)`` draws for ``n`` showers: ``(n, L + D)`` float32.

    Per batch, Flow I's ``(b, L)`` rows are drawn before the Flow II ``(b, D)`` rows from one
    ``torch.Generator``; the columns are laid out as the exported sampler reads them.
    """
    parts = [z for _, z in iter_noise(generator, n, batch_size, seed)]
    pre = generator.preprocessor
    return np.concatenate(parts) if parts else np.zeros((0, pre.n_layers + pre.n_voxels), np.float32)


def sample_from_noise(generator: ShowerGenerator, incident_energy: ArrayLike, noise: ArrayLike,
                      batch_size: int = 10_000) -> np.ndarray:
    """Voxel energies (N, D) MeV float32 from explicit noise, as ``generator.sample`` computes them.

    The same steps as :meth:`ShowerGenerator.sample_with_layers` (the student through
    :class:`flows.fast.FastIAFSampler`, a teacher through its D-pass inverse) with ``noise[:, :L]`` for
    Flow I and ``noise[:, L:]`` for Flow II: with :func:`draw_noise`'s noise it equals ``sample``.
    """
    pre = generator.preprocessor
    e_inc = _energies(incident_energy)
    z = noise.detach().cpu().numpy() if isinstance(noise, torch.Tensor) else np.asarray(noise)
    if z.shape != (e_inc.size, pre.n_layers + pre.n_voxels):
        raise FlowsError(f"noise: expected shape ({e_inc.size}, {pre.n_layers + pre.n_voxels}), got {z.shape}")
    d1, d2 = next(generator.flow1.parameters()).dtype, next(generator.flow2.parameters()).dtype
    fast = FastIAFSampler(generator.flow2) if isinstance(generator.flow2, IAF) else None
    out = np.zeros((e_inc.size, pre.n_voxels), dtype=np.float32)
    dev = generator.device
    with torch.inference_mode():
        for start in range(0, e_inc.size, batch_size):
            sl = slice(start, start + batch_size)
            e = torch.as_tensor(e_inc[sl], device=dev)
            z1 = torch.as_tensor(z[sl, :pre.n_layers], device=dev, dtype=d1)
            z2 = torch.as_tensor(z[sl, pre.n_layers:], device=dev, dtype=d2)
            u = generator.flow1.inverse(z1, pre.flow1_context(e).to(d1))[0]
            layer_e = pre.layer_energies_from_flow1(u.to(torch.float64), e)
            c2 = pre.flow2_context(e, layer_e).to(d2)
            x = fast(z2, c2) if fast is not None else generator.flow2.inverse(z2, c2)[0]
            out[sl] = pre.voxels_from_flow2(x.to(torch.float64), layer_e).cpu().numpy()
    return out


# -- export --------------------------------------------------------------------------------------------

def _package_version() -> str:
    try:
        return importlib_metadata.version("calodistill")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise FlowsError(f"metadata: keys and values must be strings (not {bad[0]!r}: "
                         f"{type(metadata[bad[0]]).__name__})")
    return dict(metadata)


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < DEFAULT_OPSET:
        raise FlowsError(f"opset: must be an integer >= {DEFAULT_OPSET} (torch's exporter writes no lower), "
                         f"got {opset!r}")


def _writable_target(path: Path) -> Path:
    """Fail early, before the (slow) export, if ``path`` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise FlowsError(f"{path}: is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlowsError(f"{path}: cannot create the folder ({exc.strerror})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise FlowsError(f"{path}: the folder is not writable")
    return path


def _write_atomic(proto: object, path: Path) -> None:
    """``onnx.save`` to a temporary name beside ``path`` (mode from the umask), then ``os.replace``."""
    import onnx

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        raise FlowsError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress and warns about things we do on purpose: keep them off the terminal."""
    torch_onnx_logger = logging.getLogger("torch.onnx")
    level = torch_onnx_logger.level
    torch_onnx_logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_onnx_logger.setLevel(level)
        if sink.getvalue().strip():
            logger.debug("exporter output:\n%s", sink.getvalue())


def _translations() -> dict[object, object]:
    """aten → ONNX overrides: ``softplus`` as one ONNX ``Softplus`` node.

    The default translation spells out torch's overflow guard (``x > 20 → x``) in six nodes around it;
    ONNX Runtime's Softplus is stable for large inputs on its own, and the spline evaluates it twice per
    block.
    """
    from onnxscript import opset18 as op

    def softplus(self: object, beta: float = 1.0, threshold: float = 20.0) -> object:
        if beta == 1.0:
            return op.Softplus(self)
        return op.Div(op.Softplus(op.Mul(self, op.CastLike(beta, self))), op.CastLike(beta, self))

    return {torch.ops.aten.softplus.default: softplus}


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: Sequence[str], output_name: str,
            path: Path, props: dict[str, str], opset: int) -> Path:
    """Export ``module`` (batch axis 0 of every input dynamic), attach ``props``, write ``path`` atomically.

    Only onnxscript's constant folding runs, not its full optimizer: that treats multiplications by
    factors within ~1e-5 of 1 and additions of ~1e-8 as identities and drops them (the logit's
    ``(1 − 2α)``, the log floor). ONNX Runtime optimises the graph further when it loads it.
    """
    import onnx
    import onnxscript.optimizer

    path = _writable_target(path)
    batch = torch.export.Dim("batch")
    module = module.eval()
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(module, args, None, input_names=list(input_names), output_names=[output_name],
                                     dynamic_shapes={name: {0: batch} for name in input_names},
                                     opset_version=opset, dynamo=True, verbose=False, optimize=False,
                                     custom_translation_table=_translations())
        onnxscript.optimizer.fold_constants(program.model)
        onnxscript.optimizer.remove_unused_nodes(program.model)
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's per-node stack traces: local paths, a third of the file
        del node.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    _write_atomic(proto, path)
    logger.debug("wrote %s (%d nodes, opset %d)", path, len(proto.graph.node), opset)
    return path


def _common_props(generator: ShowerGenerator, graph: str, opset: int) -> dict[str, str]:
    pre = generator.preprocessor
    return {
        "producer": "calodistill",
        "graph": graph,
        "calodistill_version": _package_version(),
        "torch_version": torch.__version__,
        "opset": str(opset),
        "n_layers": str(pre.n_layers),
        "n_voxels": str(pre.n_voxels),
        "layer_sizes": json.dumps(pre.layer_sizes),
        "voxel_order": "the dataset's: layer by layer, as the training showers (layer_sizes gives the split)",
        "energy_unit": "MeV",
        "dtype": "float32",
        "preprocessing": json.dumps(pre.state_dict()),
        "flow1_config": json.dumps(generator.flow1.config.to_dict()),
        "flow2_config": json.dumps(generator.flow2.config.to_dict()),
    }


def export_sampler(generator: ShowerGenerator, path: str | os.PathLike[str], metadata: dict[str, str] | None = None,
                   opset: int = DEFAULT_OPSET, groups: int = 16) -> Path:
    """Write the student sampler as one ONNX graph: ``(incident_energy, noise) → showers``.

    Inputs ``incident_energy`` (N, 1) MeV and ``noise`` (N, L + D) standard normal (columns ``[0, L)``
    drive Flow I, ``[L, L + D)`` the student, as :func:`draw_noise` lays out what
    :meth:`ShowerGenerator.sample` draws); output ``showers`` (N, D) MeV in the dataset's voxel order; all
    float32, the batch axis dynamic. ``metadata`` (geometry, particle, energy range, ...) is added to the
    model's metadata properties, after and over the built-in ones.

    Args:
        generator: a student generator (its Flow II an IAF).
        path: the ``.onnx`` file to write (atomically; its folder is created).
        metadata: extra string properties.
        opset: ONNX opset (≥ 18, which ONNX Runtime supports since 1.14).
        groups: output-layer groups of the student's MADEs (1: dense; see :class:`flows.fast.FastIAFSampler`).

    Returns:
        ``path``.
    """
    if not isinstance(generator.flow2, IAF):
        raise FlowsError("teacher: a MAF samples in D sequential passes per block and does not export as "
                         "a sampler; export the student")
    extra = _check_metadata(metadata)
    _check_opset(opset)
    pre = generator.preprocessor
    graph = SamplerGraph(pre, generator.flow1, generator.flow2, groups=groups)
    gen = torch.Generator().manual_seed(0)
    e = torch.full((_EXAMPLE_ROWS, 1), 1e4)
    noise = torch.randn(_EXAMPLE_ROWS, pre.n_layers + pre.n_voxels, generator=gen)
    props = _common_props(generator, "sampler", opset)
    props.update({
        "inputs": (f"incident_energy: float32 (N, 1), MeV; noise: float32 (N, {pre.n_layers + pre.n_voxels}), "
                   f"standard normal, columns [0, {pre.n_layers}) drive Flow I (layer energies) and "
                   f"[{pre.n_layers}, {pre.n_layers + pre.n_voxels}) the student (voxels)"),
        "outputs": f"showers: float32 (N, {pre.n_voxels}), MeV, the dataset's voxel order",
        "voxel_threshold_mev": repr(pre.voxel_threshold),
    })
    props.update(extra)
    return _export(graph, (e, noise), SAMPLER_INPUTS, SAMPLER_OUTPUT, Path(path), props, opset)


def export_teacher_log_prob(generator: ShowerGenerator, path: str | os.PathLike[str],
                            metadata: dict[str, str] | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Write the teacher's log-likelihood as one ONNX graph: ``(showers, incident_energy) → log_prob``.

    Inputs ``showers`` (N, D) MeV and ``incident_energy`` (N, 1) MeV, output ``log_prob`` (N,): Flow I's
    plus the teacher's log-density in the preprocessed space, what
    ``generator.log_prob(e, showers, add_noise=False)["total"]`` returns; float32, dynamic batch.

    Args:
        generator: a teacher generator (its Flow II a MAF: one pass in this direction).
        path, metadata, opset: as in :func:`export_sampler`.
    """
    if isinstance(generator.flow2, IAF):
        raise FlowsError("student: its log-prob takes D sequential passes per block; export the teacher's")
    extra = _check_metadata(metadata)
    _check_opset(opset)
    pre = generator.preprocessor
    graph = TeacherLogProbGraph(pre, generator.flow1, generator.flow2)
    gen = torch.Generator().manual_seed(0)
    showers = torch.rand(_EXAMPLE_ROWS, pre.n_voxels, generator=gen) * 10.0
    e = torch.full((_EXAMPLE_ROWS, 1), 1e4)
    props = _common_props(generator, "teacher_log_prob", opset)
    props.update({
        "inputs": (f"showers: float32 (N, {pre.n_voxels}), MeV, the dataset's voxel order; "
                   "incident_energy: float32 (N, 1), MeV"),
        "outputs": ("log_prob: float32 (N,), log-density of Flow I + the teacher in the preprocessed space "
                    "(no dequantisation noise added)"),
    })
    props.update(extra)
    return _export(graph, (showers, e), LOG_PROB_INPUTS, LOG_PROB_OUTPUT, Path(path), props, opset)


def export_student_flow(student: IAF, path: str | os.PathLike[str], metadata: dict[str, str] | None = None,
                        opset: int = DEFAULT_OPSET, groups: int = 16) -> Path:
    """Write the student's Flow II alone as one ONNX graph: ``(noise, context) → x``.

    Inputs ``noise`` (N, D) standard normal and ``context`` (N, C), output ``x`` (N, D) in the
    preprocessed space, as ``IAF.inverse`` returns it; float32, dynamic batch. What the benchmark times
    next to :class:`flows.fast.FastIAFSampler`; simulators want :func:`export_sampler`.

    Args:
        student: the IAF (with context features).
        path, metadata, opset, groups: as in :func:`export_sampler`.
    """
    if not isinstance(student, IAF):
        raise FlowsError(f"student: expected an IAF, got {type(student).__name__}")
    d, c = student.config.features, student.config.context_features
    if not c:
        raise FlowsError("student: a Flow II without context features does not export alone")
    extra = _check_metadata(metadata)
    _check_opset(opset)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(_EXAMPLE_ROWS, d, generator=gen)
    ctx = torch.randn(_EXAMPLE_ROWS, c, generator=gen)
    props = {"producer": "calodistill", "graph": "student_flow", "calodistill_version": _package_version(),
             "torch_version": torch.__version__, "opset": str(opset), "dtype": "float32",
             "flow2_config": json.dumps(student.config.to_dict()),
             "inputs": f"noise: float32 (N, {d}), standard normal; context: float32 (N, {c})",
             "outputs": f"x: float32 (N, {d}), the preprocessed (logit) space"}
    props.update(extra)
    return _export(StudentFlowGraph(student, groups), (z, ctx), STUDENT_FLOW_INPUTS, STUDENT_FLOW_OUTPUT,
                   Path(path), props, opset)


# -- ONNX Runtime ----------------------------------------------------------------------------------------

def _ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's exception types (pybind11 classes deriving from ``Exception`` only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
             "NotImplemented", "RuntimeException", "EPFail")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))


def default_providers() -> list[str]:
    """ONNX Runtime execution providers: CUDA first when this onnxruntime has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def onnx_session(path: str | os.PathLike[str], providers: Sequence[str] | None = None,
                 threads: int | None = None, spinning: bool = True) -> object:
    """An ``onnxruntime.InferenceSession`` for ``path``; a file it cannot load is a one-line FlowsError.

    Args:
        path: an ``.onnx`` file.
        providers: execution providers (:func:`default_providers` if None).
        threads: intra-op threads (ONNX Runtime's default, all cores, if None).
        spinning: let idle intra-op threads spin (ONNX Runtime's default); off, they sleep and leave the
            cores to other work in the process (a benchmark timing torch beside it).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FlowsError(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its load-time warnings are not the user's business
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or default_providers()))
    except (*_ort_errors(), ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlowsError(f"{path}: cannot load the ONNX model ({first})") from None


class OnnxSampler:
    """An exported sampler run by ONNX Runtime: ``sample(incident_energy, noise) → showers``.

    Args:
        path: a file written by :func:`export_sampler`.
        providers: ONNX Runtime execution providers (:func:`default_providers` if None).
        threads: intra-op threads (ONNX Runtime's default, all cores, if None).
        chunk_size: rows per ONNX Runtime call for large batches (None: one call), so that the spline's
            ``(rows, D, bins)`` intermediates stay in cache.
    """

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[str] | None = None,
                 threads: int | None = None, chunk_size: int | None = 256) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise FlowsError(f"chunk_size: must be positive or None, got {chunk_size}")
        self.chunk_size = chunk_size
        self.path = Path(path)
        self.session: Any = onnx_session(self.path, providers, threads)
        names = tuple(i.name for i in self.session.get_inputs())
        outputs = tuple(o.name for o in self.session.get_outputs())
        if names != SAMPLER_INPUTS or outputs != (SAMPLER_OUTPUT,):
            raise FlowsError(f"{self.path}: not a calodistill sampler (inputs {names}, outputs {outputs})")
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.noise_features = int(self.session.get_inputs()[1].shape[1])
        self.n_layers = int(self.metadata.get("n_layers", 0))
        self.n_voxels = int(self.session.get_outputs()[0].shape[1])

    @property
    def providers(self) -> list[str]:
        """The execution providers the session uses."""
        return list(self.session.get_providers())

    def sample(self, incident_energy: ArrayLike, noise: ArrayLike) -> np.ndarray:
        """Voxel energies (N, D) MeV float32 for incident energies (N,) or (N, 1) MeV and noise (N, L + D)."""
        e = _energies(incident_energy).astype(np.float32).reshape(-1, 1)
        z = noise.detach().cpu().numpy() if isinstance(noise, torch.Tensor) else np.asarray(noise)
        if z.shape != (e.shape[0], self.noise_features):
            raise FlowsError(f"noise: expected shape ({e.shape[0]}, {self.noise_features}), got {z.shape}")
        z = np.ascontiguousarray(z, dtype=np.float32)
        step = self.chunk_size or max(1, e.shape[0])
        if e.shape[0] <= step:
            return self.session.run([SAMPLER_OUTPUT], {"incident_energy": e, "noise": z})[0]
        out = np.empty((e.shape[0], self.n_voxels), dtype=np.float32)
        for start in range(0, e.shape[0], step):
            sl = slice(start, start + step)
            out[sl] = self.session.run([SAMPLER_OUTPUT], {"incident_energy": e[sl], "noise": z[sl]})[0]
        return out
