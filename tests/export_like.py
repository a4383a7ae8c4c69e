"""Test models that look like what real exporters write, for the passes to be tested on.

Each builder returns `(model, feeds)`: an opset-17 model that passes `onnx.checker` and feeds
(input name -> array) for ONNX Runtime. They reproduce exporter habits that clean-up and
rewrite passes must cope with: torch.onnx's Shape->Gather->Concat flatten and Identity
nodes, paddle2onnx's weights in Constant nodes, tf2onnx's NHWC transposes and Cast-ed
constants, control flow with outer-scope references, and ops from other domains.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Built = tuple[onnx.ModelProto, dict[str, np.ndarray]]
FLOAT, BOOL, INT64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64

# --- helpers: names are given as space-separated strings (no exporter name has a space) ----


def node(op: str, inputs: str, outputs: str, name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs.split(), outputs.split(), name=name, **attrs)


def torch_node(op: str, name: str, inputs: str, **attrs) -> onnx.NodeProto:
    """A node named like torch.onnx does, whose output is `<name>_output_0`."""
    return node(op, inputs, f"{name}_output_0", name, **attrs)


def tensor(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def constant(output: str, value, name: str = "") -> onnx.NodeProto:
    """A Constant node holding `value` (also how paddle2onnx and tf2onnx store weights)."""
    return helper.make_node("Constant", [], [output], name=name or output, value=tensor(output, value))


def info(name: str, dims: list, elem_type: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, dims)


def make_model(graph: onnx.GraphProto, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", 17)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    # IR 8: what opset 17 needs and what every ONNX Runtime the project supports loads.
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def bn_params(rng: np.random.Generator, c: int) -> list[np.ndarray]:
    """scale, bias, mean, var: all non-trivial so a wrong fold changes the numbers."""
    uniform = rng.uniform(0.5, 1.5, (2, c)).astype(np.float32)
    return [uniform[0], normal(rng, c, scale=0.1), normal(rng, c, scale=0.1), uniform[1]]


# --- exporters -------------------------------------------------------------------------------


def pytorch_like(seed: int = 0) -> Built:
    """Conv-BN-ReLU, `x.view(x.size(0), -1)` as torch.onnx spells it, Identity nodes, a dead
    branch and a Linear, with torch's node and tensor names."""
    rng = np.random.default_rng(seed)
    bn_names = [f"bn.{f}" for f in ("weight", "bias", "running_mean", "running_var")]
    inits = [
        tensor("conv.weight", normal(rng, 4, 3, 3, 3, scale=0.3)),
        tensor("conv.bias", normal(rng, 4, scale=0.1)),
        tensor("fc.weight", normal(rng, 10, 256, scale=0.06)),
        tensor("fc.bias", normal(rng, 10, scale=0.1)),
        *(tensor(n, v) for n, v in zip(bn_names, bn_params(rng, 4), strict=True)),
    ]
    nodes = [
        torch_node("Conv", "/conv/Conv", "input conv.weight conv.bias", kernel_shape=[3, 3], pads=[1] * 4),
        torch_node(
            "BatchNormalization",
            "/bn/BatchNormalization",
            " ".join(["/conv/Conv_output_0", *bn_names]),
            epsilon=1e-5,
            momentum=0.9,
        ),
        torch_node("Relu", "/relu/Relu", "/bn/BatchNormalization_output_0"),
        # Dropout in eval mode, as older exporters wrote it.
        torch_node("Identity", "/dropout/Identity", "/relu/Relu_output_0"),
        # Dead branch: computed, never used (an auxiliary head left in the graph).
        torch_node("Sigmoid", "/aux/Sigmoid", "/relu/Relu_output_0"),
        # x.view(x.size(0), -1)
        torch_node("Shape", "/Shape", "/dropout/Identity_output_0"),
        constant("/Constant_output_0", np.int64(0), "/Constant"),
        torch_node("Gather", "/Gather", "/Shape_output_0 /Constant_output_0", axis=0),
        constant("/Constant_1_output_0", np.array([0], np.int64), "/Constant_1"),
        torch_node("Unsqueeze", "/Unsqueeze", "/Gather_output_0 /Constant_1_output_0"),
        constant("/Constant_2_output_0", np.array([-1], np.int64), "/Constant_2"),
        torch_node("Concat", "/Concat", "/Unsqueeze_output_0 /Constant_2_output_0", axis=0),
        torch_node("Reshape", "/Reshape", "/dropout/Identity_output_0 /Concat_output_0"),
        # A shared weight reached through an Identity, as torch.onnx emits for tied params.
        node("Identity", "fc.weight", "onnx::Gemm_21", "Identity_0"),
        node("Gemm", "/Reshape_output_0 onnx::Gemm_21 fc.bias", "output", "/fc/Gemm", transB=1),
    ]
    inputs, outputs = [info("input", ["batch", 3, 8, 8])], [info("output", ["batch", 10])]
    graph = helper.make_graph(nodes, "main_graph", inputs, outputs, inits)
    return make_model(graph), {"input": normal(rng, 2, 3, 8, 8)}


