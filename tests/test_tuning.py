"""polaris_opt.tuning and `polaris-opt tune`: the cache round trip, corrupt files, the candidates, the
launchers' use of a cached choice (tile shape and work-group size), and the CLI on PoCL's CPU device."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from polaris_opt import tuning
from polaris_opt.devices import PROFILES, list_devices

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


def cache_text(defines: dict, version: int = tuning.CACHE_VERSION) -> str:
    return json.dumps({"version": version, "entries": {"cpu/csr_fp32|batch 1|k<=256": {"defines": defines}}})


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        json.dumps({"version": 99, "entries": {}}),
        cache_text({"TILE_VECTORS": "64"}),
        cache_text({"LOCAL_SIZE": "48"}),  # not a power of two
        cache_text({"LOCAL_SIZE": "4096"}),  # above the tuned set's 256
        cache_text({"LOCAL_SIZE": "64", "UNROLL": "2"}),  # a define the tuner never sets
        cache_text({"VEC_WIDTH": "4"}, version=1),  # measured before work-group sizes were tuned
        json.dumps([1, 2]),
    ],
    ids=["json", "version-99", "tile-64", "local-48", "local-4096", "unknown-define", "version-1", "list"],
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


def test_a_cached_local_size_above_the_device_limit_is_ignored(cache_home, caplog):
    path = tuning.cache_file("Dev X", "1.2", cache_home)
    path.parent.mkdir(parents=True)
    path.write_text(cache_text({"LOCAL_SIZE": "256"}))
    assert tuning.load_entries(path, max_local_size=256) == {
        "cpu/csr_fp32|batch 1|k<=256": {"LOCAL_SIZE": "256"}
    }
    with caplog.at_level(logging.WARNING, logger="polaris_opt.tuning"):
        assert tuning.load_entries(path, max_local_size=128) == {}
    assert "needs work-groups above this device's 128" in caplog.text


@pytest.mark.parametrize(
    "profile, most, sizes",
    [
        ("cpu", 4096, [16, 32, 64, 128, 256]),
        ("polaris", 1024, [64, 128, 256]),  # whole wave64 wavefronts
        ("rdna", 1024, [32, 64, 128, 256]),
        ("rdna", 128, [32, 64, 128]),  # never above the device's largest work-group
    ],
)
def test_local_size_candidates(profile, most, sizes):
    assert tuning.local_size_candidates(PROFILES[profile], most) == sizes
    near = tuning.local_size_candidates(PROFILES[profile], most, near=64)  # --quick
    assert near == [size for size in sizes if size in (32, 64, 128)]


def test_gemm_tiles_only_for_large_batches():
    assert tuning.gemm_tile_candidates("batch 1") == tuning.gemm_tile_candidates("batch<=8") == []
    assert [t["TILE_M"] for t in tuning.gemm_tile_candidates("batch>8")] == ["4", "8", "16"]


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


def cache_entries(env, kernel: str, chosen: dict[str, dict[str, str]], bucket: str = "k<=256") -> None:
    """Write `chosen` (batch class -> defines) for `kernel` into the device's cache file."""
    path = tuning.cache_file(env.device.name, env.device.driver_version)
    results = [
        tuning.TuneResult(tuning.entry_key(kernel, batch, bucket), kernel, batch, bucket, [], defines, 1, 2)
        for batch, defines in chosen.items()
    ]
    tuning.save_results(path, env.device.name, env.device.driver_version, results)


def recorded_launches(env, monkeypatch) -> list[tuple[str, int]]:
    """(kernel name, local size) of every launch on `env` from now on."""
    launches = []
    real = env.enqueue

    def enqueue(kernel, global_size, *args, **options):
        launches.append((kernel.function_name, env.local_size_of(kernel)))
        return real(kernel, global_size, *args, **options)

    monkeypatch.setattr(env, "enqueue", enqueue)
    return launches


def run(env, launcher, x: np.ndarray) -> np.ndarray:
    import pyopencl.array as cl_array

    return launcher.launch({0: cl_array.to_device(env.queue, x)}).get()


