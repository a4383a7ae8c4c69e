"""Foundation numbers (issue 2): CLI start-up, and `compile --pipeline cleanup` against a plain
`onnx.load` + `onnxruntime.InferenceSession` of the same file (wall time and peak RSS).

    .venv/bin/python benchmarks/bench_foundation.py [--runs 5] [--large-runs 3] [--skip-large]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import OUT, ROOT, interleave, machine, median, spread, write_json

CLI = str(Path(sys.executable).parent / "polaris-opt")

STARTUP = {
    "python -c pass": "import subprocess; subprocess.run([sys.executable, '-c', 'pass'], check=True)",
    "polaris-opt --help": f"import subprocess; subprocess.run([{CLI!r}, '--help'], check=True, capture_output=True)",
    "python -c 'import onnxruntime'": (
        "import subprocess; subprocess.run([sys.executable, '-c', 'import onnxruntime'], check=True)"
    ),
}


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
        subprocess.run([sys.executable, str(ROOT / "models" / "build_zoo.py"), "--large", str(path)], check=True)
    return path


def table(title: str, samples: dict[str, list[dict]], extra: str = "") -> str:
    rows = [f"#### {title}{extra}", "", "| contender | median wall (s) | spread (max/min) | peak RSS (MB) |", "|---|---|---|---|"]
    for name, runs in samples.items():
        rows.append(f"| {name} | {median(runs, 'wall'):.3f} | {spread(runs, 'wall'):.2f} | {median(runs, 'peak_mb'):.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--large-runs", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()

    results = {"machine": machine()}
    sections = []
    results["startup"] = interleave(STARTUP, runs=args.runs * 2)
    sections.append(table("Start-up (the child's wall time includes launching the command)", results["startup"]))

    resnet = ROOT / "models" / "resnet_s.onnx"
    results["resnet_s"] = interleave(compile_contenders(resnet, OUT / "resnet_s.clean.onnx"), runs=args.runs)
    sections.append(table("resnet_s.onnx", results["resnet_s"], f" ({resnet.stat().st_size / 1e6:.2f} MB)"))

    if not args.skip_large:
        large = build_large(OUT / "large" / "large_mlp.onnx")
        results["large"] = interleave(compile_contenders(large, OUT / "large" / "large.clean.onnx"), runs=args.large_runs)
        sections.append(table("large_mlp.onnx", results["large"], f" ({large.stat().st_size / 1e6:.0f} MB)"))

    write_json("foundation", results)
    m = results["machine"]
    print(f"{m['date']} · {m['nproc']} cores · {m['cpu']} · OpenCL: {m['opencl']}\n")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
