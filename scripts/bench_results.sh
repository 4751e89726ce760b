#!/usr/bin/env bash
# Every benchmark figure of docs/bench_results.md, from the repo root (about 45 minutes on a
# 2-core CPU): five launch/bench.py runs, then their tables. Each run exits non-zero when a
# record breaks one of the bench's own checks (ISO compute vs stock beyond 5%, a time reduction
# beyond the same-run bound, ISO peak memory above 1.05 x stock); this script reports every
# run's status and exits non-zero if any failed.
#   1. TP 2, emulated link: stock-ratio profiles and GPU profiles (the cost model's M/C for
#      that GPU, model and TP, and the device's contention), 1024 and 2048 tokens, every split
#   2. TP 2, short prompts and a fast link: auto only (where ISO must step aside or not lose)
#   3. TP 1: no all-reduce at all, auto (nothing to overlap: must not lose)
#   4. chunked pipeline parallelism, TP 1 x PP 2 (launch/bench_pipeline.py): stage transfers
#      over gloo; then each stage standing in for TP 2 (all-reduces at M/C 0.5) with the stage
#      link emulated at 0.05 of a stage's compute (Llama-3-70B, TP 8 x PP 4, H100 + IB NDR)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-docs}
REPS=${REPS:-5}
status=0
run() {  # name, nproc, bench arguments...
    local name=$1 nproc=$2
    shift 2
    echo "== $name" >&2
    torchrun --standalone --nproc-per-node "$nproc" launch/bench.py --timing-repeats "$REPS" \
        --output-json "$OUT/$name.json" "$@" || { echo "== $name: exit $?" >&2; status=1; }
}
run bench_cpu_emulated 2 \
    --profiles ratio:0.5,ratio:1,ratio:2,gpu:4090/opt-30b/tp4,gpu:a800/opt-30b/tp4,gpu:4090/llama-33b/tp4,gpu:a800/llama-33b/tp4 \
    --seq-lens 1024,2048 --splits even,balanced,auto --plot "$OUT/bench_cpu_emulated.png"
# short prompts: cheap, and their few-ms differences are the noise's size: twice the repetitions
run bench_cpu_short 2 --profiles ratio:0.05,ratio:1 --seq-lens 256,512 --splits auto --timing-repeats $((2 * REPS + 1))
run bench_cpu_tp1 1 --profiles ratio:1 --seq-lens 1024,2048 --splits auto
PP=(--pipeline-model-parallel-size 2 --seq-lens 256,512,2048,4096 --pp-chunks 2,4,8,auto --max-chunks 8)
run bench_cpu_pp 2 "${PP[@]}"
run bench_cpu_pp_emulated 2 "${PP[@]}" --pp-tp-ratio 0.5 --pp-link ratio:0.05
for name in bench_cpu_emulated bench_cpu_short bench_cpu_tp1 bench_cpu_pp bench_cpu_pp_emulated; do
    [ -f "$OUT/$name.json" ] && { echo; echo "### $name"; python3 launch/bench.py --summarize "$OUT/$name.json"; }
done
exit $status
