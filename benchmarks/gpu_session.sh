#!/usr/bin/env bash
# Issue 3's GPU work in one device call (H100/H200, within the 10-minute limit of one command):
#   1. the Triton backend's tests on the GPU (compiled kernels: both plans, every option, realistic
#      dims, determinism, the memory bound), capped at 200 s;
#   2. the benchmark at d = 768 (the dim the targets name) for every method, both Triton
#      plans tuned first, within a 350 s budget (the report is rewritten after every row, so a
#      command cut off at the device's limit keeps what it measured).
#   3. issue 11: the trainer's GPU tests (tests/test_training_gpu.py: bf16 + Triton steps, no host
#      syncs in the GradCache loops, bit-identical resume), capped at 60 s;
#   4. issue 11: the training benchmark (benchmarks/bench_train_gpu.py: gist-fast train vs
#      sentence-transformers at contrastive batch 4096 / 16384 / 65536, the fit search to 262144)
#      within a 170 s budget, capped at 200 s; its report is saved after every run.
# Logs, the GPU's name and the benchmark's JSON / markdown / PNG land in the given folder.
#
# Usage, from the repo root on the GPU machine:
#   bash benchmarks/gpu_session.sh "$OUT"                  # default run
#   bash benchmarks/gpu_session.sh "$OUT" --batches 65536 1048576 --methods triton triton-chunked
# The second call of a session (B = 2^20, then the other dims), without the tests:
#   python3 benchmarks/bench_triton_gpu.py --out "$OUT" --dims 768 --batches 1048576 \
#       --methods triton triton-chunked --tiles-from benchmarks/results/<first call's JSON> --tag b1048576 \
#       --budget-s 560
# Back on the CPU machine (the GPU image may lack matplotlib), one plot from both calls' reports:
#   .venv/bin/python benchmarks/bench_triton_gpu.py --plot-from benchmarks/results/<first>.json \
#       benchmarks/results/<second>.json
set -o pipefail
out=${1:-benchmarks/results}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_backend.py 2>&1 \
    | tee "$out/tests.log" | tail -n 15
echo "tests exit: $?"
python3 benchmarks/bench_triton_gpu.py --out "$out" --dims 768 --budget-s 350 "$@" 2>&1 \
    | tee "$out/bench.log" | tail -n 60
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_training_gpu.py 2>&1 \
    | tee "$out/tests_training.log" | tail -n 15
echo "training tests exit: $?"
timeout 200 python3 benchmarks/bench_train_gpu.py --out "$out" --budget-s 170 2>&1 \
    | tee "$out/bench_train.log" | tail -n 40
