#!/usr/bin/env bash
# Sequences of 200 CounterFact-style dev edits on SmolLM2-135M, a checkpoint every 20 edits, 50 probe
# records no edit touches (see `attention-drift sequence --help`). Resumable: each run folder keeps
# its checkpoint, so re-running this script continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
AD=${AD:-attention-drift}
COMMON="--data dev --edits 200 --every 20 --probes 50 --explorer-at 200 --threads 1 --no-progress"
$AD sequence --method rome $COMMON --out rome
$AD sequence --method alphaedit $COMMON --out alphaedit
$AD sequence --method memit $COMMON --out memit
$AD sequence --method rome --sadr --sadr-variant plus $COMMON --out rome-sadr-plus
$AD sequence --method alphaedit --sadr --sadr-variant plus $COMMON --out alphaedit-sadr-plus
$AD sequence --method memit --sadr --sadr-variant plus $COMMON --out memit-sadr-plus
$AD sequence-figure rome alphaedit memit rome-sadr-plus alphaedit-sadr-plus memit-sadr-plus --out sequences
