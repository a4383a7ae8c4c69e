"""Sources that read NumPy files: one .npz archive, or .npy/.npz files in file-name order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polaris_opt.calib_data.base import Batch, InputSpec
from polaris_opt.calib_data.batching import Batching
from polaris_opt.calib_data.numpy_files import NpyFile, NpzFile, open_numpy_file
from polaris_opt.calib_data.rows import RowSource, hash_files


class _NumpyFilesSource(RowSource):
    """Rows read in order from a list of .npy/.npz files, all checked when the source opens."""

    # Whether file names go into the fingerprint: they do where their order is the samples' order.
    _hash_names = False

    def __init__(
        self,
        files: list[NpzFile | NpyFile],
        inputs: list[InputSpec],
        batching: Batching,
        where: str,
        label: str,
    ):
        self.files = files
        samples = sum(f.check(inputs) for f in files)
        super().__init__(inputs, batching, where, label, samples)

    def _open_chunks(self) -> Iterator[Batch]:
        return (chunk for f in self.files for chunk in f.chunks(self.batching.rows))

    def _hash_content(self, digest: Any) -> None:
        hash_files(digest, (f.path for f in self.files), with_names=self._hash_names)


class NpzSource(_NumpyFilesSource):
    """An .npz archive of input name -> array with a batch dimension."""

    def __init__(self, path: Path, inputs: list[InputSpec], batching: Batching):
        where = f"calibration data '{path}'"
        super().__init__([NpzFile(path, where)], inputs, batching, where, path.name)


class FolderSource(_NumpyFilesSource):
    """Sorted .npy/.npz files (or one .npy file); rows continue from one file into the next."""

    _hash_names = True

    def __init__(self, label: str, paths: list[Path], inputs: list[InputSpec], batching: Batching):
        files = [open_numpy_file(path, inputs) for path in paths]
        super().__init__(files, inputs, batching, f"calibration data '{label}'", label)
