#!/usr/bin/env bash
# The GPU check, one script of at most 8 minutes on a machine with one CUDA GPU (an H200 here):
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# 1. the `gpu` tests (parity of 1f1b, zbv, interleaved and dualpipev with stages as threads on one GPU, each on
#    its own stream, fp32 with TF32 off and float64; GPipe on cuda:0 twice; bf16; recompute; checkpoints
#    CUDA -> CPU -> CUDA; the timeline timed by CUDA events);
# 2. the runtime's overhead against plain PyTorch on GPT-2 124M, bf16, sequence 1024 (benchmarks/gpu_overhead.py).
# Results go to $OUT: gpu_tests.txt, gpu_overhead.json, timelines as PNG.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONPATH=.
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
tests=${PIPESTATUS[0]}
timeout 240 python3 benchmarks/gpu_overhead.py --out "$OUT" 2>&1 | tail -40 | tee "$OUT/gpu_overhead.txt"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, overhead bench exit $bench" | tee -a "$OUT/device.txt"
exit $(( tests != 0 || bench != 0 ))
