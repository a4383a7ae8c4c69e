"""Gradual magnitude pruning of a PyTorch model while it trains, then export to ONNX.

polaris-opt prunes ONNX graphs after training, in one shot. When the training loop is at hand,
pruning a little at a time while fine-tuning (Zhu & Gupta 2017, `polaris_opt.schedule`) keeps
far more accuracy at high sparsity. This helper does that:

    pruner = GradualPruner(model, PolynomialSchedule(0.0, 0.9, begin_step=0, end_step=300, frequency=20))
    for step, (x, y) in enumerate(batches):
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        pruner.step(step)           # new masks at pruning steps; masked weights back to exactly 0
    pruner.remove()
    export_onnx(model, x[:1], "pruned.onnx")

Masks are chosen by `polaris_opt.pruning.patterns.select` on the same matrix view polaris-opt
uses for ONNX weights ([out, in·kh·kw]: a Linear weight as it is, a Conv weight reshaped), so an
N:M or block pattern means the same weights here as in `polaris-opt prune --pattern`. PyTorch is
an optional dependency (`pip install "polaris-opt[torch]"`), imported only when used.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from polaris_opt.errors import BadInput
from polaris_opt.pruning.patterns import Pattern, select
from polaris_opt.schedule import PolynomialSchedule

if TYPE_CHECKING:
    import torch

TORCH_MISSING = 'polaris_opt.torch_pruning needs PyTorch: install it with pip install "polaris-opt[torch]"'
SCOPES = ("local", "global")


def require_torch():
    """The torch module, or an ImportError that says how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(TORCH_MISSING) from exc
    return torch


