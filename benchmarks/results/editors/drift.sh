#!/usr/bin/env bash
# Per-head attention drift of every editor on the gallery's drift records (the first 100 development
# records with distract prompts, balanced between the kinds: the records of figures/drift/drift.json,
# which is ROME's), then one figure of every editor's mean drift on one colour scale. Resumable:
# re-run to continue. MEMIT's 100 records took 52 min on the 2-core CPU at low priority beside four
# other jobs; add --device cuda on a GPU.
set -euo pipefail
cd "$(dirname "$0")"
AD=${AD:-attention-drift}
SEL="--data dev --limit 100 --balanced --with-distract --threads 1 --no-progress --no-figures ${EXTRA:-}"
for m in memit pmet alphaedit emmet r-rome ft; do
    $AD drift $SEL --method $m --out drift/$m
done
$AD drift-figure ../../../figures/drift drift/memit drift/pmet drift/alphaedit drift/emmet drift/r-rome drift/ft \
    --out drift/editors
