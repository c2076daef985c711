#!/usr/bin/env bash
# Runs fuzz targets one at a time, single job, and prints each run's final statistics.
#   fuzz/run.sh [RUNS] [TARGET...]     (RUNS defaults to 10,000,000 executions per target)
# MAX_LEN (default 1024) bounds an input's length: every property shows in a few hundred
# bytes, and longer inputs only make each execution slower.
# Needs cargo-fuzz and a nightly toolchain: docs/TESTING.md, "Fuzzing".
set -euo pipefail
cd "$(dirname "$0")"
runs=${1:-10000000}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
mkdir -p logs
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    start=$(date +%s)
    # One process, one job (libFuzzer's default). --sanitizer none: the code is safe Rust (#![forbid(unsafe_code)]); panics are the findings.
    nice -n 10 cargo +nightly fuzz run -O --sanitizer none "$target" "corpus/$target" -- \
        -runs="$runs" -max_len="${MAX_LEN:-1024}" -print_final_stats=1 > "logs/$target.log" 2>&1 || {
        echo "$target: FAILED after $(( $(date +%s) - start )) s, see fuzz/logs/$target.log"
        continue
    }
    seconds=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$target.log" | grep -o '[0-9]*$')
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "logs/$target.log" | grep -o '[0-9]*$')
    echo "$target: $execs executions in $seconds s ($rate exec/s), corpus $(ls "corpus/$target" | wc -l) files"
done
