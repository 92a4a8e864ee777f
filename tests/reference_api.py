"""The calls behind the frozen analysis references (tests/make_reference_analysis.py writes them,
tests/test_reference_analysis.py checks them): one place that maps each pinned quantity to the
package's API, so an API change touches this file only and the stored numbers stay as they are."""

from attention_drift.measure.case_study import case_study
from attention_drift.core.data import distract_prompt
from attention_drift.measure.drift import drift_record
from attention_drift.measure.patch_record import patch_record
from attention_drift.reports.drift import drift_from_lines
from attention_drift.reports.patch import patch_from_lines


def drift_line(model, record, factory) -> dict:
    """A record's drift run line (``drift_records.jsonl``, without ``"method"``)."""
    return drift_record(model, record, factory).to_line()


def drift_summary(lines) -> dict:
    """``drift.json`` of the lines, without the samples (the lines hold them)."""
    out = drift_from_lines(lines)
    return {k: v for k, v in out.items() if k != "samples"}


def patch_line(model, record, factory, **options) -> dict:
    """A record's patching run line (``patch_records.jsonl``, without ``"method"``)."""
    return patch_record(model, record, factory, **options).to_line()


def patch_summary(lines) -> dict:
    """``patch.json`` of the lines."""
    return patch_from_lines(lines)


def case_study_json(model, record, edit_fn) -> dict:
    """The case study of the record's first distract-neighbourhood prompt."""
    rw = record.rewrite
    prompt = distract_prompt(rw, record.neighborhood.prompts[0])
    return case_study(model, rw, prompt, record.neighborhood.targets[0], edit_fn=edit_fn).to_json()
