#!/usr/bin/env bash
# The grid with today's defaults and statistics: 100 balanced records of the report half,
# the pre-edit scores of ../plus/none.jsonl reused. Resumable: re-run this script.
set -euo pipefail
cd "$(dirname "$0")"
AD=${AD:-attention-drift}
SEL="--data dev-report --limit 100 --balanced --reuse-pre ../plus/none.jsonl --threads 1 --no-progress"
$AD evaluate $SEL --method memit --out memit.jsonl
$AD evaluate $SEL --method pmet --out pmet.jsonl
$AD evaluate $SEL --method memit --sadr --sadr-variant plus --out memit-sadr-plus.jsonl
$AD evaluate $SEL --method pmet --sadr --sadr-variant plus --out pmet-sadr-plus.jsonl
$AD evaluate $SEL --method rome --sadr --out rome-sadr.jsonl
$AD evaluate $SEL --method memit --sadr --out memit-sadr.jsonl
$AD evaluate $SEL --method pmet --sadr --out pmet-sadr.jsonl
