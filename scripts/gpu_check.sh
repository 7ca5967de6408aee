#!/usr/bin/env bash
# The prepared device check: every CUDA path the CPU suite cannot reach, in one short run.
#
#   bash scripts/gpu_check.sh OUT_DIR            # on a GPU machine (one H200: about 8 minutes)
#   bash scripts/gpu_check.sh OUT_DIR --smoke    # the same steps, tiny, on CPU (about a minute; no compile)
#
# 1. scripts/benchmark.py at the full ALBEF-4M config (ViT-B/16 256 px, BERT-base 6+6, batch 64,
#    bf16): pairs/s, MFU, peak memory, per-phase times; the data pipeline with 1/4/16 workers,
#    decode in the workers and data.decode=device (nvJPEG + tensor augmentation).
# 2. the same step with train.compile=true, and the largest batch with and without activation
#    checkpointing.
# 3. scripts/bench_retrieval_eval.py: COCO-5k evaluation time and memory from a 500-image run.
# 4. real training steps of configs/pretrain.yaml (random weights: nothing is downloaded) on a
#    generated corpus: bf16 autocast, fused AdamW, async checkpoint staging, --resume auto, then
#    the same with data.decode=device.
# Every result lands in OUT_DIR (JSON, log.jsonl, *.log). A step that fails does not stop the
# others; the exit status says whether all passed.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--smoke]}
SMOKE=${2:-}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
failed=0
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, time it, remember a failure
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    if "$@" > "$OUT/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        echo "   FAILED ($((SECONDS - start)) s), last lines:"; tail -5 "$OUT/$name.log"; failed=1
    fi
}

python - <<'EOF' > "$OUT/env.txt" 2>&1
import torch, torchvision, transformers, timm
print("torch", torch.__version__, "torchvision", torchvision.__version__, "transformers", transformers.__version__,
      "timm", timm.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF
cat "$OUT/env.txt"

if [ "$SMOKE" = --smoke ]; then
    step bench python scripts/benchmark.py --smoke --data-workers 0,1 --json "$OUT/bench.json"
    step eval_bench python scripts/bench_retrieval_eval.py --smoke --out "$OUT/eval_bench.json"
    SIZE=(--num-train 64 --image-size 64)
    TRAIN=(--config configs/demo.yaml train.batch_size=8 train.max_steps=3 train.log_every=1 data.num_workers=1)
    MORE=5
else
    step bench python scripts/benchmark.py --steps 30 --data-workers 1,4,16 --json "$OUT/bench.json" \
        train.batch_size=64 train.precision=bf16
    step bench_compile python scripts/benchmark.py --steps 30 --no-data --json "$OUT/bench_compile.json" \
        train.batch_size=64 train.precision=bf16 train.compile=true
    step max_batch python scripts/benchmark.py --max-batch --batch-size 128 --json "$OUT/max_batch.json" \
        train.precision=bf16
    step max_batch_ckpt python scripts/benchmark.py --max-batch --batch-size 256 --json "$OUT/max_batch_ckpt.json" \
        train.precision=bf16 model.vision.grad_checkpointing=true model.text.grad_checkpointing=true
    step eval_bench python scripts/bench_retrieval_eval.py --images 500 --out "$OUT/eval_bench.json"
    SIZE=(--num-train 1024 --image-size 320)
    TRAIN=(--config configs/pretrain.yaml train.batch_size=64 train.precision=bf16 train.max_steps=20
           train.log_every=5 data.num_workers=8 model.vision.pretrained=false model.vision.checkpoint=null)
    MORE=25
fi

CORPUS=$(mktemp -d)
step corpus python -m albef.data.synthetic --out "$CORPUS" "${SIZE[@]}"
DATA=(data.train_files="[$CORPUS/train.json]" data.image_root="$CORPUS" model.text.bert="$CORPUS/bert"
      model.text.pretrained=false train.ckpt_every=10 eval.val_files=[] eval.test_files=[])
step train python -m albef.pretrain "${TRAIN[@]}" "${DATA[@]}" --output-dir "$OUT/train"
step train_resume python -m albef.pretrain "${TRAIN[@]}" "${DATA[@]}" --output-dir "$OUT/train" --resume auto \
    train.max_steps=$MORE
step train_device_decode python -m albef.pretrain "${TRAIN[@]}" "${DATA[@]}" --output-dir "$OUT/train_device" \
    data.decode=device
rm -rf "$CORPUS" "$OUT"/train*/checkpoints
echo "results in $OUT; all passed: $([ $failed = 0 ] && echo yes || echo no)"
exit $failed
