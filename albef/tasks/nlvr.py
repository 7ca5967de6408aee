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


from albef.models.classify import NLVR_ADAPTER
from albef.tasks.base import register_task
from albef.tasks.ve import VETask


@register_task("nlvr", help="NLVR2 fine-tuning and evaluation")
class NLVRTask(VETask):
    """NLVR2 on the engine: a `Classifier` over two images, 2 classes (false, true)."""

    name = "nlvr"
    kind = "nlvr"
    num_classes = 2
    num_images = 2
    label_names = {0: False, 1: True}
    description = "ALBEF NLVR2 fine-tuning and evaluation"
    weight_adapter = NLVR_ADAPTER  # ALBEF NLVR.py's rule, fusion layers doubled from pretraining


def main(argv: Sequence[str] | None = None) -> int:
    return NLVRTask.main(argv, "albef-nlvr")


if __name__ == "__main__":
    sys.exit(main())
