"""Reading .npy and .npz files a batch at a time, without unpickling anything (DESIGN.md §10).

Headers are read and checked when a file opens (dtype, shape, truncation), so bad data is refused
before any batch is made; rows are then read on demand: streamed from the zip for .npz members,
memory-mapped for .npy files.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from polaris_opt.calib_data.base import Batch, InputSpec, input_names
from polaris_opt.calib_data.batching import check_arrays
from polaris_opt.errors import BadInput

_NPY_MAGIC = b"\x93NUMPY"


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


class _NumpyFile(ABC):
    """A NumPy file whose headers are read: `check` them against the model, then read `chunks`."""

    path: Path
    where: str
    headers: dict[str, NpyHeader]
    rows: int = 0

    def check(self, inputs: list[InputSpec]) -> int:
        """Names, dtypes and shapes against the model's inputs; the number of samples."""
        self.rows = check_arrays(inputs, self.headers, self.where)
        return self.rows

    @abstractmethod
    def chunks(self, rows: int) -> Iterator[Batch]:  # pragma: no cover - abstract
        """The file's arrays, `rows` samples at a time."""


class NpzFile(_NumpyFile):
    """One .npz archive (np.savez or np.savez_compressed): headers read at once, rows on demand.

    Each member is read as a stream from the zip, `rows` rows at a time, so a 1 GB archive costs
    one batch of memory.
    """

    def __init__(self, path: Path, where: str):
        self.path, self.where = path, where
        self.headers = self._read_headers()

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


class NpyFile(_NumpyFile):
    """One .npy file for a model's only input, memory-mapped so only the rows asked for are read."""

    def __init__(self, path: Path, input_name: str, where: str):
        self.path, self.where = path, where
        with open(path, "rb") as stream:
            header = read_npy_header(stream, where)
            check_complete(header, stream.tell(), path.stat().st_size, where)
        self.headers = {input_name: header}

    def chunks(self, rows: int) -> Iterator[Batch]:
        if self.rows == 0:
            return  # an empty array has nothing to map
        ((name, header),) = self.headers.items()
        mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
        for start in range(0, self.rows, rows):
            # A plain, native-order copy of the rows: the batch, not the mapping, leaves this module.
            yield {name: np.array(mapped[start : start + rows], dtype=header.dtype)}


def open_numpy_file(path: Path, inputs: list[InputSpec]) -> NpzFile | NpyFile:
    """An .npz archive, or an .npy file when the model has one input; judged by content."""
    where = f"calibration data '{path}'"
    kind = numpy_kind(path, where)
    if kind == "npz":
        return NpzFile(path, where)
    if kind is None:
        raise BadInput(f"{where} is not a NumPy .npy or .npz file")
    if len(inputs) != 1:
        raise BadInput(
            f"{where} is one array but the model has {len(inputs)} inputs ({input_names(inputs)}); "
            "use .npz files"
        )
    return NpyFile(path, inputs[0].name, where)
