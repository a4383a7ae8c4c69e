"""The gradual pruning schedule of Zhu & Gupta, "To prune, or not to prune" (2017).

Pruning a trained network a little at a time while it keeps training lets the remaining
weights take over the work of the removed ones; pruning everything at once (what the `prune`
pass does to an ONNX graph, with no training loop) cannot. The schedule says how sparse each
layer should be at a training step: it starts at the initial sparsity s_i at step t0, prunes
every Δt steps, and reaches the final sparsity s_f after n pruning intervals,

    s_t = s_f + (s_i - s_f) · (1 - (t - t0) / (n·Δt))^p    for t in {t0, t0 + Δt, ..., t0 + n·Δt}

with p = 3 in the paper: fast at first, while many redundant weights are left, and slow near
the end, when each removed weight costs more. Between pruning steps the sparsity holds at its
last value. This module is pure Python, so a training loop in any framework can use it;
`polaris_opt.torch_pruning` applies it to a PyTorch model.
"""

from __future__ import annotations

from dataclasses import dataclass

from polaris_opt.errors import BadInput


class ScheduleError(BadInput, ValueError):
    """A schedule with impossible values: a BadInput (exit code 2) that is also a ValueError,
    the error a training script expects from a bad argument."""


@dataclass(frozen=True)
class PolynomialSchedule:
    """Sparsity s_i at `begin_step`, rising every `frequency` steps to s_f at `end_step`."""

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int
    power: float = 3

    def __post_init__(self) -> None:
        for label, value in (("initial", self.initial_sparsity), ("final", self.final_sparsity)):
            if not 0.0 <= value < 1.0:
                raise ScheduleError(f"schedule: {label} sparsity {value} is outside [0, 1): give a fraction")
        if self.final_sparsity < self.initial_sparsity:
            raise ScheduleError(
                f"schedule: final sparsity {self.final_sparsity} is below the initial "
                f"{self.initial_sparsity}: gradual pruning only removes weights"
            )
        if self.begin_step < 0:
            raise ScheduleError(f"schedule: begin step {self.begin_step} is negative: steps count from 0")
        if self.end_step <= self.begin_step:
            raise ScheduleError(
                f"schedule: end step {self.end_step} must come after begin step {self.begin_step}"
            )
        if self.frequency <= 0:
            raise ScheduleError(f"schedule: frequency {self.frequency} must be a positive number of steps")
        span = self.end_step - self.begin_step
        if span % self.frequency:
            raise ScheduleError(
                f"schedule: end step - begin step = {span} is not a multiple of the frequency "
                f"{self.frequency}: the last pruning step would miss the end step "
                f"(try end step {self.begin_step + (span // self.frequency + 1) * self.frequency})"
            )
        if self.power <= 0:
            raise ScheduleError(f"schedule: power {self.power} must be positive (the paper uses 3)")

    @property
    def intervals(self) -> int:
        """n: how many pruning intervals of `frequency` steps lie between begin and end."""
        return (self.end_step - self.begin_step) // self.frequency

    def steps(self) -> list[int]:
        """Every pruning step, t0 to t0 + n·Δt inclusive."""
        return list(range(self.begin_step, self.end_step + 1, self.frequency))

    def is_pruning_step(self, step: int) -> bool:
        """True at the steps where masks are recomputed to a new sparsity."""
        return self.begin_step <= step <= self.end_step and (step - self.begin_step) % self.frequency == 0

    def sparsity(self, step: int) -> float:
        """The target sparsity at `step`: the value of the last pruning step at or before it."""
        if step <= self.begin_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        done = (step - self.begin_step) // self.frequency  # pruning intervals completed
        remaining = 1.0 - done / self.intervals
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * remaining**self.power
