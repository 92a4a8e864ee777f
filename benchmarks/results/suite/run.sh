#!/usr/bin/env bash
# The distract suite (evaluate --suite) on SmolLM2-135M: the first 20 balanced records of the report
# half, pre-edit (none.jsonl), after ROME (rome.jsonl) and after ROME with SADR+ (rome-sadr-plus.jsonl),
# the edited runs reusing none.jsonl's pre-edit scores, on CPU with one thread; then the comparison
# table (compare.md) and the suite figure (suite.png). Resumable: re-run this script.
set -euo pipefail
cd "$(dirname "$0")"
AD=${AD:-attention-drift}
SEL="--data dev-report --limit 20 --balanced --suite --threads 1 --no-progress"
$AD evaluate $SEL --method none --out none.jsonl
$AD evaluate $SEL --method rome --reuse-pre none.jsonl --out rome.jsonl
$AD evaluate $SEL --method rome --sadr --sadr-variant plus --reuse-pre none.jsonl --out rome-sadr-plus.jsonl
$AD compare none.jsonl rome.jsonl rome-sadr-plus.jsonl --suite-figure suite.png > compare.md