def paddle_like(seed: int = 0) -> Built:
    """paddle2onnx style: every weight in a Constant node, `p2o.<Op>.<n>` node names."""
    rng = np.random.default_rng(seed)
    bn_names = [f"batch_norm_0.{s}" for s in ("w_0", "b_0", "w_1", "w_2")]
    nodes = [
        constant("conv2d_0.w_0", normal(rng, 4, 3, 3, 3, scale=0.3), "p2o.Constant.0"),
        constant("conv2d_0.b_0", normal(rng, 4, scale=0.1), "p2o.Constant.1"),
        node(
            "Conv",
            "x conv2d_0.w_0 conv2d_0.b_0",
            "conv2d_1.tmp_1",
            "p2o.Conv.0",
            kernel_shape=[3, 3],
            pads=[1] * 4,
        ),
        *(
            constant(name, value, f"p2o.Constant.{2 + i}")
            for i, (name, value) in enumerate(zip(bn_names, bn_params(rng, 4), strict=True))
        ),
        node(
            "BatchNormalization",
            " ".join(["conv2d_1.tmp_1", *bn_names]),
            "batch_norm_0.tmp_2",
            "p2o.BatchNormalization.0",
            epsilon=1e-5,
        ),
        node("Relu", "batch_norm_0.tmp_2", "relu_0.tmp_0", "p2o.Relu.0"),
        node("Identity", "relu_0.tmp_0", "relu_0.tmp_0.identity", "p2o.Identity.0"),
        constant("p2o.Constant.6.out", np.array([-1, 256], np.int64), "p2o.Constant.6"),
        node("Reshape", "relu_0.tmp_0.identity p2o.Constant.6.out", "reshape2_0.tmp_0", "p2o.Reshape.0"),
        constant("linear_0.w_0", normal(rng, 256, 10, scale=0.06), "p2o.Constant.7"),
        constant("linear_0.b_0", normal(rng, 10, scale=0.1), "p2o.Constant.8"),
        node("MatMul", "reshape2_0.tmp_0 linear_0.w_0", "linear_1.tmp_0", "p2o.MatMul.0"),
        node("Add", "linear_1.tmp_0 linear_0.b_0", "linear_1.tmp_1", "p2o.Add.0"),
        node("Softmax", "linear_1.tmp_1", "softmax_0.tmp_0", "p2o.Softmax.0", axis=-1),
        node("Identity", "softmax_0.tmp_0", "save_infer_model/scale_0.tmp_0", "p2o.Identity.1"),
    ]
    inputs = [info("x", ["batch", 3, 8, 8])]
    outputs = [info("save_infer_model/scale_0.tmp_0", ["batch", 10])]
    graph = helper.make_graph(nodes, "paddle-model", inputs, outputs)
    return make_model(graph), {"x": normal(rng, 2, 3, 8, 8)}


def tf2onnx_like(seed: int = 0) -> Built:
    """tf2onnx style: NHWC in and out, HWIO conv weights transposed at run time, Cast-ed
    constants, an Identity chain, batch norm already folded into Mul/Add, Squeeze at the end."""
    rng = np.random.default_rng(seed)
    kernel, bias = "model/conv2d/Conv2D/ReadVariableOp", "model/conv2d/BiasAdd/ReadVariableOp"
    nodes = [
        node("Transpose", "input_1", "Transpose__6:0", "Transpose__6", perm=[0, 3, 1, 2]),
        constant(f"{kernel}:0", normal(rng, 3, 3, 3, 4, scale=0.3), kernel),  # HWIO, as TF keeps it
        node("Transpose", f"{kernel}:0", "Transpose__8:0", "Transpose__8", perm=[3, 2, 0, 1]),  # -> OIHW
        constant(f"{bias}:0", rng.standard_normal(4) * 0.1, bias),  # float64 in the graph...
        node("Cast", f"{bias}:0", "Cast__10:0", "Cast__10", to=FLOAT),  # ...cast at run time
        node(
            "Conv",
            "Transpose__6:0 Transpose__8:0 Cast__10:0",
            "model/conv2d/BiasAdd:0",
            "model/conv2d/BiasAdd",
            kernel_shape=[3, 3],
            pads=[1] * 4,
            strides=[1, 1],
        ),
        node("Identity", "model/conv2d/BiasAdd:0", "Identity__11:0", "Identity__11"),
        node("Identity", "Identity__11:0", "Identity__12:0", "Identity__12"),
        node("Relu", "Identity__12:0", "model/conv2d/Relu:0", "model/conv2d/Relu"),
        node("Transpose", "model/conv2d/Relu:0", "Transpose__14:0", "Transpose__14", perm=[0, 2, 3, 1]),
        # Batch norm folded at export: x * scale + shift on the channel (last) axis.
        constant("model/bn/mul:0", rng.uniform(0.5, 1.5, 4).astype(np.float32), "model/bn/mul/Const"),
        node("Mul", "Transpose__14:0 model/bn/mul:0", "model/bn/mul_1:0", "model/bn/mul_1"),
        constant("model/bn/sub:0", normal(rng, 4, scale=0.1), "model/bn/sub/Const"),
        node("Add", "model/bn/mul_1:0 model/bn/sub:0", "model/bn/add_1:0", "model/bn/add_1"),
        node("ReduceMean", "model/bn/add_1:0", "model/pool/Mean:0", "model/pool/Mean", axes=[1, 2]),
        constant("Squeeze__20/axes:0", np.array([1, 2], np.int32), "Squeeze__20/axes"),
        node("Cast", "Squeeze__20/axes:0", "Cast__21:0", "Cast__21", to=INT64),
        node("Squeeze", "model/pool/Mean:0 Cast__21:0", "output_0", "Squeeze__20"),
    ]
    inputs, outputs = [info("input_1", ["batch", 8, 8, 3])], [info("output_0", ["batch", 4])]
    graph = helper.make_graph(nodes, "tf2onnx", inputs, outputs)
    return make_model(graph), {"input_1": normal(rng, 2, 8, 8, 3)}


