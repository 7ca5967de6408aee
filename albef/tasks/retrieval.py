"""Image-text retrieval: fine-tuning (COCO, Flickr30K) and evaluation, as ALBEF's `Retrieval.py`.

    albef-retrieval --config configs/retrieval_coco.yaml --init-from ALBEF_4M.pth --output-dir DIR
    albef-retrieval --config configs/retrieval_coco.yaml --init-from DIR/best.pt --evaluate

Training runs on the engine as pretraining does, with the retrieval model: no MLM head, ITC whose
positives are every caption of the same image (in the batch and in the queue), ITM with hard
negatives that never share the image. Evaluation: every image and caption is encoded once, the
ITC similarity picks the `k_test` best candidates of each query, and the fusion encoder's ITM
logit (positive class) replaces their score (ALBEF; `itm_itc_` results add the ITC similarity as
BLIP and LAVIS report); everything outside the top-k scores -100.
"""
from __future__ import annotations

import sys
from typing import Sequence

from torch import nn

from albef.config import Config, ConfigError
from albef.data.retrieval import RetrievalDataError, RetrievalDataset  # noqa: F401  (re-exported)
from albef.dist import DistInfo
from albef.models.albef import RETRIEVAL_ADAPTER
from albef.tasks.base import register_task
from albef.tasks.pretrain import PretrainTask, unwrap
from albef.tasks.retrieval_eval import (RECALL_AT, RetrievalScores, candidate_pairs, chance_recall,  # noqa: F401
                                        encode_images, encode_texts, evaluate_retrieval, format_table,
                                        pair_itm_logits, retrieval_scores, score_pairs, topk_matrix)


@register_task("retrieval", help="image-text retrieval fine-tuning and evaluation (R@1/5/10)")
class RetrievalTask(PretrainTask):
    """ALBEF's retrieval model on the engine: the pretraining step without MLM, image ids as
    positives; evaluation on eval.val_files / eval.test_files; best.pt by mean recall."""

    best_metric = "r_mean"
    weight_adapter = RETRIEVAL_ADAPTER  # ALBEF Retrieval.py's rule: the MLM heads (and a pretraining idx_queue) unused
    description = "ALBEF image-text retrieval: fine-tuning and evaluation"
    flags = {"--save-examples": ("eval.save_examples", "write picture grids of N text and N image queries "
                                 "(their top-5, correct ones marked) to OUTPUT_DIR/examples/ and TensorBoard")}

    def check(self, cfg: Config, training: bool = True) -> None:
        """Before anything is built: the config suits the retrieval model and every annotation
        file it will read is well-formed."""
        if cfg.loss.weights.mlm:
            raise ConfigError("loss.weights.mlm: retrieval fine-tuning has no MLM term (ALBEF's retrieval model); "
                              "set loss.weights.mlm=0")
        super().check(cfg, training)  # caption files and evaluation images, as pretraining's

    def evaluate(self, model: nn.Module, cfg: Config, dist: DistInfo, split: str) -> dict[str, float]:
        return evaluate_retrieval(unwrap(model), cfg, dist.device, split)

    def find_unused_parameters(self, cfg: Config) -> bool:
        return min(cfg.loss.weights.itc, cfg.loss.weights.itm) == 0


def main(argv: Sequence[str] | None = None) -> int:
    """`albef-retrieval --config CFG [--init-from PATH] [--evaluate] [--save-examples N] [...]`;
    see albef/cli.py."""
    return RetrievalTask.main(argv, "albef-retrieval")


if __name__ == "__main__":
    sys.exit(main())
