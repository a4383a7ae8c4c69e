"""The examples/NN_name/README.md walkthroughs run as written, so they cannot go stale.

Each README's ```sh blocks run in order in one bash process (`set -euo pipefail`, stderr into
stdout), in a scratch folder shaped like the checkout: models/, examples/ and docs/ linked,
build/ written there, caches (XDG_CACHE_HOME) inside it, this environment's `polaris-opt` first
on PATH, 80 columns as the outputs were taken. A ```text block right after a ```sh block shows
that block's output, and is checked against it:

- its first line must be a line of the output, exactly;
- every other line without a digit must appear in the output too, compared with table borders
  and runs of spaces removed (so a column that grows by a digit elsewhere does not matter).

Lines with digits are not compared beyond the first: times, sizes and measured numbers vary
from run to run and machine to machine. A README may therefore elide part of a long output
with a line that has a digit (`… 12 more layers`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
WALKTHROUGHS = sorted(EXAMPLES.glob("[0-9][0-9]_*/README.md"))
# Linked into the scratch folder: what the walkthroughs read.
LINKED = ("models", "examples", "docs")
MARKER = "@@polaris-opt example block {}@@"
MARKER_LINE = re.compile("\n" + re.escape(MARKER).replace(r"\{\}", r"(\w+)") + "\n")
FENCE = re.compile(r"^```(\w*)\s*$")
BOX_DRAWING = re.compile(r"[\u2500-\u257f]")


@dataclass
class Block:
    """One ```sh block and the output its ```text block shows (None when it shows none)."""

    script: str
    shown: list[str] | None
    line: int  # where the block starts in the README, for failure messages


def fenced_blocks(text: str) -> list[tuple[str, list[str], int]]:
    """(language, lines, first line number) of every fenced block, in order."""
    blocks, language, body, start = [], None, [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if language is None and fence:
            language, body, start = fence.group(1), [], number
        elif language is not None and line.rstrip() == "```":
            blocks.append((language, body, start))
            language = None
        elif language is not None:
            body.append(line)
    return blocks


def shell_blocks(text: str) -> list[Block]:
    """The ```sh blocks, each with the ```text block that follows it directly, if any."""
    found: list[Block] = []
    previous = None
    for language, body, start in fenced_blocks(text):
        if language == "sh":
            found.append(Block("\n".join(body), None, start))
        elif language == "text" and previous == "sh":
            found[-1].shown = body
        previous = language
    return found


def squeeze(line: str) -> str:
    """The line without table borders and with single spaces: what a reader compares."""
    return " ".join(BOX_DRAWING.sub(" ", line).split())


def mismatches(shown: list[str], output: str) -> list[str]:
    """The shown lines the output does not contain, by the rules of the module docstring."""
    if not shown:
        return []
    lines = [line.rstrip() for line in output.splitlines()]
    missing = [] if shown[0].rstrip() in lines else [shown[0]]
    squeezed_output = " ".join(squeeze(line) for line in lines)
    for line in shown[1:]:
        words = squeeze(line)
        if words and not re.search(r"\d", words) and words not in squeezed_output:
            missing.append(line)
    return missing


def script_of(blocks: list[Block]) -> str:
    """One bash script running the blocks in order, printing a marker line before each."""
    parts = ["set -euo pipefail", "exec 2>&1"]
    for index, block in enumerate(blocks):
        # The newline first: the output before may not end with one.
        parts += [f"printf '\\n%s\\n' '{MARKER.format(index)}'", block.script]
    parts.append(f"printf '\\n%s\\n' '{MARKER.format('end')}'")
    return "\n".join(parts) + "\n"


def outputs_by_block(output: str, count: int) -> list[str | None]:
    """Each block's output, split at the markers; None for blocks that never started."""
    pieces = MARKER_LINE.split(output)
    found = dict(zip(pieces[1::2], pieces[2::2], strict=True))
    return [found.get(str(index)) for index in range(count)]


