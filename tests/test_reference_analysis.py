"""Frozen references: drift, patching and case-study numbers must stay what
tests/make_reference_analysis.py recorded (tests/fixtures/reference_analysis*.json).

Tolerance: |value - reference| <= 2e-6 + 1e-5 |reference| for every number (attention masses
are stored rounded to 6 digits; scores are float32 log-probabilities); strings, booleans and
integers exactly; NaN matches NaN. Only the keys the reference holds are compared, and each must
be present. A failure names the path of the first differing value.
"""

import json
import math
from pathlib import Path

import pytest

from handmade_edit import push_subject  # noqa: E402
from make_reference_analysis import (  # noqa: E402
    CF0,
    OBAMA,
    SMOLLM2_PATH,
    TINY_PATH,
    rank_one_edit,
)
from reference_api import case_study_json, drift_line, drift_summary, patch_line, patch_summary  # noqa: E402

ATOL, RTOL = 2e-6, 1e-5


def assert_matches(value, reference, path: str = "") -> None:
    """``value`` equals ``reference`` on the reference's keys, numbers within the tolerance."""
    if isinstance(reference, dict):
        assert isinstance(value, dict), f"{path}: expected a dict, got {type(value).__name__}"
        for key, ref in reference.items():
            assert key in value, f"{path}: key {key!r} is missing"
            assert_matches(value[key], ref, f"{path}.{key}")
    elif isinstance(reference, list):
        assert isinstance(value, (list, tuple)), f"{path}: expected a list, got {type(value).__name__}"
        assert len(value) == len(reference), f"{path}: length {len(value)} != {len(reference)}"
        for i, (v, ref) in enumerate(zip(value, reference)):
            assert_matches(v, ref, f"{path}[{i}]")
    elif isinstance(reference, float) or (isinstance(value, float) and isinstance(reference, int)
                                          and not isinstance(reference, bool)):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}: {value!r} is not a number"
        if math.isnan(reference):
            assert math.isnan(value), f"{path}: {value} != NaN"
        else:
            assert abs(value - reference) <= ATOL + RTOL * abs(reference), f"{path}: {value!r} != {reference!r}"
    else:
        assert value == reference, f"{path}: {value!r} != {reference!r}"


def _json(x):
    return json.loads(json.dumps(x))


def test_assert_matches_catches_differences():
    assert_matches({"a": [1.0, float("nan")], "b": "x", "extra": 1}, {"a": [1.0 + 1e-7, float("nan")], "b": "x"})
    for value, reference in [({"a": 1.0}, {"a": 1.001}), ({"a": [1.0]}, {"a": [1.0, 2.0]}), ({}, {"a": 1}),
                             ({"a": 0.0}, {"a": float("nan")}), ({"a": "x"}, {"a": "y"}), ({"a": True}, {"a": False})]:
        with pytest.raises(AssertionError):
            assert_matches(value, reference)


REFERENCE = json.loads(Path(TINY_PATH).read_text())


@pytest.fixture(params=["llama", "gpt2"])
def arch(request):
    return request.param


@pytest.fixture
def tiny(arch):
    from attention_drift.core.models import tiny_model

    return tiny_model(arch)


def test_drift_lines_and_summary(tiny, arch):
    ref = REFERENCE["tiny"][arch]
    lines = [drift_line(tiny, r, lambda rec: push_subject(tiny, rec.rewrite)) for r in (CF0, OBAMA)]
    for i, line in enumerate(lines):
        assert_matches(_json(line), ref["drift_lines"][i], f"drift_lines[{i}]")
    assert_matches(_json(drift_summary(lines)), ref["drift_summary"], "drift_summary")


def test_patch_line_and_summary(tiny, arch):
    ref = REFERENCE["tiny"][arch]
    line = patch_line(tiny, CF0, lambda rec: push_subject(tiny, rec.rewrite), **REFERENCE["patch"])
    assert_matches(_json(line), ref["patch_line"], "patch_line")
    assert_matches(_json(patch_summary([line])), ref["patch_summary"], "patch_summary")


def test_case_study(tiny, arch):
    ref = REFERENCE["tiny"][arch]
    cs = case_study_json(tiny, CF0, lambda: push_subject(tiny, CF0.rewrite))
    assert_matches(_json(cs), ref["case_study"], "case_study")


@pytest.mark.slow
def test_smollm2_record(smollm2):
    """One CounterFact record on SmolLM2-135M, the stored rank-one ROME change replayed."""
    import torch

    ref = json.loads(Path(SMOLLM2_PATH).read_text())
    edit = ref["edit"]
    u, v = torch.tensor(edit["u"]), torch.tensor(edit["v"])

    def factory(record):
        return rank_one_edit(smollm2, edit["layer"], u, v)

    assert_matches(_json(drift_line(smollm2, CF0, factory)), ref["drift_line"], "drift_line")
    assert_matches(_json(patch_line(smollm2, CF0, factory, **ref["patch"])), ref["patch_line"], "patch_line")
