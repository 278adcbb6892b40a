#!/usr/bin/env bash
# The checks only a CUDA GPU can run, in one go, within a time budget (a lent GPU is short-lived):
#
#   PAIRS=path/to/debian/train.jsonl.gz BIG_MODEL=path/to/bert-large bash scripts/gpu_checks.sh OUT_DIR [SECONDS]    (from the repository root)
#
# 1. the GPU tests (bf16/fp16 training, gradient cache with CUDA dropout, DeepSpeed on one GPU);
# 2. the rest of the fast test suite, which then trains on the GPU;
# 3. contrastive throughput vs sentence-transformers on the GPU (packaged MiniLM; also with
#    data-loader workers);
# 4. gradient-cache GPU memory at growing global batch, and its time overhead;
# 5. throughput with BIG_MODEL (e.g. a random BERT-large), if set;
# and the synchronising CUDA calls per training step (python -m benchmarks.count_host_reads).
# Each stage gets what is left of SECONDS (default 480) and writes OUT_DIR/<stage>.log.
set -u
OUT=${1:?output directory}
BUDGET=${2:-480}
PAIRS=${PAIRS:?PAIRS must name Debian train.jsonl.gz}
mkdir -p "$OUT"
DEADLINE=$(($(date +%s) + BUDGET))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true

stage() {  # stage NAME MAX_SECONDS COMMAND...
    local name=$1 limit=$2 left
    shift 2
    left=$((DEADLINE - $(date +%s) - 5))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "== $name: skipped (time budget spent)"
        return
    fi
    echo "== $name (at most ${limit}s): $*"
    local start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $(($(date +%s) - start))s"
}

# -v -rA: each test's outcome is logged by name as it finishes, so a stage cut short still says which failed.
stage gpu_tests 170 python3 -m pytest -v -rA -p no:cacheprovider -m gpu -s tests/test_gpu.py tests/test_grad_cache.py
stage test_suite 200 python3 -m pytest -v -rfE -p no:cacheprovider -n 14 --timeout 120 tests \
    --ignore tests/test_deepspeed.py --ignore tests/test_gpu.py --ignore tests/test_distributed.py \
    --ignore tests/test_reliability_distributed.py  # 2-process tests hide the GPU: CPU runs, as in CI
# +1slice: one padded forward per side, half the kernel launches of the default two slices.
stage bench_minilm 130 python3 -m benchmarks.bench_contrastive --pairs "$PAIRS" --num-pairs 8000 \
    --batch-sizes 256 --steps 20 --warmup-steps 5 --repeats 2 --max-length 128 \
    --variants ember:bf16,st:bf16,ember:bf16+1slice,ember:bf16+packed,ember:fp32,st:fp32
# Synchronising CUDA calls per optimizer step, padded and packed (the CPU counts are in docs/benchmarks.md).
stage host_reads 50 python3 -m benchmarks.count_host_reads --layout padded,packed --steps 3 --precision bf16
# chunk 32 = the smallest batch: every size then holds the same activations at once (256 left out:
# on an H200, 32 and 256 took the stage's 91 s before 1,024 was reached).
stage grad_cache 100 python3 -m benchmarks.bench_grad_cache --pairs "$PAIRS" --batches 32,1024 \
    --plain-batches 32,1024 --chunk 32 --max-length 128 --overhead-batch 1024 --steps 3 \
    --overhead-repeats 1 --precision bf16
# Tokenizing in data-loader workers on both sides: does it close ember-train's gap on a small model?
stage bench_minilm_workers 80 python3 -m benchmarks.bench_contrastive --pairs "$PAIRS" --num-pairs 8000 \
    --batch-sizes 256 --steps 25 --warmup-steps 8 --repeats 2 --max-length 128 --num-workers 2 \
    --variants ember:bf16,st:bf16

if [[ -n "${BIG_MODEL:-}" ]]; then
    stage bench_large 90 python3 -m benchmarks.bench_contrastive --pairs "$PAIRS" --model "$BIG_MODEL" \
        --num-pairs 4000 --batch-sizes 64 --steps 12 --warmup-steps 2 --repeats 1 --max-length 128 \
        --variants ember:bf16,st:bf16,ember:bf16+grouped
fi

for log in "$OUT"/*.log; do
    echo "---- $(basename "$log"): last lines"
    grep -v -i "warn" "$log" | tail -n 25
done
