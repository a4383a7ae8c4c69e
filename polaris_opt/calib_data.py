"""Calibration data: where the batches that calibration, GPTQ and analysis run on come from.

Every source yields batches as `{input name: array}` with a leading batch dimension, checked
against the model's declared inputs (DESIGN.md §8). `open_calibration` turns what a user gives
into a source:

    "random"                  RandomSource   seeded noise, marked untrustworthy
    data.npz                  NpzSource      input name -> array, read a batch at a time
    data.npy or a folder      FolderSource   sorted .npy/.npz files, rows collected across files
    a folder of images        ImageSource    decoded and preprocessed as an ImageSpec says
    {input name: array}       ArraySource
    an object with get_next   ReaderSource   ONNX Runtime's CalibrationDataReader protocol

Every source is a stream of rows: it reads a few rows at a time and `RowSource` regroups them
into batches, so memory holds about one batch whatever the number of samples. Bad data is
refused with one line naming the input, what the model expects and what was given, as early as
possible (NumPy headers are checked when the source opens). NumPy files are never unpickled
(DESIGN.md §10).
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx

from polaris_opt.errors import BadInput

Batch = dict[str, np.ndarray]

RANDOM_WARNING = (
    "calibrating on random data (--calib random): ranges and accuracy of the result are not trustworthy"
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"})
NUMPY_SUFFIXES = frozenset({".npy", ".npz"})
LAYOUTS = ("nchw", "nhwc")
_NPY_MAGIC = b"\x93NUMPY"
_HASH_BLOCK = 1 << 20


# --- What the model takes ------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """A model input as declared: dims are ints, or None where dynamic; `shape` is None when the
    model declares no rank at all."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: np.dtype

    def describe(self) -> str:
        """'float32 [batch, 1, 8, 8]': a dynamic first dim is the batch, later dynamic dims are '?'."""
        if self.shape is None:
            return f"{self.dtype.name} [any shape]"
        dims = [
            str(d) if d is not None else "batch" if axis == 0 else "?" for axis, d in enumerate(self.shape)
        ]
        return f"{self.dtype.name} [{', '.join(dims)}]"

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether data of `shape` (its first dim counts samples) has the declared rank and dims."""
        if self.shape is None:
            return len(shape) >= 1
        if len(shape) != len(self.shape):
            return False
        return all(d is None or d == given for d, given in zip(self.shape[1:], shape[1:], strict=True))


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers (those have defaults)."""
    weights = {t.name for t in model.graph.initializer}
    return [_input_spec(value) for value in model.graph.input if value.name not in weights]


def _input_spec(value: onnx.ValueInfoProto) -> InputSpec:
    if not value.type.HasField("tensor_type"):
        raise BadInput(f"model input '{value.name}' is not a tensor; calibration data can only feed tensors")
    tensor = value.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except KeyError:
        raise BadInput(
            f"model input '{value.name}' declares no element type; fix the model's inputs"
        ) from None
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return InputSpec(value.name, shape, dtype)


# --- The base of every source --------------------------------------------------------------


