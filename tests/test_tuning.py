"""polaris_opt.tuning and `polaris-opt tune`: the cache round trip, corrupt files, the launcher's use
of a cached choice, and the CLI on PoCL's CPU device."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from polaris_opt import tuning
from polaris_opt.devices import list_devices

needs_opencl = pytest.mark.skipif(not list_devices(), reason="no OpenCL platform/device on this machine")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Every test gets its own $XDG_CACHE_HOME and forgets files loaded by earlier tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tuning.forget_loaded()
    yield tmp_path / "polaris-opt"
    tuning.forget_loaded()


def result(key_batch: str, best, ms=1.0, default_ms=2.0) -> tuning.TuneResult:
    kernel = tuning.kernel_key("cpu", "csr", "fp32")
    key = tuning.entry_key(kernel, key_batch, "k<=256")
    return tuning.TuneResult(key, kernel, key_batch, "k<=256", [], best, ms, default_ms)


def test_shape_classes():
    assert [tuning.batch_class(m) for m in (1, 2, 8, 9, 1000)] == [
        "batch 1",
        "batch<=8",
        "batch<=8",
        "batch>8",
        "batch>8",
    ]
    assert [tuning.k_bucket(k) for k in (1, 256, 257, 2048, 2049)] == [
        "k<=256",
        "k<=256",
        "k<=2048",
        "k<=2048",
        "k>2048",
    ]


def test_cache_round_trip(cache_home):
    path = tuning.cache_file("Dev X", "1.2", cache_home)
    assert path.parent == cache_home / "tune"
    tuning.save_results(path, "Dev X", "1.2", [result("batch>8", {"TILE_VECTORS": "2"})])
    tuning.save_results(path, "Dev X", "1.2", [result("batch 1", {"VEC_WIDTH": "4"})])  # merged
    entries = tuning.load_entries(path)
    assert entries == {
        "cpu/csr_fp32|batch>8|k<=256": {"TILE_VECTORS": "2"},
        "cpu/csr_fp32|batch 1|k<=256": {"VEC_WIDTH": "4"},
    }
    # the launcher's default winning removes an older override; no correct candidate keeps it
    tuning.save_results(path, "Dev X", "1.2", [result("batch>8", {}), result("batch 1", None)])
    assert tuning.load_entries(path) == {"cpu/csr_fp32|batch 1|k<=256": {"VEC_WIDTH": "4"}}
    assert json.loads(path.read_text())["device"] == "Dev X"
    # another driver version is another file
    assert tuning.cache_file("Dev X", "1.3", cache_home) != path


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"version": 99, "entries": {}}),
        json.dumps({"version": 1, "entries": {"k": {"defines": {"TILE_VECTORS": "64"}}}}),
        json.dumps([1, 2]),
    ],
)
def test_corrupt_cache_is_ignored_with_a_warning(cache_home, caplog, text):
    path = tuning.cache_file("Dev X", "1.2", cache_home)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="polaris_opt.tuning"):
        assert tuning.load_entries(path) == {}
    assert "ignoring the tuning cache" in caplog.text
    # saving over it replaces it with a valid file
    tuning.save_results(path, "Dev X", "1.2", [result("batch 1", {"VEC_WIDTH": "8"})])
    assert tuning.load_entries(path) == {"cpu/csr_fp32|batch 1|k<=256": {"VEC_WIDTH": "8"}}


@pytest.fixture(scope="module")
def env():
    from polaris_opt.cl_env import open_env

    return open_env()


def spmm_launcher(env, rng, k: int):
    from polaris_opt.runtime.launchers.sparse import SparseMatMul
    from polaris_opt.sparse import from_dense, to_dense

    w = rng.standard_normal((48, k)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    m = from_dense(w, "csr")
    attrs = {
        "format": "csr",
        "shape": list(m.shape),
        "block": [1, 1],
        "slice_height": 0,
        "activation": "none",
    }
    return SparseMatMul(env, attrs, {1: m.data, 2: m.indices, 3: m.indptr}), to_dense(m)


@needs_opencl
def test_launcher_uses_cached_choice(env, cache_home, monkeypatch):
    import pyopencl.array as cl_array

    k = 100
    path = tuning.cache_file(env.device.name, env.device.driver_version)
    kernel = tuning.kernel_key(env.profile.name, "csr", "fp32")
    results = [
        tuning.TuneResult(
            tuning.entry_key(kernel, "batch>8", "k<=256"),
            kernel,
            "batch>8",
            "k<=256",
            [],
            {"TILE_VECTORS": "2"},
            1,
            2,
        ),
        tuning.TuneResult(
            tuning.entry_key(kernel, "batch 1", "k<=256"),
            kernel,
            "batch 1",
            "k<=256",
            [],
            {"VEC_WIDTH": "4"},
            1,
            2,
        ),
    ]
    tuning.save_results(path, env.device.name, env.device.driver_version, results)
    built = []
    real_kernel = env.kernel
    monkeypatch.setattr(
        env,
        "kernel",
        lambda src, name, defines=None: (
            built.append((name, dict(defines or {}))) or real_kernel(src, name, defines)
        ),
    )
    rng = np.random.default_rng(0)
    launcher, dense = spmm_launcher(env, rng, k)
    assert ("csr_spmv_row", {**launcher.weight.defines, "VEC_WIDTH": "4"}) in built
    assert launcher.weight.tile_vectors(32) == 2  # the default at batch 32 is 4
    assert launcher.weight.tile_vectors(5) == 1  # no entry for batch<=8: the default
    for batch in (1, 32):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        y = launcher.launch({0: cl_array.to_device(env.queue, x)}).get()
        np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-5)
    assert any(name == "csr_spmm_tile" and d["TILE_VECTORS"] == "2" for name, d in built)


@needs_opencl
def test_launcher_without_cache_uses_defaults(env):
    launcher, _ = spmm_launcher(env, np.random.default_rng(1), 100)
    assert launcher.weight.tuned == {}
    if env.profile.row_per_work_item:
        assert launcher.weight.tile_vectors(32) == 4


@needs_opencl
def test_tune_keeps_a_correct_candidate(env):
    results = tuning.tune(env, quick=True, formats=("bsr",), values=("int8",))
    assert [r.batch for r in results] == list(tuning.BATCH_CLASSES)
    for r in results:
        assert r.key.startswith(f"{env.profile.name}/bsr_int8|")
        assert len(r.candidates) >= 3 and all(row["ok"] for row in r.candidates)
        assert r.best is not None and r.best_ms <= r.default_ms and r.best_ms > 0


@needs_opencl
def test_cli_writes_cache_and_prints_table(cache_home):
    from polaris_opt.cli import app

    out = CliRunner().invoke(app, ["tune", "--quick"])
    assert out.exit_code == 0, out.output
    assert "csr_fp32" in out.output and "batch<=8" in out.output and "cached in" in out.output
    files = list((cache_home / "tune").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["version"] == tuning.CACHE_VERSION


@needs_opencl
def test_cli_json_and_cache_dir(tmp_path):
    from polaris_opt.cli import app

    folder = tmp_path / "elsewhere"
    out = CliRunner().invoke(app, ["tune", "--quick", "--json", "--cache-dir", str(folder)])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert [row["batch"] for row in data["results"]] == list(tuning.BATCH_CLASSES)
    assert all(row["best"] is not None and row["speedup"] >= 1.0 for row in data["results"])
    assert data["cache_file"].startswith(str(folder / "tune"))
    document = json.loads(open(data["cache_file"]).read())
    chosen = {row["key"] for row in data["results"] if row["best"]}
    assert set(document["entries"]) == chosen
