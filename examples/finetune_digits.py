"""Gradual pruning while fine-tuning against one-shot pruning: the digits CNN at 90 % sparsity.

The zoo's digits CNN (models/digits_cnn.onnx) is rebuilt in PyTorch with the same layers and
its trained weights read from the ONNX file. It is then fine-tuned on the zoo's own training
rows (models/digits_train.npz) while `GradualPruner` raises the sparsity of its Conv and Linear
weights from 0 to 90 % on the Zhu & Gupta schedule over the first half of the epochs; the
second half lets the remaining weights recover. The result is exported to ONNX and compared on
the held-out test set (models/digits_test.npz) with the dense model and with one-shot 90 %
magnitude pruning of the same ONNX model by polaris-opt (`cleanup,prune{sparsity=0.9}`, no
training). Every top-1 is measured on ONNX Runtime from an ONNX model.

    pip install -e ".[torch]"
    python examples/finetune_digits.py            # a table
    python examples/finetune_digits.py --json     # the same numbers as JSON

Runs in a few seconds on a CPU and repeats exactly for a given --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from polaris_opt.compiler import run_pipeline
from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph
from polaris_opt.fidelity import top1_accuracy
from polaris_opt.numerics import make_session
from polaris_opt.pipeline import Pipeline
from polaris_opt.pruning.targets import find_targets
from polaris_opt.schedule import PolynomialSchedule
from polaris_opt.torch_pruning import GradualPruner, export_onnx

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DENSE = MODELS / "digits_cnn.onnx"
BATCH = 32
PRUNE_EVERY = 10  # optimizer steps between mask updates (Δt)


class DigitsCNN(nn.Module):
    """models/digits_cnn.onnx in PyTorch; module names match its initializer names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_from_onnx(path: Path) -> DigitsCNN:
    """A DigitsCNN holding the trained weights and BatchNorm statistics of the ONNX model."""
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    net = DigitsCNN()
    state = net.state_dict()
    for key in state:
        if key.endswith("num_batches_tracked"):
            continue  # a training counter the ONNX file has no use for
        values = initializers[key]
        if tuple(values.shape) != tuple(state[key].shape):
            raise ValueError(
                f"{path.name}: {key} has shape {values.shape}, expected {tuple(state[key].shape)}"
            )
        state[key] = torch.from_numpy(values.copy())
    net.load_state_dict(state)
    return net


def load_digits(name: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 1, 8, 8] float32 in [0, 1] and int64 labels from models/<name>."""
    with np.load(MODELS / name, allow_pickle=False) as data:
        x, y = data[x_key], data["y"]
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(16)  # pixel counts 0..16, scaled as the zoo did
    return x.reshape(-1, 1, 8, 8).astype(np.float32), y.astype(np.int64)


def finetune_pruned(net: DigitsCNN, x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> GradualPruner:
    """Adam fine-tuning with gradual pruning over the first half of the epochs; masks baked in."""
    steps_per_epoch = -(-len(x) // BATCH)
    prune_steps = args.epochs // 2 * steps_per_epoch // PRUNE_EVERY * PRUNE_EVERY
    schedule = PolynomialSchedule(
        0.0, args.sparsity, begin_step=0, end_step=prune_steps, frequency=PRUNE_EVERY
    )
    pruner = GradualPruner(net, schedule)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    shuffle = torch.Generator().manual_seed(args.seed)
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    step = 0
    net.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(images), generator=shuffle)
        for start in range(0, len(images), BATCH):
            batch = order[start : start + BATCH]
            loss = nn.functional.cross_entropy(net(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pruner.step(step)
            step += 1
    pruner.remove()
    return pruner


def one_shot(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    """polaris-opt's magnitude pruning of the ONNX model, no training."""
    return run_pipeline(model, Pipeline.parse(f"cleanup,prune{{sparsity={sparsity}}}")).model


def weight_sparsity(model: onnx.ModelProto) -> float:
    """Fraction of zeros over the weights polaris-opt can prune (Conv, Gemm, MatMul)."""
    targets, _ = find_targets(to_graph(model))
    zeros = sum(int(np.count_nonzero(t.weight.values == 0)) for t in targets)
    return zeros / sum(t.weight.values.size for t in targets)


def evaluate(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    session = make_session(model)
    batches = ({"input": x[i : i + 150]} for i in range(0, len(x), 150))
    return {"top1": top1_accuracy(session, batches, y), "sparsity": weight_sparsity(model)}


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    # The network is tiny: one thread is as fast as two, repeats exactly, and does not stall
    # when other processes share the cores (OpenMP threads spin waiting for each other).
    torch.set_num_threads(1)
    x_train, y_train = load_digits("digits_train.npz", "x")
    x_test, y_test = load_digits("digits_test.npz", "x_cnn")
    dense = onnx.load(str(DENSE))

    net = load_from_onnx(DENSE)
    finetune_pruned(net, x_train, y_train, args)
    export_onnx(net, torch.from_numpy(x_test[:1]), args.out, input_names=["input"], output_names=["logits"])

    results = {
        "dense": evaluate(dense, x_test, y_test),
        "one_shot": evaluate(one_shot(dense, args.sparsity), x_test, y_test),
        "gradual": evaluate(onnx.load(str(args.out)), x_test, y_test),
    }
    return {
        "target_sparsity": args.sparsity,
        "epochs": args.epochs,
        "test_samples": len(y_test),
        "results": results,
        "exported": str(args.out),
        "seconds": round(time.perf_counter() - started, 2),
    }


def print_table(report: dict) -> None:
    labels = {
        "dense": "dense (trained zoo model)",
        "one_shot": "one-shot magnitude (polaris-opt prune)",
        "gradual": f"gradual + fine-tune ({report['epochs']} epochs)",
    }
    print(f"digits CNN, top-1 on {report['test_samples']} held-out digits (ONNX Runtime)")
    print(f"{'model':<42} {'sparsity':>9} {'top-1':>8}")
    for key, label in labels.items():
        row = report["results"][key]
        print(f"{label:<42} {row['sparsity']:>8.1%} {row['top1']:>8.2%}")
    exported = Path(report["exported"]).resolve()
    shown = exported.relative_to(ROOT) if exported.is_relative_to(ROOT) else exported
    print(f"exported {shown} in {report['seconds']} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9, help="final sparsity (default 0.9)")
    parser.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (default 20)")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "digits_cnn.gradual.onnx")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: give at least 2 (half prune, half recover)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except BadInput as exc:  # a bad --sparsity reaches the schedule: one line, exit code 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
