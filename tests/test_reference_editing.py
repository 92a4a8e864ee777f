"""Frozen reference: what ROME, MEMIT, PMET, AlphaEdit and ROME+SADR compute, pinned to stored numbers.

``tests/fixtures/reference_editing.json`` holds, per seeded 3-layer tiny model
(``tiny_model("llama", n_layers=3)`` and ``"gpt2"``) and editor, summaries of every weight
delta (Frobenius norm, sum, sum and maximum of absolute values, a few fixed entries and the
largest one) and the per-step loss traces (total, and SADR's own term), plus one ROME edit
of SmolLM2-135M (delta norm, loss trace, target probability before and after). Every config is spelled out here, steps included, so
a change of presets or defaults does not move these numbers; only a change of what an
editor computes does. It was written by this module from the code before the editing
redesign (issue 12); the tiny cases were rewritten with settings under which the optimisation
converges (see :func:`tiny_case`; the code was unchanged). The AlphaEdit case was added with
the editor (the other cases' numbers unchanged by that rewrite). Regenerate it only for an intended
change of results, and say why in the commit message:

    OMP_NUM_THREADS=1 python tests/test_reference_editing.py          # tiny models
    OMP_NUM_THREADS=1 python tests/test_reference_editing.py --slow   # and SmolLM2 (minutes)

Tolerances: float32 arithmetic done in another order (batched vs. row-wise, another thread
count, running only the suffix positions) moves single results by ~1e-7 relative, which
a few Adam steps and a matrix solve amplify to ~1e-6-1e-5; a behavioural change (another
step count, template, loss term, key or layer) moves them by far more than 1e-3. So tiny
models compare at 1e-4 relative to each delta's own scale (its norm, sum of absolute values
or largest entry) and loss traces at 1e-4 relative to their largest value (measured on the
converging cases: one against two threads differ by <= 2.5e-7 in both; one thread reproduces
the stored numbers exactly; with other CPUs' vector kernels emulated, ``ATEN_CPU_CAPABILITY=avx2``
or ``default`` with ``MKL_ENABLE_INSTRUCTIONS``, deltas differ by <= 2.1e-5 and losses by
<= 1.9e-6). SADR's own term is a KL divergence between nearly equal attention rows, so
float32 noise in the rows is a large part of it (measured: up to 6e-5 of its largest value
between one and two threads, 1.1e-3 with the emulated kernels);
its trace compares at 1e-2, still
far below what another selection, divergence or weight changes. SmolLM2 (30 layers, 20
steps, statistics sampled from the model) compares at 1e-3 relative, and 1e-3 absolute on
probabilities.
"""

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "reference_editing.json"
TINY_RTOL = 1e-4
SLOW_RTOL = 1e-3
SADR_RTOL = 1e-2
ENTRIES = ((0, 0), (7, 13), (31, 63), (63, 5))
METHODS_CASES = ("rome", "memit", "pmet", "rome_sadr", "alphaedit")
TINY_LAYERS = 3


def _requests():
    from attention_drift.core.data import Rewrite

    eiffel = Rewrite("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris")
    jordan = Rewrite("Michael Jordan plays", "Michael Jordan", "soccer", "basketball")
    return eiffel, jordan


