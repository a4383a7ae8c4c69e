"""Print benchmarks/out/prune.json as the Markdown tables of docs/BENCHMARKS.md's pruning section.

.venv/bin/python benchmarks/render_prune.py
"""

from __future__ import annotations

import json

from common import OUT

METHODS = ["magnitude", "wanda", "sparsegpt", "sparsegpt one-shot"]


def quality(table: dict) -> None:
    print("| model | pattern @ sparsity | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for name, rows in table.items():
        dense = rows["dense"]
        for key, by_method in rows.items():
            if key == "dense":
                continue
            cells = [_quality_cell(by_method[m], dense) for m in METHODS]
            print(f"| {name} | {key} | " + " | ".join(cells) + " |")
    print()
    print(
        "Each cell: output SQNR vs the dense model in dB (digits: top-1 %, dense "
        + ", ".join(f"{n} {r['dense']['top1']} %" for n, r in table.items() if "top1" in r["dense"])
        + ")."
    )


def _quality_cell(row: dict, dense: dict) -> str:
    cell = f"{row['sqnr_db']:.1f} dB"
    if "top1" in row:
        cell += f", {row['top1']:.2f} %"
    elif row.get("agreement") is not None:
        cell += f", agree {row['agreement']:.0f} %"
    return cell


def structured(results: dict) -> None:
    resnet = results["resnet_s_channel_50"]
    print("| resnet_s, 50 % channels | value |")
    print("|---|---|")
    print(
        f"| parameters | {resnet['params_dense']:,} → {resnet['params_pruned']:,} "
        f"({resnet['params_ratio']:.3f}×) |"
    )
    for batch, ms in resnet["latency_ms"].items():
        print(
            f"| ORT CPU latency, {batch}, 1 thread | {ms['dense']:.3f} ms → {ms['pruned']:.3f} ms "
            f"({ms['speedup']:.2f}× faster) |"
        )
    print(f"| output SQNR vs dense | {resnet['sqnr_db']:.1f} dB |")
    if "sqnr_db_correct" in resnet:
        print(f"| output SQNR vs dense, `--correct` | {resnet['sqnr_db_correct']:.1f} dB |")
    print()
    digits = results["digits_cnn_channel_25"]
    print(
        f"digits_cnn at 25 % channels (dense top-1 {digits['top1_dense']} %, "
        f"parameters {digits['params_ratio']:.3f}×):"
    )
    print()
    print("| importance | top-1 | drop (points) | SQNR |")
    print("|---|---|---|---|")
    for key, row in digits.items():
        if isinstance(row, dict):
            print(f"| {key} | {row['top1']:.2f} % | {row['drop']:.2f} | {row['sqnr_db']:.1f} dB |")
    print()
    heads = results["transformer_s_head_50"]
    ms = heads["latency_ms"]
    print(
        f"transformer_s, half the heads: parameters {heads['params_ratio']:.3f}×, SQNR "
        f"{heads['sqnr_db']:.1f} dB, batch 8 latency {ms['dense']:.3f} → {ms['pruned']:.3f} ms "
        f"({ms['speedup']:.2f}×)."
    )


def speed(results: dict) -> None:
    print("| job | target | wall, load + prune + save (median) | spread | prune pass | peak RSS |")
    print("|---|---|---|---|---|---|")
    targets = {"sparsegpt_4096": "≤ 60 s", "magnitude_134MB": "≤ 10 s"}
    for name, row in results.items():
        prune = sum(v for k, v in row["pass_seconds"].items() if k.startswith("prune"))
        print(
            f"| {name} | {targets.get(name, '')} | {row['wall_s']:.2f} s | {row['spread']:.2f} "
            f"| {prune:.2f} s | {row['peak_mb']:.0f} MB |"
        )


def main() -> None:
    report = json.loads((OUT / "prune.json").read_text())
    machine = report["machine"]
    print(f"{machine['date']} · {machine['nproc']} cores · {machine['cpu']} · `{report['command']}`")
    print()
    for section, render in (("quality", quality), ("structured", structured), ("speed", speed)):
        if section in report:
            print(f"### {section}")
            print()
            render(report[section])
            print()


if __name__ == "__main__":
    main()
