"""Run every model-facing path on one device and dtype: evaluation, each editor with the published
SADR, drift, patching and the case study; print the time of each and the peak GPU memory.

    python benchmarks/gpu_check.py --device cuda --dtype bfloat16 [--model smollm2-135m]
    python benchmarks/gpu_check.py --device cpu --model <tiny folder>     # the same paths on a CPU

Every check goes through the functions the commands use (``Variant.editor``, ``evaluate_record``,
``drift_record``, ``patch_record``, ``case_study``). Prints one line per check and "OK" at the end;
CI has no GPU, so this is run by hand (or on a lent GPU machine).
"""

import argparse
import time

import torch

from attention_drift.measure.case_study import case_study
from attention_drift.core.data import load_dev, load_example
from attention_drift.measure.drift import drift_record, record_prompts
from attention_drift.measure.evaluate import evaluate_record
from attention_drift.core.models import load_model
from attention_drift.measure.patch_record import patch_record
from attention_drift.runs.variants import SADRSpec, Variant, editor_names


def _peak(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--data", choices=("dev", "example"), default="dev")
    args = p.parse_args()
    start = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    device = next(model.parameters()).device
    print(f"loaded {args.model} ({args.dtype}) on {device} in {time.perf_counter() - start:.1f} s{_peak(device)}",
          flush=True)
    records = load_dev() if args.data == "dev" else load_example()
    record = next(r for r in records if r.kind == "counterfact")

    def check(name: str, fn):
        t = time.perf_counter()
        out = fn()
        print(f"{name}: {time.perf_counter() - t:.1f} s{_peak(device)}", flush=True)
        return out

    before = check("evaluate_record", lambda: evaluate_record(model, record))
    for method in editor_names():
        variant = Variant(f"{method}-sadr", method, SADRSpec())

        def edit_and_score():
            with variant.editor(model)(record) as result:
                after = evaluate_record(model, record)
            mask = result.sadr_records[0]["mask"][-1]
            assert mask.device.type == device.type, f"SADR mask on {mask.device}, model on {device}"
            return after, result

        after, result = check(f"{method} + published SADR ({result_steps(variant, model)} steps)", edit_and_score)
        print(f"  efficacy P(new) {before.groups['efficacy'].p_right[0]:.4f} -> "
              f"{after.groups['efficacy'].p_right[0]:.4f}; edit {result.seconds:.1f} s", flush=True)
    rome = Variant("rome", "rome").editor(model)
    drift = check("drift_record (top-3 heads captured)", lambda: drift_record(model, record, rome, capture_heads=3))
    print(f"  {len(drift.samples)} prompts, top head {drift.top_heads(1)}", flush=True)
    patched = check("patch_record (k=5, sweeps and contamination on 1 prompt)",
                    lambda: patch_record(model, record, rome, k=5, sweep_prompts=1, contamination_prompts=1))
    print(f"  {len(patched.cases)} prompts patched", flush=True)
    prompts, targets, _ = record_prompts(record, ("distract_neighborhood",))
    cs = check("case_study", lambda: case_study(model, record.rewrite, prompts[0], targets[0], method="rome"))
    print(f"  top-1 pre / post / restored: {[p.top_token for p in cs.predictions.values()]}", flush=True)
    print(f"OK in {time.perf_counter() - start:.1f} s{_peak(device)}")


def result_steps(variant: Variant, model) -> int:
    _, sadr = variant.resolve(model)
    return sadr.steps


if __name__ == "__main__":
    main()
