"""Pipeline text: strict parsing, exact printing, alias expansion, and the lazy registry."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polaris_opt.errors import BadInput
from polaris_opt.passes import ALIASES, PASSES, load_pass
from polaris_opt.pipeline import Pipeline


@pytest.mark.parametrize(
    "text",
    [
        "cleanup",
        "fold-constants",
        "fold-constants{max-size-mb=16}",
        "fold-constants{max-size-mb=1e-4},cleanup,infer-shapes",
        "lift-constants,fold-constants{max-size-mb=64.0},eliminate-dead-code",
    ],
)
def test_prints_back_what_it_parsed(text):
    assert Pipeline.parse(text).text() == text


def test_spaces_are_tolerated_and_dropped():
    assert Pipeline.parse(" cleanup , fold-constants { max-size-mb = 8 } ").text() == (
        "cleanup,fold-constants{max-size-mb=8}"
    )


def test_options_reach_the_pass_typed():
    [(step, fold)] = Pipeline.parse("fold-constants{max-size-mb=8}").passes()
    assert step == "fold-constants{max-size-mb=8}"
    assert fold.max_size_mb == 8.0 and isinstance(fold.max_size_mb, float)


def test_alias_expands_to_its_passes_in_order():
    names = [p.name for _, p in Pipeline.parse("cleanup").passes()]
    assert names == ALIASES["cleanup"].split(",")
    assert "fold-batchnorm" in names and names[-1] == "infer-shapes"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "nosuchpass",
            "unknown pass 'nosuchpass'; valid passes: calibrate, convert-fp16, correct-bias, elim",
        ),
        ("fold-constants{bogus=1}", "has no option 'bogus'; valid options: "),
        ("fold-constants{max-size-mb=big}", "expected float, got 'big'"),
        ("fold-constants{max-size-mb=1,max-size-mb=2}", "given twice"),
        ("cleanup{x=1}", "is an alias"),
        ("", "empty pipeline"),
        ("cleanup,,infer-shapes", "expected a pass name at column 9"),
        ("fold-constants{max-size-mb=1", "expected ',' or '}'"),
        ("fold-constants{max-size-mb}", "expected '=' after option"),
        ("cleanup;infer-shapes", "expected ',' or end of text"),
    ],
)
def test_bad_text_is_refused_with_a_useful_message(text, message):
    with pytest.raises(BadInput, match=message.replace("{", r"\{").replace("}", r"\}")):
        Pipeline.parse(text)


def test_unknown_pass_error_lists_every_valid_name():
    with pytest.raises(BadInput) as error:
        Pipeline.parse("nope")
    for name in [*PASSES, *ALIASES]:
        assert name in str(error.value)


def test_every_registered_pass_loads_with_its_registered_name():
    for name in PASSES:
        assert load_pass(name).name == name


@given(st.lists(st.sampled_from(sorted(PASSES) + sorted(ALIASES)), min_size=1, max_size=6))
def test_any_sequence_of_names_round_trips(names):
    text = ",".join(names)
    assert Pipeline.parse(text).text() == text


def test_registry_and_help_do_not_import_onnxruntime_or_pyopencl():
    probe = (
        "import sys\n"
        "from polaris_opt.cli import main\n"
        "import polaris_opt.passes\n"
        "main(['--help'])\n"
        "heavy = [m for m in ('onnxruntime', 'pyopencl') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