# --- control flow and foreign domains ------------------------------------------------------


def branch(prefix: str, const_value: float, combine: str) -> onnx.GraphProto:
    """If branch: Identity(x), a Constant, Add of the outer-scope initializer `bias`."""
    p = prefix
    nodes = [
        node("Identity", "x", f"{p}_x", f"{p}/Identity"),
        constant(f"{p}_c", np.float32(const_value), f"{p}/Constant"),
        node("Add", f"{p}_x bias", f"{p}_sum", f"{p}/Add"),
        node(combine, f"{p}_sum {p}_c", f"{p}_out", f"{p}/{combine}_1"),
    ]
    return helper.make_graph(nodes, f"{p}_branch", [], [info(f"{p}_out", ["batch", 4])])


def with_if(seed: int = 0) -> Built:
    """y = Relu(If(cond, then: x + bias + 1, else: (x + bias) * 2)), cond a bool graph input."""
    rng = np.random.default_rng(seed)
    nodes = [
        node(
            "If",
            "cond",
            "if_out",
            "If_0",
            then_branch=branch("then", 1.0, "Add"),
            else_branch=branch("else", 2.0, "Mul"),
        ),
        node("Relu", "if_out", "y", "Relu_0"),
    ]
    inputs = [info("x", ["batch", 4]), info("cond", [], BOOL)]
    graph = helper.make_graph(
        nodes, "with_if", inputs, [info("y", ["batch", 4])], [tensor("bias", normal(rng, 4))]
    )
    return make_model(graph), {"x": normal(rng, 2, 4), "cond": np.array(True)}


def with_loop(seed: int = 0) -> Built:
    """Loop, 3 trips: acc += 0.5 (a Constant in the body); also scans out every acc."""
    rng = np.random.default_rng(seed)
    body_nodes = [
        node("Identity", "cond_in", "cond_out", "body/Identity"),
        constant("step", np.full(4, 0.5, np.float32), "body/Constant"),
        node("Add", "acc_in step", "acc_out", "body/Add"),
        node("Identity", "acc_out", "scan_out", "body/Identity_1"),
    ]
    body_inputs = [info("iter", [], INT64), info("cond_in", [], BOOL), info("acc_in", ["batch", 4])]
    body_outputs = [info("cond_out", [], BOOL), info("acc_out", ["batch", 4]), info("scan_out", ["batch", 4])]
    body = helper.make_graph(body_nodes, "loop_body", body_inputs, body_outputs)
    loop = node("Loop", "trip_count keep_going x", "y trace", "Loop_0", body=body)
    outputs = [info("y", ["batch", 4]), info("trace", [3, "batch", 4])]
    inits = [tensor("trip_count", np.int64(3)), tensor("keep_going", np.array(True))]
    graph = helper.make_graph([loop], "with_loop", [info("x", ["batch", 4])], outputs, inits)
    return make_model(graph), {"x": normal(rng, 2, 4)}


def with_unknown_domains(seed: int = 0, custom: bool = True) -> Built:
    """com.microsoft FusedMatMul and Gelu (ONNX Runtime runs them) and, unless
    custom=False, a `my.custom.Foo` no runtime knows; passes must leave both alone."""
    rng = np.random.default_rng(seed)
    ms = "com.microsoft"
    nodes = [
        node("FusedMatMul", "x w", "mm", "FusedMatMul_0", domain=ms, alpha=1.0, transA=0, transB=1),
        node("Gelu", "mm", "gelu", "Gelu_0", domain=ms),
        node("Relu", "gelu", "y", "Relu_0"),
    ]
    outputs = [info("y", ["batch", 8])]
    opsets = {ms: 1}
    if custom:
        nodes.append(node("Foo", "gelu", "foo", "Foo_0", domain="my.custom", mode="fast"))
        outputs.append(info("foo", ["batch", 8]))
        opsets["my.custom"] = 1
    inits = [tensor("w", normal(rng, 8, 8, scale=0.35))]
    graph = helper.make_graph(nodes, "with_unknown_domains", [info("x", ["batch", 8])], outputs, inits)
    return make_model(graph, opsets), {"x": normal(rng, 2, 8)}
