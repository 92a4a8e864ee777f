import json

import pytest

from attention_drift.core.jsonl import RunFile, RunFileError, read_run

META = {"model": "a", "method": "none", "created": "t0"}


def test_header_written_with_the_first_record_only(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    with RunFile(path, META) as run:
        assert not path.exists()
        run.write({"case_id": 1, "method": "none", "x": [1, 2]})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"meta": META}, {"case_id": 1, "method": "none", "x": [1, 2]}
    ]


def test_resume_tracks_done_records(tmp_path):
    path = tmp_path / "r.jsonl"
    with RunFile(path, META) as run:
        run.write({"case_id": 1, "method": "none"})
        with pytest.raises(RunFileError, match="already"):
            run.write({"case_id": 1, "method": "none"})
    with RunFile(path, {**META, "created": "t1"}) as run:
        assert run.done(1, "none") and not run.done("1", "none") and not run.done(1, "rome")
        run.write({"case_id": 2, "method": "none"})
    run = read_run(path)
    assert run.meta == META
    assert [r["case_id"] for r in run.records] == [1, 2]


def test_mismatched_header_is_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    with RunFile(path, META) as run:
        run.write({"case_id": 1, "method": "none"})
    before = path.read_bytes()
    with pytest.raises(RunFileError, match="model='a'.*model='b'"):
        RunFile(path, {**META, "model": "b"})
    assert path.read_bytes() == before


def test_torn_last_line_is_dropped_on_the_next_write(tmp_path):
    path = tmp_path / "r.jsonl"
    with RunFile(path, META) as run:
        run.write({"case_id": 1, "method": "none"})
    with path.open("a") as f:
        f.write('{"case_id": 2, "meth')
    assert [r["case_id"] for r in read_run(path).records] == [1]
    with RunFile(path, META) as run:
        assert not run.done(2, "none")
        run.write({"case_id": 2, "method": "none"})
    assert [r["case_id"] for r in read_run(path).records] == [1, 2]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"meta": META}) + "\n" + json.dumps({"case_id": 1, "method": "none"}))
    with RunFile(path, META) as run:
        assert run.done(1, "none")
        run.write({"case_id": 2, "method": "none"})
    assert [r["case_id"] for r in read_run(path).records] == [1, 2]


def test_bad_files(tmp_path):
    with pytest.raises(RunFileError, match="does not exist"):
        read_run(tmp_path / "none.jsonl")
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"case_id": 1}\n')
    with pytest.raises(RunFileError, match="header"):
        read_run(junk)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"meta": META}) + "\nnot json\n" + json.dumps({"case_id": 1, "method": "none"}) + "\n")
    with pytest.raises(RunFileError, match="line 2"):
        RunFile(broken, META)
    with pytest.raises(RunFileError, match="folder"):
        RunFile(tmp_path, META)