class GradualPruner:
    """Prunes the weights of a model's Linear and Conv layers to a schedule's sparsity.

    pattern: "unstructured", "N:M" or "block:RxC" (as `polaris-opt prune --pattern`); an N:M
    pattern has its own sparsity, so the schedule must end at 1 - N/M, reached at the first
    pruning step. scope: "local" prunes every layer to the scheduled sparsity; "global" ranks all
    weights together, no layer above `max_layer_sparsity`. layers: the module types to prune,
    (nn.Linear, nn.Conv2d) by default; each must keep output features on the weight's first
    axis (Linear, Conv1d/2d/3d, not ConvTranspose).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: PolynomialSchedule,
        *,
        pattern: str | Pattern = "unstructured",
        scope: str = "local",
        layers: Sequence[type] | None = None,
        max_layer_sparsity: float = 0.99,
    ) -> None:
        torch = require_torch()
        self.schedule = schedule
        self.pattern = pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)
        self.scope = scope
        self.max_layer_sparsity = max_layer_sparsity
        self._check_options()
        kinds = tuple(layers) if layers is not None else (torch.nn.Linear, torch.nn.Conv2d)
        self.layers = prunable_layers(model, kinds)
        self.masks: dict[str, torch.Tensor] = {}

    def _check_options(self) -> None:
        if self.scope not in SCOPES:
            raise BadInput(f"GradualPruner: scope '{self.scope}' is not one of {', '.join(SCOPES)}")
        if not 0 < self.max_layer_sparsity <= 1:
            raise BadInput(f"GradualPruner: max_layer_sparsity {self.max_layer_sparsity} is outside (0, 1]")
        fixed = self.pattern.fixed_sparsity
        if fixed is not None and abs(self.schedule.final_sparsity - fixed) > 1e-9:
            raise BadInput(
                f"GradualPruner: pattern {self.pattern.text()} means sparsity {fixed:g}, but the schedule "
                f"ends at {self.schedule.final_sparsity:g}: give final_sparsity={fixed:g}"
            )

    def step(self, global_step: int) -> bool:
        """Call after each optimizer step: at a pruning step recompute the masks to the scheduled
        sparsity, then zero every masked weight. Returns True when the masks were recomputed."""
        recomputed = self.schedule.is_pruning_step(global_step)
        if recomputed:
            self.update_masks(self.schedule.sparsity(global_step))
        self.apply_masks()
        return recomputed

    def update_masks(self, sparsity: float) -> None:
        """New magnitude masks at `sparsity` (per layer, or overall with scope='global')."""
        torch = require_torch()
        scores = [weight_matrix(module.weight) for module in self.layers.values()]
        for (name, module), keep in zip(self.layers.items(), self._keep_masks(scores, sparsity), strict=True):
            weight = module.weight
            self.masks[name] = torch.from_numpy(keep.reshape(weight.shape)).to(weight.device)

    def _keep_masks(self, scores: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
        if self.scope == "global" and self.pattern.kind != "nm":
            # Imported here: only global scope needs the allocation across layers.
            from polaris_opt.pruning.allocation import global_sparsities

            sparsities = global_sparsities(scores, sparsity, self.max_layer_sparsity)
        else:
            sparsities = [sparsity] * len(scores)
        pairs = zip(scores, sparsities, strict=True)
        return [select(layer_scores, self.pattern, layer_sparsity) for layer_scores, layer_sparsity in pairs]

    def apply_masks(self) -> None:
        """Zero the weights the masks prune (the optimizer may have moved them since)."""
        torch = require_torch()
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.layers[name].weight.masked_fill_(~mask, 0.0)

    def remove(self) -> None:
        """Bake the masks into the weights for good and stop tracking them."""
        self.apply_masks()
        self.masks.clear()

    def layer_sparsities(self) -> dict[str, float]:
        """Fraction of exactly-zero weights in each pruned layer, by module name."""
        return {name: zero_fraction(module.weight) for name, module in self.layers.items()}

    def sparsity(self) -> float:
        """Fraction of exactly-zero weights over all the layers this pruner prunes."""
        zeros = sum(int((m.weight == 0).sum()) for m in self.layers.values())
        return zeros / sum(m.weight.numel() for m in self.layers.values())


def prunable_layers(model: torch.nn.Module, kinds: tuple[type, ...]) -> dict[str, torch.nn.Module]:
    """The modules of `model` of the given kinds, by name; BadInput when there is none or one
    whose weight has its output features elsewhere than on the first axis."""
    torch = require_torch()
    found = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    if not found:
        names = ", ".join(kind.__name__ for kind in kinds)
        raise BadInput(f"GradualPruner: the model has no layers of type {names} to prune")
    for name, module in found.items():
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            raise BadInput(
                f"GradualPruner: layer '{name}' is a transposed convolution, whose weight is "
                "[in, out, ...]: leave ConvTranspose out of `layers`"
            )
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise BadInput(f"GradualPruner: layer '{name}' ({type(module).__name__}) has no weight tensor")
    return found


def weight_matrix(weight: torch.Tensor) -> np.ndarray:
    """|W| as the [out, in·kh·kw] matrix polaris-opt scores ONNX weights in (float32 NumPy)."""
    return weight.detach().abs().reshape(weight.shape[0], -1).float().cpu().numpy()


def zero_fraction(weight: torch.Tensor) -> float:
    return int((weight == 0).sum()) / weight.numel()


def export_onnx(
    model: torch.nn.Module,
    example_input: Any,
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Path:
    """Write `model` (in eval mode, zeros as they are) as an ONNX file polaris-opt reads.

    Call `GradualPruner.remove()` first so the file holds the final masked weights. The batch
    axis (0) of every input and output is named 'batch' when `dynamic_batch`. Written beside
    `path` and renamed into place, so a failed export leaves no half-written file.
    """
    torch = require_torch()
    path = Path(path)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    names = [*input_names, *output_names]
    dynamic_axes = {name: {0: "batch"} for name in names} if dynamic_batch else None
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose: the torch.export-based default needs
            # onnxscript, which polaris-opt does not depend on. Its deprecation notice is not the
            # user's to act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                args,
                temporary,
                dynamo=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
            )
        os.replace(temporary, path)
    finally:
        model.train(was_training)
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path
