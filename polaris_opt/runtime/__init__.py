"""The runtime shim: run ai.polaris models with ONNX Runtime plus OpenCL kernels (DESIGN.md §6).

`Session` mirrors `onnxruntime.InferenceSession`; see polaris_opt/runtime/session.py.
"""

from __future__ import annotations

from polaris_opt.runtime.session import Session, StepRecord, TensorArg

__all__ = ["Session", "StepRecord", "TensorArg"]
