"""polaris_opt.runtime.Session: partitioning, host/device placement, threads, and bad feeds.

The mixed model interleaves standard ops with SparseMatMul nodes (csr fp32 + bias + relu, bsr
fp16, sell int8) built by hand as docs/OPS.md specifies; its dense twin holds the same weights
(`to_dense`) as MatMul/Add/Relu, so ONNX Runtime on the twin is the reference. Device tests
skip cleanly when the machine has no OpenCL device.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from polaris_opt.errors import BadInput
from polaris_opt.numerics import make_session, relative_error, run_model
from polaris_opt.runtime import Session, TensorArg, scheduler
from polaris_opt.runtime.partition import OrtStep, partition
from polaris_opt.sparse.formats import from_dense, to_dense

MODELS = Path(__file__).resolve().parent.parent / "models"
RNG = np.random.default_rng(5)


# ------------------------------------------------------------------------------ the models


def sparse_weight(n: int, k: int, density: float = 0.3) -> np.ndarray:
    w = RNG.standard_normal((n, k)).astype(np.float32)
    w[RNG.random((n, k)) > density] = 0.0
    return w


def sparse_matmul(name, x, y, w, fmt, *, bias=None, activation="none", values="fp32"):
    """A SparseMatMul node built by hand, its initializers, and the dense W it stores."""
    matrix = from_dense(w, fmt, values=values, block=(4, 4), slice_height=8)
    arrays = {"data": matrix.data, "indices": matrix.indices, "indptr": matrix.indptr}
    inputs = [x, *(f"{name}.{key}" for key in arrays)]
    if bias is not None or matrix.scale is not None:
        arrays["bias"] = bias
        inputs.append(f"{name}.bias" if bias is not None else "")
    if matrix.scale is not None:
        arrays["scale"] = matrix.scale
        inputs.append(f"{name}.scale")
    attrs = {"format": fmt, "shape": list(w.shape), "activation": activation}
    attrs |= {"block": list(matrix.block)} if fmt == "bsr" else {}
    attrs |= {"slice_height": matrix.slice_height} if fmt == "sell" else {}
    node = helper.make_node("SparseMatMul", inputs, [y], name=name, domain="ai.polaris", **attrs)
    weights = [numpy_helper.from_array(a, f"{name}.{key}") for key, a in arrays.items() if a is not None]
    return node, weights, to_dense(matrix)


def dense_matmul(name, x, y, w, *, bias=None, activation="none"):
    """The standard-ONNX twin of `sparse_matmul`: MatMul by Wᵀ, Add bias, Relu."""
    nodes = [helper.make_node("MatMul", [x, f"{name}.wt"], [f"{name}.mm" if bias is not None else y])]
    weights = [numpy_helper.from_array(np.ascontiguousarray(w.T), f"{name}.wt")]
    if bias is not None:
        after_add = f"{name}.add" if activation == "relu" else y
        nodes.append(helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [after_add]))
        weights.append(numpy_helper.from_array(bias, f"{name}.b"))
    if activation == "relu":
        nodes.append(helper.make_node("Relu", [f"{name}.add"], [y]))
    return nodes, weights


def make_model(nodes, weights, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.polaris", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def mixed_models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x → MatMul → Tanh → SMM(csr, bias, relu) = s2 → SMM(bsr fp16) → Softmax = y → SMM(sell int8) = z."""
    w1 = RNG.standard_normal((64, 48)).astype(np.float32)
    bias2 = RNG.standard_normal(40).astype(np.float32)
    smm2, w2_init, w2 = sparse_matmul(
        "smm2", "t", "s2", sparse_weight(40, 48), "csr", bias=bias2, activation="relu"
    )
    smm3, w3_init, w3 = sparse_matmul("smm3", "s2", "s3", sparse_weight(24, 40), "bsr", values="fp16")
    smm4, w4_init, w4 = sparse_matmul("smm4", "y", "z", sparse_weight(20, 24, 0.5), "sell", values="int8")
    head = [helper.make_node("MatMul", ["x", "w1"], ["m"]), helper.make_node("Tanh", ["m"], ["t"])]
    softmax = helper.make_node("Softmax", ["s3"], ["y"], axis=-1)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", size])
        for name, size in (("y", 24), ("s2", 40), ("z", 20))
    ]
    w1_init = numpy_helper.from_array(w1, "w1")
    mixed = make_model(
        [*head, smm2, smm3, softmax, smm4], [w1_init, *w2_init, *w3_init, *w4_init], inputs, outputs
    )
    d2, d2_init = dense_matmul("smm2", "t", "s2", w2, bias=bias2, activation="relu")
    d3, d3_init = dense_matmul("smm3", "s2", "s3", w3)
    d4, d4_init = dense_matmul("smm4", "y", "z", w4)
    dense = make_model(
        [*head, *d2, *d3, softmax, *d4], [w1_init, *d2_init, *d3_init, *d4_init], inputs, outputs
    )
    return mixed, dense