class CalibrationSource:
    """Base of every calibration source.

    `batches()` starts again from the first batch each time it is called, so several passes can
    read the same data. `fingerprint()` is a content hash for the statistics cache, or None
    when the data cannot be hashed (a Python reader), which turns caching off.
    """

    # False for `--calib random`: results computed from it are not to be trusted.
    trustworthy: bool = True

    def batches(self) -> Iterator[dict[str, np.ndarray]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        return None

    @property
    def num_batches(self) -> int | None:
        """How many batches `batches()` yields, when known (for progress bars)."""
        return None

    @property
    def num_samples(self) -> int | None:
        """How many samples the batches hold in all, when known."""
        return None

    @property
    def warnings(self) -> list[str]:
        """What the user should be told about this data (random data, samples left out)."""
        # Made on first use, so a subclass written elsewhere need not call a base __init__.
        return self.__dict__.setdefault("_warnings", [])

    def describe(self) -> str:
        """A short line for logs and reports: what the data is and how much of it."""
        return type(self).__name__


# --- Batching and checks -------------------------------------------------------------------


@dataclass(frozen=True)
class Batching:
    """How samples become batches: `rows` samples a batch, at most `limit` samples in all.

    `fixed` when the model declares a static batch dimension: every batch then holds exactly
    `rows` samples, and samples that do not fill a last batch are left out.
    """

    rows: int
    fixed: bool = False
    limit: int | None = None

    def used(self, samples: int) -> int:
        return samples if self.limit is None else min(samples, self.limit)

    def count(self, samples: int) -> int:
        """How many batches `samples` samples make."""
        used = self.used(samples)
        return used // self.rows if self.fixed else -(-used // self.rows)

    def dropped(self, samples: int) -> int:
        return self.used(samples) % self.rows if self.fixed else 0


def plan_batching(inputs: list[InputSpec], batch_size: int, limit: int | None) -> Batching:
    """Batches of `batch_size`, unless the model fixes its batch dimension, which then wins."""
    if batch_size < 1:
        raise BadInput(f"calibration batch size must be at least 1; got {batch_size}")
    if limit is not None and limit < 1:
        raise BadInput(f"calibration limit must be at least 1 sample; got {limit}")
    for spec in inputs:
        if spec.shape == ():
            raise BadInput(
                f"model input '{spec.name}' is a scalar; calibration batches need a batch dimension"
            )
    fixed = {spec.name: spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] is not None}
    sizes = set(fixed.values())
    if len(sizes) > 1 or (sizes and min(sizes) < 1):
        listed = ", ".join(f"'{name}' {size}" for name, size in fixed.items())
        raise BadInput(
            f"the model's inputs declare batch dimensions {listed}; calibration needs one batch size"
        )
    if sizes:
        return Batching(rows=sizes.pop(), fixed=True, limit=limit)
    return Batching(rows=batch_size, limit=limit)


def check_schema(inputs: list[InputSpec], given: Mapping[str, tuple[tuple, np.dtype]], where: str) -> int:
    """Check names, dtypes and shapes of `given` (name -> (shape, dtype)); return the number of samples."""
    expected = [spec.name for spec in inputs]
    for name in given:
        if name not in expected:
            raise BadInput(f"{where} has '{name}' but the model's inputs are: {', '.join(expected)}")
    for name in expected:
        if name not in given:
            held = ", ".join(f"'{n}'" for n in given) or "nothing"
            raise BadInput(f"{where} has no data for the model's input '{name}' (it holds {held})")
    for spec in inputs:
        shape, dtype = given[spec.name]
        if dtype != spec.dtype or not spec.fits(tuple(shape)):
            hint = f"; convert it with .astype(np.{spec.dtype.name})" if dtype != spec.dtype else ""
            raise BadInput(
                f"{where}: input '{spec.name}' expects {spec.describe()}, got {dtype} {tuple(shape)}{hint}"
            )
    samples = {name: shape[0] for name, (shape, _) in given.items()}
    if len(set(samples.values())) > 1:
        listed = ", ".join(f"'{name}' {count}" for name, count in samples.items())
        raise BadInput(
            f"{where}: arrays hold different numbers of samples ({listed}); the first dim counts them"
        )
    return next(iter(samples.values()))


def check_finite(batch: Batch, number: int, first: int, where: str) -> None:
    """NaN or Inf would poison every range computed from the batch: refuse it, saying where it is."""
    for name, array in batch.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            last = first + rows_in(batch) - 1
            raise BadInput(
                f"{where}: input '{name}' holds NaN or Inf in batch {number} "
                f"(samples {first}..{last}, counting from 0)"
            )


# --- Rows into batches ---------------------------------------------------------------------


def rows_in(chunk: Batch) -> int:
    return len(next(iter(chunk.values())))


def slice_rows(chunk: Batch, start: int, stop: int) -> Batch:
    return {name: array[start:stop] for name, array in chunk.items()}


def limit_rows(chunks: Iterable[Batch], limit: int | None) -> Iterator[Batch]:
    """The first `limit` rows of the chunks; stops pulling chunks as soon as it has them."""
    left = math.inf if limit is None else limit
    for chunk in chunks:
        count = rows_in(chunk)
        yield chunk if count <= left else slice_rows(chunk, 0, int(left))
        left -= min(count, left)
        if left == 0:
            return