@needs_opencl
def test_sparse_launcher_uses_cached_choice(env, cache_home, monkeypatch):
    k = 100
    kernel = tuning.kernel_key(env.profile.name, "csr", "fp32")
    cache_entries(
        env,
        kernel,
        {
            "batch>8": {"TILE_VECTORS": "2", "LOCAL_SIZE": "128"},
            "batch 1": {"VEC_WIDTH": "4", "LOCAL_SIZE": "32"},
        },
    )
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
    spmv = "csr_spmv_row" if env.profile.row_per_work_item else "csr_spmv_vector"
    assert any(name == spmv and d["VEC_WIDTH"] == "4" and d["LOCAL_SIZE"] == "32" for name, d in built)
    assert launcher.weight.tile_vectors(32) == 2  # the default at batch 32 is 4
    assert launcher.weight.tile_vectors(5) == 1  # no entry for batch<=8: the default
    launches = recorded_launches(env, monkeypatch)
    for batch in (1, 32, 5):
        x = rng.standard_normal((batch, k)).astype(np.float32)
        np.testing.assert_allclose(run(env, launcher, x), x @ dense.T, rtol=1e-5, atol=1e-5)
    assert launches == [
        (spmv, 32),  # batch 1: the cached work-group size
        ("transpose", env.local_size),  # not tuned: the profile's
        ("csr_spmm_tile", 128),  # batch 32: batch>8's entry
        ("transpose", env.local_size),
        ("csr_spmm_tile", env.local_size),  # batch 5: no entry
    ]
    assert any(name == "csr_spmm_tile" and d["TILE_VECTORS"] == "2" for name, d in built)


@needs_opencl
def test_sparse_launcher_without_cache_uses_defaults(env):
    launcher, _ = spmm_launcher(env, np.random.default_rng(1), 100)
    assert launcher.weight.tuned == {}
    if env.profile.row_per_work_item:
        assert launcher.weight.tile_vectors(32) == 4


