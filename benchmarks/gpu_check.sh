#!/usr/bin/env bash
# GPU check: tests/gpu/test_gpu.py, the rest of the suite, the throughput benchmark on the GPU in bf16, then the
# step-overhead benchmark (host work per step, rows/s and GPU utilisation; about 13 to 14 minutes in all).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, or from anywhere: every part
#   bash benchmarks/gpu_check.sh gpu-tests suite          # some parts: gpu-tests (<= 150 s), suite (<= 200 s),
#   bash benchmarks/gpu_check.sh throughput overhead      #   throughput (<= 200 s), overhead (<= 320 s)
#
# All four parts take up to 14.5 minutes, more than one command may run on a lent device machine (10 minutes):
# run them as the two calls above.
#
# Needs only a python3 with torch (CUDA), lightning, torchmetrics, pandas, pyarrow and pytest:
# no make, no virtualenv, no network. torchdata and jsonargparse are pure Python: where they are missing, put a copy of
# them on PYTHONPATH (it is kept). Writes its outputs under benchmarks/.cache/gpu_check/:
# versions.txt, gpu_tests.txt, tests.txt (tests-0..3.txt: the shards), throughput.txt (the table: rows/s,
# peak RSS, GPU utilisation per system), throughput.json (every measurement), step_overhead.txt (raw loop, its CUDA-graph
# ceiling and Trainer + ParquetDataModule + module at batch 2048, the benchmark MMoE at batch 16384: steps/s, rows/s,
# host ms per step, GPU utilisation) and nvidia-smi.txt.
set -u
cd "$(dirname "$0")/.."
PARTS="${*:-gpu-tests suite throughput overhead}"
for part in $PARTS; do
    case "$part" in gpu-tests|suite|throughput|overhead) ;;
        *) echo "unknown part '$part': the parts are gpu-tests, suite, throughput, overhead" >&2; exit 2 ;;
    esac
done
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
gpu_rc=0; tests_rc=0; bench_rc=0; overhead_rc=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # absolute: tests start scripts in other folders
OUT=benchmarks/.cache/gpu_check
mkdir -p "$OUT"

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))" || exit 1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

python3 -m pip list 2>/dev/null | grep -iE "^(torch|lightning|torchmetrics|torchrec|fbgemm|onnx|pyarrow)" \
    > "$OUT/versions.txt" || true
cat "$OUT/versions.txt"

if want gpu-tests; then
echo "== GPU tests: tests/gpu/test_gpu.py (at most 150 s) =="
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
gpu_rc=$?
tail -n 8 "$OUT/gpu_tests.txt"
fi

if want suite; then
echo "== the rest of the suite, 4 processes side by side (at most 200 s) =="
# The suite takes about 13 minutes on 2 cores; the GPU machine has more, so its files run in 4 shards.
files=$(ls tests/*/test_*.py | grep -v test_gpu.py)
if ! python3 -c "import moto, s3fs" 2>/dev/null; then  # the dev extra's local S3 server is not installed here
    echo "moto or s3fs missing: tests/data/test_object_store.py and tests/training/test_incremental.py are left out"
    files=$(echo "$files" | grep -v -e test_object_store.py -e test_incremental.py)
fi
pids=()
for shard in 0 1 2 3; do
    mine=$(echo "$files" | awk -v s=$shard 'NR % 4 == s')
    timeout 200 python3 -m pytest -q -p no:cacheprovider $mine > "$OUT/tests-$shard.txt" 2>&1 &
    pids+=($!)
done
tests_rc=0
for shard in 0 1 2 3; do
    wait "${pids[$shard]}"; rc=$?
    [ "$rc" -ne 0 ] && tests_rc=$rc
    echo "shard $shard (exit $rc): $(tail -n 1 "$OUT/tests-$shard.txt")"
    [ "$rc" -eq 124 ] && echo "shard $shard: stopped after 200 s (see $OUT/tests-$shard.txt)"
done
cat "$OUT"/tests-?.txt > "$OUT/tests.txt"
fi
[ "$gpu_rc" -ne 0 ] && tests_rc=$gpu_rc

if want throughput; then
echo "== throughput, gpu bf16-mixed (at most 200 s) =="
# MMoE only, 2 repetitions of 60 timed steps: raw loop, raw loop with SparseAdam, frozen tables,
# Trainer + ParquetDataModule dense and with sparse_embeddings=True, and TorchRecStrategy where TorchRec is
# installed; the data path alone.
timeout 200 python3 benchmarks/throughput.py --accelerator gpu --precision bf16-mixed --models mmoe \
    --repeats 2 --steps 60 --threads 4 --no-auc --timeout 120 --json "$OUT/throughput.json" \
    2>&1 | tee "$OUT/throughput.txt"
bench_rc=${PIPESTATUS[0]}
fi

if want overhead; then
echo "== step overhead, gpu bf16-mixed (at most 320 s) =="
# Host work per step on the GPU (docs/performance.md, "Step overhead"): the raw fused-Adam loop, its fair ceiling
# (batches gathered on the GPU before timing, fused losses, the whole step as one CUDA graph), Trainer +
# ParquetDataModule + MultiTaskLightningModule at their defaults (the split kept on the GPU: device_resident="auto")
# and with host batches (pinned, copied every step); tiny and benchmark MMoE at batch 2048, 2 rounds; then the
# benchmark MMoE at batch 16384 (the goal: 1M rows/s), GPU utilisation sampled by nvidia-smi.
{
    timeout 200 python3 benchmarks/step_overhead.py --accelerator gpu --precision bf16-mixed --gpu-util \
        --threads 4 --rounds 2 --batch-size 2048 --steps 100 --models tiny,bench
    rc1=$?
    timeout 120 python3 benchmarks/step_overhead.py --accelerator gpu --precision bf16-mixed --gpu-util \
        --threads 4 --rounds 2 --batch-size 16384 --steps 30 --models bench \
        --loops "raw,raw-ceiling,mtl-lightning,mtl-lightning host-batches"
    rc2=$?
    [ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
} 2>&1 | tee "$OUT/step_overhead.txt"
overhead_rc=${PIPESTATUS[0]}
fi

echo "parts run: $PARTS; tests exit code: $tests_rc, benchmark exit codes: throughput $bench_rc, step overhead $overhead_rc;" \
    "outputs in $OUT/"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$overhead_rc" -eq 0 ]
