"""GradualPruner and export_onnx: masks against a NumPy reference, zeros kept through optimizer
steps, the schedule's sparsity reached, patterns in polaris-opt's matrix view, export on ORT."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from polaris_opt.errors import BadInput
from polaris_opt.export import to_graph
from polaris_opt.numerics import run_model
from polaris_opt.pruning.patterns import pruned_count
from polaris_opt.pruning.targets import find_targets
from polaris_opt.schedule import PolynomialSchedule


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: two OpenMP threads only spin on a busy 2-core machine
    return torch


@pytest.fixture
def tp():
    pytest.importorskip("torch")
    from polaris_opt import torch_pruning

    return torch_pruning


def small_cnn(torch, batchnorm: bool = True):
    nn = torch.nn
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if batchnorm else []
    layers += [nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 6 * 6, 10)]
    return nn.Sequential(*layers)


def train_steps(torch, model, pruner, steps: int, check=None) -> None:
    """Adam on random data: it moves every weight, masked or not, before pruner.step re-zeroes."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        x = torch.randn(4, 3, 6, 6)
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step(step)
        if check:
            check(step)


def zeros(module) -> np.ndarray:
    return (module.weight.detach().numpy() == 0).reshape(module.weight.shape[0], -1)


def test_masks_hold_through_optimizer_steps_and_follow_the_schedule(torch, tp):
    model = small_cnn(torch)
    schedule = PolynomialSchedule(0.0, 0.8, begin_step=2, end_step=12, frequency=5)
    pruner = tp.GradualPruner(model, schedule)
    assert list(pruner.layers) == ["0", "3", "6"]  # Conv, Conv, Linear; BatchNorm left alone
    previous = {name: np.zeros_like(zeros(m)) for name, m in pruner.layers.items()}

    def check(step: int) -> None:
        target = schedule.sparsity(step) if step >= schedule.begin_step else 0.0
        for name, module in pruner.layers.items():
            now = zeros(module)
            # Exactly the scheduled count is zero, and once pruned a weight stays pruned.
            assert now.sum() == pruned_count(now.size, target), (step, name)
            assert np.all(now[previous[name]]), (step, name)
            previous[name] = now

    train_steps(torch, model, pruner, 20, check)
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-3)
    assert all(s == pytest.approx(0.8, abs=2e-3) for s in pruner.layer_sparsities().values())


def test_masks_keep_the_largest_magnitudes(torch, tp):
    model = small_cnn(torch, batchnorm=False)
    pruner = tp.GradualPruner(model, PolynomialSchedule(0.5, 0.9, begin_step=0, end_step=10, frequency=10))
    before = {
        name: m.weight.detach().numpy().reshape(m.weight.shape[0], -1).copy()
        for name, m in model.named_children()
        if name in pruner.layers
    }
    pruner.step(0)  # s_i = 0.5 at t0
    for name, weight in before.items():
        magnitudes = np.abs(weight).ravel()
        keep = np.zeros(magnitudes.size, dtype=bool)
        keep[np.argsort(magnitudes, kind="stable")[pruned_count(magnitudes.size, 0.5) :]] = True
        assert np.array_equal(~zeros(pruner.layers[name]).ravel(), keep)
        got = pruner.layers[name].weight.detach().numpy().reshape(weight.shape)
        np.testing.assert_array_equal(got, np.where(keep.reshape(weight.shape), weight, 0))


def test_global_scope_ranks_all_layers_together(torch, tp):
    model = small_cnn(torch, batchnorm=False)
    with torch.no_grad():
        model[0].weight.mul_(10)  # the first conv's weights are all large: global pruning spares it
    magnitudes = np.concatenate(
        [np.abs(m.weight.detach().numpy()).ravel() for m in (model[0], model[2], model[5])]
    )
    threshold = np.sort(magnitudes)[pruned_count(magnitudes.size, 0.7) - 1]
    schedule = PolynomialSchedule(0.0, 0.7, begin_step=0, end_step=1, frequency=1)
    pruner = tp.GradualPruner(model, schedule, scope="global")
    pruner.step(1)
    assert pruner.sparsity() == pruned_count(magnitudes.size, 0.7) / magnitudes.size
    layers = pruner.layer_sparsities()
    assert layers["0"] < 0.1 < 0.7 < layers["5"]
    for module in (model[0], model[2], model[5]):
        kept = module.weight.detach().numpy()
        assert np.all(np.abs(kept[kept != 0]) > threshold)


