"""The rational-quadratic spline in one compiled pass per element, on CPU: sampling and training.

:func:`flows.fast.rqs_inverse` in torch runs a dozen small kernels per block (softmax, cumsum, gathers,
the quadratic root), each a pass over a ``(N, 3K − 1, D)`` tensor; at CaloFlow sizes they took about as
long as the student's matrix products. ``flows/csrc/rqs_inverse.cpp`` does the same arithmetic in one
pass per element, vectorised over the feature axis (glibc's vector ``exp``/``log``) and spread over rows
with OpenMP (the same ``libgomp`` that torch loads). For training, ``flows/csrc/rqs_spline.cpp`` does the
forward and the inverse with an analytic backward (:func:`rq_spline_native`, an autograd function used by
:class:`flows.transforms.RQSAutoregressiveTransform`): autograd through the torch spline took most of a
training step.

The sources are compiled on first use with the system C++ compiler (``$CXX`` or ``g++``, about two
seconds) into a per-user cache (``$CALODISTILL_CACHE_DIR``, else ``$XDG_CACHE_HOME/calodistill``, else
``~/.cache/calodistill``), keyed by the source, the flags, the compiler and the CPU, written to a temporary
name and renamed. Nothing is downloaded. Where no compiler works, or with ``CALODISTILL_NATIVE=0``, the
sampler keeps the torch spline (:func:`available` says which; the reason is logged once).

Tested equal to nflows' ``unconstrained_rational_quadratic_spline(inverse=True, tails="linear")`` and to
the torch spline's values and gradients in float64 and float32 (tests/flows/test_native.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .errors import FlowsError

__all__ = [
    "NativeSpline",
    "available",
    "library_path",
    "rq_spline_native",
    "rqs_inverse_native",
    "supports_bins",
    "train_spline_available",
    "train_spline_supports",
    "unavailable_reason",
    "vectorised",
]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "rqs_inverse.cpp"
TRAIN_SOURCE = Path(__file__).with_name("csrc") / "rqs_spline.cpp"
_BASE_FLAGS = ["-O3", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_lock = threading.Lock()
_state: dict[str, object] = {}
_train_state: dict[str, object] = {}


def _cache_dir() -> Path:
    explicit = os.environ.get("CALODISTILL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "calodistill"


def _cpu_signature() -> str:
    """Machine and CPU feature flags (the library is built with -march=native)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()}|{flags}"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx)


def _flag_sets() -> list[list[str]]:
    native = ["-march=native"]
    if platform.machine() in ("x86_64", "AMD64"):
        native.append("-mprefer-vector-width=256")  # 8 floats per vector on AVX2 (gcc prefers 128 bits)
    return [_BASE_FLAGS + native, list(_BASE_FLAGS)]


def _build(cxx: str, source_path: Path = SOURCE) -> Path:
    source = source_path.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_signature().encode()])).hexdigest()[:16]
        target = _cache_dir() / f"{source_path.stem}-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{source_path.stem}-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, str(source_path), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{' '.join(flags)}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise FlowsError(f"{source_path}: compiling failed ({'; '.join(errors)})")


def _bind_inverse(lib: ctypes.CDLL) -> None:
    for name in ("calodistill_rqs_inverse_f32", "calodistill_rqs_inverse_f64"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_double] * 5 + [ctypes.c_int]
    lib.calodistill_rqs_vectorised.restype = ctypes.c_int
    lib.calodistill_rqs_vectorised.argtypes = []
    lib.calodistill_rqs_supported_bins.restype = ctypes.c_int
    lib.calodistill_rqs_supported_bins.argtypes = [ctypes.c_int64]


