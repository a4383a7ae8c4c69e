"""A tiny graph builder that names things the way `torch.onnx.export` does.

Passes meet exporter-named graphs in the wild, so the zoo uses the same spelling:
node names are `<scope>/<OpType>` ("/layer1/0/conv1/Conv", "/Relu_1" for a repeat), node
outputs `<node name>_output_<i>`, and parameters the scope in dotted form plus a field
("layer1.0.conv1.weight").
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# onnx 1.23 would stamp a newer IR than older ONNX Runtime builds load; 8 is what opset 17 needs.
IR_VERSION = 8
PRODUCER = "polaris-opt-zoo"

Dim = int | str


def param_name(scope: str, field: str) -> str:
    """ "/layer1/0/conv1", "weight" -> "layer1.0.conv1.weight" (PyTorch state-dict spelling)."""
    prefix = scope.strip("/").replace("/", ".")
    return f"{prefix}.{field}" if prefix else field


def value_info(name: str, dims: Sequence[Dim], elem_type: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem_type, list(dims))


class GraphBuilder:
    """Collects nodes, initializers and graph inputs/outputs; `model()` checks and wraps them."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._taken: set[str] = set()

    def input(self, name: str, dims: Sequence[Dim], elem_type: int = TensorProto.FLOAT) -> str:
        self.inputs.append(value_info(name, dims, elem_type))
        return name

    def output(self, name: str, dims: Sequence[Dim], elem_type: int = TensorProto.FLOAT) -> str:
        self.outputs.append(value_info(name, dims, elem_type))
        return name

    def param(self, scope: str, field: str, value: np.ndarray) -> str:
        """Add an initializer named like a state-dict entry; returns its name."""
        name = param_name(scope, field)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        scope: str = "",
        *,
        outputs: Sequence[str] | None = None,
        domain: str | None = None,
        **attrs,
    ) -> str:
        """Add one node; returns its (first) output name. `outputs` overrides the default
        names, e.g. to give the graph output its public name."""
        name = self._unique(f"{scope}/{op_type}")
        outputs = list(outputs) if outputs else [f"{name}_output_0"]
        node = helper.make_node(op_type, list(inputs), outputs, name=name, domain=domain, **attrs)
        self.nodes.append(node)
        return outputs[0]

    def const(self, value: np.ndarray, scope: str = "") -> str:
        """A Constant node, which is how torch.onnx spells literal shapes and scalars."""
        return self.op("Constant", [], scope, value=numpy_helper.from_array(np.asarray(value)))

    def model(self, graph_name: str, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            doc_string=doc,
        )
        onnx.checker.check_model(model, full_check=True)
        return model

    def _unique(self, name: str) -> str:
        candidate, n = name, 0
        while candidate in self._taken:
            n += 1
            candidate = f"{name}_{n}"
        self._taken.add(candidate)
        return candidate


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers (weights, biases and BN statistics);
    integer shape constants are not parameters."""
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.data_type in floats)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like `np.savez`, but byte-reproducible: numpy stamps each zip member with the current
    time, which would make every rebuild of the zoo differ."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, buffer.getvalue())
