"""Load and save ONNX models safely: external data checked, atomic writes, IR version clamped.

Models, like recipes and data, may come from strangers (DESIGN.md §10): external-data
locations that leave the model's folder are refused before anything is read, and a save
either leaves a complete file at the target or nothing at all.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from polaris_opt import __version__
from polaris_opt.errors import BadInput
from polaris_opt.proto import proto_graphs

MIN_OPSET = 11
# Protobuf cannot serialise a message above 2 GiB; beyond this, tensors must go to a side file.
PROTOBUF_LIMIT = 2**31 - 1
# Tensors smaller than this stay inside the .onnx file when saving with external data.
EXTERNAL_DATA_THRESHOLD = 1024
METADATA_VERSION_KEY = "polaris-opt.version"
METADATA_PIPELINE_KEY = "polaris-opt.pipeline"


# --------------------------------------------------------------------------------------- load


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, with its external data, refusing anything malformed or unsafe."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty file, not an ONNX model")
    model, problem = _read(path)
    _check_looks_like_model(model, path)
    if _has_external_data(model):
        if load_external_data:
            _load_external_data(model, path.parent)
        # Checked as bytes, the side files could not be found: check again where they can be.
        problem = _check_with_side_files(model, path)
    if problem is not None:
        raise BadInput(f"{path}: invalid ONNX model ({problem}); truncated or corrupt?")
    return model


def _read(path: Path) -> tuple[onnx.ModelProto, str | None]:
    """The model in `path`, and what onnx.checker finds wrong with it as read (None: nothing).

    A binary file is checked as read: checking the parsed model would serialise every weight
    once more. The caller reports the problem after its own checks of the parsed model, which
    say more about a file that is no model at all. A model importing ai.polaris is checked
    against that op set's schemas.
    """
    # Like onnx.load_model: a text format when the extension names one (.onnxtxt, .json).
    fmt = onnx.serialization.registry.get_format_from_file_extension(path.suffix) or "protobuf"
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data, format=fmt)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise BadInput(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from None
    # Parsed first so that the checker knows the ai.polaris schemas before it reads the model.
    register_polaris_schemas_for(model)
    return model, _checker_problem(data if fmt == "protobuf" else model)


def imports_polaris(model: onnx.ModelProto) -> bool:
    """Whether `model` imports the ai.polaris op set (its nodes may then use it)."""
    from polaris_opt.ops import DOMAIN

    return any(opset.domain == DOMAIN for opset in model.opset_import)


def register_polaris_schemas_for(model: onnx.ModelProto) -> None:
    """Give ONNX the ai.polaris schemas when `model` imports that op set, so onnx.checker checks
    its nodes fully instead of passing over an unknown domain (idempotent, cheap)."""
    if imports_polaris(model):
        from polaris_opt.ops import register_schemas

        register_schemas()


def _check_looks_like_model(model: onnx.ModelProto, path: Path) -> None:
    # Random bytes often parse as a protobuf with unknown fields; a model has opsets and a graph.
    if not model.opset_import or not model.HasField("graph"):
        raise BadInput(f"{path}: not an ONNX model (no graph or opset_import; truncated or wrong file?)")
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise BadInput(
            f"{path}: opset {opset} is older than {MIN_OPSET}, the oldest polaris-opt reads; "
            "upgrade it with onnx.version_converter.convert_version"
        )


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_model_tensors(model))


def _check_with_side_files(model: onnx.ModelProto, path: Path) -> str | None:
    # With its data loaded, a model under 2 GB is checked whole (payload sizes measured);
    # otherwise by path, where the checker finds the side files next to the model.
    if _has_external_data(model) or tensor_bytes(model) >= PROTOBUF_LIMIT:
        return _checker_problem(str(path))
    return _checker_problem(model)


def _checker_problem(model: onnx.ModelProto | bytes | str) -> str | None:
    """The first line of what onnx.checker finds wrong with `model`; None when nothing."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:  # ValueError: bytes that do not parse
        return str(exc).strip().splitlines()[0]
    return None


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a graph and its sub-graphs: initializers, sparse parts, attributes."""
    for g in proto_graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            yield from _attribute_tensors(node)


def iter_model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from iter_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    base = base_dir.resolve()
    for tensor in iter_model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        fields = _external_fields(tensor)
        data_path = _safe_external_path(fields.get("location", ""), base, tensor.name)
        offset = int(fields.get("offset", 0))
        length = int(fields["length"]) if "length" in fields else data_path.stat().st_size - offset
        if offset < 0 or length < 0 or offset + length > data_path.stat().st_size:
            raise BadInput(
                f"tensor '{tensor.name}': external data range {offset}+{length} lies beyond the "
                f"end of {data_path.name} ({data_path.stat().st_size} bytes); truncated data file?"
            )
        with open(data_path, "rb") as handle:
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _safe_external_path(location: str, base: Path, tensor_name: str) -> Path:
    if not location:
        raise BadInput(f"tensor '{tensor_name}': external data without a location")
    candidate = Path(location)
    # A crafted model could point at /etc/shadow or ../../secret; never read outside its folder.
    resolved = (base / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(base):
        raise BadInput(
            f"tensor '{tensor_name}': external data location '{location}' is outside the "
            "model's folder; refused"
        )
    if not resolved.is_file():
        raise BadInput(f"tensor '{tensor_name}': external data file '{location}' is missing")
    return resolved


# --------------------------------------------------------------------------------------- save


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor payload held in the proto (cheap: no serialisation)."""
    total = 0
    for tensor in iter_model_tensors(model):
        total += len(tensor.raw_data) or _typed_field_bytes(tensor)
    return total


