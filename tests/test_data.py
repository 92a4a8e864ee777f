import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest

from attention_drift.core.data import (
    COUNTERFACT_URL,
    DataError,
    PromptGroup,
    Record,
    Rewrite,
    balanced_subset,
    distract_prompt,
    load_counterfact,
    load_example,
    parse_record,
)

FIXTURES = Path(__file__).parent / "fixtures"
ORIGINAL = FIXTURES / "counterfact_original_mini.json"
MERGED = FIXTURES / "counterfact_merged_mini.json"


def _raw(path: Path) -> list:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(tmp_path: Path, records) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_original_layout():
    records = load_counterfact(ORIGINAL)
    assert [r.case_id for r in records] == [10, 11, 12]
    assert {r.kind for r in records} == {"counterfact"}
    first = records[0]
    assert first.rewrite == Rewrite(
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        relation_id="P103",
        target_new_id="Q1860",
    )
    assert first.efficacy == PromptGroup(("The mother tongue of Danielle Darrieux is",), ("English",))
    assert first.paraphrase.targets == ("English", "English")
    assert first.neighborhood == PromptGroup(
        ("The mother tongue of Jean Gabin is", "The native language of Alain Delon is"), ("French", "French")
    )
    assert first.generation == ("Danielle Darrieux's friends all speak the language of", "Danielle Darrieux was born in")
    assert first.commonsense is None
    assert len(first.reasoning) == len(first.subject_alias) == len(first.relation) == 0
    assert records[1].rewrite.prompt == "Eiffel Tower is located in"
    assert records[1].rewrite.template == "{} is located in"
    assert len(records[1].neighborhood) == 3


def test_merged_layout():
    records = load_counterfact(str(MERGED))
    assert [r.case_id for r in records] == [0, 1, 2, 3]
    assert [r.kind for r in records] == ["counterfact", "wikidata", "counterfact", "wikidata"]
    france = records[1]
    assert france.rewrite.relation_id is None and france.rewrite.target_new_id is None
    assert france.reasoning == PromptGroup(
        ("The name of the sea next to the capital city of France is",), ("Mediterranean Sea",)
    )
    assert france.subject_alias.targets == ("Marseille",)
    assert france.relation.targets == ("French", "euro")
    assert len(france.paraphrase) == len(france.neighborhood) == 0 and france.generation == ()
    assert france.commonsense.prompt == "scissors"
    assert france.commonsense.right == "can cut paper in half"
    toyota = records[2]
    assert toyota.rewrite.target_new == "Germany"
    assert toyota.efficacy.targets == ("Germany",)
    assert len(records[3].relation) == 0


def test_both_layouts_give_the_same_record():
    original = load_counterfact(ORIGINAL)[0]
    merged = load_counterfact(MERGED)[0]
    assert isinstance(original, Record) and isinstance(merged, Record)
    assert dataclasses.replace(merged, case_id=10, commonsense=None) == original


def test_prompt_strings():
    rewrite = load_counterfact(MERGED)[0].rewrite
    assert rewrite.template == "The mother tongue of {} is"
    assert rewrite.edit_sentence == "The mother tongue of Danielle Darrieux is English."
    assert (
        distract_prompt(rewrite, "The mother tongue of Jean Gabin is")
        == "The mother tongue of Danielle Darrieux is English. The mother tongue of Jean Gabin is"
    )
    repeated = Rewrite("Paris is big and Paris is", "Paris", "small", "big")
    assert repeated.template == "{} is big and Paris is"
    assert repeated.template.replace("{}", repeated.subject, 1) == repeated.prompt


def _drop_rewrite(r):
    del r["requested_rewrite"]


def _drop_subject(r):
    del r["requested_rewrite"]["subject"]


def _empty_new(r):
    r["requested_rewrite"]["target_new"] = "   "


def _empty_true(r):
    r["requested_rewrite"]["target_true"] = ""


def _foreign_subject(r):
    r["requested_rewrite"]["subject"] = "Lexus"


def _same_targets(r):
    r["requested_rewrite"]["target_new"] = " Japan "


def _length_mismatch(r):
    r["l-neighbor"]["targets"].pop()


def _group_not_dict(r):
    r["p-paraphrase"] = ["Toyota comes from"]


def _commonsense_missing_right(r):
    del r["o-commonsense"]["right"]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_drop_rewrite, "'requested_rewrite'"),
        (_drop_subject, "requested_rewrite.subject"),
        (_empty_new, "requested_rewrite.target_new"),
        (_empty_true, "requested_rewrite.target_true"),
        (_foreign_subject, "requested_rewrite.subject"),
        (_same_targets, "requested_rewrite.target_new"),
        (_length_mismatch, "l-neighbor.targets"),
        (_group_not_dict, "p-paraphrase"),
        (_commonsense_missing_right, "o-commonsense.right"),
    ],
)
def test_validation_errors_name_record_and_field(tmp_path, mutate, field):
    raw = _raw(MERGED)
    mutate(raw[2])
    with pytest.raises(DataError) as info:
        load_counterfact(_write(tmp_path, raw))
    assert "record 2" in str(info.value)
    assert field in str(info.value)


def test_validation_error_names_case_id(tmp_path):
    raw = _raw(ORIGINAL)
    raw[1]["requested_rewrite"]["target_true"] = {"str": "Rome", "id": "Q220"}
    with pytest.raises(DataError, match=r"record 1 \(case_id 11\).*requested_rewrite\.target_new.*equals"):
        load_counterfact(_write(tmp_path, raw))
    raw = _raw(ORIGINAL)
    raw[1]["requested_rewrite"]["prompt"] = "The tower is located in"
    with pytest.raises(DataError, match=r"case_id 11.*requested_rewrite\.subject.*does not occur"):
        load_counterfact(_write(tmp_path, raw))


