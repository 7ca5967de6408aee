"""NLVR2 fine-tuning (ALBEF NLVR.py): is the sentence true of the pair of images?

    albef-nlvr --config configs/nlvr.yaml --init-from TA_OR_PRETRAIN_CHECKPOINT [key.sub=value ...]
    torchrun --nproc_per_node=8 -m albef.tasks.nlvr --config configs/nlvr.yaml --init-from ...
    albef-nlvr --config configs/nlvr.yaml --evaluate --init-from NLVR_CHECKPOINT.pth

The BERT has every fusion layer twice; the layers attend to image 0 and image 1 in turn and each
pair shares its cross-attention key/value. `--init-from` accepts:

* a text-assignment checkpoint (albef-nlvr-pretrain, or ALBEF's Pretrain_nlvr.py): loaded as it
  is (ALBEF NLVR.py); the momentum encoders start as copies of the loaded weights;
* a pretraining / retrieval checkpoint (12-layer BERT): mapped with ALBEF Pretrain_nlvr.py's
  layer rule first (fusion layer n -> 2(n-F)+F and 2(n-F)+F+1), then as above;
* an NLVR2 checkpoint (ours or ALBEF's model_nlvr): loaded as it is, momentum copies included.

Evaluation: accuracy on eval.val_files (dev) and eval.test_files (test-P).
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch

from albef.checkpoint import CheckpointError, LoadReport, load_weights
from albef.models.classify import (MOMENTUM_NOTE, Classifier, double_fusion_layers, doubling_note, num_layers,
                                   with_momentum_copies)
from albef.tasks.base import register_task
from albef.tasks.ve import MOMENTUM, PRETRAIN_ONLY, VETask

# TA-only keys (ALBEF NLVR.py leaves them unexpected).
TA_ONLY = ("ta_head",)


def map_to_nlvr(state: dict[str, torch.Tensor], model_layers: int, fusion_layer: int, distill: bool,
                source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """A pretraining, TA or NLVR2 state dict (our key names) mapped onto the NLVR2 layout, and
    report notes naming the mapping.

    One fusion stack (pretraining): `double_fusion_layers`. Momentum encoders: kept when the file
    has NLVR2-layout ones, else copies of the (mapped) student when `distill`.
    """
    found = num_layers(state)
    single = fusion_layer + (model_layers - fusion_layer) // 2
    notes = []
    if found == single:
        state = double_fusion_layers(state, fusion_layer)
        notes.append(doubling_note(fusion_layer, single))
    elif found != model_layers:
        raise CheckpointError(
            f"{source}: its text encoder has {found} layers; NLVR2 needs {single} (a pretraining checkpoint) or "
            f"{model_layers} (a TA / NLVR2 checkpoint) with model.text.fusion_layer={fusion_layer}")
    if distill and (notes or not any(k.startswith("text_encoder_m.") for k in state)):
        state = with_momentum_copies(state)
        notes.append(MOMENTUM_NOTE)
    return state, notes


@register_task("nlvr", help="NLVR2 fine-tuning and evaluation")
class NLVRTask(VETask):
    """NLVR2 on the engine: a `Classifier` over two images, 2 classes (false, true)."""

    name = "nlvr"
    kind = "nlvr"
    num_classes = 2
    num_images = 2
    label_names = {0: False, 1: True}
    description = "ALBEF NLVR2 fine-tuning and evaluation"

    def init_weights(self, model: Classifier, state: dict[str, torch.Tensor], source: str) -> LoadReport:
        config = model.text_encoder.config
        state, notes = map_to_nlvr(state, config.num_hidden_layers, config.fusion_layer, model.distill, source)
        unused = list(PRETRAIN_ONLY) + list(TA_ONLY) + ([] if model.distill else list(MOMENTUM))
        report = load_weights(model, state, source, unused=unused, new=["cls_head", "cls_head_m"])
        report.notes += notes
        return report


def main(argv: Sequence[str] | None = None) -> int:
    return NLVRTask.main(argv, "albef-nlvr")


if __name__ == "__main__":
    sys.exit(main())