def regroup_rows(chunks: Iterable[Batch], rows: int) -> Iterator[Batch]:
    """Batches of exactly `rows` rows from chunks of any size; the last may be smaller.

    At most one batch and one chunk are held at a time.
    """
    pending: deque[Batch] = deque()
    held = 0
    for chunk in chunks:
        if rows_in(chunk) == 0:
            continue
        pending.append(chunk)
        held += rows_in(chunk)
        while held >= rows:
            yield _take_rows(pending, rows)
            held -= rows
    if held:
        yield _take_rows(pending, held)


def _take_rows(pending: deque[Batch], count: int) -> Batch:
    parts = []
    while count:
        chunk = pending[0]
        size = rows_in(chunk)
        if size <= count:
            parts.append(pending.popleft())
            count -= size
        else:
            parts.append(slice_rows(chunk, 0, count))
            pending[0] = slice_rows(chunk, count, size)
            count = 0
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


class RowSource(CalibrationSource):
    """A source whose samples are rows of arrays.

    Subclasses stream chunks of rows from `_open_chunks()` and hash their content in
    `_hash_content()`; this class applies the limit, makes the batches, checks each for NaN/Inf,
    counts them and writes the fingerprint.
    """

    def __init__(
        self, inputs: list[InputSpec], batching: Batching, where: str, label: str, samples: int | None
    ):
        self.inputs = list(inputs)
        self.batching = batching
        self.where = where  # how errors name the data: "calibration data 'cal.npz'"
        self.label = label  # how describe() names it: "cal.npz"
        self._counts: tuple[int, int] | None = None  # (samples, batches) yielded by a full pass
        self._fingerprint: str | None = None
        if samples is not None:
            self._count(samples)

    def _count(self, samples: int) -> None:
        used, rows = self.batching.used(samples), self.batching.rows
        if used == 0:
            raise BadInput(f"{self.where} holds no samples")
        batches = self.batching.count(samples)
        if batches == 0:
            raise BadInput(self._too_few(used))
        if self.batching.dropped(samples):
            self._warn_dropped(self.batching.dropped(samples), used)
        self._counts = (min(used, batches * rows), batches)

    def _too_few(self, samples: int) -> str:
        rows = self.batching.rows
        return f"{self.where} has {samples} samples, fewer than the model's fixed batch size {rows}"

    def _warn_dropped(self, dropped: int, used: int) -> None:
        message = (
            f"{self.label}: {dropped} of {used} samples do not fill a batch of {self.batching.rows} "
            "(the model fixes its batch dimension) and are left out"
        )
        if message not in self.warnings:
            self.warnings.append(message)

    def batches(self) -> Iterator[Batch]:
        # The chunks open here, not on the first next(), so a reader that cannot rewind fails at once.
        return self._batched(self._open_chunks())

    def _open_chunks(self) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _batched(self, chunks: Iterator[Batch]) -> Iterator[Batch]:
        rows, fixed = self.batching.rows, self.batching.fixed
        samples = batches = 0
        for batch in regroup_rows(limit_rows(chunks, self.batching.limit), rows):
            if fixed and rows_in(batch) < rows:
                if batches == 0:
                    raise BadInput(self._too_few(rows_in(batch)))
                self._warn_dropped(rows_in(batch), samples + rows_in(batch))
                break
            batches += 1
            check_finite(batch, batches, samples, self.where)
            yield batch
            samples += rows_in(batch)
        if batches == 0:
            raise BadInput(f"{self.where} holds no samples")
        self._counts = (samples, batches)

    @property
    def num_batches(self) -> int | None:
        return self._counts[1] if self._counts else None

    @property
    def num_samples(self) -> int | None:
        return self._counts[0] if self._counts else None

    def describe(self) -> str:
        if self._counts is None:
            return f"{self.label}: batches of {self.batching.rows}"
        samples, batches = self._counts
        return f"{self.label}: {samples} samples in {batches} batches"

    def fingerprint(self) -> str | None:
        if self._fingerprint is None:
            digest = hashlib.sha256(self._settings().encode())
            self._hash_content(digest)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _settings(self) -> str:
        """Everything besides the content that changes the batches."""
        b = self.batching
        names = ",".join(spec.name for spec in self.inputs)
        return f"{type(self).__name__};inputs={names};rows={b.rows};fixed={b.fixed};limit={b.limit}"

    def _hash_content(self, digest: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def hash_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)