MIXED, DENSE = mixed_models()


def fan_out_models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x → Tanh = t → SMM(csr) = a and SMM(csr) = b: two polaris steps in a row read one upload."""
    nodes, weights, dense_nodes, dense_weights = [helper.make_node("Tanh", ["x"], ["t"])], [], [], []
    for name, rows in (("a", 24), ("b", 16)):
        node, initializers, w = sparse_matmul(f"smm_{name}", "t", name, sparse_weight(rows, 64), "csr")
        nodes.append(node)
        weights += initializers
        twin, twin_weights = dense_matmul(f"smm_{name}", "t", name, w)
        dense_nodes += twin
        dense_weights += twin_weights
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", r]) for n, r in (("a", 24), ("b", 16))
    ]
    return make_model(nodes, weights, inputs, outputs), make_model(
        [nodes[0], *dense_nodes], dense_weights, inputs, outputs
    )


FAN_OUT, FAN_OUT_DENSE = fan_out_models()


def feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, 64), dtype=np.float32)}


def assert_matches_dense(outputs: list[np.ndarray], x: dict[str, np.ndarray]) -> None:
    expected = run_model(DENSE, x)
    for name, got in zip(("y", "s2", "z"), outputs, strict=True):
        assert got.shape == expected[name].shape and got.dtype == np.float32
        assert relative_error(expected[name], got) <= 1e-4, name


@pytest.fixture(scope="module")
def device_available() -> bool:
    from polaris_opt.cl_env import open_env

    return open_env() is not None


@pytest.fixture(scope="module")
def device_session(device_available) -> Session:
    if not device_available:
        pytest.skip("no OpenCL device")
    return Session(MIXED, placement="device")


@pytest.fixture(scope="module")
def host_session() -> Session:
    return Session(MIXED, placement="host")


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("batch", [1, 5])
def test_host_placement_equals_ort_on_the_dense_model(host_session, batch):
    trace = []
    outputs = host_session.run(None, feeds(batch), trace=trace)
    assert_matches_dense(outputs, feeds(batch))
    assert [(r.op_type, r.placement) for r in trace] == [
        ("onnxruntime", "onnxruntime"),
        ("SparseMatMul", "host"),
        ("SparseMatMul", "host"),
        ("onnxruntime", "onnxruntime"),
        ("SparseMatMul", "host"),
    ]


@pytest.mark.parametrize("batch", [1, 5, 33])
def test_device_placement_equals_ort_and_host(device_session, host_session, batch):
    trace = []
    on_device = device_session.run(None, feeds(batch, seed=batch), trace=trace)
    assert_matches_dense(on_device, feeds(batch, seed=batch))
    assert [r.placement for r in trace if r.op_type == "SparseMatMul"] == ["device"] * 3
    on_host = host_session.run(None, feeds(batch, seed=batch))
    for device_value, host_value in zip(on_device, on_host, strict=True):
        assert relative_error(host_value, device_value) <= 1e-5


class CopySpy:
    """Records every pyopencl.enqueue_copy: (direction, host shape, blocking, device buffer address)."""

    def __init__(self, monkeypatch):
        import pyopencl as cl

        self.copies: list[tuple[str, tuple, bool, int]] = []
        self._copy = cl.enqueue_copy
        monkeypatch.setattr(cl, "enqueue_copy", self)

    def __call__(self, queue, dest, src, **kwargs):
        import pyopencl as cl

        upload = isinstance(dest, cl.Buffer)
        host, device = (src, dest) if upload else (dest, src)
        self.copies.append(
            ("up" if upload else "down", host.shape, kwargs.get("is_blocking", True), device.int_ptr)
        )
        return self._copy(queue, dest, src, **kwargs)

    def of(self, direction: str) -> list[tuple[tuple, bool, int]]:
        return [copy[1:] for copy in self.copies if copy[0] == direction]


def test_activations_stay_on_the_device_between_polaris_nodes(device_session, monkeypatch):
    spy = CopySpy(monkeypatch)
    device_session.run(None, feeds(3))
    # Up: t (into smm2) and y (into smm4), neither waited for. Down: s3 (Softmax reads it), then
    # s2 and z (the caller's) read together: one wait, on the last.
    assert [(shape, blocking) for shape, blocking, _ in spy.of("up")] == [((3, 48), False), ((3, 24), False)]
    downs = [(shape, blocking) for shape, blocking, _ in spy.of("down")]
    assert downs == [((3, 24), True), ((3, 40), False), ((3, 20), True)]


def test_uploads_reuse_the_threads_staging_arrays_across_runs(device_session, monkeypatch):
    spy = CopySpy(monkeypatch)
    for seed in (1, 2):
        assert_matches_dense(device_session.run(None, feeds(3, seed)), feeds(3, seed))
    first, second = spy.of("up")[:2], spy.of("up")[2:]
    assert [address for *_, address in first] == [address for *_, address in second]
    # a new batch size remakes them, and the results stay right
    assert_matches_dense(device_session.run(None, feeds(6, 3)), feeds(6, 3))
    assert_matches_dense(device_session.run(None, feeds(3, 4)), feeds(3, 4))


def test_consecutive_runs_never_overwrite_earlier_results(device_session):
    first = device_session.run(None, feeds(4, seed=10))
    kept = [value.copy() for value in first]
    second = device_session.run(None, feeds(4, seed=11))
    assert_matches_dense(first, feeds(4, seed=10))
    assert_matches_dense(second, feeds(4, seed=11))
    for before, after, other in zip(kept, first, second, strict=True):
        assert np.array_equal(before, after)  # not rewritten by the second run
        assert not np.array_equal(after, other)
        assert not np.shares_memory(after, other)


def test_concurrent_runs_from_four_threads(device_available):
    session = Session(MIXED, placement="device" if device_available else "host")
    batches = [1, 3, 8, 17]
    expected = {b: run_model(DENSE, feeds(b, seed=b)) for b in batches}
    failures: list[str] = []

    def worker(batch: int) -> None:
        for _ in range(10):
            y, s2, z = session.run(None, feeds(batch, seed=batch))
            for name, got in (("y", y), ("s2", s2), ("z", z)):
                if relative_error(expected[batch][name], got) > 1e-4:
                    failures.append(f"batch {batch} output {name}")

    threads = [threading.Thread(target=worker, args=(b,)) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


@pytest.mark.parametrize("model, dense", [(MIXED, DENSE), (FAN_OUT, FAN_OUT_DENSE)], ids=["mixed", "fan-out"])
def test_concurrent_runs_of_one_shape_keep_their_own_buffers(device_available, model, dense):
    """Four threads, one shape (so shared buffers would collide), new inputs every run. In the
    fan-out model two launches read one upload, with the device lock released in between."""
    if not device_available:
        pytest.skip("no OpenCL device")
    session = Session(model, placement="device")
    seeds = {thread: [100 * thread + i for i in range(12)] for thread in range(4)}
    expected = {seed: run_model(dense, feeds(5, seed)) for run in seeds.values() for seed in run}
    results: dict[int, list] = {}
    start = threading.Barrier(4)

    def worker(thread: int) -> None:
        start.wait()
        results[thread] = [session.run(None, feeds(5, seed)) for seed in seeds[thread]]

    threads = [threading.Thread(target=worker, args=(t,)) for t in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for thread, run_seeds in seeds.items():
        for seed, outputs in zip(run_seeds, results[thread], strict=True):
            for name, got in zip(expected[seed], outputs, strict=True):
                assert relative_error(expected[seed][name], got) <= 1e-4, (thread, seed, name)


def test_auto_placement_follows_the_cost_model(device_available, monkeypatch):
    if not device_available:
        pytest.skip("no OpenCL device")
    slow_host = scheduler.Machine(gflops=1e-6, bandwidth_gbs=1e-6, call_seconds=1.0)
    monkeypatch.setattr(scheduler, "measured_host", lambda: slow_host)
    session = Session(MIXED, placement="auto")
    trace = []
    assert_matches_dense(session.run(None, feeds(4), trace=trace), feeds(4))
    assert [r.placement for r in trace if r.op_type == "SparseMatMul"] == ["device"] * 3
    fast_host = scheduler.Machine(gflops=1e9, bandwidth_gbs=1e9, call_seconds=0.0)
    monkeypatch.setattr(scheduler, "measured_host", lambda: fast_host)
    trace = []
    assert_matches_dense(session.run(None, feeds(4), trace=trace), feeds(4))
    assert [r.placement for r in trace if r.op_type == "SparseMatMul"] == ["host"] * 3


def test_no_device_runs_on_the_host_and_warns_once(monkeypatch, caplog):
    import polaris_opt.cl_env
    from polaris_opt.runtime import session as session_module

    monkeypatch.setattr(polaris_opt.cl_env, "open_env", lambda spec=None: None)
    monkeypatch.setattr(session_module, "_warned_no_device", False)
    with caplog.at_level(logging.WARNING):
        sessions = [Session(MIXED), Session(MIXED)]
    warnings = [r for r in caplog.records if "no OpenCL device" in r.getMessage()]
    assert len(warnings) == 1
    trace = []
    assert_matches_dense(sessions[1].run(None, feeds(2), trace=trace), feeds(2))
    assert {r.placement for r in trace} == {"onnxruntime", "host"}
    with pytest.raises(BadInput, match="no OpenCL device"):
        Session(MIXED, placement="device")


def qmatmul_model(w_q, w_scale, bias, x_scale, x_zero_point) -> onnx.ModelProto:
    """x → Tanh → QMatMul(static x_scale / x_zero_point, relu) → y: five constant inputs."""
    arrays = {"w_q": w_q, "w_scale": w_scale, "bias": bias, "x_scale": x_scale, "x_zp": x_zero_point}
    weights = [numpy_helper.from_array(np.asarray(a), name) for name, a in arrays.items()]
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("QMatMul", ["t", *arrays], ["y"], domain="ai.polaris", activation="relu"),
    ]
    n, k = w_q.shape
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])]
    return make_model(
        nodes, weights, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])]
    )


@pytest.mark.parametrize("placement", ["host", "device"])
def test_qmatmul_through_the_session_follows_the_contract(device_available, placement):
    from polaris_opt.runtime.launchers import LAUNCHERS

    if placement == "device" and not (device_available and "QMatMul" in LAUNCHERS):
        pytest.skip("no OpenCL device or no QMatMul launcher registered")
    w_q = RNG.integers(-127, 128, (12, 20)).astype(np.int8)
    w_scale = RNG.uniform(0.01, 0.02, 12).astype(np.float32)
    bias = RNG.standard_normal(12).astype(np.float32)
    x_scale, x_zero_point = np.float32(2 / 255), np.uint8(128)
    session = Session(qmatmul_model(w_q, w_scale, bias, x_scale, x_zero_point), placement=placement)
    x = RNG.standard_normal((3, 20), dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    # docs/OPS.md: x_q = clip(round(X / x_scale) + zp, 0, 255); acc = Σ (x_q − zp)·w_q in int32.
    x_q = np.clip(np.rint(np.tanh(x) / x_scale) + 128, 0, 255).astype(np.int32)
    acc = (x_q - 128) @ w_q.T.astype(np.int32)
    expected = np.maximum(acc * x_scale * w_scale + bias, 0)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- the ORT side


@pytest.mark.parametrize("name", ["digits_cnn", "transformer_s"])
def test_a_standard_model_equals_ort_exactly(name):
    path = MODELS / f"{name}.onnx"
    with np.load(MODELS / f"{name}.input.npz") as archive:
        x = {key: archive[key] for key in archive.files}
    expected = make_session(onnx.load(path)).run(None, x)
    trace = []
    got = Session(path).run(None, x, trace=trace)
    assert len(got) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert [r.placement for r in trace] == ["onnxruntime"]


def test_inputs_and_outputs_are_described_like_ort(host_session):
    assert host_session.get_inputs() == [TensorArg("x", ["batch", 64], "tensor(float)")]
    assert host_session.get_outputs() == [
        TensorArg("y", ["batch", 24], "tensor(float)"),
        TensorArg("s2", ["batch", 40], "tensor(float)"),
        TensorArg("z", ["batch", 20], "tensor(float)"),
    ]
    ort_inputs = make_session(onnx.load(MODELS / "digits_mlp.onnx")).get_inputs()
    ours = Session(MODELS / "digits_mlp.onnx").get_inputs()
    assert [(a.name, a.shape, a.type) for a in ours] == [(a.name, a.shape, a.type) for a in ort_inputs]


def test_a_subset_of_outputs_runs_only_the_steps_it_needs(host_session):
    trace = []
    (s2,) = host_session.run(["s2"], feeds(2), trace=trace)
    assert relative_error(run_model(DENSE, feeds(2))["s2"], s2) <= 1e-4
    assert [r.op_type for r in trace] == ["onnxruntime", "SparseMatMul"]
    z, y = host_session.run(["z", "y"], feeds(2))
    expected = run_model(DENSE, feeds(2))
    assert relative_error(expected["z"], z) <= 1e-4 and relative_error(expected["y"], y) <= 1e-4


# ------------------------------------------------------------------------------ bad input

BAD_FEEDS = [
    ({}, "missing input 'x'; the model takes x float\\[batch, 64\\]"),
    ({"x": np.zeros((1, 64), np.float32), "w": np.zeros(1)}, "unknown input 'w'"),
    ({"x": np.zeros((1, 64), np.float64)}, "input 'x' is float64, the model expects float\\[batch, 64\\]"),
    ({"x": np.zeros((1, 63), np.float32)}, "input 'x' has shape \\[1, 63\\], the model expects"),
]


@pytest.mark.parametrize("bad, message", BAD_FEEDS)
def test_bad_feeds_are_one_line_errors(host_session, bad, message):
    with pytest.raises(BadInput, match=message) as raised:
        host_session.run(None, bad)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("bad, message", BAD_FEEDS[:2])
def test_bad_feeds_of_a_standard_model_are_one_line_errors(bad, message):
    session = Session(MODELS / "digits_mlp.onnx")
    with pytest.raises(BadInput, match=message.replace("x float", "input float").replace("'x'", "'input'")):
        session.run(None, {("input" if k == "x" else k): v for k, v in bad.items()})


def test_unknown_output_and_placement_are_refused(host_session):
    with pytest.raises(BadInput, match="unknown output 'nope'; the model gives y float"):
        host_session.run(["nope"], feeds(1))
    with pytest.raises(BadInput, match="unknown output 'nope'"):
        Session(MODELS / "digits_mlp.onnx").run(["nope"], {"input": np.zeros((1, 64), np.float32)})
    with pytest.raises(BadInput, match="placement must be one of auto, device, host"):
        Session(MIXED, placement="gpu")


def test_unknown_polaris_op_is_refused():
    model = onnx.ModelProto()
    model.CopyFrom(MIXED)
    model.graph.node[2].op_type = "SparseFoo"
    with pytest.raises(BadInput, match="ai.polaris op 'SparseFoo', which this version does not know"):
        Session(model, placement="host")


# ------------------------------------------------------------------------------ partition


def test_partition_cuts_at_polaris_nodes_and_keeps_only_what_is_read_later():
    plan = partition(MIXED)
    kinds = [type(step).__name__ for step in plan.steps]
    assert kinds == ["OrtStep", "PolarisStep", "PolarisStep", "OrtStep", "PolarisStep"]
    first, softmax = plan.steps[0], plan.steps[3]
    assert isinstance(first, OrtStep) and first.inputs == ("x",) and first.outputs == ("t",)
    assert [t.name for t in first.model.graph.initializer] == ["w1"]
    assert isinstance(softmax, OrtStep) and softmax.inputs == ("s3",) and softmax.outputs == ("y",)
    assert plan.graph_inputs == ("x",) and plan.graph_outputs == ("y", "s2", "z")


def test_partition_merges_independent_standard_branches():
    """File order SMM1, Relu, SMM2, Add would give four steps; the sort gives three."""
    w = sparse_weight(8, 8)
    smm1, init1, dense1 = sparse_matmul("smm1", "x", "a", w, "csr")
    smm2, init2, dense2 = sparse_matmul("smm2", "a", "b", w, "csr")
    nodes = [smm1, helper.make_node("Relu", ["x"], ["r"]), smm2, helper.make_node("Add", ["b", "r"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8]) for n in ("x", "y")]
    model = make_model(nodes[::-1], [*init1, *init2], io[:1], io[1:])  # reversed: not sorted either
    plan = partition(model)
    assert [type(s).__name__ for s in plan.steps] == ["OrtStep", "PolarisStep", "PolarisStep", "OrtStep"]
    x = RNG.standard_normal((2, 8), dtype=np.float32)
    (y,) = Session(model, placement="host").run(None, {"x": x})
    np.testing.assert_allclose(y, (x @ dense1.T) @ dense2.T + np.maximum(x, 0), rtol=1e-5, atol=1e-5)


def test_weights_in_constant_nodes_and_outer_scope_reads_of_an_if():
    """The weight of the SMM comes from Constant nodes; an If branch reads the SMM's output."""
    w = sparse_weight(6, 5)
    node, weights, dense = sparse_matmul("smm", "x", "s", w, "csr")
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in weights]
    branch = helper.make_graph(
        [helper.make_node("Neg", ["s"], ["n"])],
        "neg",
        [],
        [helper.make_tensor_value_info("n", TensorProto.FLOAT, None)],
    )
    keep = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["k"])],
        "keep",
        [],
        [helper.make_tensor_value_info("k", TensorProto.FLOAT, None)],
    )
    branch_if = helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=keep)
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
    ]
    model = make_model(
        [*constants, node, branch_if],
        [],
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
    )
    plan = partition(model)
    assert [type(s).__name__ for s in plan.steps] == ["PolarisStep", "OrtStep"]  # Constant-only run is dead
    assert plan.steps[1].inputs == ("flag", "s")
    session = Session(model, placement="host")
    x = RNG.standard_normal((3, 5), dtype=np.float32)
    for flag, sign in ((True, -1.0), (False, 1.0)):
        (y,) = session.run(None, {"x": x, "flag": np.array(flag)})
        np.testing.assert_allclose(y, sign * (x @ dense.T), rtol=1e-5, atol=1e-6)


