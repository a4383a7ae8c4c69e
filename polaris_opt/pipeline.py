"""Pipeline text `a,b{k=v,...}`: parsed strictly, printed back exactly as written.

    cleanup,fold-constants{max-size-mb=64}

Each step is a registered pass or an alias (`cleanup`). An unknown pass or option is an error
that lists the valid ones. A parsed pipeline keeps each value's text as given, so
`Pipeline.parse(text).text() == text` for any text without spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from polaris_opt.errors import BadInput
from polaris_opt.passes import ALIASES, PASSES, load_pass
from polaris_opt.passes_api import Pass

_NAME = re.compile(r"[a-z][a-z0-9-]*")
# A value is anything up to the next separator; quoting is not needed by any option we have.
_VALUE = re.compile(r"[^,{}=\s]+")


@dataclass(frozen=True)
class Step:
    """One step of a pipeline: a pass or alias name and its options, as text, in given order."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        steps = tuple(_Parser(text).steps())
        for step in steps:
            _validate(step)
        return cls(steps)

    def text(self) -> str:
        return ",".join(step.text() for step in self.steps)

    def passes(self) -> list[tuple[str, Pass]]:
        """(step text, pass instance) for every pass to run, aliases expanded in place."""
        expanded = []
        for step in self.steps:
            if step.name in ALIASES:
                expanded += Pipeline.parse(ALIASES[step.name]).passes()
            else:
                expanded.append((step.text(), instantiate(step)))
        return expanded


def instantiate(step: Step) -> Pass:
    pass_class = load_pass(step.name)
    by_name = {option.name: option for option in pass_class.options()}
    values = {by_name[key].field_name: by_name[key].parse(value) for key, value in step.options}
    return pass_class(**values)


def _validate(step: Step) -> None:
    if step.name in ALIASES:
        if step.options:
            raise BadInput(f"pipeline: '{step.name}' is an alias ({ALIASES[step.name]}) and takes no options")
        return
    if step.name not in PASSES:
        valid = ", ".join(sorted(PASSES) + sorted(ALIASES))
        raise BadInput(f"pipeline: unknown pass '{step.name}'; valid passes: {valid}")
    options = {option.name: option for option in load_pass(step.name).options()}
    seen = set()
    for key, value in step.options:
        if key not in options:
            valid = ", ".join(sorted(options)) or "none"
            raise BadInput(f"pipeline: pass '{step.name}' has no option '{key}'; valid options: {valid}")
        if key in seen:
            raise BadInput(f"pipeline: option '{key}' given twice to pass '{step.name}'")
        seen.add(key)
        try:
            options[key].parse(value)
        except ValueError as exc:
            raise BadInput(f"pipeline: {step.name}{{{key}={value}}}: {exc}") from None


class _Parser:
    """A hand-written scanner: the grammar is small and errors must point at the column."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def steps(self) -> list[Step]:
        if not self.text.strip():
            raise BadInput("pipeline: empty pipeline text")
        steps = [self.step()]
        while self.accept(","):
            steps.append(self.step())
        self.skip_space()
        if self.pos != len(self.text):
            self.fail("expected ',' or end of text")
        return steps

    def step(self) -> Step:
        name = self.expect(_NAME, "a pass name")
        options: list[tuple[str, str]] = []
        if self.accept("{"):
            options.append(self.option())
            while self.accept(","):
                options.append(self.option())
            if not self.accept("}"):
                self.fail("expected ',' or '}'")
        return Step(name, tuple(options))

    def option(self) -> tuple[str, str]:
        key = self.expect(_NAME, "an option name")
        if not self.accept("="):
            self.fail(f"expected '=' after option '{key}'")
        return key, self.expect(_VALUE, f"a value for option '{key}'")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def accept(self, literal: str) -> bool:
        self.skip_space()
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def expect(self, pattern: re.Pattern, what: str) -> str:
        self.skip_space()
        match = pattern.match(self.text, self.pos)
        if not match:
            self.fail(f"expected {what}")
        self.pos = match.end()
        return match.group()

    def fail(self, message: str):
        raise BadInput(f"pipeline: {message} at column {self.pos + 1} of '{self.text}'")