@needs_opencl
def test_quantized_launchers_use_cached_choice(env, cache_home):
    from polaris_opt.ops.reference import REFERENCES
    from polaris_opt.runtime.launchers.quant import MatMulInt4, QMatMul

    rng = np.random.default_rng(2)
    n, k = 24, 64
    w_q = rng.integers(-128, 128, (n, k), dtype=np.int8)
    w_scale = np.exp2(-rng.integers(4, 8, n)).astype(np.float32)  # exact epilogue: results equal
    constants = {1: w_q, 2: w_scale, 4: np.array(2.0**-4, np.float32), 5: np.array(7, np.uint8)}
    blob = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    int4 = {1: blob, 2: np.exp2(-rng.integers(2, 6, (n, k // 32))).astype(np.float32)}
    for name in ("qgemm_rows", "qgemm_wave", "matmul_int4_rows", "matmul_int4_wave"):
        cache_entries(
            env, tuning.kernel_key(env.profile.name, name), {"batch>8": {"TILE_M": "4", "LOCAL_SIZE": "16"}}
        )
    launchers = [
        (QMatMul(env, {}, constants), constants, {}),
        (MatMulInt4(env, {"K": k, "N": n, "block_size": 32}, int4), int4, {"K": k, "N": n, "block_size": 32}),
    ]
    for launcher, consts, attrs in launchers:
        gemm = launcher.gemm
        assert gemm.tile(32) == 4 and env.local_size_of(gemm.kernel(32)) == 16  # batch>8's entry
        assert gemm.tile(3) == 4 and env.local_size_of(gemm.kernel(3)) == env.local_size  # no entry
        for batch in (3, 32):
            x = rng.standard_normal((batch, k)).astype(np.float32)
            expected = REFERENCES[launcher.op_type](
                [x] + [consts.get(i) for i in range(1, max(consts) + 1)], attrs
            )
            np.testing.assert_allclose(run(env, launcher, x), expected, rtol=1e-5, atol=1e-5)


@needs_opencl
def test_spmm_candidates_skip_the_launchers_own_choice(env):
    problems = list(tuning.spmm_problems(env, np.random.default_rng(0), "csr", "fp32", "k<=256"))
    assert [p.batch for p in problems] == list(tuning.BATCH_CLASSES)
    for problem in problems:
        assert problem.key == f"{env.profile.name}/csr_fp32|{problem.batch}|k<=256"
        assert problem.expected.shape == (tuning.BATCH_CLASSES[problem.batch], tuning.ROWS)
    if env.profile.row_per_work_item:  # defaults: 8-wide vectors; 1 vector at batch 8, 4 at 32
        assert [p.tiles for p in problems] == [
            [{"VEC_WIDTH": "4"}],
            [{"TILE_VECTORS": "2"}, {"TILE_VECTORS": "4"}],
            [{"TILE_VECTORS": "1"}, {"TILE_VECTORS": "2"}],
        ]


@needs_opencl
def test_tune_keeps_a_correct_candidate(env):
    results = tuning.tune(env, quick=True, families=("spmm",), formats=("bsr",), values=("int8",))
    assert [r.batch for r in results] == list(tuning.BATCH_CLASSES)
    sizes = tuning.local_size_candidates(env.profile, env.device.max_work_group_size, near=env.local_size)
    for r in results:
        assert r.key.startswith(f"{env.profile.name}/bsr_int8|")
        assert all(row["ok"] and row["ms"] > 0 for row in r.candidates)
        timed_sizes = {
            int(row["defines"]["LOCAL_SIZE"]) for row in r.candidates if "LOCAL_SIZE" in row["defines"]
        }
        assert timed_sizes == set(sizes) - {env.local_size}
        assert r.best is not None and r.best_ms <= r.default_ms and r.best_ms > 0
        assert r.local_size == int(r.best.get("LOCAL_SIZE", env.local_size))


@needs_opencl
def test_a_work_group_size_a_kernel_cannot_run_is_skipped():
    # The device claims twice its real limit, so the candidate passes the device check and is
    # refused by the kernel's own limit, as a GPU kernel short of registers would be.
    env = tuning.open_tuning_env()
    most = env.device.max_work_group_size
    env.device = dataclasses.replace(env.device, max_work_group_size=2 * most)
    problem = next(tuning.qmatmul_problems(env, np.random.default_rng(3), "k<=256"))
    result = tuning.tune_one(env, problem, runs=2, sizes=[2 * most])
    assert result.candidates == [
        {"defines": {}, "ms": result.default_ms, "ok": True},
        {"defines": {"LOCAL_SIZE": str(2 * most)}, "ms": None, "ok": False},
    ]
    assert result.best == {} and result.local_size == env.local_size


@needs_opencl
def test_tune_the_quantized_gemms(env):
    results = tuning.tune(env, quick=True, families=("qmatmul", "int4"))
    rows = "rows" if env.profile.row_per_work_item else "wave"
    assert [r.kernel for r in results] == [f"{env.profile.name}/qgemm_{rows}"] * 3 + [
        f"{env.profile.name}/matmul_int4_{rows}"
    ] * 3
    for r in results:
        assert r.bucket == "k<=256" and r.best is not None
        assert all(row["ok"] for row in r.candidates)
        tile_ms = [row["defines"]["TILE_M"] for row in r.candidates if "TILE_M" in row["defines"]]
        assert (r.batch == "batch>8") == bool(tile_ms)


@needs_opencl
def test_cli_writes_cache_and_prints_table(cache_home):
    from polaris_opt.cli import app

    out = CliRunner().invoke(app, ["tune", "--quick"], env={"COLUMNS": "160"})
    assert out.exit_code == 0, out.output
    for text in ("csr_fp32", "qgemm_", "matmul_int4_", "batch<=8", "group", "work-group size", "cached in"):
        assert text in out.output
    files = list((cache_home / "tune").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["version"] == tuning.CACHE_VERSION


@needs_opencl
def test_cli_json_and_cache_dir_with_local_size_choices(env, tmp_path, monkeypatch):
    # Timing is replaced so that LOCAL_SIZE 128 (a candidate on every profile) is fastest: every
    # shape class must then cache and report it. Candidates are still built, run and checked.
    from polaris_opt.cli import app

    def local_128_fastest(env, trials, runs):
        return {t: 0.5 if t.defines.get("LOCAL_SIZE") == "128" else 1.0 for t in trials if t.launcher}

    monkeypatch.setattr(tuning, "_race", local_128_fastest)
    folder = tmp_path / "elsewhere"
    out = CliRunner().invoke(app, ["tune", "--quick", "--json", "--cache-dir", str(folder)])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert len(data["results"]) == 9 and data["default_local_size"] == env.local_size
    sizes = set(
        tuning.local_size_candidates(env.profile, env.device.max_work_group_size, near=env.local_size)
    )
    for row in data["results"]:
        assert row["local_size"] == 128 and row["best"]["LOCAL_SIZE"] == "128" and row["speedup"] == 2.0
        timed = {int(c["defines"].get("LOCAL_SIZE", env.local_size)) for c in row["candidates"]}
        assert timed == sizes and all(c["ok"] for c in row["candidates"])
    assert data["cache_file"].startswith(str(folder / "tune"))
    document = json.loads(open(data["cache_file"]).read())
    cached = {key: entry["defines"]["LOCAL_SIZE"] for key, entry in document["entries"].items()}
    assert cached == {row["key"]: "128" for row in data["results"]}
