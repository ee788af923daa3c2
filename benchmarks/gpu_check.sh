#!/usr/bin/env bash
# The GPU paths on a CUDA machine, in one go (results under $OUT, default benchmarks/results/gpu):
# 1. batched clients give the sequential path's deltas on CUDA (tests/test_batched.py);
# 2. client-steps per second, batched vs sequential, on CUDA (benchmarks/batched.py);
# 3. README's main job with its pools on the GPU (ray.num_gpus_per_pool = 0.25, batched
#    clients) and the same job on the CPU cores, for the round time ratio.
#
#     bash benchmarks/gpu_check.sh                     # README's main job: 24 rounds
#     ROUNDS=8 MODES=gpu bash benchmarks/gpu_check.sh  # shorter, the GPU run alone
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -c "import torch; print('device:', torch.cuda.get_device_name())" || exit 1
python3 -m pytest -q -p no:cacheprovider tests/test_batched.py 2>&1 | tail -3
python3 benchmarks/batched.py --device cuda --out "$OUT/batched_cuda.json"
ROUNDS=${ROUNDS:-24}
for mode in ${MODES:-gpu cpu}; do
  gpus=0; [ "$mode" = gpu ] && gpus=0.25
  /usr/bin/time -f "$mode wall %e s" python3 -m ssdiff_ray.cli run --set rounds="$ROUNDS" \
    --set ray.num_gpus_per_pool=$gpus --set out_dir="$OUT/runs-$mode" --set name=main 2>&1 | tail -14
  cp "$OUT/runs-$mode/main/summary.json" "$OUT/main_job_${mode}_r$ROUNDS.json"
  cp "$(ls "$OUT"/runs-$mode/main/samples/round_*.png | tail -1)" "$OUT/main_job_${mode}_r$ROUNDS.png"
  rm -rf "$OUT/runs-$mode"
done
