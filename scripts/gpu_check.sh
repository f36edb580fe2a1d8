#!/usr/bin/env bash
# The checks that need a GPU, as one script: train a full and an MLET model on DEVICE with
# TorchRec (one GPU, then all of them with --nproc where there are several),
# export both (the CUDA execution provider and TensorRT are used where installed), time
# the training step of MLET against full tables on DEVICE, and run the tests marked gpu
# or tensorrt. It installs nothing, so it runs on a machine that has PyTorch and cannot
# reach a package index; a step whose packages are missing there fails with the import
# error in OUT/log.txt and the others still run. Training, export and the overhead need
# the core dependencies (torch, numpy, onnx, onnxruntime, safetensors, tqdm, matplotlib);
# the serving test also needs orjson, starlette, uvicorn and tritonclient, the GPU tests
# onnxruntime-gpu and TensorRT (each test skips, saying why, when its runtime is absent).
#
#   scripts/gpu_check.sh OUT_DIR                    # DEVICE=cuda by default
#   DEVICE=cpu ROWS=20000 scripts/gpu_check.sh /tmp/check   # the same steps on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
DEVICE=${DEVICE:-cuda}
ROWS=${ROWS:-200000}
PYTHON=${PYTHON:-python3}
mlet() { PYTHONPATH=. "$PYTHON" -m cli "$@"; }
mkdir -p "$OUT"
: >"$OUT/log.txt"
failed=()
step() {  # step NAME COMMAND...: run it, log it to OUT/log.txt, keep going on failure
    local name=$1
    shift
    echo "== $name" | tee -a "$OUT/log.txt"
    if "$@" >>"$OUT/log.txt" 2>&1; then echo "== $name: ok" | tee -a "$OUT/log.txt"; else
        echo "== $name: FAILED (see $OUT/log.txt)" | tee -a "$OUT/log.txt"
        failed+=("$name")
    fi
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
step data mlet data synth --out "$work/datasets/synth" --rows "$ROWS" --seed 0
step train-full mlet train --data "$work/datasets/synth" --out "$work/runs/full-d16" --embedding full \
    --dim 16 --epochs 1 --device "$DEVICE"
step train-mlet mlet train --data "$work/datasets/synth" --out "$work/runs/mlet-d4-k64" --embedding mlet \
    --dim 4 --hidden 64 --epochs 1 --device "$DEVICE"
# TorchRec over every GPU the machine has (NCCL), the same command with --nproc
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DEVICE" = cuda ] && [ "${gpus:-0}" -gt 1 ]; then
    step "train-mlet-${gpus}gpus" mlet train --data "$work/datasets/synth" --out "$work/runs/mlet-nproc" \
        --embedding mlet --dim 4 --hidden 64 --epochs 1 --device cuda --nproc "$gpus"
fi
for run in full-d16 mlet-d4-k64; do
    step "export-$run" mlet export "$work/runs/$run" --repo "$work/models" --variants fp32,fp16
done
step overhead mlet study --data "$work/datasets/synth" --stage overhead --overhead-widths 4,16 \
    --device "$DEVICE" --out "$work/overhead"
# few files back: the log, the device, the overhead table and the exports' manifests
cp "$work/overhead/overhead.json" "$OUT/" 2>/dev/null
manifests=$(cd "$work" && ls models/*/manifest.json 2>/dev/null)
[ -n "$manifests" ] && tar -czf "$OUT/manifests.tgz" -C "$work" $manifests
# one step per file: a file whose imports fail there does not stop the other's tests
for tests in train_gpu export_tensorrt serve_production; do
    step "tests-$tests" env PYTHONPATH=. "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
        -m "gpu or tensorrt" "tests/test_$tests.py"
done

if ((${#failed[@]})); then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed; figures in $OUT"
