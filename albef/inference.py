"""Inference API: score images against captions with a trained model.

    import albef
    from PIL import Image

    model, preprocess = albef.load("demo_runs/pretrain", device="cpu")
    images = [Image.open("demo_data/images/test_000000.jpg"), Image.open("demo_data/images/test_000001.jpg")]
    texts = ["a red circle above a blue square", "a green triangle on a white background"]
    model.similarity(images, texts)  # ITC cosine similarity [2 images, 2 texts]
    model.itm_score(images, texts)   # ITM match probability [2 images, 2 texts]

`albef.load` reads the config stored with the weights (or the run directory's config.yaml),
builds that model without downloading any weights (they all come from the file) and loads the
file under the one weight-loading policy (albef.checkpoint).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor

from albef.checkpoint import CheckpointError, confined, is_dcp_checkpoint, load_weights, read_weights, run_weights
from albef.config import Config, ConfigError, load_config, parse_yaml
from albef.exported import is_export_dir, is_hub_name, read_export
from albef.data.captions import pre_caption
from albef.data.transforms import eval_transform
from albef.build import build_model
from albef.models import ALBEF, build_tokenizer

__all__ = ["ALBEFInference", "Preprocess", "load"]


@dataclass
class Preprocess:
    """The evaluation preprocessing of a model: image transform, caption cleaning, tokenizer."""

    transform: Any  # PIL image -> normalised tensor [3, S, S] (albef.data.transforms.eval_transform)
    tokenizer: Any
    max_words: int  # pre_caption keeps this many words (data.max_words)
    max_tokens: int  # captions are tokenised to at most this many tokens (eval.max_tokens)

    def images(self, images: Sequence[Image.Image]) -> Tensor:
        """A batch [N, 3, S, S] of RGB images."""
        return torch.stack([self.transform(image.convert("RGB")) for image in images])

    def caption(self, text: str) -> str:
        return pre_caption(text, self.max_words)

    def texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) [N, L] of the cleaned captions, padded to the longest."""
        tokens = self.tokenizer([self.caption(t) for t in texts], padding="longest", truncation=True,
                                max_length=self.max_tokens, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask


class ALBEFInference:
    """A loaded model in eval mode with its preprocessing: scores PIL images against strings.

    `model` is the underlying `ALBEF` module (its own methods take tensors).
    """

    def __init__(self, model: ALBEF, preprocess: Preprocess, device: torch.device | str = "cpu",
                 batch_size: int = 64):
        self.model = model.eval()
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _images(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor]:
        parts = [self.model.image_tokens(self.preprocess.images(images[i:i + self.batch_size]).to(self.device))
                 for i in range(0, len(images), self.batch_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Text states (padded to the longest caption of all), ITC features and masks."""
        input_ids, mask = (t.to(self.device) for t in self.preprocess.texts(texts))
        parts = [self.model.text_tokens(input_ids[i:i + self.batch_size], mask[i:i + self.batch_size])
                 for i in range(0, len(texts), self.batch_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), mask

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image]) -> Tensor:
        """Normalised ITC features [N, D]."""
        return self._images(images)[1]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Normalised ITC features [N, D]."""
        return self._texts(texts)[1]

    @torch.no_grad()
    def similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Tensor:
        """ITC cosine similarity [len(images), len(texts)] (divide by `model.temp` for logits)."""
        return self.encode_image(images) @ self.encode_text(texts).t()

    @torch.no_grad()
    def itm_score(self, images: Sequence[Image.Image], texts: Sequence[str], pairwise: bool = False) -> Tensor:
        """ITM probability that an image matches a caption: every image against every caption
        [len(images), len(texts)]; with `pairwise`, image i against caption i only [N]."""
        if pairwise and len(images) != len(texts):
            raise ValueError(f"pairwise=True needs as many images as texts (got {len(images)} and {len(texts)})")
        image_embeds, _ = self._images(images)
        text_embeds, _, mask = self._texts(texts)
        if pairwise:
            image_index = text_index = torch.arange(len(texts), device=self.device)
        else:
            image_index = torch.arange(len(images), device=self.device).repeat_interleave(len(texts))
            text_index = torch.arange(len(texts), device=self.device).repeat(len(images))
        probs = []
        for i in range(0, len(text_index), self.batch_size):
            rows, cols = image_index[i:i + self.batch_size], text_index[i:i + self.batch_size]
            logits = self.model.itm_logits(image_embeds[rows], text_embeds[cols], mask[cols])
            probs.append(logits.float().softmax(dim=-1)[:, 1])
        probs = torch.cat(probs)
        return probs if pairwise else probs.view(len(images), len(texts))


def _weights_file(path: Path) -> Path:
    """The weights of a run directory: best.pt, else its newest checkpoint."""
    found = run_weights(path)
    if found is None:
        raise CheckpointError(f"{path}: no best.pt and no step_*.pt / step_*.dcp checkpoint; pass a weight file "
                              "or a run directory")
    return found


def read_weights_and_config(weights: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(model state, config) of a weight file, read once: the config saved inside it (our .pt
    checkpoints and best.pt, .safetensors metadata), else the config.yaml of the run the file
    belongs to (RUN/best.pt, RUN/checkpoints/step_*), else None."""
    state, config = read_weights(weights)
    if isinstance(config, str):  # .safetensors metadata
        config = parse_yaml(config, f"{weights} (stored config)") if config else None
    for run in (weights.parent, weights.parent.parent):
        if config is None and (run / "config.yaml").is_file():
            file = confined(run / "config.yaml", run)
            with open(file, encoding="utf-8") as f:
                config = parse_yaml(f, str(file))
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"{weights}: its stored config is not a mapping of sections (found a "
                          f"{type(config).__name__})")
    return state, config


def load(path: str | os.PathLike, device: torch.device | str = "cpu",
         config: str | os.PathLike | Config | None = None) -> tuple[ALBEFInference, Preprocess]:
    """`model, preprocess = albef.load(path)`: a trained model ready to score images and captions.

    `path`: a weight file with its config inside (best.pt, a training checkpoint), a run
    directory (best.pt or its newest checkpoint), a folder written by `albef export` or
    `hf-hub:org/name[@revision]` (albef.hub). `config`: a YAML file or Config to use instead
    of the stored one (needed for files without one, such as released ALBEF .pth files).
    Nothing is downloaded except, for hub names, the BERT config and tokenizer.
    """
    if is_hub_name(path) or is_export_dir(path):  # `albef export` folder, hf-hub:org/name[@revision]
        weights, state, stored = read_export(path)
    else:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such weight file or run directory")
        weights = path if path.is_file() or is_dcp_checkpoint(path) else _weights_file(path)
        state, stored = read_weights_and_config(weights)
    if isinstance(config, Config):
        cfg = config
    elif config is not None:
        cfg = load_config(str(config))
    else:
        if stored is None:
            raise CheckpointError(f"{weights}: no config stored with these weights and no config.yaml beside them; "
                                  "pass config=PATH (the YAML the model was trained with)")
        cfg = Config.from_dict(stored, source=f"{weights} (stored config)")
    # Every weight comes from the file: no DeiT / BERT downloads, no --init-from of the run.
    cfg.model.vision.pretrained, cfg.model.vision.checkpoint = False, None
    cfg.model.text.pretrained, cfg.model.init_checkpoint = False, None

    model = build_model(cfg)
    queues = [k for k in ("image_queue", "text_queue", "idx_queue", "queue_ptr") if k not in state]  # exports leave them out
    report = load_weights(model, state, str(weights), new=queues)
    if report.new or report.resampled or report.reinitialised or report.skipped:
        report.print()
    model.to(device)
    preprocess = Preprocess(
        transform=eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std),
        tokenizer=build_tokenizer(cfg.model),
        max_words=cfg.data.max_words,
        max_tokens=cfg.eval.max_tokens,
    )
    return ALBEFInference(model, preprocess, device, batch_size=cfg.eval.batch_size), preprocess