def tiny_case(name: str):
    """(method, config, requests, sadr) of one reference edit on a 3-layer tiny model.

    Every case is an optimisation that converges: the loss falls at every step (checked by
    :func:`test_reference_optimisations_converge`). The random tiny model's MLP outputs are small
    (norms 0.02-0.09 at the subject), so the editors' usual weight decay (a factor times
    ``||delta|| / ||init||^2``) and clamp (a few times ``||init||``) are out of scale there: with
    weight decay 0.01, clamp 4 (ROME) / 0.75 (MEMIT, PMET) and learning rates 0.2-0.5 the decay term
    outgrew the NLL from the first step, the loss rose (ROME 5.82 -> 7.46) and the pinned numbers
    were Adam oscillating at the clamp. Weight decay 1e-6 (still a term of the loss), clamp 50 and
    learning rate 0.1 let the NLL fall, so the references pin an optimisation, not its failure.

    SADR restricts every head (``selection="all"``): the hinge selection is a strict
    comparison, so a 1e-7 change can flip one head in or out and move the result by more
    than any tolerance; it has exact unit tests in ``test_sadr.py``. The weight is large
    because the tiny random model's attention hardly moves."""
    from attention_drift.editing import AlphaEditConfig, MEMITConfig, PMETConfig, ROMEConfig, StatsConfig
    from attention_drift.editing.sadr import SADRConfig

    stats = StatsConfig(corpus="model", n_samples=32, seq_len=24, batch_size=32, seed=0)
    eiffel, jordan = _requests()
    common = dict(v_loss_layer=None, weight_decay=1e-6, kl_factor=0.0625, early_stop_loss=0.05,
                  stats=stats, template_seed=0)
    rome = ROMEConfig(layer=1, lr=0.1, steps=8, clamp_norm_factor=50.0, context_templates=((4, 2), (6, 2)),
                      mom2_adjustment=True, **common)
    if name == "rome":
        return "rome", rome, [eiffel], None
    if name == "rome_sadr":
        sadr = SADRConfig(weight=100.0, layers=None, selection="all", divergence="kl", steps=10,
                          distract=False, distract_only=False)
        return "rome", rome, [eiffel], sadr
    if name == "memit":
        cfg = MEMITConfig(layers=(0, 1), lr=0.1, steps=8, clamp_norm_factor=50.0, mom2_update_weight=50.0,
                          context_templates=((4, 3),), **common)
        return "memit", cfg, [eiffel, jordan], None
    if name == "alphaedit":  # threshold and L2 at the scale of the tiny models' keys (see AlphaEditConfig)
        cfg = AlphaEditConfig(layers=(0, 1), lr=0.1, steps=8, clamp_norm_factor=50.0, nullspace_threshold=1e-4,
                              l2=1e-4, context_templates=((4, 3),), **common)
        return "alphaedit", cfg, [eiffel, jordan], None
    if name == "pmet":
        cfg = PMETConfig(layers=(0, 1), lr=0.1, steps=8, clamp_norm_factor=50.0, nll_factor=1.0,
                         mom2_update_weight=50.0, context_templates=((4, 3),),
                         **{**common, "kl_factor": 1.0})
        return "pmet", cfg, [eiffel, jordan], None
    raise KeyError(name)


def delta_summary(delta) -> dict:
    d = delta.detach().double().cpu()
    flat = d.abs().flatten().argmax().item()
    top = divmod(flat, d.shape[1])
    return {
        "shape": list(d.shape),
        "norm": d.norm().item(),
        "sum": d.sum().item(),
        "abs_sum": d.abs().sum().item(),
        "max_abs": d.abs().max().item(),
        "entries": {f"{i},{j}": d[i, j].item() for i, j in (*ENTRIES, top)},
    }


def result_summary(result) -> dict:
    return {
        "layers": list(result.layers),
        "deltas": {name: delta_summary(d) for name, d in sorted(result.deltas.items())},
        "loss": [t.loss for t in result.traces],
        "sadr_loss": [t.extra.get("sadr", []) for t in result.traces],
        "steps_run": [t.steps_run for t in result.traces],
    }


def run_tiny(arch: str, name: str) -> dict:
    """Edit a fresh seeded tiny model (statistics cached under ``$ATTENTION_DRIFT_CACHE``)."""
    from attention_drift.editing import apply_edit
    from attention_drift.core.models import tiny_model

    model = tiny_model(arch, n_layers=TINY_LAYERS)
    method, config, requests, sadr = tiny_case(name)
    result = apply_edit(model, requests, method, config, sadr=sadr, progress=False)
    summary = result_summary(result)
    result.restore()
    return summary


SMOLLM2_REWRITE = ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")


def smollm2_case():
    from attention_drift.editing import ROMEConfig, StatsConfig

    stats = StatsConfig(corpus="model", n_samples=64, seq_len=64, batch_size=32, seed=0)
    return ROMEConfig(layer=5, v_loss_layer=None, lr=0.5, steps=20, weight_decay=0.5, clamp_norm_factor=2.0,
                      kl_factor=0.0625, early_stop_loss=0.05, context_templates=((5, 5),),
                      mom2_adjustment=True, stats=stats, template_seed=0)


def target_prob(model, prompt: str, target: str) -> float:
    import torch

    from attention_drift.core import tokens

    batch = tokens.batch_with_targets(model, [prompt], [target])
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    return tokens.target_log_probs(logits, batch).exp()[0].item()