# --- NumPy files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NpyHeader:
    """What an .npy header declares; `stored` keeps the file's byte order."""

    shape: tuple[int, ...]
    stored: np.dtype
    fortran: bool

    @property
    def dtype(self) -> np.dtype:
        return self.stored.newbyteorder("=")

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.stored.itemsize


def read_npy_header(stream: IO[bytes], where: str) -> NpyHeader:
    """Read the header at the stream's position (leaving it at the data); refuse pickled objects."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} is not supported")
    except ValueError as exc:
        raise BadInput(f"{where} is not a readable NumPy array: {exc}") from None
    if dtype.hasobject:
        raise BadInput(
            f"{where} holds Python objects (dtype {dtype}); calibration data must be numeric arrays"
        )
    if not shape:
        raise BadInput(
            f"{where} is a single value; calibration arrays need a first dimension that counts samples"
        )
    return NpyHeader(tuple(shape), dtype, fortran)


def check_complete(header: NpyHeader, data_start: int, total_bytes: int, where: str) -> None:
    """Refuse a file shorter than its header says, before any batch is read from it."""
    if total_bytes < data_start + header.rows * header.row_bytes:
        raise BadInput(
            f"{where} is truncated: its header promises {header.rows} samples of {header.shape[1:]}"
        )


def read_rows(stream: IO[bytes], header: NpyHeader, count: int, where: str) -> np.ndarray:
    """The next `count` rows of a C-ordered array whose header has been read."""
    size = count * header.row_bytes
    try:
        data = stream.read(size)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise BadInput(f"{where} cannot be read: {exc}") from None
    if len(data) != size:
        raise BadInput(f"{where} is truncated: its header promises {header.rows} samples")
    rows = np.frombuffer(data, dtype=header.stored).reshape(count, *header.shape[1:])
    return rows if header.stored.isnative else rows.astype(header.dtype)


def numpy_kind(path: Path, where: str) -> str | None:
    """'npz', 'npy', or None when the file is neither, judged by its first bytes, not its name."""
    with open(path, "rb") as stream:
        head = stream.read(len(_NPY_MAGIC))
    if not head:
        raise BadInput(f"{where} is an empty file")
    if head.startswith(b"PK"):
        return "npz"
    return "npy" if head == _NPY_MAGIC else None


class NpzFile:
    """One .npz archive (np.savez or np.savez_compressed): headers read at once, rows on demand.

    Each member is read as a stream from the zip, `rows` rows at a time, so a 1 GB archive costs
    one batch of memory.
    """

    def __init__(self, path: Path, where: str):
        self.path, self.where = path, where
        self.headers = self._read_headers()
        self.rows = 0

    @staticmethod
    def _members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
        # np.savez names each array '<name>.npy'; np.load strips the suffix the same way.
        return {info.filename.removesuffix(".npy"): info for info in archive.infolist() if not info.is_dir()}

    def _read_headers(self) -> dict[str, NpyHeader]:
        headers = {}
        try:
            with zipfile.ZipFile(self.path) as archive:
                for name, info in self._members(archive).items():
                    with archive.open(info) as stream:
                        where = f"{self.where} array '{name}'"
                        headers[name] = read_npy_header(stream, where)
                        check_complete(headers[name], stream.tell(), info.file_size, where)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise BadInput(f"{self.where} is not a readable .npz archive: {exc}") from None
        if not headers:
            raise BadInput(f"{self.where} holds no arrays")
        for name, header in headers.items():
            if header.fortran and len(header.shape) > 1:
                raise BadInput(
                    f"{self.where} array '{name}' is stored in Fortran order, which cannot be read a batch "
                    "at a time; save np.ascontiguousarray(array) instead"
                )
        return headers

    def check(self, inputs: list[InputSpec]) -> int:
        given = {name: (h.shape, h.dtype) for name, h in self.headers.items()}
        self.rows = check_schema(inputs, given, self.where)
        return self.rows

    def chunks(self, rows: int) -> Iterator[Batch]:
        with zipfile.ZipFile(self.path) as archive, ExitStack() as stack:
            members = self._members(archive)
            streams = {name: stack.enter_context(archive.open(members[name])) for name in self.headers}
            for stream in streams.values():
                read_npy_header(stream, self.where)  # moves past the header, to the rows
            for start in range(0, self.rows, rows):
                count = min(rows, self.rows - start)
                yield {
                    name: read_rows(stream, self.headers[name], count, f"{self.where} array '{name}'")
                    for name, stream in streams.items()
                }


class NpyFile:
    """One .npy file for a model's only input, memory-mapped so only the rows asked for are read."""

    def __init__(self, path: Path, input_name: str, where: str):
        self.path, self.where = path, where
        with open(path, "rb") as stream:
            header = read_npy_header(stream, where)
            check_complete(header, stream.tell(), path.stat().st_size, where)
        self.headers = {input_name: header}
        self.rows = 0

    def check(self, inputs: list[InputSpec]) -> int:
        given = {name: (h.shape, h.dtype) for name, h in self.headers.items()}
        self.rows = check_schema(inputs, given, self.where)
        return self.rows

    def chunks(self, rows: int) -> Iterator[Batch]:
        if self.rows == 0:
            return  # an empty array has nothing to map
        ((name, header),) = self.headers.items()
        mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
        for start in range(0, self.rows, rows):
            # A plain, native-order copy of the rows: the batch, not the mapping, leaves this module.
            yield {name: np.array(mapped[start : start + rows], dtype=header.dtype)}


