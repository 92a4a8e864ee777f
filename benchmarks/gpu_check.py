"""Check that editing (with SADR), evaluation and drift run on a GPU: a tiny model, every editor.

    python benchmarks/gpu_check.py [--device cuda]

Prints one line per check and "GPU OK" at the end; CI has no GPU, so this is run by hand.
"""

import argparse
import time

import torch

from attention_drift import load_example, tiny_model
from attention_drift.editing import MEMITConfig, PMETConfig, ROMEConfig, StatsConfig, edit
from attention_drift.evaluate import evaluate_record
from attention_drift.sadr import SADRConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    device = p.parse_args().device
    model = tiny_model("llama", n_layers=3).to(device)
    record = load_example()[0]
    stats = StatsConfig(corpus="model", n_samples=32, seq_len=24)
    configs = {
        "rome": ROMEConfig(layer=1, stats=stats, steps=6, context_templates=((4, 2),)),
        "memit": MEMITConfig(layers=(1,), stats=stats, steps=6, context_templates=((4, 2),)),
        "pmet": PMETConfig(layers=(1,), stats=stats, steps=6, context_templates=((4, 2),)),
    }
    before = evaluate_record(model, record)
    for method, config in configs.items():
        start = time.perf_counter()
        with edit(model, record.rewrite, method, config, sadr=SADRConfig(weight=1.0, distract=True)) as result:
            after = evaluate_record(model, record)
            mask = result.sadr_records[0]["mask"][-1]
        assert mask.device.type == torch.device(device).type
        print(f"{method}+SADR on {device}: {time.perf_counter() - start:.2f} s, efficacy p "
              f"{before.groups['efficacy'].p_right[0]:.4f} -> {after.groups['efficacy'].p_right[0]:.4f}", flush=True)
    print("GPU OK")


if __name__ == "__main__":
    main()
