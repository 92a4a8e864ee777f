#!/usr/bin/env bash
# Issue 26, items 2 and 3: SADR+ taken apart, and the cross variant, against ROME on the report half,
# every context of the distract suite scored: all 168 records of dev-report (84 CounterFact-type, 65 of
# them with neighbourhood prompts for the DNS contexts; 84 Wikidata-type, 35 with relation prompts for
# RS, distract relation and RS-M). The runs first covered the 84 CounterFact-type records
# (`--kinds counterfact`); a run file's header names no selection, so the same files take the rest.
# Pre-edit scores computed once (none.jsonl) and reused; ROME, cross (`--sadr-variant cross`, designed
# on dev-tune: benchmarks/results/cross/), SADR+, MEMIT and PMET on the first 50 CounterFact-type
# records, and the four baselines of attention_drift.runs.variants.PLUS_PARTS; then the comparisons
# (compare*.md) and the suite figure.
# About 1-1.5 CPU-minutes per record and variant on SmolLM2-135M with one thread; add --device cuda
# (and more --workers) on a GPU. Resumable: re-run this script.
set -euo pipefail
cd "$(dirname "$0")"
AD=${AD:-attention-drift}
COMMON="--data dev-report --suite --fluency --threads 1 --no-progress ${EXTRA:-}"
SEL="$COMMON --limit 200"
$AD evaluate $SEL --method none --out none.jsonl
$AD evaluate $SEL --method rome --reuse-pre none.jsonl --out rome.jsonl
$AD evaluate $SEL --method rome --sadr --sadr-variant cross --reuse-pre none.jsonl --out rome-sadr-cross.jsonl
$AD evaluate $SEL --method rome --sadr --sadr-variant plus --reuse-pre none.jsonl --out rome-sadr-plus.jsonl
# MEMIT and PMET, plain, SADR+ and cross, on the first 50 of the same records (item 2 and item 3's "beside")
SEL50="$COMMON --kinds counterfact --limit 50"
for m in memit pmet; do
    $AD evaluate $SEL50 --method $m --reuse-pre none.jsonl --out $m.jsonl
    $AD evaluate $SEL50 --method $m --sadr --sadr-variant cross --reuse-pre none.jsonl --out $m-sadr-cross.jsonl
    $AD evaluate $SEL50 --method $m --sadr --sadr-variant plus --reuse-pre none.jsonl --out $m-sadr-plus.jsonl
done
for part in fallback no-verify attn-distract published-contrast; do
    $AD evaluate $SEL --variant rome-parts-$part --reuse-pre none.jsonl --out rome-parts-$part.jsonl
done
for m in memit pmet; do
    $AD compare $m.jsonl $m-sadr-cross.jsonl $m-sadr-plus.jsonl > compare-$m.md
done
$AD compare rome.jsonl rome-sadr-cross.jsonl rome-sadr-plus.jsonl rome-parts-*.jsonl --suite-figure suite.png > compare.md