def test_polaris_node_inside_a_subgraph_is_refused():
    node, weights, _ = sparse_matmul("smm", "x", "s", sparse_weight(4, 4), "csr")
    body = helper.make_graph(
        [node], "b", [], [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)], initializer=weights
    )
    branch_if = helper.make_node("If", ["flag"], ["y"], then_branch=body, else_branch=body)
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
    ]
    model = make_model([branch_if], [], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    with pytest.raises(BadInput, match="inside an If/Loop/Scan body.*polaris-opt lower"):
        Session(model, placement="host")


# ------------------------------------------------------------------------------ scheduler


def test_roofline_estimates_by_hand():
    from polaris_opt.devices import PROFILES

    host = scheduler.Machine(gflops=100.0, bandwidth_gbs=10.0, call_seconds=10e-6)
    # A 1024x1024 GEMV on Polaris: memory-bound on both sides.
    guess = scheduler.estimate(
        (2e6, 4e6), (2e6, 8e6), upload_bytes=4096, download_bytes=0, profile=PROFILES["polaris"], host=host
    )
    device = max(2e6 / 6175e9, 4e6 / 256e9) + 20e-6 + (20e-6 + 4096 / 8e9)
    assert guess.device_seconds == pytest.approx(device)
    assert guess.host_seconds == pytest.approx(max(2e6 / 100e9, 8e6 / 10e9) + 10e-6)
    assert guess.placement == "device"
    # A tiny layer: the launch and the PCIe round trip cost more than NumPy does.
    tiny = scheduler.estimate(
        (2e3, 4e3), (2e3, 4e3), upload_bytes=64, download_bytes=0, profile=PROFILES["polaris"], host=host
    )
    assert tiny.placement == "host"
    # Inputs already on the device make the host pay for fetching them.
    fetched = scheduler.estimate(
        (2e3, 4e3), (2e3, 4e3), upload_bytes=0, download_bytes=10**6, profile=PROFILES["polaris"], host=host
    )
    assert fetched.host_seconds == pytest.approx(max(2e3 / 100e9, 4e3 / 10e9) + 10e-6 + 20e-6 + 1e6 / 8e9)
    # PoCL shares host memory: a transfer is a memcpy at the profile's bandwidth.
    assert scheduler.link_for(PROFILES["cpu"]).seconds(20_000) == pytest.approx(50e-6 + 20_000 / 20e9)
    assert scheduler.link_for(PROFILES["cpu"]).seconds(0) == 0.0


def test_host_work_counts_the_dense_product_the_references_do():
    smm = {"format": "csr", "shape": (40, 48)}
    assert scheduler.host_work("SparseMatMul", smm, {0: (2, 3, 48)}) == (
        2.0 * 6 * 40 * 48,
        4.0 * (2 * 40 * 48 + 6 * 48 + 6 * 40),
    )
    conv = {
        "shape": (8, 3 * 3 * 3),
        "kernel_shape": (3, 3),
        "pads": (1, 1, 1, 1),
        "strides": (2, 2),
        "dilations": (1, 1),
    }
    rows = 2 * 5 * 4  # X [2, 3, 9, 7]: OH = (9 + 2 - 3) // 2 + 1 = 5, OW = (7 + 2 - 3) // 2 + 1 = 4
    flops, moved = scheduler.host_work("SparseConv", conv, {0: (2, 3, 9, 7)})
    assert flops == 2.0 * rows * 8 * 27
    assert moved == 4.0 * (2 * 8 * 27 + rows * 27 + rows * 8) + 8.0 * rows * 27
    assert scheduler.host_work("QMatMul", {}, {0: (5, 16), 1: (12, 16), 2: (12,)})[0] == 2.0 * 5 * 12 * 16


def test_host_rates_are_measured_once():
    first = scheduler.measured_host()
    assert first is scheduler.measured_host()
    assert first.gflops > 0.1 and first.bandwidth_gbs > 0.1
