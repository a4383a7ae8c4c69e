"""The README's `$ polaris-opt ...` examples run as written: documentation cannot rot.

A command shown succeeding must exit 0 and print the lines shown (times and sizes aside:
only the first line is compared, and tables by their pass names); an error example must print
exactly the error line shown, with exit code 2.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "polaris-opt"


def examples() -> list[tuple[str, list[str]]]:
    """(command, the output lines shown under it) for every `$ polaris-opt` line."""
    found, command, shown = [], None, []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("$ polaris-opt") or line.startswith("```"):
            if command:
                found.append((command, shown))
            command, shown = (line[2:], []) if line.startswith("$ ") else (None, [])
        elif command:
            shown.append(line)
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # The examples use paths relative to the checkout; run them in a scratch copy of its shape.
    work = tmp_path_factory.mktemp("readme")
    (work / "models").symlink_to(ROOT / "models")
    (work / "README.md").write_text((ROOT / "README.md").read_text())
    (work / "build").mkdir()
    return work


EXAMPLES = examples()


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("command, shown", EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_readme_example_runs_as_shown(workdir, command, shown):
    argv = shlex.split(command)
    # Calibration statistics are cached in the scratch folder, not the user's cache.
    env = {**os.environ, "XDG_CACHE_HOME": str(workdir / "cache")}
    result = subprocess.run(
        [str(CLI), *argv[1:]], cwd=workdir, capture_output=True, text=True, timeout=300, env=env
    )
    if shown and shown[0].startswith("polaris-opt: error:"):
        assert result.returncode == 2
        assert result.stderr.strip() == shown[0]
        return
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].rstrip() == shown[0].rstrip()
    for name in re.findall(r"^│ ([a-z][a-z-]+) ", "\n".join(shown), flags=re.M):
        assert name in result.stdout
