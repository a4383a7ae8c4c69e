"""One error type per exit code (DESIGN.md §9), so the CLI turns any failure into one line."""

from __future__ import annotations


class PolarisError(Exception):
    """Base of every error polaris-opt reports to a user; `exit_code` is what the CLI returns."""

    exit_code = 3


class BadInput(PolarisError):
    """The model, recipe, data or command line given to us is wrong (exit code 2)."""

    exit_code = 2


class GateFailed(PolarisError):
    """A quality gate (`--check`) failed: the output is valid but not good enough (exit code 1)."""

    exit_code = 1


class PassFailed(PolarisError):
    """A pass broke the graph or raised: names the pass, so the user knows what to exclude."""

    exit_code = 3

    def __init__(self, pass_name: str, reason: str):
        super().__init__(f"pass '{pass_name}' failed: {reason}")
        self.pass_name = pass_name
        self.reason = reason
