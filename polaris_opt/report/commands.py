"""The report of each optimizing command, from what the command already measured plus what it lacks.

- quantize measured fidelity but no per-layer error: each layer's SQNR is measured here, on the
  same data (polaris_opt.report.layer_sqnr), and the sample count of that data is recorded.
- prune measured fidelity and each pruned layer's SQNR: reused as they are; only the samples of
  its fidelity data are counted (the data is read again, no model runs).
- sparsify measures no fidelity: here both models run on seeded random inputs on ONNX Runtime,
  the sparse one lowered to standard ops (polaris_opt.ops.lowering densifies and dequantizes
  each weight with the NumPy references' own helpers, so the figures are the ops' meaning,
  whatever device runs them later). On resnet_s at 80 % sparsity that took 0.05 s where
  polaris_opt.runtime.Session with the references on the host took 1.3 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from polaris_opt.report.document import build_report_from_models, result_fidelity


def quantize_report(
    input_path: Path,
    output_path: Path,
    result: dict,
    *,
    source: onnx.ModelProto,
    quantized: onnx.ModelProto,
    calib: Any = None,
    calib_options: dict | None = None,
    threads: int = 1,
) -> dict:
    """`calib` and `calib_options`: the calibration data quantize was given (None: it measured on
    random inputs) and open_calibration's options for it (batch_size, limit, image)."""
    from polaris_opt.report.layer_sqnr import fidelity_feeds, layer_sqnr, weighted_layer_rows

    feeds, _ = fidelity_feeds(_opened(calib, source, calib_options), source, threads=threads)
    rows = result.get("layers") or weighted_layer_rows(quantized)
    sqnr = layer_sqnr(source, quantized, [row["name"] for row in rows], feeds, threads=threads)
    layers = [{**row, "sqnr_db": sqnr.get(row["name"])} for row in rows]
    fidelity = _with_samples(result_fidelity(result), feeds)
    return build_report_from_models(
        "quantize", input_path, output_path, result, source, quantized, fidelity=fidelity, layers=layers
    )


def prune_report(
    input_path: Path,
    output_path: Path,
    result: dict,
    *,
    calib: Any = None,
    calib_options: dict | None = None,
    threads: int = 1,
) -> dict:
    """`calib`, `calib_options`: as for quantize_report."""
    from polaris_opt.graph_io import load_model
    from polaris_opt.report.layer_sqnr import fidelity_feeds

    source, pruned = load_model(input_path), load_model(output_path)
    fidelity = result_fidelity(result)
    if fidelity is not None:
        feeds, _ = fidelity_feeds(_opened(calib, source, calib_options), source, threads=threads)
        fidelity = _with_samples(fidelity, feeds)
    return build_report_from_models(
        "prune", input_path, output_path, result, source, pruned, fidelity=fidelity
    )


def sparsify_report(input_path: Path, output_path: Path, result: dict, *, threads: int = 1) -> dict:
    from polaris_opt.graph_io import load_model

    source, sparse = load_model(input_path), load_model(output_path)
    fidelity = sparse_fidelity(source, sparse, threads=threads)
    return build_report_from_models(
        "sparsify", input_path, output_path, result, source, sparse, fidelity=fidelity
    )


def sparse_fidelity(source: onnx.ModelProto, sparse: onnx.ModelProto, *, threads: int = 1) -> dict:
    """SQNR, cosine and top-1 agreement of `sparse` against `source` on seeded random inputs."""
    from polaris_opt.fidelity import compare_models, overall
    from polaris_opt.numerics import make_session
    from polaris_opt.ops.lowering import lower
    from polaris_opt.report.layer_sqnr import fidelity_feeds, samples_in

    feeds, data = fidelity_feeds(None, source, threads=threads)
    reference = make_session(source, threads=threads)
    candidate = make_session(lower(sparse), threads=threads)
    pooled = overall(compare_models(reference, candidate, feeds))
    return {**pooled.as_dict(), "samples": samples_in(feeds), "data": data}


def _opened(calib: Any, model: onnx.ModelProto, options: dict | None):
    """The command's calibration data as a CalibrationSource, opened as the command opened it."""
    from polaris_opt.calib_data import CalibrationSource, open_calibration

    if calib is None or isinstance(calib, CalibrationSource):
        return calib
    return open_calibration(calib, model, **(options or {}))


def _with_samples(fidelity: dict | None, feeds: list[dict]) -> dict | None:
    from polaris_opt.report.layer_sqnr import samples_in

    return None if fidelity is None else {**fidelity, "samples": samples_in(feeds)}
