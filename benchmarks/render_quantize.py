"""Print the quantization section of docs/BENCHMARKS.md from benchmarks/out/quantize.json.

.venv/bin/python benchmarks/render_quantize.py > /tmp/section.md
"""

from __future__ import annotations

import json

from common import OUT


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fidelity(data: dict) -> str:
    rows = []
    for model, results in data.items():
        ours = {k: v["sqnr_db"] for k, v in results.items() if k.startswith("ours")}
        theirs = {k: v["sqnr_db"] for k, v in results.items() if k.startswith("ort")}
        best_ours, best_ort = max(ours, key=ours.get), max(theirs, key=theirs.get)
        same = [
            f"{results[f'ours {m}']['sqnr_db']:.2f} / {results[f'ort {m} (pre-processed)']['sqnr_db']:.2f}"
            for m in ("minmax", "percentile", "entropy")
        ]
        margin = ours[best_ours] - theirs[best_ort]
        rows.append(
            [
                model,
                *same,
                f"{results['ours mse']['sqnr_db']:.2f}",
                f"{ours[best_ours]:.2f} ({best_ours[5:]})",
                f"{theirs[best_ort]:.2f} ({best_ort[4:]})",
                f"{margin:+.2f}",
            ]
        )
    header = [
        "model",
        "minmax ours / ORT",
        "percentile ours / ORT",
        "entropy ours / ORT",
        "mse (ours only)",
        "our best",
        "ORT best",
        "margin dB",
    ]
    return table(header, rows)


def accuracy(data: dict) -> str:
    rows = []
    for model in ("digits_mlp", "digits_cnn"):
        results = data[model]
        fp32 = results["ours minmax"]["top1_fp32"]
        cells = [
            f"{results[k]['top1']:.2f}" for k in ("ours minmax", "ours entropy", "ort minmax (pre-processed)")
        ]
        rows.append([model, f"{fp32:.2f}", *cells])
    return table(["model", "FP32 top-1 %", "ours minmax", "ours entropy", "ORT minmax"], rows)


def speed(data: dict) -> str:
    rows = []
    for key, row in data.items():
        rows.append(
            [
                key,
                row["ours"]["wall_s"],
                row["ort"]["wall_s"],
                row["time_ratio"],
                row["ours"]["peak_mb"],
                row["ort"]["peak_mb"],
                row["rss_ratio"],
            ]
        )
    return table(
        ["resnet_s, method", "ours s", "ORT s", "time ratio", "ours MB", "ORT MB", "RSS ratio"], rows
    )


def latency(data: dict) -> str:
    rows = [[m, r["fp32"], r["ours"], r["ort"], r["ours_vs_ort"], r["fp32_vs_ours"]] for m, r in data.items()]
    return table(["model", "FP32 ms", "ours INT8 ms", "ORT INT8 ms", "ours / ORT", "FP32 / ours"], rows)


def sizes(data: dict) -> str:
    rows = []
    for model, r in data.items():
        rows.append(
            [
                model,
                r["fp32_bytes"],
                r["int8"]["size_ratio"],
                r["int8-dynamic"]["size_ratio"],
                r["ort int8-dynamic"]["size_ratio"],
                r["fp16"]["size_ratio"],
                f"{r['int8-dynamic']['sqnr_db']:.2f} / {r['ort int8-dynamic']['sqnr_db']:.2f}",
                f"{r['fp16']['sqnr_db']:.2f}",
            ]
        )
    header = [
        "model",
        "FP32 bytes",
        "INT8 static",
        "INT8 dynamic",
        "ORT dynamic",
        "FP16",
        "dynamic SQNR ours / ORT",
        "FP16 SQNR",
    ]
    return table(header, rows)


def int4(data: dict) -> str:
    rows = []
    for model, r in data.items():
        for key, v in r.items():
            rows.append([model, key, f"{v['sqnr_db']:.2f}", v["ratio"], v.get("top1", "")])
    return table(["model", "variant (block 32)", "SQNR dB", "MatMul weight bytes ratio", "top-1 %"], rows)


def main() -> None:
    data = json.loads((OUT / "quantize.json").read_text())
    print(
        f"Measured {data['machine']['date']} on {data['machine']['nproc']} cores, {data['machine']['cpu']}; "
        f"command `{data['command']}`.\n"
    )
    for title, render, key in [
        ("Fidelity: output SQNR (dB) vs FP32 on held-out data", fidelity, "fidelity"),
        ("Accuracy on the digits test split", accuracy, "fidelity"),
        ("Calibrate + quantize, fresh process per run (imports included), interleaved", speed, "speed"),
        ("Latency of the result on ONNX Runtime CPU (batch 8, 1 thread)", latency, "latency"),
        ("File size ratio to FP32", sizes, "size"),
        ("INT4 weight-only against matmul_nbits_quantizer", int4, "int4"),
    ]:
        if key in data:
            print(f"#### {title}\n\n{render(data[key])}\n")
    for key, title in [
        ("memory", "Peak RSS with 10x the calibration samples (entropy)"),
        ("coverage", "Paddle-style model (weights in Constant nodes)"),
    ]:
        if key in data:
            print(f"#### {title}\n\n```\n{json.dumps(data[key], indent=1)}\n```\n")


if __name__ == "__main__":
    main()
