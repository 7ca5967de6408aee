"""Time a scaled retrieval evaluation and estimate COCO-5k (5,000 images x 25,000 captions).

Runs `evaluate_retrieval` of the configured model (random weights, nothing downloaded: a local
BERT-base-shaped config) on generated JPEGs with `--captions` random captions each, and scales
the measured phases to COCO's test split: encoding by the number of images (captions scale with
them), re-ranking by the number of ITM pairs (COCO at most (5,000 + 25,000) x k_test; the union
of both directions' top-k is smaller, so the estimate is an upper bound).

    python scripts/bench_retrieval_eval.py                          # retrieval_coco.yaml, 500 images
    python scripts/bench_retrieval_eval.py --images 1000 eval.batch_size=256
    python scripts/bench_retrieval_eval.py --smoke                  # tiny model, CPU ok
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import PRESETS, write_bert_dir  # noqa: E402

from albef.config import load_config  # noqa: E402
from albef.build import build_model  # noqa: E402
from albef.tasks.retrieval import evaluate_retrieval  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COCO_IMAGES, COCO_CAPTIONS = 5000, 25000


def write_split(root: Path, images: int, captions: int, side: int = 64) -> Path:
    """`images` random-noise JPEGs and a test file with `captions` random 12-word captions each."""
    rng = random.Random(0)
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(images):
        pixels = bytes(rng.randrange(256) for _ in range(side * side * 3))
        Image.frombytes("RGB", (side, side), pixels).save(root / "images" / f"{i:06d}.jpg")
        words = lambda: " ".join(f"w{rng.randrange(30000)}" for _ in range(12))  # noqa: E731
        entries.append({"image": f"images/{i:06d}.jpg", "caption": [words() for _ in range(captions)]})
    (root / "test.json").write_text(json.dumps(entries))
    return root / "test.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "retrieval_coco.yaml"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--captions", type=int, default=5, help="captions per image (COCO: 5)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 16 images, k_test 4")
    parser.add_argument("--out", help="also write the result as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    images = 16 if args.smoke else args.images

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "bert").mkdir()
        write_bert_dir(tmp / "bert", vocab_size=30522)
        test = write_split(tmp / "data", images, args.captions)
        overrides = [f"model.text.bert={tmp / 'bert'}", "model.text.pretrained=false", "model.vision.pretrained=false",
                     "model.vision.checkpoint=null", "model.init_checkpoint=null", f"eval.test_files=[{test}]",
                     "eval.val_files=[]", f"eval.image_root={tmp / 'data'}", "loss.weights.mlm=0",
                     f"output_dir={tmp / 'run'}"]
        overrides += PRESETS["smoke"] + ["eval.k_test=4", "eval.num_workers=0"] if args.smoke else []
        cfg = load_config(args.config, overrides + args.overrides)
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = evaluate_retrieval(model, cfg, device, "test")

    k = cfg.eval.k_test
    coco_pairs = (COCO_IMAGES + COCO_CAPTIONS) * k
    encode = result["time_encode_s"] * COCO_IMAGES / result["num_images"]
    rerank = result["time_rerank_s"] * coco_pairs / result["num_pairs"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "image_size": cfg.model.vision.image_size, "k_test": k, "precision": cfg.train.precision,
        "num_images": result["num_images"], "num_texts": result["num_texts"], "num_pairs": result["num_pairs"],
        "time_encode_s": round(result["time_encode_s"], 3), "time_rerank_s": round(result["time_rerank_s"], 3),
        "pairs_per_s": round(result["num_pairs"] / max(result["time_rerank_s"], 1e-9), 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
        "coco5k_estimate_s": {"encode": round(encode, 1), "rerank_upper_bound": round(rerank, 1),
                              "total": round(encode + rerank, 1)},
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
