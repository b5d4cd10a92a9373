"""Reduced-precision copies of an exported graph: the big matrix weights in float16 or int8.

At batch 1 a sampler reads every weight once per shower, so its time is the weights' bytes over the
memory bandwidth. :func:`convert_precision` rewrites the matrix products whose weights live under a
name prefix (the student's, ``student.``; Flow I, the spline and the preprocessing stay float32):

- ``fp16``: the weights stored as float16 with a ``Cast`` to float32 in front of each product
  (activations and every other operation stay float32; inputs and outputs too).
- ``int8``: the weights in int8 with a scale per block of 32 input rows (ONNX Runtime's weight-only
  ``MatMulNBits``, a ``com.microsoft`` operator: ONNX Runtime runs it, other ONNX back ends may not;
  accuracy level 4: the activations are quantized per block on the fly and the products run in int8).
- ``int8-dynamic``: ONNX Runtime's dynamic quantization (``quantize_dynamic``): weights int8 with one
  scale per matrix, activations quantized per call with one scale, ``MatMulInteger`` (standard ONNX).
  Coarser: on the trained quickstart student its showers are measurably worse (docs/benchmarks.md).

The model's metadata properties are kept, with ``precision`` set. onnx and onnxruntime are imported
only when used.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from .errors import FlowsError

__all__ = ["INT8_ACCURACY_LEVEL", "INT8_BLOCK", "PRECISIONS", "STUDENT_SCOPE", "convert_precision",
           "weight_products"]

logger = logging.getLogger(__name__)

#: The precisions a graph can be written in.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-dynamic")
#: ``int8``: rows of a weight matrix sharing one scale, and ONNX Runtime's accuracy level (4: int8 products).
INT8_BLOCK, INT8_ACCURACY_LEVEL = 32, 4
#: The prefix of the student's weights in graphs written by :mod:`flows.export`.
STUDENT_SCOPE = "student."
_PRODUCTS = ("Gemm", "MatMul")


def weight_products(model: object, scope: str = STUDENT_SCOPE) -> list[object]:
    """The ``Gemm``/``MatMul`` nodes of ``model`` (an ``onnx.ModelProto``) whose weight is an initializer
    named ``scope...``."""
    inits = {i.name for i in model.graph.initializer}  # type: ignore[attr-defined]
    return [n for n in model.graph.node  # type: ignore[attr-defined]
            if n.op_type in _PRODUCTS and len(n.input) > 1 and n.input[1] in inits and n.input[1].startswith(scope)]


def _to_fp16(model: object, scope: str) -> int:
    """Store the weights of :func:`weight_products` as float16, each behind a Cast to float32."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph  # type: ignore[attr-defined]
    inits = {i.name: i for i in graph.initializer}
    targets = {n.input[1] for n in weight_products(model, scope)}
    casts = []
    for name in sorted(targets):
        weight = inits[name]
        half = numpy_helper.from_array(numpy_helper.to_array(weight).astype(np.float16), f"{name}.fp16")
        weight.CopyFrom(half)  # replaces the float32 initializer in place
        casts.append(helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}.cast"))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)  # the casts read only initializers: first keeps the order topological
    return len(targets)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs a 'consider pre-processing' warning on the root logger and prints."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _gemms_as_matmuls(model: object, scope: str) -> list[str]:
    """Split each Gemm of :func:`weight_products` into ``MatMul`` + ``Add`` (what ``MatMulNBits`` replaces);
    returns the products' names."""
    from onnx import helper

    graph = model.graph  # type: ignore[attr-defined]
    targets = {n.name for n in weight_products(model, scope)}
    nodes, names = [], []
    for n in graph.node:
        if n.name not in targets:
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0
                                    or attrs.get("beta", 1.0) != 1.0):
            raise FlowsError(f"{n.name}: a Gemm with {attrs} is not x @ W + b")
        product = helper.make_node("MatMul", list(n.input[:2]), [f"{n.output[0]}.product"], name=f"{n.name}.matmul")
        nodes.append(product)
        names.append(product.name)
        if n.op_type == "Gemm" and len(n.input) > 2:
            bias = helper.make_node("Add", [product.output[0], n.input[2]], list(n.output), name=f"{n.name}.bias")
            nodes.append(bias)
        else:
            product.output[0] = n.output[0]
    del graph.node[:]
    graph.node.extend(nodes)
    return names


def _to_int8_blocks(model: object, scope: str) -> object | None:
    """``int8``: weight-only block quantization (``MatMulNBits``); None when there is nothing to quantize."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    names = _gemms_as_matmuls(model, scope)
    if not names:
        return None
    config = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK, is_symmetric=True, accuracy_level=INT8_ACCURACY_LEVEL,
                                          bits=8)
    with _quiet():
        quantizer = MatMulNBitsQuantizer(model, nodes_to_include=names, algo_config=config)
        quantizer.process()
    return quantizer.model.model


def _to_int8(src: Path, dst: Path, scope: str) -> int:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    names = [n.name for n in weight_products(model, scope)]
    if not names:
        return 0
    # the quantizer first splits a Gemm into MatMul + Add, named "<gemm>_MatMul"
    nodes = names + [f"{n}_MatMul" for n in names]
    with _quiet():
        quantize_dynamic(model, dst, op_types_to_quantize=list(_PRODUCTS), nodes_to_quantize=nodes,
                         weight_type=QuantType.QInt8, per_channel=False)
    return len(names)


def convert_precision(src: str | os.PathLike[str], dst: str | os.PathLike[str], precision: str,
                      scope: str = STUDENT_SCOPE) -> Path:
    """Write ``src`` (a float32 graph from :mod:`flows.export`) to ``dst`` in ``precision``.

    Args:
        src: the float32 ``.onnx`` file.
        dst: the file to write (a new path; written atomically, mode from the umask).
        precision: one of :data:`PRECISIONS` (``fp32`` copies).
        scope: the weight-name prefix of the products to convert.

    Returns:
        ``dst``.

    Raises:
        FlowsError: an unknown precision, or a graph with no such products.
    """
    import onnx

    if precision not in PRECISIONS:
        raise FlowsError(f"precision: unknown {precision!r} (use {', '.join(PRECISIONS)})")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FlowsError(f"{src}: no such ONNX file")
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        if precision == "int8-dynamic":
            if not _to_int8(src, tmp, scope):
                raise FlowsError(f"{src}: no matrix products with weights named {scope}* to quantize")
            model = onnx.load(str(tmp))
            props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
        else:
            model = onnx.load(str(src))
            props = {p.key: p.value for p in model.metadata_props}
            if precision == "fp16" and not _to_fp16(model, scope):
                raise FlowsError(f"{src}: no matrix products with weights named {scope}* to convert")
            if precision == "int8":
                model = _to_int8_blocks(model, scope)
                if model is None:
                    raise FlowsError(f"{src}: no matrix products with weights named {scope}* to quantize")
        props["precision"] = precision
        onnx.helper.set_model_props(model, props)
        onnx.checker.check_model(model)
        onnx.save_model(model, str(tmp))
        os.replace(tmp, dst)
    except OSError as exc:
        raise FlowsError(f"{dst}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote %s (%s weights under %s)", dst, precision, scope)
    return dst
