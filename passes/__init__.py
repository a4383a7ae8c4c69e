"""The pass registry: each name maps to where its class lives, imported only when used.

Keeping this a table of strings is what lets `polaris-opt --help` start without importing
onnxruntime, pyopencl or any pass module.
"""

from __future__ import annotations

import importlib

from polaris_opt.passes_api import Pass

PASSES: dict[str, str] = {
    "lift-constants": "polaris_opt.passes.lift_constants:LiftConstants",
    "fold-constants": "polaris_opt.passes.fold_constants:FoldConstants",
    "eliminate-identity": "polaris_opt.passes.eliminate_identity:EliminateIdentity",
    "eliminate-dead-code": "polaris_opt.passes.eliminate_dead_code:EliminateDeadCode",
    "fold-batchnorm": "polaris_opt.passes.fold_batchnorm:FoldBatchNorm",
    "infer-shapes": "polaris_opt.passes.infer_shapes:InferShapes",
    "calibrate": "polaris_opt.passes.calibrate:Calibrate",
    "quantize": "polaris_opt.passes.quantize:Quantize",
    "quantize-dynamic": "polaris_opt.passes.quantize_dynamic:QuantizeDynamic",
    "convert-fp16": "polaris_opt.passes.convert_fp16:ConvertFp16",
    "quantize-int4": "polaris_opt.passes.quantize_int4:QuantizeInt4",
    "correct-bias": "polaris_opt.passes.correct_bias:CorrectBias",
    "prune": "polaris_opt.passes.prune:Prune",
    "prune-structured": "polaris_opt.passes.prune_structured:PruneStructured",
    "lower": "polaris_opt.passes.lower:Lower",
    "merge-sibling-matmuls": "polaris_opt.passes.merge_sibling_matmuls:MergeSiblingMatMuls",
    "sparsify": "polaris_opt.passes.sparsify:Sparsify",
}

# An alias names a sequence of passes; it is printed back as written and expanded when run.
ALIASES: dict[str, str] = {
    # Constants first so folding sees every weight; identity before batchnorm folding so a
    # Conv -> Identity -> BatchNormalization chain still folds; dead code after everything
    # that leaves orphans; shapes last, on the final graph.
    "cleanup": "lift-constants,fold-constants,eliminate-identity,fold-batchnorm,"
    "eliminate-dead-code,infer-shapes",
}


def load_pass(name: str) -> type[Pass]:
    """The class registered under `name`; KeyError when there is none."""
    module_name, class_name = PASSES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
