"""The cache root and atomic writes (``attention_drift.core.paths``)."""

import pytest

from attention_drift.core.paths import cache_dir, cache_root, write_atomically


def test_cache_root_follows_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path and cache_dir("stats") == tmp_path / "stats"
    monkeypatch.delenv("ATTENTION_DRIFT_CACHE")
    assert cache_root().parts[-2:] == (".cache", "attention_drift")


def test_write_atomically_replaces_whole_files_and_leaves_nothing_when_the_write_fails(tmp_path):
    path = tmp_path / "new" / "file.txt"
    assert write_atomically(path, lambda tmp: tmp.write_text("first")) == path
    assert path.read_text() == "first"

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_text() == "first" and sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]
