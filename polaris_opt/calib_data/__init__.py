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

The modules, by responsibility: base (InputSpec, CalibrationSource), batching (batch sizes,
checks, rows into batches), rows (RowSource), numpy_files and numpy_sources (.npy/.npz), images,
arrays, readers and spool (CalibrationDataReader), random_source, open (open_calibration).
"""

from __future__ import annotations

from polaris_opt.calib_data.arrays import ArraySource
from polaris_opt.calib_data.base import Batch, CalibrationSource, InputSpec, model_inputs
from polaris_opt.calib_data.batching import (
    Batching,
    check_finite,
    check_schema,
    limit_rows,
    plan_batching,
    regroup_rows,
    rows_in,
    slice_rows,
)
from polaris_opt.calib_data.images import (
    LAYOUTS,
    ImagePlan,
    ImageSource,
    ImageSpec,
    load_image,
    plan_image,
    preprocess_image,
)
from polaris_opt.calib_data.numpy_files import (
    NpyFile,
    NpyHeader,
    NpzFile,
    check_complete,
    numpy_kind,
    open_numpy_file,
    read_npy_header,
    read_rows,
)
from polaris_opt.calib_data.numpy_sources import FolderSource, NpzSource
from polaris_opt.calib_data.open import (
    IMAGE_SUFFIXES,
    NUMPY_SUFFIXES,
    open_calibration,
    open_folder,
    open_path,
)
from polaris_opt.calib_data.random_source import (
    RANDOM_WARNING,
    RandomSource,
    check_random_input,
    random_array,
)
from polaris_opt.calib_data.readers import ReaderSource
from polaris_opt.calib_data.rows import RowSource, hash_file

__all__ = [
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "NUMPY_SUFFIXES",
    "RANDOM_WARNING",
    "ArraySource",
    "Batch",
    "Batching",
    "CalibrationSource",
    "FolderSource",
    "ImagePlan",
    "ImageSource",
    "ImageSpec",
    "InputSpec",
    "NpyFile",
    "NpyHeader",
    "NpzFile",
    "NpzSource",
    "RandomSource",
    "ReaderSource",
    "RowSource",
    "check_complete",
    "check_finite",
    "check_random_input",
    "check_schema",
    "hash_file",
    "limit_rows",
    "load_image",
    "model_inputs",
    "numpy_kind",
    "open_calibration",
    "open_folder",
    "open_numpy_file",
    "open_path",
    "plan_batching",
    "plan_image",
    "preprocess_image",
    "random_array",
    "read_npy_header",
    "read_rows",
    "regroup_rows",
    "rows_in",
    "slice_rows",
]