def _bind_train(lib: ctypes.CDLL) -> None:
    for name in ("calodistill_rqs_train_f32", "calodistill_rqs_train_f64"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = ([ctypes.c_void_p] * 8 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2 + [ctypes.c_double] * 5
                       + [ctypes.c_int])


def _load_source(source_path: Path, bind: Callable[[ctypes.CDLL], None], state: dict[str, object],
                 used_by: str) -> ctypes.CDLL | None:
    with _lock:
        if "lib" in state:
            return state["lib"]  # type: ignore[return-value]
        lib = None
        reason = ""
        if os.environ.get("CALODISTILL_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            reason = "disabled by CALODISTILL_NATIVE"
        elif (cxx := _compiler()) is None:
            reason = f"no C++ compiler ({os.environ.get('CXX') or 'g++'}) on PATH"
        else:
            try:
                path = _build(cxx, source_path)
                lib = ctypes.CDLL(str(path))
                bind(lib)
                state["path"] = path
            except (OSError, AttributeError, subprocess.SubprocessError, FlowsError) as exc:
                lib = None
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if lib is None:
            logger.info("native %s unavailable (%s); %s", source_path.name, reason, used_by)
        state["lib"] = lib
        state["reason"] = reason
        return lib


def _load() -> ctypes.CDLL | None:
    return _load_source(SOURCE, _bind_inverse, _state, "the sampler uses the torch spline")


def available() -> bool:
    """Whether the compiled spline can be used (compiles it on first call)."""
    return _load() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    _load()
    return str(_state.get("reason", ""))


def library_path() -> Path | None:
    """Where the compiled library lies (None when unavailable)."""
    return _state.get("path") if available() else None  # type: ignore[return-value]


def vectorised() -> bool:
    """Whether the library was built with its AVX2 float32 path (else the scalar code serves float32)."""
    lib = _load()
    return lib is not None and bool(lib.calodistill_rqs_vectorised())


def supports_bins(num_bins: int) -> bool:
    """Whether the compiled spline has a variant for ``num_bins`` bins (2–6, 8, 10, 12, 16)."""
    lib = _load()
    return lib is not None and bool(lib.calodistill_rqs_supported_bins(int(num_bins)))


def rqs_inverse_native(inputs: Tensor, params: Tensor, tail_bound: float, min_bin_width: float,
                       min_bin_height: float, min_derivative: float,
                       logabsdet_total: Tensor | None = None, threads: int | None = None,
                       out: Tensor | None = None) -> Tensor:
    """Spline inverse of ``inputs`` ``(N, D)`` with MADE outputs ``params`` ``(N, 3K − 1, D)``.

    ``params`` holds the unnormalised widths (rows ``[0, K)``), heights (``[K, 2K)``) and interior
    derivatives (``[2K, 3K − 1)``) of every feature, as :func:`flows.fast.rqs_inverse` takes them.
    ``inputs`` and ``out`` may be column slices of wider tensors (unit stride along features).
    If ``logabsdet_total`` ``(N,)`` is given, the row sums of ``log|dx/dy|`` are added to it in place.

    Returns:
        x ``(N, D)``: ``out`` when given, else a new tensor.

    Raises:
        FlowsError: unavailable library, unsupported bins, or tensors that are not CPU float32/float64
            of one dtype, matching shapes and unit feature stride (``params`` C-contiguous).
    """
    if inputs.dim() != 2 or params.dim() != 3:
        raise FlowsError(f"inputs/params: expected (N, D) and (N, 3K-1, D), got {tuple(inputs.shape)}, "
                         f"{tuple(params.shape)}")
    n, d = inputs.shape
    m = params.shape[1]
    if (m + 1) % 3:
        raise FlowsError(f"params: expected 3·bins − 1 rows per feature, got {m}")
    dtype = inputs.dtype
    spline = NativeSpline((m + 1) // 3, dtype, tail_bound, min_bin_width, min_bin_height, min_derivative)
    if out is None:
        out = torch.empty((n, d), dtype=dtype)
    if params.shape != (n, m, d) or out.shape != (n, d) or (
            logabsdet_total is not None and logabsdet_total.shape != (n,)):
        raise FlowsError(f"params/out/logabsdet: shapes ({n}, {m}, {d}), ({n}, {d}), ({n},) expected, got "
                         f"{tuple(params.shape)}, {tuple(out.shape)}, "
                         f"{None if logabsdet_total is None else tuple(logabsdet_total.shape)}")
    for name, t, ok in (("inputs", inputs, n <= 1 or d <= 1 or inputs.stride(1) == 1),
                        ("out", out, n <= 1 or d <= 1 or out.stride(1) == 1),
                        ("params", params, params.is_contiguous()),
                        ("logabsdet", logabsdet_total, logabsdet_total is None or logabsdet_total.is_contiguous())):
        if t is not None and (t.device.type != "cpu" or t.dtype != dtype or not ok):
            raise FlowsError(f"{name}: the native spline needs CPU {dtype} with unit feature stride "
                             f"(params contiguous), got {t.device} {t.dtype} strides {t.stride()}")
    spline(inputs, params, out, logabsdet_total, threads)
    return out


class NativeSpline:
    """The compiled spline inverse bound to one spline's settings, for repeated calls without checks.

    :func:`rqs_inverse_native` checks its arguments and calls this; the fast sampler calls it directly
    with tensors whose layout it guarantees (see that function for the layout).
    """

    def __init__(self, num_bins: int, dtype: torch.dtype, tail_bound: float, min_bin_width: float,
                 min_bin_height: float, min_derivative: float) -> None:
        lib = _load()
        if lib is None:
            raise FlowsError(f"native spline: unavailable ({unavailable_reason()})")
        if not lib.calodistill_rqs_supported_bins(int(num_bins)):
            raise FlowsError(f"num_bins: no compiled spline for {num_bins} bins")
        if dtype not in (torch.float32, torch.float64):
            raise FlowsError(f"dtype: float32 or float64 needed, got {dtype}")
        self.bins = int(num_bins)
        self.dtype = dtype
        self._fn = lib.calodistill_rqs_inverse_f32 if dtype == torch.float32 else lib.calodistill_rqs_inverse_f64
        # the end derivatives as nflows computes them: min_derivative + softplus(log(expm1(1 − min)))
        edge = float(torch.nn.functional.softplus(torch.tensor(math.log(math.expm1(1 - min_derivative)),
                                                               dtype=dtype))) + min_derivative
        self._spec = (float(tail_bound), float(min_bin_width), float(min_bin_height), float(min_derivative),
                      edge)

    def __call__(self, inputs: Tensor, params: Tensor, out: Tensor, logabsdet_total: Tensor | None = None,
                 threads: int | None = None) -> Tensor:
        n, d = inputs.shape
        rc = self._fn(inputs.data_ptr(), params.data_ptr(), out.data_ptr(),
                      logabsdet_total.data_ptr() if logabsdet_total is not None else None, n, d,
                      inputs.stride(0), out.stride(0), self.bins, *self._spec,
                      int(threads if threads is not None else torch.get_num_threads()))
        if rc != 0:
            raise FlowsError(f"native spline: failed with code {rc}")
        return out


# ------------------------------------------------------------------------------- training spline
def _load_train() -> ctypes.CDLL | None:
    return _load_source(TRAIN_SOURCE, _bind_train, _train_state, "training uses the torch spline")


def train_spline_available() -> bool:
    """Whether the compiled training spline (forward and inverse with their backward) can be used."""
    return _load_train() is not None and available()


def train_spline_supports(inputs: Tensor, params: Tensor) -> bool:
    """Whether :func:`rq_spline_native` can take these tensors (CPU float32/float64, supported bins)."""
    m = params.shape[-1]
    return (inputs.device.type == "cpu" and inputs.dtype in (torch.float32, torch.float64)
            and params.dtype == inputs.dtype and params.device.type == "cpu" and (m + 1) % 3 == 0
            and train_spline_available() and supports_bins((m + 1) // 3))


def _edge_derivative(min_derivative: float, dtype: torch.dtype) -> float:
    """The end derivatives as nflows computes them: min_derivative + softplus(log(expm1(1 − min)))."""
    return float(torch.nn.functional.softplus(torch.tensor(math.log(math.expm1(1 - min_derivative)),
                                                           dtype=dtype))) + min_derivative


def _train_call(inverse: bool, backward: bool, v: Tensor, p: Tensor, spec: tuple[float, ...],
                out: Tensor | None = None, lad: Tensor | None = None, g_out: Tensor | None = None,
                g_lad: Tensor | None = None, g_v: Tensor | None = None, g_p: Tensor | None = None) -> None:
    lib = _load_train()
    assert lib is not None
    fn = lib.calodistill_rqs_train_f32 if v.dtype == torch.float32 else lib.calodistill_rqs_train_f64
    n, d = v.shape
    m = p.shape[2]  # p: (N, D, 3K − 1)

    def ptr(t: Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    rc = fn(ptr(v), ptr(p), ptr(out), ptr(lad), ptr(g_out), ptr(g_lad), ptr(g_v), ptr(g_p), n, d, (m + 1) // 3,
            int(inverse), int(backward), *spec, torch.get_num_threads())
    if rc != 0:
        raise FlowsError(f"native training spline: failed with code {rc}")


class _RQSpline(torch.autograd.Function):
    """The compiled spline as an autograd function; its backward is the compiled analytic one."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, inputs: Tensor, params: Tensor, inverse: bool,
                spec: tuple[float, ...]) -> tuple[Tensor, Tensor]:
        inputs = inputs.contiguous()
        params = params.contiguous()
        out = torch.empty_like(inputs)
        lad = inputs.new_empty(inputs.shape[0])
        _train_call(inverse, False, inputs, params, spec, out=out, lad=lad)
        ctx.save_for_backward(inputs, params)
        ctx.inverse, ctx.spec = inverse, spec
        return out, lad

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, g_out: Tensor,
                 g_lad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        inputs, params = ctx.saved_tensors
        need_v, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_v or need_p):
            return None, None, None, None
        g_v = torch.empty_like(inputs) if need_v else None
        g_p = torch.empty_like(params) if need_p else None
        _train_call(ctx.inverse, True, inputs, params, ctx.spec, g_out=g_out.contiguous(),
                    g_lad=g_lad.contiguous(), g_v=g_v, g_p=g_p)
        return g_v, g_p, None, None


def rq_spline_native(inputs: Tensor, params: Tensor, inverse: bool, tail_bound: float, min_bin_width: float,
                     min_bin_height: float, min_derivative: float) -> tuple[Tensor, Tensor]:
    """The linear-tail rational-quadratic spline, compiled, differentiable in ``inputs`` and ``params``.

    The same function as :func:`flows.transforms.rq_spline_linear_tails` (nflows' spline), with the
    log-determinant summed over features: ``inputs`` ``(N, D)``, ``params`` ``(N, D, 3K − 1)`` (nflows'
    layout: widths, heights, interior derivatives per feature). Its backward is analytic (the inverse's
    by the implicit-function theorem), one compiled pass per element instead of autograd's chain of
    small kernels; first-order gradients only.

    Returns:
        ``(outputs (N, D), logabsdet (N,))``.

    Raises:
        FlowsError: tensors :func:`train_spline_supports` rejects.
    """
    if inputs.dim() != 2 or params.dim() != 3 or params.shape[:2] != inputs.shape:
        raise FlowsError(f"inputs/params: expected (N, D) and (N, D, 3K-1), got {tuple(inputs.shape)}, "
                         f"{tuple(params.shape)}")
    if not train_spline_supports(inputs, params):
        _load_train()
        why = str(_train_state.get("reason", "")) or unavailable_reason() or "unsupported"
        raise FlowsError(f"native training spline: cannot take {inputs.device} {inputs.dtype} / {params.dtype} "
                         f"with {params.shape[-1]} parameters per feature ({why})")
    spec = (float(tail_bound), float(min_bin_width), float(min_bin_height), float(min_derivative),
            _edge_derivative(min_derivative, inputs.dtype))
    return _RQSpline.apply(inputs, params, inverse, spec)