def scratch_checkout(work: Path) -> Path:
    """WORK shaped like the checkout for the walkthroughs: what they read, linked."""
    for name in LINKED:
        (work / name).symlink_to(ROOT / name)
    return work


def run_walkthrough(readme: Path, work: Path) -> tuple[subprocess.CompletedProcess, list[Block]]:
    """Run README's sh blocks in WORK as a user would, with this environment's polaris-opt."""
    blocks = shell_blocks(readme.read_text())
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "XDG_CACHE_HOME": str(work / "cache"),
        "COLUMNS": "80",
        "PYTHONUNBUFFERED": "1",  # stdout and stderr interleave as they do on a terminal
        # SparseGPT's NumPy BLAS threads spin while the other core is busy: on this 2-core
        # machine, with another job running, prune --method sparsegpt on resnet_s took a median
        # 6.4 s (3.7-11.6) with two threads and 2.9 s (2.75-3.15) with one, 5 interleaved pairs.
        # Only digits of the outputs change.
        "OPENBLAS_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", "-c", script_of(blocks)], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    return result, blocks


def test_the_examples_folder_has_the_three_walkthroughs():
    names = {readme.parent.name for readme in WALKTHROUGHS}
    assert {"01_quantize", "02_prune_sparsify", "03_ci_gate"} <= names
    index = (EXAMPLES / "README.md").read_text()
    for name in names:
        assert f"({name}/README.md)" in index, f"examples/README.md does not link {name}"


@pytest.mark.parametrize("readme", WALKTHROUGHS, ids=[r.parent.name for r in WALKTHROUGHS])
def test_every_command_shows_its_output(readme):
    blocks = shell_blocks(readme.read_text())
    assert len(blocks) >= 3
    untouched = [b.line for b in blocks if "polaris-opt " in b.script and not b.shown]
    assert not untouched, f"{readme}: sh blocks at lines {untouched} run polaris-opt but show no output"


@pytest.mark.parametrize("readme", WALKTHROUGHS, ids=[r.parent.name for r in WALKTHROUGHS])
def test_walkthrough_runs_as_shown(readme, tmp_path):
    result, blocks = run_walkthrough(readme, scratch_checkout(tmp_path))
    outputs = outputs_by_block(result.stdout, len(blocks))
    started = [index for index, output in enumerate(outputs) if output is not None]
    failed = blocks[started[-1]] if started else blocks[0]
    assert result.returncode == 0, (
        f"{readme}: the sh block at line {failed.line} failed (exit {result.returncode}):\n"
        f"{result.stdout[-4000:]}{result.stderr[-2000:]}"
    )
    for block, output in zip(blocks, outputs, strict=True):
        missing = mismatches(block.shown or [], output or "")
        assert not missing, f"{readme}, sh block at line {block.line}: not in its output: {missing}\n{output}"


SAMPLE = """Intro.

```sh
printf one
```

```text
one
```

```yaml
key: value
```

```sh
printf 'a  b\\n│ c │\\n'
```

```text
a b
│ c   │
```
"""


def test_shell_blocks_pair_each_output_with_its_commands():
    blocks = shell_blocks(SAMPLE)
    assert [b.script for b in blocks] == ["printf one", "printf 'a  b\\n│ c │\\n'"]
    assert [b.shown for b in blocks] == [["one"], ["a b", "│ c   │"]]


def test_a_walkthrough_whose_output_drifted_fails():
    blocks = shell_blocks(SAMPLE)
    output = subprocess.run(["bash", "-c", script_of(blocks)], capture_output=True, text=True, check=True)
    first, second = outputs_by_block(output.stdout, len(blocks))
    assert mismatches(blocks[0].shown, first) == []  # an output without a final newline too
    # The first line must match exactly; later lines are compared without borders and spacing.
    assert mismatches(blocks[1].shown, second) == ["a b"]
    assert mismatches(["a  b", "│ c   │"], second) == []
    assert mismatches(["a  b", "d"], second) == ["d"]
    assert mismatches(["a  b", "took 12 ms"], second) == []