def run_smollm2(model) -> dict:
    from attention_drift.core.data import Rewrite
    from attention_drift.editing import apply_edit

    rewrite = Rewrite(*SMOLLM2_REWRITE)
    before = target_prob(model, rewrite.prompt, rewrite.target_new)
    result = apply_edit(model, rewrite, "rome", smollm2_case(), progress=False)
    after = target_prob(model, rewrite.prompt, rewrite.target_new)
    summary = result_summary(result)
    result.restore()
    return {"target_prob_before": before, "target_prob_after": after,
            "delta_norm": summary["deltas"]["blocks.5.mlp.out.weight"]["norm"], "loss": summary["loss"]}


# ---------------------------------------------------------------- comparison

def _close(got: float, want: float, scale: float, rtol: float) -> bool:
    return math.isfinite(got) and abs(got - want) <= rtol * max(abs(scale), 1e-12)


def compare_summary(got: dict, want: dict, rtol: float) -> list[str]:
    """Every difference beyond tolerance, as readable lines (empty: equal)."""
    problems = []
    if got["layers"] != want["layers"] or sorted(got["deltas"]) != sorted(want["deltas"]):
        return [f"edited layers {got['layers']} / {sorted(got['deltas'])}, reference {want['layers']}"]
    if got["steps_run"] != want["steps_run"]:
        problems.append(f"steps run {got['steps_run']}, reference {want['steps_run']}")
    for name, w in want["deltas"].items():
        g = got["deltas"][name]
        if g["shape"] != w["shape"]:
            problems.append(f"{name}: shape {g['shape']}, reference {w['shape']}")
            continue
        for key, scale in (("norm", w["norm"]), ("abs_sum", w["abs_sum"]), ("max_abs", w["max_abs"]),
                           ("sum", w["abs_sum"])):
            if not _close(g[key], w[key], scale, rtol):
                problems.append(f"{name}: {key} {g[key]!r}, reference {w[key]!r}")
        for index, value in w["entries"].items():
            i, j = map(int, index.split(","))
            got_value = g["entries"].get(index)
            if got_value is None:
                problems.append(f"{name}: entry {index} was not recorded")
            elif not _close(got_value, value, w["max_abs"], rtol):
                problems.append(f"{name}[{i},{j}] = {got_value!r}, reference {value!r}")
    for key, tol in (("loss", rtol), ("sadr_loss", max(rtol, SADR_RTOL))):
        for r, (g_trace, w_trace) in enumerate(zip(got[key], want[key])):
            if len(g_trace) != len(w_trace):
                problems.append(f"{key} of request {r}: {len(g_trace)} steps, reference {len(w_trace)}")
                continue
            scale = max((abs(v) for v in w_trace), default=0.0)
            bad = [s for s, (a, b) in enumerate(zip(g_trace, w_trace)) if not _close(a, b, scale, tol)]
            if bad:
                problems.append(f"{key} of request {r} differs at steps {bad}: {g_trace}, reference {w_trace}")
    return problems


def _reference() -> dict:
    if not FIXTURE.is_file():
        pytest.fail(f"{FIXTURE} is missing; write it with: python tests/test_reference_editing.py")
    return json.loads(FIXTURE.read_text())


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_DRIFT_CACHE", str(tmp_path / "cache"))


def convergence_problems(trace: list[float], rtol: float) -> list[str]:
    """Why a loss trace does not show a converging optimisation (empty: it does): it must end
    lower than it starts by more than ten times ``rtol`` of its scale, and no step may rise by
    more than ``rtol`` of it (float noise)."""
    scale = max(abs(v) for v in trace)
    problems = []
    if not trace[-1] < trace[0] - 10 * rtol * scale:
        problems.append(f"the loss does not fall: {trace[0]} -> {trace[-1]}")
    rises = [s + 1 for s, (a, b) in enumerate(zip(trace, trace[1:])) if b > a + rtol * scale]
    if rises:
        problems.append(f"the loss rises at steps {rises}: {trace}")
    return problems


