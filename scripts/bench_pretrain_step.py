"""Throughput of one ALBEF pretraining step (forward + backward + AdamW + EMA + enqueue).

Measures the model alone on synthetic tensors (no data loading), so it isolates the compute
path; prints images/s and peak GPU memory. Weights are random and nothing is downloaded: the
BERT architecture comes from a local BertConfig with bert-base-uncased's sizes (or the tiny
smoke sizes) and a generated vocabulary of the same size.

    python scripts/bench_pretrain_step.py                       # ALBEF ViT-B/16 + BERT-base
    python scripts/bench_pretrain_step.py --batch-size 96 --steps 30 train.precision=bf16
    python scripts/bench_pretrain_step.py --smoke               # tiny model, 3 steps, CPU ok
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import BertConfig

from albef.config import load_config
from albef.engine.optim import build_optimizer
from albef.engine.trainer import resolve_precision
from albef.models import build_model

REPO = Path(__file__).resolve().parents[1]
SMOKE = [
    "model.vision.image_size=32", "model.vision.patch_size=16", "model.vision.embed_dim=64",
    "model.vision.depth=2", "model.vision.num_heads=2", "model.embed_dim=32", "model.queue_size=64",
    "model.text.fusion_layer=1",
    "model.text.config_overrides={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
    "intermediate_size: 128}",
]


def write_bert_dir(path: Path, vocab_size: int) -> None:
    """A BERT dir (config.json + vocab.txt) with bert-base's shape and no weights."""
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertConfig(vocab_size=vocab_size).save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "pretrain.yaml"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, batch 4, 3 steps")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as bert_dir:
        write_bert_dir(Path(bert_dir), vocab_size=30522)
        overrides = [f"model.text.bert={bert_dir}", "model.text.pretrained=false",
                     "model.vision.pretrained=false", "model.vision.checkpoint=null"]
        overrides += SMOKE if args.smoke else []
        cfg = load_config(args.config, overrides + args.overrides)
        model = build_model(cfg).to(device).train()
    batch_size = 4 if args.smoke else (args.batch_size or cfg.train.batch_size)
    steps, warmup = (3, 1) if args.smoke else (args.steps, 3)
    optimizer = build_optimizer(model, cfg.optim, device)
    amp_dtype = resolve_precision(cfg.train.precision, device)

    size, length = cfg.model.vision.image_size, cfg.data.max_tokens
    images = torch.randn(batch_size, 3, size, size, device=device)
    input_ids = torch.randint(1000, 30522, (batch_size, length), device=device)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    attention_mask = torch.ones_like(input_ids)
    ids = torch.arange(batch_size, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(images, input_ids, attention_mask, alpha=cfg.loss.alpha, ids=ids)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.momentum_update()
        model.enqueue(*out["queue_update"])

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, precision {amp_dtype or 'fp32'}")
    print(f"model: {params:.1f}M trainable params, image {size}px, {length} tokens, batch {batch_size}")
    print(f"{steps} steps in {elapsed:.2f} s: {elapsed / steps * 1000:.1f} ms/step, "
          f"{batch_size * steps / elapsed:.1f} images/s")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
