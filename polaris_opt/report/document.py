"""The report document: one JSON-ready dict that says what a command did to a model.

Top level (format version FORMAT_VERSION): "polaris_opt_report", "command", "input" and "output"
(polaris_opt.report.model_stats), "size_ratio", "fidelity" (or null), "layers", "bench", "gates"
and "result" (the command's own --json result, as is).

A layer row has the keys of LAYER_KEYS. Rows come from the command's result, whichever command
wrote them (a compile pipeline may hold several): quantize rows give a precision, prune rows a
sparsity and an SQNR, sparsify rows a format, a precision and the weight's bytes before and
after. A layer reported by several passes is one row, the later pass's figures over the
earlier's. A layer's SQNR compares its output tensor in the output model with the tensor of the
same name in the input model on the fidelity data: the error accumulated up to that layer, not
the layer's own error alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import onnx

FORMAT_VERSION = 1
COMMANDS = ("quantize", "prune", "sparsify", "compile")
LAYER_KEYS = (
    "name",
    "op",
    "precision",
    "sparsity",
    "sqnr_db",
    "sensitivity_db",
    "note",
    "bytes_before",
    "bytes_after",
)
FIDELITY_KEYS = ("sqnr_db", "cosine", "top1_agreement", "top1_accuracy", "top1_accuracy_reference", "samples")
# Values of a sparsify row's "values", as element type names like the precision mix's.
STORED_VALUES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
EXACT_NOTE = "output identical to the input model's"


def build_report(
    command: str,
    input_path: Path,
    output_path: Path,
    result: dict,
    *,
    fidelity: dict | None = None,
    layers: list[dict] | None = None,
    bench: list[dict] | None = None,
    gates: list[dict] | None = None,
) -> dict:
    """The report of `command`, which read `input_path` and wrote `output_path` with `result`.

    Both model files are read for sizes, parameters, precision mix and sparsity. `layers`
    defaults to the rows of `result` (layer_rows); `fidelity` to `result["fidelity"]` with
    `result["accuracy"]`, when the command measured them.
    """
    from polaris_opt.graph_io import load_model

    return build_report_from_models(
        command,
        input_path,
        output_path,
        result,
        load_model(input_path),
        load_model(output_path),
        fidelity=fidelity,
        layers=layers,
        bench=bench,
        gates=gates,
    )


def build_report_from_models(
    command: str,
    input_path: Path,
    output_path: Path,
    result: dict,
    source: onnx.ModelProto,
    target: onnx.ModelProto,
    *,
    fidelity: dict | None = None,
    layers: list[dict] | None = None,
    bench: list[dict] | None = None,
    gates: list[dict] | None = None,
) -> dict:
    """build_report for models a command already holds in memory (loaded from those paths)."""
    from polaris_opt.report.files import strict
    from polaris_opt.report.model_stats import model_stats

    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}; got {command!r}")
    before, after = model_stats(Path(input_path), source), model_stats(Path(output_path), target)
    rows = layers if layers is not None else layer_rows(result)
    report = {
        "polaris_opt_report": FORMAT_VERSION,
        "command": command,
        "input": before,
        "output": after,
        "size_ratio": after["bytes"] / max(before["bytes"], 1),
        "fidelity": normalized_fidelity(fidelity if fidelity is not None else result_fidelity(result)),
        "layers": merge_layers([layer_row(row) for row in rows]),
        "bench": list(bench or []),
        "gates": list(gates or []),
        "result": result,
    }
    return strict(report)


# ---------------------------------------------------------------------------------- fidelity


def result_fidelity(result: dict) -> dict | None:
    """A command's measured fidelity (and --eval accuracy) in the report's terms; None if none."""
    measured = result.get("fidelity")
    if not isinstance(measured, dict):
        return None
    accuracy = result.get("accuracy") or {}
    return {
        **measured,
        "top1_accuracy": accuracy.get("top1_after"),
        "top1_accuracy_reference": accuracy.get("top1_before"),
    }


def normalized_fidelity(fidelity: dict | None) -> dict | None:
    """The fidelity entry with every key of FIDELITY_KEYS (None where not measured), plus "data"
    (what it was measured on) when known."""
    if fidelity is None:
        return None
    entry: dict[str, Any] = {key: fidelity.get(key) for key in FIDELITY_KEYS}
    entry["samples"] = int(entry["samples"]) if entry["samples"] is not None else None
    if fidelity.get("data"):
        entry["data"] = str(fidelity["data"])
    return entry


# ------------------------------------------------------------------------------------ layers


def layer_rows(result: dict) -> list[dict]:
    """The per-layer rows of a command's result: its "layers", else its passes' (compile)."""
    if result.get("layers"):
        return list(result["layers"])
    rows: list[dict] = []
    for report in result.get("passes") or []:
        details = (report.get("details") if isinstance(report, dict) else None) or {}
        rows += [row for row in details.get("layers", []) if isinstance(row, dict)]
    return rows


def layer_row(row: dict) -> dict:
    """One report layer row from a command's row (quantize, prune or sparsify) or a report row."""
    name = str(row.get("name", row.get("layer", "")))
    sqnr = row.get("sqnr_db")
    note = _note(row)
    if isinstance(sqnr, float) and math.isinf(sqnr) and sqnr > 0:
        note = f"{note}; {EXACT_NOTE}" if note else EXACT_NOTE
    return {
        "name": name,
        "op": _op(row),
        "precision": _precision(row),
        "sparsity": _sparsity(row),
        "sqnr_db": sqnr,
        "sensitivity_db": row.get("sensitivity_db"),
        "note": note,
        **_bytes(row),
    }


