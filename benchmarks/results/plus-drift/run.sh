#!/usr/bin/env bash
# Issue 26, item 2, the mechanism: per-head attention drift of SADR+ edits beside ROME's, on the
# report half's 100 records with distract prompts (65 CounterFact-type with distract neighbourhood
# prompts, 35 Wikidata-type with distract relation prompts). Does the attention still drift where
# SADR+ has removed the failure? Then the explorer of the two runs side by side. Resumable: re-run
# to continue. About 1 CPU-minute per record and run on SmolLM2-135M with one thread beside other
# jobs; add --device cuda on a GPU.
set -euo pipefail
cd "$(dirname "$0")"
AD=${AD:-attention-drift}
SEL="--data dev-report --limit 100 --with-distract --threads 1 --no-progress --no-figures ${EXTRA:-}"
$AD drift $SEL --method rome --out rome
$AD drift $SEL --method rome --sadr --sadr-variant plus --out rome-sadr-plus
$AD drift-figure rome rome-sadr-plus --out drift
$AD explore rome --comparison rome-sadr-plus --out explorer.html --no-open
