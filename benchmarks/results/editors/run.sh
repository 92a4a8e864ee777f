#!/usr/bin/env bash
# Every editor on the grid's records (the first 100 balanced records of the report half), with
# today's defaults and statistics, the pre-edit scores of ../plus/none.jsonl reused, so that the
# rows differ only by the editor. ROME, MEMIT, PMET and their SADR rows are in ../plus and
# ../grid-today. Resumable: re-run this script.
set -euo pipefail
cd "$(dirname "$0")"
AD=${AD:-attention-drift}
SEL="--data dev-report --limit 100 --balanced --reuse-pre ../plus/none.jsonl --threads 1 --no-progress"
# r-rome-compute-v.jsonl: r-ROME before 2026-12-07 (the rome/compute_v.py form; see r_rome.py)
for m in alphaedit emmet r-rome ft; do
    $AD evaluate $SEL --method $m --out $m.jsonl
done
for m in alphaedit emmet r-rome ft; do
    $AD evaluate $SEL --method $m --sadr --sadr-variant plus --out $m-sadr-plus.jsonl
done
for m in alphaedit emmet r-rome ft; do
    $AD evaluate $SEL --method $m --sadr --out $m-sadr.jsonl
done