def test_nm_pattern_in_polaris_opt_matrix_view(torch, tp, tmp_path):
    model = small_cnn(torch, batchnorm=False)
    schedule = PolynomialSchedule(0.5, 0.5, begin_step=0, end_step=4, frequency=2)
    pruner = tp.GradualPruner(model, schedule, pattern="2:4")
    train_steps(torch, model, pruner, 6)
    pruner.remove()
    assert pruner.masks == {}
    path = tp.export_onnx(model, torch.randn(1, 3, 6, 6), tmp_path / "nm.onnx", output_names=["logits"])
    # polaris-opt's view of the exported weights ([out, in·kh·kw]) holds 2 of every 4 columns.
    targets, _ = find_targets(to_graph(onnx.load(str(path))))
    assert sorted(t.op for t in targets) == ["Conv", "Conv", "Gemm"]
    for target in targets:
        kept = target.matrix() != 0
        full = kept.shape[1] // 4 * 4  # a last partial group of r columns keeps min(2, r)
        assert np.all(kept[:, :full].reshape(kept.shape[0], -1, 4).sum(axis=2) == 2), target.name
        assert np.all(kept[:, full:].sum(axis=1) == min(2, kept.shape[1] - full)), target.name
    assert targets[0].matrix().shape[1] % 4 == 3  # the first conv: 27 columns, so one partial group


def test_block_pattern_prunes_whole_blocks(torch, tp):
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    schedule = PolynomialSchedule(0.0, 0.75, begin_step=0, end_step=2, frequency=2)
    pruner = tp.GradualPruner(model, schedule, pattern="block:2x4")
    pruner.step(2)
    blocks = zeros(model[0]).reshape(4, 2, 4, 4).transpose(0, 2, 1, 3).reshape(16, 8)
    assert sorted(blocks.sum(axis=1).tolist()) == [0] * 4 + [8] * 12  # whole blocks, 12 of 16


def test_export_matches_torch_on_onnx_runtime(torch, tp, tmp_path):
    model = small_cnn(torch)
    pruner = tp.GradualPruner(model, PolynomialSchedule(0.0, 0.6, begin_step=0, end_step=4, frequency=2))
    train_steps(torch, model, pruner, 5)  # also moves the BatchNorm running statistics
    pruner.remove()
    model.train()
    path = tp.export_onnx(model, torch.randn(1, 3, 6, 6), tmp_path / "pruned.onnx", output_names=["logits"])
    assert model.training  # export evaluates in eval mode and puts the mode back
    onnx.checker.check_model(str(path), full_check=True)
    exported = onnx.load(str(path))
    x = np.random.default_rng(0).standard_normal((3, 3, 6, 6)).astype(np.float32)  # batch 3: dynamic
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = run_model(exported, {"input": x})
    np.testing.assert_allclose(got["logits"], expected, rtol=1e-4, atol=1e-5)
    # The masks are baked in: polaris-opt sees the pruned weights.
    targets, _ = find_targets(to_graph(exported))
    pruned = sum(int(np.count_nonzero(t.weight.values == 0)) for t in targets)
    assert pruned / sum(t.weight.values.size for t in targets) == pytest.approx(0.6, abs=2e-3)
    assert not list(tmp_path.glob(".*.tmp"))


def test_fixed_batch_export(torch, tp, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    path = tp.export_onnx(model, torch.randn(2, 5), tmp_path / "fixed.onnx", dynamic_batch=False)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 5]


SCHEDULE = PolynomialSchedule(0.0, 0.5, begin_step=0, end_step=10, frequency=5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scope": "everywhere"}, "scope 'everywhere' is not one of local, global"),
        ({"max_layer_sparsity": 0.0}, "max_layer_sparsity 0.0 is outside (0, 1]"),
        ({"pattern": "3of4"}, "pattern '3of4' is not valid"),
        ({"pattern": "1:4"}, "pattern 1:4 means sparsity 0.75, but the schedule ends at 0.5"),
    ],
)
def test_bad_options(torch, tp, options, message):
    with pytest.raises(BadInput) as caught:
        tp.GradualPruner(small_cnn(torch), SCHEDULE, **options)
    assert message in str(caught.value)


def test_bad_layers(torch, tp):
    with pytest.raises(BadInput, match="no layers of type Linear, Conv2d"):
        tp.GradualPruner(torch.nn.Sequential(torch.nn.ReLU()), SCHEDULE)
    deconv = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 2, 3))
    with pytest.raises(BadInput, match="layer '0' is a transposed convolution"):
        tp.GradualPruner(deconv, SCHEDULE, layers=[torch.nn.ConvTranspose2d])


def test_missing_torch_names_the_extra(monkeypatch):
    from polaris_opt import torch_pruning

    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` sees when it is absent
    with pytest.raises(ImportError, match=r'pip install "polaris-opt\[torch\]"'):
        torch_pruning.GradualPruner(object(), SCHEDULE)


def test_the_docs_example_runs_as_shown(torch, tmp_path, monkeypatch, capsys):
    docs = Path(__file__).resolve().parent.parent / "docs" / "gradual.md"
    (snippet,) = re.findall(r"```python\n(.*?)```", docs.read_text(), flags=re.DOTALL)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, str(docs), "exec"), {})
    assert capsys.readouterr().out == "sparsity 90.0%\n"
    exported = onnx.load("build/mlp.pruned.onnx")
    x = np.ones((2, 64), dtype=np.float32)
    assert run_model(exported, {"input": x})["logits"].shape == (2, 10)
