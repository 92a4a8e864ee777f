"""The committed gallery read as a reviewer would: every n the README states is the n of the data
behind it.

A README number of records / prompts carries its source in an HTML comment right after it
(invisible when rendered): ``41 / 280 <!-- n: run benchmarks/results/plus/rome.jsonl
distract_neighborhood -->`` counts the records that have prompts of the group, and the prompts,
in that run file's post-edit scores; ``<!-- n: json figures/figures.json items.drift.n.drift_vs_failure
-->`` reads ``{"records", "prompts"}`` at that path of a JSON file.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATED = re.compile(r"(\d+)\s*/\s*(\d+)\s*<!--\s*n:\s*(run|json)\s+(\S+)\s+(\S+)\s*-->")


def run_sizes(path: Path, group: str) -> tuple[int, int]:
    """(records with post-edit prompts of ``group``, those prompts) of a run file."""
    records = prompts = 0
    for line in path.read_text().splitlines()[1:]:
        scores = json.loads(line).get("post", {}).get("groups", {}).get(group, {}).get("scores")
        if scores:
            records, prompts = records + 1, prompts + len(scores)
    return records, prompts


def json_sizes(path: Path, key: str) -> tuple[int, int]:
    node = json.loads(path.read_text())
    for part in key.split("."):
        node = node[part]
    return node["records"], node["prompts"]


def stated(text: str) -> list[tuple[tuple[int, int], str, str, str]]:
    return [((int(r), int(p)), kind, source, key) for r, p, kind, source, key in STATED.findall(text)]


def test_the_checker_reads_a_run_file(tmp_path):
    run = tmp_path / "r.jsonl"
    lines = [{"meta": {}}, {"post": {"groups": {"g": {"scores": [[0, 0, 1]] * 3}}}},
             {"post": {"groups": {"h": {"scores": [[0, 0, 1]]}}}}, {"post": {"groups": {"g": {"scores": []}}}}]
    run.write_text("\n".join(json.dumps(line) for line in lines))
    assert run_sizes(run, "g") == (1, 3)
    [(n, kind, source, key)] = stated(f"| x | 1 / 3 <!-- n: run {run} g --> |")
    assert n == run_sizes(Path(source), key)
    assert stated("100 / 280 plain") == []


def test_every_n_in_the_readme_is_the_data_s():
    text = (ROOT / "README.md").read_text()
    found = stated(text)
    assert found, "the README states no checked n"
    wrong = []
    for n, kind, source, key in found:
        path = ROOT / source
        assert path.is_file(), f"README names {source}, which is not in the repository"
        actual = run_sizes(path, key) if kind == "run" else json_sizes(path, key)
        if actual != n:
            wrong.append(f"{n[0]} / {n[1]} stated for {kind} {source} {key}, the data have {actual[0]} / {actual[1]}")
    assert not wrong, "\n".join(wrong)


def test_every_row_of_the_reproduction_table_states_a_checked_n():
    text = (ROOT / "README.md").read_text()
    section = text.split("### What reproduces on SmolLM2-135M", 1)[1].split("\n\n", 3)
    table = next(block for block in section if block.lstrip().startswith("| finding"))
    rows = [row for row in table.splitlines()[2:] if row.startswith("|")]
    assert rows
    missing = [row.split("|")[1].strip() for row in rows if not STATED.search(row)]
    assert not missing, f"rows without a checked n: {missing}"