def open_numpy_file(path: Path, inputs: list[InputSpec]) -> NpzFile | NpyFile:
    where = f"calibration data '{path}'"
    kind = numpy_kind(path, where)
    if kind == "npz":
        return NpzFile(path, where)
    if kind is None:
        raise BadInput(f"{where} is not a NumPy .npy or .npz file")
    if len(inputs) != 1:
        names = ", ".join(spec.name for spec in inputs)
        raise BadInput(
            f"{where} is one array but the model has {len(inputs)} inputs ({names}); use .npz files"
        )
    return NpyFile(path, inputs[0].name, where)


class _NumpyFilesSource(RowSource):
    """Rows read in order from a list of .npy/.npz files, all checked when the source opens."""

    def __init__(self, files: list[NpzFile | NpyFile], inputs, batching, where: str, label: str):
        self.files = files
        samples = sum(f.check(inputs) for f in files)
        super().__init__(inputs, batching, where, label, samples)

    def _open_chunks(self) -> Iterator[Batch]:
        return (chunk for f in self.files for chunk in f.chunks(self.batching.rows))

    def _hash_content(self, digest: Any) -> None:
        for f in self.files:
            hash_file(digest, f.path)


class NpzSource(_NumpyFilesSource):
    """An .npz archive of input name -> array with a batch dimension."""

    def __init__(self, path: Path, inputs: list[InputSpec], batching: Batching):
        where = f"calibration data '{path}'"
        super().__init__([NpzFile(path, where)], inputs, batching, where, path.name)


class FolderSource(_NumpyFilesSource):
    """Sorted .npy/.npz files (or one .npy file); rows continue from one file into the next."""

    def __init__(self, label: str, paths: list[Path], inputs: list[InputSpec], batching: Batching):
        files = [open_numpy_file(path, inputs) for path in paths]
        super().__init__(files, inputs, batching, f"calibration data '{label}'", label)

    def _hash_content(self, digest: Any) -> None:
        for f in self.files:
            digest.update(f.path.name.encode() + b"\0")  # the order of files is the order of samples
            hash_file(digest, f.path)