@pytest.mark.parametrize("name", METHODS_CASES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_edit_matches_the_frozen_reference(arch, name, private_cache):
    want = _reference()["tiny"][arch][name]
    got = run_tiny(arch, name)
    problems = compare_summary(got, want, TINY_RTOL)
    assert not problems, "\n".join(problems)
    assert not [p for trace in got["loss"] for p in convergence_problems(trace, TINY_RTOL)]


def test_reference_optimisations_converge():
    """Every stored loss trace falls (see :func:`tiny_case`), SmolLM2's too: a reference that pins a
    diverging optimisation would pin its oscillation, not what the editor computes."""
    ref = _reference()
    for arch, cases in ref["tiny"].items():
        for name, summary in cases.items():
            for r, trace in enumerate(summary["loss"]):
                assert not convergence_problems(trace, TINY_RTOL), (arch, name, r, convergence_problems(trace, TINY_RTOL))
    for trace in ref["smollm2"]["loss"]:
        assert not convergence_problems(trace, SLOW_RTOL) and trace[-1] < 0.1 * trace[0]
    assert convergence_problems([5.8, 7.4, 7.5, 7.4], TINY_RTOL) and convergence_problems([5.8, 5.7, 5.75], TINY_RTOL)


def test_reference_pins_nontrivial_edits():
    """The stored edits changed the weights and SADR was active, so a no-op editor cannot pass."""
    ref = _reference()["tiny"]
    for arch, cases in ref.items():
        for name, summary in cases.items():
            assert all(d["norm"] > 1e-3 for d in summary["deltas"].values()), (arch, name)
        assert max(cases["rome_sadr"]["sadr_loss"][0]) > 0, arch
        assert cases["rome_sadr"]["steps_run"] != cases["rome"]["steps_run"] or \
            cases["rome_sadr"]["loss"] != cases["rome"]["loss"], arch


def test_comparison_flags_a_changed_edit():
    ref = _reference()["tiny"]["llama"]["rome"]
    changed = json.loads(json.dumps(ref))
    name = next(iter(changed["deltas"]))
    changed["deltas"][name]["norm"] *= 1 + 10 * TINY_RTOL
    changed["loss"][0][-1] += 1.0
    problems = compare_summary(changed, ref, TINY_RTOL)
    assert any("norm" in p for p in problems) and any("loss of request 0" in p for p in problems)
    assert compare_summary(ref, ref, TINY_RTOL) == []


@pytest.mark.slow
def test_smollm2_rome_matches_the_frozen_reference(smollm2):
    want = _reference().get("smollm2")
    if want is None:
        pytest.fail("no SmolLM2 record in the fixture; write it with: python tests/test_reference_editing.py --slow")
    got = run_smollm2(smollm2)
    assert got["target_prob_before"] == pytest.approx(want["target_prob_before"], rel=SLOW_RTOL, abs=1e-3)
    assert got["target_prob_after"] == pytest.approx(want["target_prob_after"], rel=SLOW_RTOL, abs=1e-3)
    assert got["delta_norm"] == pytest.approx(want["delta_norm"], rel=SLOW_RTOL)
    assert got["loss"] == [pytest.approx(trace, rel=SLOW_RTOL, abs=1e-4) for trace in want["loss"]]
    assert got["target_prob_after"] > 0.9 > 0.01 > got["target_prob_before"]


def write_reference(slow: bool) -> None:
    """Compute every record with the code as it is and write the fixture (keeps an absent
    SmolLM2 record's old value unless ``slow``)."""
    import torch

    torch.set_num_threads(1)
    old = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
    out = {"tiny": {}}
    saved = os.environ.get("ATTENTION_DRIFT_CACHE")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["ATTENTION_DRIFT_CACHE"] = folder
        for arch in ("llama", "gpt2"):
            out["tiny"][arch] = {}
            for name in METHODS_CASES:
                torch.manual_seed(0)
                out["tiny"][arch][name] = run_tiny(arch, name)
                print(arch, name, [round(d["norm"], 6) for d in out["tiny"][arch][name]["deltas"].values()])
    if saved is None:
        os.environ.pop("ATTENTION_DRIFT_CACHE")
    else:
        os.environ["ATTENTION_DRIFT_CACHE"] = saved
    if slow:
        from attention_drift.core.models import load_model

        out["smollm2"] = run_smollm2(load_model("smollm2-135m"))
        print("smollm2", out["smollm2"])
    elif "smollm2" in old:
        out["smollm2"] = old["smollm2"]
    FIXTURE.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", FIXTURE)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    write_reference(slow="--slow" in sys.argv[1:])
