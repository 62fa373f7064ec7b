#!/usr/bin/env bash
# GPU check, about 5 minutes (at most 8): bench/step_time.py and bench/estimation.py on a 1.1B-param
# Llama (--preset 1b: hidden 2048, 16 layers, MLP 8192, 32k vocabulary) in bf16 under ZeRO-3, one
# rank per visible GPU, NCCL through the package's own init_distributed. Prints both tables with
# tokens/s and peak GPU memory per rank; the tables and their JSON land in $OUT.
#
#   bash bench/gpu_check.sh              # every visible GPU
#   NPROC=1 bash bench/gpu_check.sh      # one GPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-bench/gpu_results}
SEQ=${SEQ:-1024}

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found; this check needs a CUDA GPU" >&2; exit 2; }
NPROC=${NPROC:-$(nvidia-smi -L | grep -c '^GPU')}
python - <<'EOF'
import torch, deepspeed
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device (a CPU-only wheel?)"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}", flush=True)
EOF
mkdir -p "$OUT"
ARGS=(--device cuda --dtype bf16 --preset 1b --nproc "$NPROC" --seq "$SEQ")

echo "== step time: LoRA-SB r=96 (fused and unfused A-projections), PEFT LoRA r=32/96, full fine-tuning, frozen floor (seq $SEQ x 4 per rank)"
timeout 290 python bench/step_time.py "${ARGS[@]}" --micro_batch 4 --warmup 3 --steps 10 --fused \
    --json "$OUT/step_time.json" | tee "$OUT/step_time.txt"

echo "== estimation: 50 samples in micro-batches of 3, owner-sharded vs all-reduce everywhere"
timeout 170 python bench/estimation.py "${ARGS[@]}" --micro_batch 3 --samples 50 \
    --json "$OUT/estimation.json" | tee "$OUT/estimation.txt"
echo "gpu_check: done; tables and JSON in $OUT"