def merge_layers(rows: list[dict]) -> list[dict]:
    """Rows of one layer from several passes as one, in first-seen order; later figures win."""
    merged: dict[str, dict] = {}
    for row in rows:
        kept = merged.setdefault(row["name"], dict(row))
        for key, value in row.items():
            if value is not None and value != "":
                kept[key] = value
    return list(merged.values())


def _is_prune_row(row: dict) -> bool:
    return "shape_before" in row and "nonzeros_after" in row


def _sparsity(row: dict) -> float | None:
    """Zeros in the weight. A prune row's "sparsity_after" of a structured layer is the share of
    parameters removed, not zeros: its zeros are counted from the nonzeros left."""
    if _is_prune_row(row):
        params, nonzeros = row.get("params_after"), row.get("nonzeros_after")
        return 1.0 - nonzeros / params if params else None
    return row.get("sparsity")


def _bytes(row: dict) -> dict[str, int | None]:
    """A weight's bytes before and after; a prune row's only when pruning shrank the weight
    (structured): unstructured zeros leave the dense bytes as they were."""
    before, after = row.get("bytes_before"), row.get("bytes_after")
    if _is_prune_row(row) and before == after:
        before = after = None
    return {"bytes_before": before, "bytes_after": after}


def _op(row: dict) -> str:
    if "as" in row:  # sparsify: the op the layer became, with what it absorbed
        return str(row["as"]) + "".join(f"+{op}" for op in row.get("fused", []))
    return str(row.get("op", ""))


def _precision(row: dict) -> str | None:
    if row.get("precision") is not None:
        return str(row["precision"])
    if "values" in row:
        return STORED_VALUES.get(str(row["values"]), str(row["values"]))
    return None


def _note(row: dict) -> str:
    if "note" in row:
        return str(row["note"] or "")
    if "format" in row:  # sparsify
        shape = "×".join(str(d) for d in row.get("shape", []))
        return f"{row['format']} {row.get('values', '')}, weight {shape}".strip()
    if "pattern" in row:  # prune, unstructured
        shape = "×".join(str(d) for d in row.get("shape_after", []))
        return f"{row.get('method', '')} {row['pattern']}, weight {shape}".strip()
    if _is_prune_row(row):  # prune, structured: the weight is smaller
        before, after = ("×".join(str(d) for d in row[key]) for key in ("shape_before", "shape_after"))
        return f"weight {before} → {after}"
    return str(row.get("reason") or "")