# --- Images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """How a folder of images becomes model input. Each image goes through, in this order:

    1. decode with Pillow (the first frame);
    2. convert to RGB, or to grayscale (Pillow mode L: ITU-R 601-2 luma) when the model input
       has 1 channel, so grayscale files feed RGB models and colour files feed grayscale ones;
    3. resize with bilinear filtering to (width, height): `size` = (height, width), or, when
       `size` is None, the height and width the model input declares;
    4. convert to float32 and divide by 255, so values lie in [0, 1];
    5. subtract `mean` and divide by `std`, per channel, listed in RGB order (a single value
       applies to every channel);
    6. reverse the channels to BGR when `bgr`;
    7. lay out as channels, height, width for "nchw" or height, width, channels for "nhwc".

    The batch dimension comes first; values are cast to the model input's float dtype.
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "nchw"
    bgr: bool = False

    def __post_init__(self):
        # Recipes (JSON/YAML) give lists: keep tuples so specs compare and hash alike.
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.layout not in LAYOUTS:
            raise BadInput(f"image layout must be nchw or nhwc; got '{self.layout}'")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise BadInput(f"image size must be two positive numbers (height, width); got {self.size}")
        if not self.mean or not self.std or 0.0 in self.std:
            raise BadInput(
                f"image mean and std need a value per channel and no std of 0; got {self.mean}, {self.std}"
            )


