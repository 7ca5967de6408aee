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
# 2b. the planner against measurement: `albef plan` for this GPU (largest batch with and without
#    checkpointing, next to step 2's measured --max-batch), and scripts/plan_check.py: the
#    planner's traced peak of one step vs torch.cuda.max_memory_allocated of the same step.
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
    SMOKE_SIZE=(--preset smoke model.text.bert=bert-base-uncased)
    step plan_check python scripts/plan_check.py "${SMOKE_SIZE[@]}" --json "$OUT/plan_check.json"
    step plan python -m albef plan --config configs/pretrain.yaml --gpu-memory 2 --gpu-tflops 1 --no-search --json "$OUT/plan.json" \
        model.vision.image_size=32 model.vision.patch_size=16 model.vision.embed_dim=64 model.vision.depth=2 \
        model.vision.num_heads=2 model.embed_dim=32 model.queue_size=64 model.text.fusion_layer=1 train.batch_size=4 \
        "model.text.config_overrides={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128}"
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
    GPU_NAME=$(python -c 'import torch; n = torch.cuda.get_device_name(); print("h200" if "H200" in n else "h100-80gb" if "H100" in n else "a100-80gb" if "A100" in n else "h100-80gb")')
    step plan python -m albef plan --config configs/pretrain.yaml --gpu "$GPU_NAME" \
        --gpu-memory "$(python -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)')" \
        --benchmark "$OUT/bench.json" --json "$OUT/plan.json" train.precision=bf16
    step plan_check python scripts/plan_check.py --json "$OUT/plan_check.json" train.batch_size=64 train.precision=bf16
    step plan_check_ckpt python scripts/plan_check.py --json "$OUT/plan_check_ckpt.json" train.batch_size=64 \
        train.precision=bf16 model.vision.grad_checkpointing=true model.text.grad_checkpointing=true
    step plan_vs_max_batch python - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
plan = json.loads((out / "plan.json").read_text())
for name, key in (("max_batch.json", "ddp"), ("max_batch_ckpt.json", "ddp_checkpointing")):
    measured = json.loads((out / name).read_text())
    predicted = plan["largest_batch"][key]
    print(f"{key}: planner {predicted}, measured largest {measured['largest_batch']} (first failing "
          f"{measured['first_failing_batch']})")
PYEOF
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
