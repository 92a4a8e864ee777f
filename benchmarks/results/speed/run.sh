#!/usr/bin/env bash
# Every speed figure the README quotes, made on a quiet machine (nothing else running):
# each benchmark's output goes to a .txt file beside this script, headed by the command and date.
# Run from the repository root: bash benchmarks/results/speed/run.sh
set -euo pipefail
here=benchmarks/results/speed
py=${PYTHON:-python}
record() {  # record NAME COMMAND...
    local name=$1; shift
    { echo "\$ $*"; echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -m)"; } > "$here/$name.txt"
    "$@" 2>&1 | grep -v "it/s\]\|Loading weights\|Moving model" | tee -a "$here/$name.txt"
}
export HF_HUB_OFFLINE=1
record bench_editing $py benchmarks/bench_editing.py --threads 2 --all-methods
record bench_cold_start $py benchmarks/bench_cold_start.py --threads 2
record gpu_check_cpu $py benchmarks/gpu_check.py --device cpu --dtype bfloat16
cache=$(mktemp -d)
{ echo "\$ ATTENTION_DRIFT_CACHE=\$(mktemp -d) attention-drift demo   (what make demo runs after installing; wall time at the end)"; echo "# $(date -u +%Y-%m-%dT%H:%MZ)"; } > "$here/demo_cold.txt"
start=$(date +%s.%N)
ATTENTION_DRIFT_CACHE=$cache ${AD:-attention-drift} demo 2>&1 | grep -v "it/s\]\|Loading weights\|Moving model" >> "$here/demo_cold.txt"
echo "wall: $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a "$here/demo_cold.txt"