def _typed_field_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
        return 0
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def check_output_path(output: str | os.PathLike, *, input_path=None, force: bool = False) -> Path:
    """Refuse an output we cannot write, or one that is the input, before any work is done."""
    output = Path(output)
    if output.is_dir():
        raise BadInput(f"{output}: is a folder; give a file name for the output model")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"{output}: cannot write, folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BadInput(f"{output}: cannot write, folder {parent} is not writable")
    if input_path is not None and output.exists() and not force:
        if output.resolve() == Path(input_path).resolve():
            raise BadInput(f"{output}: refusing to overwrite the input model; pass --force to do so")
    return output


@functools.cache
def max_ir_version_for_ort() -> int:
    """The newest IR version the installed ONNX Runtime loads (onnx may write newer ones)."""
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", MIN_OPSET)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for ir_version in range(onnx.IR_VERSION, 6, -1):
        probe.ir_version = ir_version
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return ir_version
        except Exception:  # noqa: BLE001 - ORT raises its own types; any failure means "too new"
            continue
    return 7


def stamp_metadata(model: onnx.ModelProto, pipeline: str | None) -> None:
    """Record who made the file and how, replacing an earlier polaris-opt stamp."""
    keep = [p for p in model.metadata_props if not p.key.startswith("polaris-opt.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.helper.set_model_props(
        model,
        {**{p.key: p.value for p in keep}, METADATA_VERSION_KEY: __version__}
        | ({METADATA_PIPELINE_KEY: pipeline} if pipeline is not None else {}),
    )


def save_model(
    model: onnx.ModelProto,
    output: str | os.PathLike,
    *,
    pipeline: str | None = None,
    external_data: bool | None = None,
    input_path=None,
    force: bool = False,
) -> Path:
    """Write `model` atomically: a complete file appears at `output`, or nothing changes.

    `external_data=None` decides by size (side file above protobuf's 2 GiB limit). The IR version
    is lowered to what the installed ONNX Runtime loads; `pipeline` goes into metadata_props.
    """
    output = check_output_path(output, input_path=input_path, force=force)
    if external_data is None:
        external_data = tensor_bytes(model) >= PROTOBUF_LIMIT
    parent = output.parent if str(output.parent) else Path(".")
    try:
        with tempfile.TemporaryDirectory(dir=parent, prefix=f".{output.name}.") as staging:
            staged = Path(staging) / output.name
            data_name = f"{output.name}.data" if external_data else None
            with _stamped(model, pipeline):
                _write_staged(model, staged, data_name)
            # Data first, then the model that points at it: a reader never sees a dangling model.
            # Tensors under the size threshold stay inline, so there may be no side file.
            if data_name and (Path(staging) / data_name).exists():
                os.replace(Path(staging) / data_name, parent / data_name)
            os.replace(staged, output)
    except OSError as exc:
        raise BadInput(f"{output}: cannot write ({exc.strerror or exc})") from None
    return output


@contextmanager
def _stamped(model: onnx.ModelProto, pipeline: str | None) -> Iterator[None]:
    """`model` as `save_model` writes it while open, as it was afterwards.

    Stamping the caller's model and undoing it spares a copy of every weight.
    """
    scalars = ("ir_version", "producer_name", "producer_version")
    header = onnx.ModelProto()  # what stamping changes, each field set or unset as in `model`
    for name in scalars:
        if model.HasField(name):
            setattr(header, name, getattr(model, name))
    header.metadata_props.extend(model.metadata_props)
    try:
        model.ir_version = min(model.ir_version or onnx.IR_VERSION, max_ir_version_for_ort())
        model.producer_name = "polaris-opt"
        model.producer_version = __version__
        stamp_metadata(model, pipeline)
        yield
    finally:
        for name in (*scalars, "metadata_props"):
            model.ClearField(name)
        model.MergeFrom(header)


def _write_staged(model: onnx.ModelProto, staged: Path, data_name: str | None) -> None:
    if data_name is None:
        with open(staged, "wb") as handle:
            handle.write(model.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        return
    # onnx.save_model moves the weights out of the model it is given into the side file.
    to_write = onnx.ModelProto()
    to_write.CopyFrom(model)
    onnx.save_model(
        to_write,
        str(staged),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=EXTERNAL_DATA_THRESHOLD,
    )


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 0