@dataclass(frozen=True)
class ImagePlan:
    """An ImageSpec resolved against one model input: the exact array each image becomes."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str
    bgr: bool
    dtype: np.dtype


def plan_image(spec: ImageSpec, target: InputSpec) -> ImagePlan:
    """Resolve `spec` against the input; refuse sizes, channels or dtypes that cannot fit it."""
    where = f"calibration images for input '{target.name}' ({target.describe()})"
    if target.shape is None or len(target.shape) != 4:
        raise BadInput(f"{where}: images need a 4-D input, N C H W (nchw) or N H W C (nhwc)")
    if target.dtype.kind != "f":
        raise BadInput(f"{where}: images feed float inputs only; give .npz data instead")
    channel_axis, spatial = (1, (2, 3)) if spec.layout == "nchw" else (3, (1, 2))
    channels = target.shape[channel_axis] or 3  # a dynamic channel dim takes RGB
    if channels not in (1, 3):
        raise BadInput(
            f"{where}: {channels} channels at axis {channel_axis} ({spec.layout}); images give 1 or 3"
        )
    declared = tuple(target.shape[axis] for axis in spatial)
    if spec.size is None and None in declared:
        raise BadInput(
            f"{where}: the model does not fix the image height and width; give the size (--size HxW)"
        )
    height, width = spec.size or declared
    if any(d is not None and d != given for d, given in zip(declared, (height, width), strict=True)):
        raise BadInput(
            f"{where}: images resized to {height}x{width} do not fit; leave the size out or match it"
        )
    mean = _per_channel("mean", spec.mean, channels, where)
    std = _per_channel("std", spec.std, channels, where)
    return ImagePlan(height, width, channels, mean, std, spec.layout, spec.bgr, target.dtype)


def _per_channel(name: str, values: tuple[float, ...], channels: int, where: str) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise BadInput(f"{where}: the image {name} has {len(values)} values for {channels} channels")
    return values


def preprocess_image(image: Any, plan: ImagePlan) -> np.ndarray:
    """One PIL image as one sample (no batch dim), following ImageSpec's steps in order."""
    from PIL import Image

    image = image.convert("L" if plan.channels == 1 else "RGB")
    if image.size != (plan.width, plan.height):
        image = image.resize((plan.width, plan.height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    pixels = pixels.reshape(plan.height, plan.width, plan.channels)  # mode L has no channel axis
    pixels = (pixels - np.float32(plan.mean)) / np.float32(plan.std)
    if plan.bgr:
        pixels = pixels[:, :, ::-1]
    if plan.layout == "nchw":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=plan.dtype)


def load_image(path: Path, plan: ImagePlan) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return preprocess_image(image, plan)
    except (OSError, Image.DecompressionBombError) as exc:
        raise BadInput(f"calibration image '{path}' cannot be decoded: {exc}") from None


class ImageSource(RowSource):
    """Sorted image files of a folder for a one-input model, decoded as the batches are made."""

    def __init__(
        self, label: str, paths: list[Path], inputs: list[InputSpec], batching: Batching, spec: ImageSpec
    ):
        where = f"calibration images '{label}'"
        if len(inputs) != 1:
            names = ", ".join(s.name for s in inputs)
            raise BadInput(f"{where} can feed a model with one input; this one has {len(inputs)} ({names})")
        self.paths = paths
        self.target = inputs[0]
        self.plan = plan_image(spec, self.target)
        super().__init__(inputs, batching, where, label, len(paths))

    def _open_chunks(self) -> Iterator[Batch]:
        return ({self.target.name: load_image(path, self.plan)[None]} for path in self.paths)

    def _settings(self) -> str:
        return f"{super()._settings()};{self.plan}"

    def _hash_content(self, digest: Any) -> None:
        for path in self.paths:
            digest.update(path.name.encode() + b"\0")
            hash_file(digest, path)


# --- Arrays, readers and random data -------------------------------------------------------


class ArraySource(RowSource):
    """A dict of input name -> array with a batch dimension, sliced into batches."""

    def __init__(self, arrays: Mapping[str, Any], inputs: list[InputSpec], batching: Batching):
        self.arrays = {str(name): np.asarray(value) for name, value in arrays.items()}
        given = {name: (a.shape, a.dtype) for name, a in self.arrays.items()}
        samples = check_schema(inputs, given, "calibration data")
        super().__init__(inputs, batching, "calibration data", "arrays", samples)

    def _open_chunks(self) -> Iterator[Batch]:
        total = rows_in(self.arrays)
        return (
            slice_rows(self.arrays, start, start + self.batching.rows)
            for start in range(0, total, self.batching.rows)
        )

    def _hash_content(self, digest: Any) -> None:
        for name in sorted(self.arrays):
            array = self.arrays[name]
            digest.update(f"{name};{array.dtype.str};{array.shape}".encode())
            for chunk in self._open_chunks():
                digest.update(np.ascontiguousarray(chunk[name]).data)


class ReaderSource(RowSource):
    """An ONNX Runtime CalibrationDataReader: `get_next()` gives a dict of arrays, then None.

    Its rows are regrouped into batches like any other source's. A second `batches()` calls the
    reader's `rewind()`; a reader without one cannot be read twice. Its content cannot be hashed,
    so its statistics are never cached.
    """

    def __init__(self, reader: Any, inputs: list[InputSpec], batching: Batching):
        self.reader = reader
        self._read_before = False
        name = f"calibration reader {type(reader).__name__}"
        super().__init__(inputs, batching, name, name, None)

    def fingerprint(self) -> str | None:
        return None

    def _open_chunks(self) -> Iterator[Batch]:
        if self._read_before:
            rewind = getattr(self.reader, "rewind", None)
            if not callable(rewind):
                raise BadInput(
                    f"{self.where} cannot be read twice: give it a rewind() method that starts it again"
                )
            rewind()
        self._read_before = True
        return self._feeds()

    def _feeds(self) -> Iterator[Batch]:
        calls = 0
        while (feeds := self.reader.get_next()) is not None:
            calls += 1
            where = f"{self.where} (get_next() call {calls})"
            if not isinstance(feeds, Mapping):
                raise BadInput(
                    f"{where} returned a {type(feeds).__name__}; expected a dict of input name -> array"
                )
            arrays = {str(name): np.asarray(value) for name, value in feeds.items()}
            check_schema(self.inputs, {name: (a.shape, a.dtype) for name, a in arrays.items()}, where)
            yield arrays


class RandomSource(RowSource):
    """Seeded random data from the declared shapes, for trying a pipeline out; not trustworthy.

    Floats are standard normal, integers and booleans 0 or 1. The batch dimension takes the
    batch size; any other dynamic dimension takes 1.
    """

    trustworthy = False

    def __init__(self, inputs: list[InputSpec], batching: Batching, *, seed: int, batches: int):
        if batches < 1:
            raise BadInput(f"random calibration data needs at least 1 batch; got {batches}")
        for spec in inputs:
            check_random_input(spec)
        self.seed, self.count = seed, batches
        super().__init__(inputs, batching, "random calibration data", "random data", batches * batching.rows)
        self.warnings.append(RANDOM_WARNING)

    def _open_chunks(self) -> Iterator[Batch]:
        rng = np.random.default_rng(self.seed)  # a new stream per pass: every pass sees the same data
        rows = self.batching.rows
        return ({spec.name: random_array(rng, spec, rows) for spec in self.inputs} for _ in range(self.count))

    def _settings(self) -> str:
        return f"{super()._settings()};seed={self.seed};batches={self.count}"

    def _hash_content(self, digest: Any) -> None:
        for spec in self.inputs:  # the data follows from the seed and what the model declares
            digest.update(f"{spec.name};{spec.dtype.str};{spec.shape}".encode())

    def describe(self) -> str:
        return f"{super().describe()} (not trustworthy)"


def check_random_input(spec: InputSpec) -> None:
    if spec.shape is None:
        raise BadInput(
            f"input '{spec.name}' declares no shape, so random data cannot be drawn; give --calib DATA"
        )
    if spec.dtype.kind not in "fiub":
        raise BadInput(
            f"input '{spec.name}' is {spec.dtype}; random data covers numbers only: give --calib DATA"
        )


def random_array(rng: np.random.Generator, spec: InputSpec, rows: int) -> np.ndarray:
    shape = (rows, *(1 if d is None else d for d in spec.shape[1:]))
    if spec.dtype.kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    return rng.integers(0, 2, shape).astype(spec.dtype)


# --- Opening what the user gave ------------------------------------------------------------


def open_calibration(
    spec: Any,
    model: onnx.ModelProto,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    image: ImageSpec | None = None,
    seed: int = 0,
    random_batches: int = 8,
) -> CalibrationSource:
    """The calibration source `spec` describes, checked against `model`'s inputs.

    `spec`: "random"; a path (str or Path) to an .npz or .npy file, a folder of .npy/.npz files
    or a folder of images (preprocessed as `image` says); a dict of input name -> array; or any
    object with `get_next()` (ONNX Runtime's CalibrationDataReader). Batches hold `batch_size`
    samples, the last one fewer, unless the model fixes its batch dimension: then every batch
    has that size and samples that do not fill one are left out (said in `warnings`). `limit`
    caps the number of samples; `seed` and `random_batches` apply to "random" only.
    """
    inputs = model_inputs(model)
    if not inputs:
        raise BadInput("the model has no inputs to feed calibration data to")
    batching = plan_batching(inputs, batch_size, limit)
    if isinstance(spec, str) and spec == "random":
        source: CalibrationSource = RandomSource(inputs, batching, seed=seed, batches=random_batches)
    elif isinstance(spec, (str, os.PathLike)):
        source = open_path(Path(spec), inputs, batching, image or ImageSpec())
    elif isinstance(spec, Mapping):
        source = ArraySource(spec, inputs, batching)
    elif callable(getattr(spec, "get_next", None)):
        source = ReaderSource(spec, inputs, batching)
    else:
        raise BadInput(
            "calibration data must be 'random', a path, a dict of arrays or an object with get_next(); "
            f"got a {type(spec).__name__}"
        )
    if image is not None and not isinstance(source, ImageSource):
        source.warnings.append(
            "the image options (--size, --mean, --std, --layout, --bgr) are ignored: the data is not images"
        )
    return source


def open_path(path: Path, inputs: list[InputSpec], batching: Batching, image: ImageSpec) -> CalibrationSource:
    where = f"calibration data '{path}'"
    if not path.exists():
        raise BadInput(f"{where} does not exist")
    if path.is_dir():
        return open_folder(path, inputs, batching, image)
    kind = numpy_kind(path, where)
    if kind == "npz":
        return NpzSource(path, inputs, batching)
    if kind == "npy":
        return FolderSource(path.name, [path], inputs, batching)
    raise BadInput(f"{where} is not a NumPy .npz or .npy file; images are given as their folder")


def open_folder(
    folder: Path, inputs: list[InputSpec], batching: Batching, image: ImageSpec
) -> CalibrationSource:
    """NumPy files or images, in file-name order; hidden files (.DS_Store, ._x.png) are skipped."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    arrays = [p for p in files if p.suffix.lower() in NUMPY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    label = f"{folder.name}/"
    if arrays and images:
        raise BadInput(
            f"calibration folder '{folder}' holds both NumPy files and images; keep one kind per folder"
        )
    if arrays:
        return FolderSource(label, arrays, inputs, batching)
    if images:
        return ImageSource(label, images, inputs, batching, image)
    raise BadInput(f"calibration folder '{folder}' holds no .npy, .npz or image files")
