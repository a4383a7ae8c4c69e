"""Per-layer SQNR for a report, where the command's own result has none (quantize).

Both models run on the data the command measured its fidelity on (`fidelity_feeds`: the first
batches of the calibration data, or the same seeded random inputs), each with the layers' float
output tensors added as graph outputs (polaris_opt.capture.with_outputs). A layer's SQNR
compares its output tensor with the tensor of the same name in the input model: the error
accumulated up to that layer. A tensor that exists in one model only (a layer cleanup folded
away, a fused output) has no SQNR; one batch at a time is held in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from polaris_opt.fidelity import Agreement

# ONNX Runtime's input type names -> NumPy, for feeding an FP16 model the float32 data.
DECLARED_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits", "MatMulInteger", "ConvInteger")


def fidelity_feeds(calib: Any, reference: onnx.ModelProto, *, threads: int = 1) -> tuple[list[dict], str]:
    """The batches the optimizing commands measure fidelity on, and how they name them: at most
    polaris_opt.quantization.FIDELITY_BATCHES batches of `calib` (a CalibrationSource), or with
    none the seeded random inputs polaris_opt.quantization.measure_fidelity uses."""
    from polaris_opt.numerics import make_session
    from polaris_opt.pruning.report import fidelity_batches

    return fidelity_batches(calib, make_session(reference, threads=threads) if calib is None else None)


def samples_in(feeds: list[dict[str, np.ndarray]]) -> int:
    """Samples in `feeds`: the leading dimension of each batch's first input, summed."""
    total = 0
    for batch in feeds:
        first = next(iter(batch.values()), None)
        total += int(first.shape[0]) if first is not None and first.ndim else 1
    return total


def layer_sqnr(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    layer_names: list[str],
    feeds: list[dict[str, np.ndarray]],
    *,
    threads: int = 1,
) -> dict[str, float]:
    """Layer (node) name -> SQNR in dB of its first output in `candidate` against `reference`."""
    from polaris_opt.capture import with_outputs
    from polaris_opt.numerics import make_session

    pairs = comparable_outputs(reference, candidate, layer_names)
    wanted = list(dict.fromkeys(pairs.values()))
    if not wanted or not feeds:
        return {}
    ref_names = list(dict.fromkeys(ref for ref, _ in wanted))
    got_names = list(dict.fromkeys(got for _, got in wanted))
    ref_session = make_session(with_outputs(reference, ref_names), threads=threads)
    got_session = make_session(with_outputs(candidate, got_names), threads=threads)
    agreements = {pair: Agreement() for pair in wanted}
    for batch in feeds:
        ref = dict(zip(ref_names, ref_session.run(ref_names, _as_declared(ref_session, batch)), strict=True))
        got = dict(zip(got_names, got_session.run(got_names, _as_declared(got_session, batch)), strict=True))
        for pair, agreement in agreements.items():
            if ref[pair[0]].shape == got[pair[1]].shape:
                agreement.add(ref[pair[0]], got[pair[1]])
    return {
        layer: agreements[pair].sqnr_db
        for layer, pair in pairs.items()
        if agreements[pair].signal + agreements[pair].noise > 0
    }


def comparable_outputs(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, names: list[str]
) -> dict[str, tuple[str, str]]:
    """Layer name -> (reference tensor, candidate tensor) its SQNR compares: the first output of
    the node of that name in `candidate`, else in `reference`, a float tensor of both models.

    The candidate's node comes first: clean-up may have folded a BatchNormalization into the
    layer, which then writes the folded node's output. The reference's is the fallback: a pass
    that replaced the layer by a chain (dynamic quantization) gives the chain's last node the
    original output, while its node of the layer's name writes integers. Where the candidate
    quantizes the tensor (QuantizeLinear then DequantizeLinear), the dequantized tensor is
    compared: what the next layers read. It matters: a Relu absorbed into the quantization
    leaves the layer writing the Relu's output name before the clamp.
    """
    from polaris_opt.capture import FLOAT_TYPES, tensor_types

    ref_types, got_types = tensor_types(reference), tensor_types(candidate)
    ref_outputs, got_outputs = _first_outputs(reference), _first_outputs(candidate)
    dequantized = _dequantized(candidate)
    chosen = {}
    for name in names:
        for tensor in (got_outputs.get(name), ref_outputs.get(name)):
            got = dequantized.get(tensor, tensor)
            if tensor and ref_types.get(tensor) in FLOAT_TYPES and got_types.get(got) in FLOAT_TYPES:
                chosen[name] = (tensor, got)
                break
    return chosen


def _dequantized(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor -> the output of the DequantizeLinear that undoes its QuantizeLinear, if any."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or not node.output:
            continue
        after = [r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"]
        if after and after[0].output:
            pairs[node.input[0]] = after[0].output[0]
    return pairs


def _first_outputs(model: onnx.ModelProto) -> dict[str, str]:
    return {node.name: node.output[0] for node in model.graph.node if node.name and node.output}


def weighted_layer_rows(model: onnx.ModelProto) -> list[dict]:
    """Rows for a result that lists no layers (FP16 converts nodes): each weighted node of
    `model` with its weight's stored type as precision."""
    from polaris_opt.inspect import dtype_name

    types = {t.name: t.data_type for t in model.graph.initializer}
    rows = []
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in types:
            precision = dtype_name(types[node.input[1]])
            rows.append({"name": node.name, "op": node.op_type, "precision": precision, "note": ""})
    return rows


def _as_declared(session, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float inputs cast to the session's declared type (an FP16 model without float32 I/O)."""
    declared = {i.name: DECLARED_FLOATS.get(i.type) for i in session.get_inputs()}
    return {
        name: value.astype(declared[name]) if declared.get(name) and value.dtype.kind == "f" else value
        for name, value in batch.items()
    }
