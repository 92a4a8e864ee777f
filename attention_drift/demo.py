"""The demo (``attention-drift demo``, ``make demo``): the whole story on one offline model.

1. load the model and show facts it knows;
2. evaluate the example records (shipped with the package) before editing;
3. edit one fact with ROME and show specificity failure on a distract prompt, with the heads
   whose attention to the edited subject drifted most;
4. print the metric table of the unedited model.

Everything runs offline on a CPU in a few minutes. The covariance statistics use fewer
self-sampled sequences than the editing preset (``--stats-samples``) so that a fresh machine
does not spend its first quarter hour sampling; the result is cached for the next run.
"""

import dataclasses
import sys
import time

import torch

from attention_drift import tokens
from attention_drift.data import distract_prompt, load_example
from attention_drift.evaluate import aggregate, avg_s, evaluate_record
from attention_drift.models import DEFAULT_MODEL, load_model


def _say(text: str = "") -> None:
    print(text, flush=True)


def show_facts(model, records) -> None:
    """Top-1 continuation of each record's rewrite prompt, and P(true) vs P(new)."""
    prompts = [r.rewrite.prompt for r in records]
    batch = tokens.batch_prompts(model, prompts)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
        rows = logits[torch.arange(len(prompts)), batch.last_prompt_index]
        true = tokens.batch_with_targets(model, prompts, [r.rewrite.target_true for r in records])
        new = tokens.batch_with_targets(model, prompts, [r.rewrite.target_new for r in records])
        p_true = tokens.target_log_probs(model(true.input_ids, attention_mask=true.attention_mask), true).exp()
        p_new = tokens.target_log_probs(model(new.input_ids, attention_mask=new.attention_mask), new).exp()
    _say("| prompt | top-1 | P(true) | P(new) |")
    _say("|---|---|---:|---:|")
    for i, record in enumerate(records):
        top = model.tokenizer.decode(rows[i].argmax())
        rw = record.rewrite
        _say(f"| {rw.prompt} … | {top!r} | {p_true[i]:.3f} ({rw.target_true}) | {p_new[i]:.3f} ({rw.target_new}) |")


def show_edit(model, record, stats_samples: int) -> None:
    """ROME on one record: efficacy, a distract prompt before/after, top drifting heads."""
    from attention_drift.drift import measure_drift
    from attention_drift.editing import ROMEConfig, edit

    config = ROMEConfig.for_model(model)
    config = dataclasses.replace(config, stats=dataclasses.replace(config.stats, n_samples=stats_samples))
    rw = record.rewrite
    neighbours = list(zip(record.neighborhood.prompts, record.neighborhood.targets))[:3]
    prompts = [distract_prompt(rw, p) for p, _ in neighbours]
    targets = [t for _, t in neighbours]
    _say(f"Edit: {rw.prompt} {rw.target_true} -> {rw.target_new}  (ROME, layer {config.layer})")
    start = time.perf_counter()
    drift = measure_drift(model, rw, prompts, lambda: edit(model, rw, method="rome", config=config), targets=targets)
    _say(f"  edit + measurement: {time.perf_counter() - start:.1f} s "
         "(the first run also computes and caches the covariance statistics)")
    for i, prompt in enumerate(prompts):
        b, a = drift.scores_before.p_true[i].item(), drift.scores_after.p_true[i].item()
        pn = drift.scores_after.p_new[i].item()
        flag = "FAILS" if drift.scores_after.prefers_new[i] else "ok"
        _say(f"  {prompt!r}\n    P({targets[i]}) {b:.3f} -> {a:.3f}; P({rw.target_new}) after {pn:.3f}  [{flag}]")
    top = drift.head_drift(0, "subject_last").top(5)
    _say("  heads whose attention from the last token to the subject's last token grew most (prompt 1):")
    for layer, head, before, after, delta in top:
        _say(f"    L{layer}H{head}: {before:.3f} -> {after:.3f} (+{delta:.3f})")


def run_demo(model_name: str = DEFAULT_MODEL, *, stats_samples: int = 100, edit_demo: bool = True) -> int:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    records = load_example()
    start = time.perf_counter()
    model = load_model(model_name)
    _say(f"# attention_drift demo — {model_name}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads "
         f"(loaded in {time.perf_counter() - start:.1f} s)\n")
    _say("## Facts the unedited model knows\n")
    show_facts(model, records)
    if edit_demo:
        _say("\n## One edit, and what it does to an unrelated fact\n")
        show_edit(model, next(r for r in records if len(r.neighborhood)), stats_samples)
    _say(f"\n## The paper's metrics on the {len(records)} example records, before editing\n")
    stats = aggregate([evaluate_record(model, r) for r in records])
    _say("| group | n | accuracy (95% CI half-width) |")
    _say("|---|---:|---:|")
    for name, s in stats.items():
        _say(f"| {name} | {s.n} | {100 * s.accuracy:.1f} ± {100 * s.half_width:.1f} |")
    avg = avg_s(stats)
    if avg is not None:
        _say(f"\nAvg.S (harmonic mean of ES, PS, NS, RS, DNS): {100 * avg:.1f}")
    _say(f"\nTotal {time.perf_counter() - start:.1f} s. Next: attention-drift evaluate --help")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