def test_parse_record_rejects_non_object():
    with pytest.raises(DataError, match="record 5"):
        parse_record(["not", "a", "record"], 5)
    record = parse_record(_raw(MERGED)[1], 7)
    assert record.case_id == 7 and record.kind == "wikidata"


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_counterfact(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_counterfact(bad)
    with pytest.raises(DataError, match="expected a list"):
        load_counterfact(_write(tmp_path, {"records": _raw(MERGED)}))


def test_non_strict_skips_bad_records(tmp_path):
    raw = _raw(MERGED)
    _empty_new(raw[1])
    _length_mismatch(raw[2])
    raw.append("junk")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = load_counterfact(_write(tmp_path, raw), strict=False)
    assert [r.case_id for r in records] == [0, 3]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 3" in message
    assert "record 1" in message and "requested_rewrite.target_new" in message
    with pytest.raises(DataError, match="record 1"):
        load_counterfact(_write(tmp_path, raw))


def test_clean_file_loads_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_counterfact(MERGED, strict=False)) == 4


def test_limit_and_kinds():
    assert [r.case_id for r in load_counterfact(MERGED, limit=3)] == [0, 1, 2]
    assert [r.case_id for r in load_counterfact(MERGED, kinds=("wikidata",))] == [1, 3]
    assert [r.case_id for r in load_counterfact(MERGED, kinds=("wikidata",), limit=1)] == [1]
    assert [r.case_id for r in load_counterfact(MERGED, kinds="counterfact")] == [0, 2]
    assert load_counterfact(MERGED, limit=0) == []
    assert load_counterfact(ORIGINAL, kinds=("wikidata",)) == []
    with pytest.raises(ValueError, match="unknown kinds"):
        load_counterfact(MERGED, kinds=("wiki",))


def test_balanced_subset():
    records = load_example()
    ids = lambda rs: [r.case_id for r in rs]  # noqa: E731
    assert ids(balanced_subset(records, 4)) == [0, 1, 2, 3]
    assert ids(balanced_subset(records, 5)) == [0, 1, 2, 3, 5]
    assert ids(balanced_subset(records, 1)) == [1]
    assert balanced_subset(records, 0) == []
    assert balanced_subset(records, 100) == records
    lopsided = [r for r in records if r.kind == "counterfact"] + records[1:2]
    picked = balanced_subset(lopsided, 4)
    assert [r.kind for r in picked].count("counterfact") == 3
    assert picked == lopsided[:3] + lopsided[4:]
    with pytest.raises(ValueError):
        balanced_subset(records, -1)


def test_load_example():
    records = load_example()
    assert len(records) == 8
    assert [r.case_id for r in records] == list(range(8))
    assert sorted(r.kind for r in records) == ["counterfact"] * 4 + ["wikidata"] * 4
    for r in records:
        assert r.rewrite.subject in r.rewrite.prompt
        assert r.rewrite.target_new != r.rewrite.target_true
        assert r.efficacy == PromptGroup((r.rewrite.prompt,), (r.rewrite.target_new,))
        assert r.commonsense is not None
        if r.kind == "counterfact":
            assert len(r.paraphrase) == 2 and 2 <= len(r.neighborhood) <= 3 and 1 <= len(r.generation) <= 2
            assert set(r.paraphrase.targets) == {r.rewrite.target_new}
            assert set(r.neighborhood.targets) == {r.rewrite.target_true}
            assert r.rewrite.relation_id and r.rewrite.target_new_id
        else:
            assert len(r.reasoning) and len(r.subject_alias) and len(r.relation)
            assert set(r.subject_alias.targets) == {r.rewrite.target_new}
            assert r.rewrite.prompt not in r.subject_alias.prompts


def test_counterfact_alias_reuses_the_cache(tmp_path, monkeypatch):
    assert COUNTERFACT_URL == "https://rome.baulab.info/data/dsets/counterfact.json"
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "counterfact.json").write_text(ORIGINAL.read_text(encoding="utf-8"), encoding="utf-8")
    assert [r.case_id for r in load_counterfact("counterfact", limit=2)] == [10, 11]
    assert load_counterfact(COUNTERFACT_URL) == load_counterfact(ORIGINAL)


def test_records_are_immutable():
    record = load_example()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.kind = "wikidata"  # type: ignore[misc]
    assert copy.deepcopy(record) == record


def test_dev_halves_are_fixed_balanced_and_disjoint():
    from attention_drift.core.data import load_dev
    from attention_drift.runs.evaluation import RecordSelection

    every = load_dev()
    tune, report = load_dev(half="tune"), load_dev(half="report")
    ids = lambda records: [json.dumps(r.case_id) for r in records]  # noqa: E731
    assert not set(ids(tune)) & set(ids(report)) and sorted(ids(tune) + ids(report)) == sorted(ids(every))
    for half in (tune, report):
        assert sum(r.kind == "counterfact" for r in half) == sum(r.kind == "wikidata" for r in half) == 84
    # the report half starts with the first records of each kind (those of the committed grid runs)
    first = RecordSelection("dev", limit=100, balanced=True).load()
    assert ids(RecordSelection("dev-report", limit=100, balanced=True).load()) == ids(first)
    assert RecordSelection("dev-tune").label == "dev-tune"
    with pytest.raises(ValueError, match="dev half"):
        load_dev(half="test")
