"""Foundation numbers (issue 2): CLI start-up, and `compile --pipeline cleanup` against a plain
`onnx.load` + `onnxruntime.InferenceSession` of the same file (wall time and peak RSS).

    .venv/bin/python benchmarks/bench_foundation.py [--runs 5] [--large-runs 3] [--skip-large]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import OUT, ROOT, interleave, machine, median, spread, write_json

CLI = str(Path(sys.executable).parent / "polaris-opt")

STARTUP = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "polaris-opt --help": [CLI, "--help"],
    "python -c 'import onnxruntime'": [sys.executable, "-c", "import onnxruntime"],
}


def time_commands(commands: dict[str, list[str]], runs: int, warmup: int = 2) -> dict[str, list[dict]]:
    """Wall time of whole commands, interleaved (start-up only: no memory figure)."""
    samples: dict[str, list[dict]] = {name: [] for name in commands}
    for index in range(warmup + runs):
        for name, argv in commands.items():
            started = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            wall = time.perf_counter() - started
            if index >= warmup:
                samples[name].append({"wall": wall})
    return samples


def compile_contenders(model: Path, output: Path) -> dict[str, str]:
    return {
        "polaris-opt compile -p cleanup": (
            "from polaris_opt.cli import main\n"
            f"code = main(['--quiet', 'compile', {str(model)!r}, '-p', 'cleanup', '-o', {str(output)!r}])\n"
            "assert code == 0, code"
        ),
        "onnx.load + ort.InferenceSession": (
            "import onnx, onnxruntime as ort\n"
            f"model = onnx.load({str(model)!r})\n"
            "opts = ort.SessionOptions(); opts.intra_op_num_threads = 1\n"
            f"session = ort.InferenceSession({str(model)!r}, opts, providers=['CPUExecutionProvider'])"
        ),
    }


def build_large(path: Path) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(ROOT / "models" / "build_zoo.py"), "--large", str(path)], check=True
        )
    return path


def table(title: str, samples: dict[str, list[dict]], extra: str = "") -> str:
    rows = [
        f"#### {title}{extra}",
        "",
        "| contender | median wall (s) | spread (max/min) | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    for name, runs in samples.items():
        peak = f"{median(runs, 'peak_mb'):.0f}" if "peak_mb" in runs[0] else "—"
        rows.append(f"| {name} | {median(runs, 'wall'):.3f} | {spread(runs, 'wall'):.2f} | {peak} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--large-runs", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine()}
    sections = []
    results["startup"] = time_commands(STARTUP, runs=args.runs * 2)
    sections.append(table("Start-up", results["startup"]))

    resnet = ROOT / "models" / "resnet_s.onnx"
    results["resnet_s"] = interleave(compile_contenders(resnet, OUT / "resnet_s.clean.onnx"), runs=args.runs)
    sections.append(table("resnet_s.onnx", results["resnet_s"], f" ({resnet.stat().st_size / 1e6:.2f} MB)"))

    if not args.skip_large:
        large = build_large(OUT / "large" / "large_mlp.onnx")
        results["large"] = interleave(
            compile_contenders(large, OUT / "large" / "large.clean.onnx"), runs=args.large_runs
        )
        sections.append(table("large_mlp.onnx", results["large"], f" ({large.stat().st_size / 1e6:.0f} MB)"))

    write_json("foundation", results)
    m = results["machine"]
    print(f"{m['date']} · {m['nproc']} cores · {m['cpu']} · OpenCL: {m['opencl']}\n")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
