"""`polaris-opt lower`: a Polaris model back to standard ONNX, over polaris_opt.ops.lowering."""

from __future__ import annotations

from pathlib import Path

from polaris_opt.cli.options import DebugFlag, ForceFlag, JsonFlag, ModelArg, OutputOpt, QuietFlag


def lower(
    model: ModelArg,
    output: OutputOpt,
    force: ForceFlag = False,
    json: JsonFlag = False,
    quiet: QuietFlag = False,
    debug: DebugFlag = False,
) -> None:
    """Turn MODEL's ai.polaris ops into standard ONNX ops that run on stock ONNX Runtime.

    Sparse and INT4 weights become dense float32 initializers; INT8 ops keep their activation rounding
    through QuantizeLinear/DequantizeLinear. The output computes what the ops compute.
    """
    from polaris_opt.cli import OUTPUT
    from polaris_opt.graph_io import check_output_path, load_model, save_model
    from polaris_opt.ops import register_schemas
    from polaris_opt.ops.lowering import lower as lower_model
    from polaris_opt.ops.lowering import polaris_op_counts

    out = OUTPUT.merged(json=json, quiet=quiet, debug=debug)
    check_output_path(output, input_path=model, force=force)
    register_schemas()
    source = load_model(model)
    lowered_ops = polaris_op_counts(source)
    if not lowered_ops:
        out.note(f"{model}: no ai.polaris ops; the output is a copy")
    lowered = lower_model(source)
    save_model(lowered, output, pipeline="lower", input_path=model, force=force)
    summary = {
        "input": str(model),
        "output": str(output),
        "lowered": dict(sorted(lowered_ops.items())),
        "nodes": len(lowered.graph.node),
        "input_bytes": model.stat().st_size,
        "output_bytes": output.stat().st_size,
    }
    out.result(summary, lambda console: render(console, summary))


def render(console, summary: dict) -> None:
    from rich.markup import escape

    ops = ", ".join(f"{op} ×{count}" for op, count in summary["lowered"].items()) or "nothing"
    names = f"{escape(Path(summary['input']).name)} → {escape(Path(summary['output']).name)}"
    console.print(f"{names}: lowered {ops}")
    sizes = f"{summary['output_bytes'] / 1e6:.3f} MB (input {summary['input_bytes'] / 1e6:.3f} MB)"
    console.print(f"wrote {escape(summary['output'])}: {sizes}, {summary['nodes']} nodes")
