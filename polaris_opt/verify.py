"""Verification between passes: structure always, numerics on request (DESIGN.md §3).

The checks are calibrated on the input model first: if the input itself fails the strict
checker (many real exports do) or cannot run on ONNX Runtime, that check is relaxed or skipped
with a warning instead of blaming the first pass for a fault it did not cause.

A model holding ai.polaris nodes (after `sparsify`, say) is checked against that op set's
schemas, and run for numerics through polaris_opt.runtime.Session on the host: ONNX Runtime
runs the standard nodes and the NumPy references, the specification of each op, run the rest,
so a wrong SparseMatMul is caught whatever the device kernels would do.

Structure is checked on a skeleton (polaris_opt.export): the graph without the payloads of
its big weights, so checking copies none of them. Each payload left out is measured against
its dims and type once, the first time it is seen: passes give a weight new values rather
than edit its TensorProto in place, so a payload found sound stays sound.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from polaris_opt.errors import PassFailed
from polaris_opt.export import payloads_left_out, skeleton_model, tensor_problem, to_model
from polaris_opt.graph_io import PROTOBUF_LIMIT, register_polaris_schemas_for, tensor_bytes
from polaris_opt.numerics import compare_outputs, make_session, run_model, sample_inputs
from polaris_opt.runtime.partition import has_polaris_nodes

# The least output SQNR a lossy pass may leave under --verify numeric: below this the model no
# longer computes the same function (a broken scale, a wrong axis), whatever the precision.
LOSSY_FLOOR_DB = 10.0


class VerifyMode(str, enum.Enum):
    NONE = "none"  # trust the passes
    STRUCTURE = "structure"  # onnx.checker (+ strict shape inference where the input passes it)
    NUMERIC = "numeric"  # structure, then outputs compared with the input model's on sample inputs


@dataclass
class Verifier:
    mode: VerifyMode
    full_check: bool = True
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Payloads found sound, by id; holding them keeps their ids from passing to other tensors.
    sound_payloads: dict[int, onnx.TensorProto] = field(default_factory=dict)

    @classmethod
    def for_input(
        cls,
        model: onnx.ModelProto,
        graph: gs.Graph,
        mode: VerifyMode,
        feeds: dict[str, np.ndarray] | None = None,
        seed=0,
    ) -> Verifier:
        """A verifier calibrated on `model` and `graph`, its import, before any pass has run."""
        verifier = cls(mode)
        if mode is VerifyMode.NONE:
            return verifier
        skeleton = skeleton_model(graph, model)
        register_polaris_schemas_for(skeleton)
        verifier.full_check = _passes_full_check(skeleton, verifier.warnings)
        if mode is VerifyMode.NUMERIC and tensor_bytes(model) >= PROTOBUF_LIMIT:
            # The skeleton keeps structure checks cheap at any size; running the model in
            # ONNX Runtime from memory needs it serialised, which protobuf cannot above 2 GB.
            verifier.mode = VerifyMode.STRUCTURE
            verifier.warnings.append("model above 2 GB: numeric verification skipped, structure checked")
        elif mode is VerifyMode.NUMERIC:
            verifier._record_reference(model, feeds, seed)
        return verifier

    def _record_reference(self, model: onnx.ModelProto, feeds, seed: int) -> None:
        try:
            session = _open_session(model)
        except Exception as exc:  # noqa: BLE001 - ORT's error types are not public API
            self.mode = VerifyMode.STRUCTURE
            self.warnings.append(
                f"numeric verification skipped: the input does not run on {_runner(model)} ({exc})"
            )
            return
        self.feeds = feeds if feeds is not None else sample_inputs(session, seed=seed)
        self.reference = run_model(session, self.feeds)

    def check(
        self, graph: gs.Graph, template: onnx.ModelProto, pass_name: str, *, lossy: bool = False
    ) -> None:
        """Raise PassFailed naming `pass_name` when `graph` is no longer valid or equivalent.

        Structure is checked on a skeleton, which copies no big weight; the whole model is
        exported only to be run for numerics.
        """
        if self.mode is VerifyMode.NONE:
            return
        for payload in payloads_left_out(graph):
            self._check_payload(payload, pass_name)
        skeleton = skeleton_model(graph, template)
        register_polaris_schemas_for(skeleton)
        self._check_structure(skeleton, pass_name)
        if self.mode is VerifyMode.NUMERIC:
            self._check_numerics(to_model(graph, template), pass_name, lossy)

    def _check_structure(self, model: onnx.ModelProto, pass_name: str) -> None:
        try:
            onnx.checker.check_model(model, full_check=self.full_check)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise _no_longer_valid(pass_name, _first_line(exc)) from None

    def _check_payload(self, payload: onnx.TensorProto, pass_name: str) -> None:
        if id(payload) in self.sound_payloads:
            return
        problem = tensor_problem(payload)
        if problem is not None:
            raise _no_longer_valid(pass_name, problem)
        self.sound_payloads[id(payload)] = payload

    def _check_numerics(self, model: onnx.ModelProto, pass_name: str, lossy: bool) -> None:
        try:
            got = run_model(_open_session(model), self.feeds)
        except Exception as exc:  # noqa: BLE001
            raise PassFailed(
                pass_name, f"the graph no longer runs on {_runner(model)}: {_first_line(exc)}"
            ) from None
        if lossy:
            self._check_lossy(got, pass_name)
            return
        mismatches = compare_outputs(self.reference, got)
        if mismatches:
            raise PassFailed(pass_name, "outputs changed: " + "; ".join(map(str, mismatches)))

    def _check_lossy(self, got: dict[str, np.ndarray], pass_name: str) -> None:
        """A pass that rounds on purpose (quantization, FP16) must keep every output above
        LOSSY_FLOOR_DB of SQNR; its outputs then become the reference the later passes must keep."""
        from polaris_opt.fidelity import sqnr_db

        for name, ref in self.reference.items():
            if name not in got or got[name].shape != ref.shape:
                raise PassFailed(pass_name, f"outputs changed: output '{name}' is missing or reshaped")
            if ref.dtype.kind == "f" and sqnr_db(ref, got[name]) < LOSSY_FLOOR_DB:
                figure = sqnr_db(ref, got[name])
                raise PassFailed(
                    pass_name, f"output '{name}' SQNR {figure:.1f} dB is below {LOSSY_FLOOR_DB:g} dB"
                )
        self.reference = got


def _open_session(model: onnx.ModelProto):
    """An ONNX Runtime session for a standard model; for one holding ai.polaris nodes, a
    polaris_opt Session with every such node on the host, where its NumPy reference runs."""
    if has_polaris_nodes(model):
        from polaris_opt.runtime import Session

        return Session(model, placement="host")
    return make_session(model)


def _runner(model: onnx.ModelProto) -> str:
    """What `_open_session` runs `model` on, as error messages name it."""
    if has_polaris_nodes(model):
        return "ONNX Runtime with the ai.polaris host references"
    return "ONNX Runtime"


def _no_longer_valid(pass_name: str, problem: str) -> PassFailed:
    return PassFailed(pass_name, f"the graph no longer passes onnx.checker: {problem}")


def _passes_full_check(skeleton: onnx.ModelProto, warnings: list[str]) -> bool:
    # `skeleton` is the input as each pass's result is checked: exported from graphsurgeon.
    try:
        onnx.checker.check_model(skeleton, full_check=True)
        return True
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        warnings.append(
            f"the input fails strict shape inference ({_first_line(exc)}); checking structure only"
        )
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
