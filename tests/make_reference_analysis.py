"""Write tests/fixtures/reference_analysis*.json: drift, patching and case-study numbers that
tests/test_reference_analysis.py pins.

    cd <repo> && OMP_NUM_THREADS=1 python tests/make_reference_analysis.py [--smollm2]

Tiny models (seeded random 2-layer Llama and GPT-2, the hand-made rank-one edit of
tests/handmade_edit.py): per-record drift lines, the drift.json summary, a patching line with
sweep and contamination, the patch.json summary and a case study. ``--smollm2``: one CounterFact
record on SmolLM2-135M with a cheap ROME edit (no covariance, two context templates); the edit's
weight change is rank one and stored as its two factors, so the test replays exactly that change
(the numbers pin the analysis, not the editor).

Regenerate only for an intended change of the numbers, and say why in the commit.
"""

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from handmade_edit import push_subject  # noqa: E402

from attention_drift.core.data import load_example  # noqa: E402

FIXTURES = HERE / "fixtures"
TINY_PATH = FIXTURES / "reference_analysis.json"
SMOLLM2_PATH = FIXTURES / "reference_analysis_smollm2.json"
RECORDS = load_example()
CF0 = RECORDS[0]      # counterfact: Eiffel Tower -> Rome, 3 neighbourhood prompts
OBAMA = RECORDS[3]    # wikidata: relation prompts that mention the subject
PATCH = {"k": 3, "window": 2, "sweep_prompts": 1, "contamination_prompts": 1, "contamination_window": 2}
SMOLLM2_PATCH = {"k": 5, "window": 10, "sweep_prompts": 1, "contamination_prompts": 1, "contamination_window": 6}
SMOLLM2_LAYER = 5


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _strip(line: dict) -> dict:
    return {k: v for k, v in line.items() if k != "edit_seconds"}


def tiny_reference(arch: str) -> dict:
    from attention_drift.core.models import tiny_model
    from reference_api import case_study_json, drift_line, drift_summary, patch_line, patch_summary

    model = tiny_model(arch)

    def factory(record):
        return push_subject(model, record.rewrite)

    drift_lines = [drift_line(model, r, factory) for r in (CF0, OBAMA)]
    patch = patch_line(model, CF0, factory, **PATCH)
    summary = drift_summary(drift_lines)
    summary["correlations"] = {"all": summary["correlations"]["all"]}  # the groups go through the same code
    summary["curves"] = {k: summary["curves"][k] for k in ("max_drift_subject_last", "max_kl")}
    return {
        "drift_lines": [_strip(line) for line in drift_lines],
        "drift_summary": summary,
        "patch_line": _strip(patch),
        "patch_summary": patch_summary([patch]),
        "case_study": case_study_json(model, CF0, lambda: push_subject(model, CF0.rewrite)),
    }


@contextlib.contextmanager
def rank_one_edit(model, layer: int, u: torch.Tensor, v: torch.Tensor):
    """Add ``outer(u, v)`` to ``layer``'s MLP output weight (its own layout), restored on exit."""
    from attention_drift.core.models import mlp_out_weight

    weight = mlp_out_weight(model, layer)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight += torch.outer(u, v).to(weight.device, weight.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def smollm2_edit_factors(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-one factors of a cheap ROME edit of CF0 at layer 5 (in the weight's layout)."""
    from attention_drift.editing import ROMEConfig, edit

    config = ROMEConfig(layer=SMOLLM2_LAYER, clamp_norm_factor=2.0, mom2_adjustment=False,
                        context_templates=((5, 2),))
    with edit(model, CF0.rewrite, method="rome", config=config) as result:
        delta = next(iter(result.deltas.values())).double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, 0] * s[0]).float(), vh[0].float()


def smollm2_reference() -> dict:
    from attention_drift.core.models import load_model
    from reference_api import drift_line, patch_line

    model = load_model("smollm2-135m")
    u, v = smollm2_edit_factors(model)

    def factory(record):
        return rank_one_edit(model, SMOLLM2_LAYER, u, v)

    return {
        "edit": {"layer": SMOLLM2_LAYER, "u": u.tolist(), "v": v.tolist()},
        "drift_line": _strip(drift_line(model, CF0, factory)),
        "patch_line": _strip(patch_line(model, CF0, factory, **SMOLLM2_PATCH)),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smollm2", action="store_true", help="also (only) the SmolLM2 reference")
    args = p.parse_args()
    torch.set_num_threads(1)
    FIXTURES.mkdir(exist_ok=True)
    meta = {"generated_by": "tests/make_reference_analysis.py", "commit": _commit()}
    if args.smollm2:
        SMOLLM2_PATH.write_text(json.dumps({**meta, "patch": SMOLLM2_PATCH, **smollm2_reference()}) + "\n")
        print(f"wrote {SMOLLM2_PATH}")
        return
    data = {**meta, "patch": PATCH, "tiny": {arch: tiny_reference(arch) for arch in ("llama", "gpt2")}}
    TINY_PATH.write_text(json.dumps(data) + "\n")
    print(f"wrote {TINY_PATH}")


if __name__ == "__main__":
    main()
