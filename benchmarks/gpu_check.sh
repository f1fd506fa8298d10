#!/usr/bin/env bash
# GPU check: the test suite, then the throughput benchmark on the GPU in bf16 (about 6 minutes).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, or from anywhere
#
# Needs only a python3 with torch (CUDA), lightning, torchmetrics, pandas, pyarrow and pytest:
# no make, no virtualenv, no network. Writes its outputs under benchmarks/.cache/gpu_check/:
# tests.txt, throughput.txt (the table: rows/s, peak RSS, GPU utilisation per system),
# throughput.json (every measurement) and nvidia-smi.txt.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=benchmarks/.cache/gpu_check
mkdir -p "$OUT"

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name(0))" || exit 1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

echo "== tests (at most 200 s) =="
timeout 200 python3 -m pytest -q -x -p no:cacheprovider > "$OUT/tests.txt" 2>&1
tests_rc=$?
tail -n 5 "$OUT/tests.txt"
[ "$tests_rc" -eq 124 ] && echo "tests: stopped after 200 s (see $OUT/tests.txt for how far they got)"

echo "== throughput, gpu bf16-mixed (at most 160 s) =="
# MMoE only, 2 repetitions of 60 timed steps: raw loop, raw loop with SparseAdam,
# Trainer + ParquetDataModule dense and with sparse_embeddings=True; the data path alone.
timeout 160 python3 benchmarks/throughput.py --accelerator gpu --precision bf16-mixed --models mmoe \
    --repeats 2 --steps 60 --threads 4 --no-auc --timeout 120 --json "$OUT/throughput.json" \
    2>&1 | tee "$OUT/throughput.txt"
bench_rc=${PIPESTATUS[0]}

echo "tests exit code: $tests_rc, benchmark exit code: $bench_rc; outputs in $OUT/"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
