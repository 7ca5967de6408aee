"""Sharded retrieval evaluation on 2 gloo ranks (real processes) equals one process.

13 images x 3 captions: the ranks encode 7 and 6 images and 20 and 19 captions, and re-rank the
pairs of their own images (uneven counts). A one-image set leaves rank 1 without images.
This file is also the torchrun script.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from albef.config import load_config
from conftest import run_torchrun

pytestmark = pytest.mark.distributed

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "test_tiny.yaml"
NUM_IMAGES, CAPTIONS, K = 13, 3, 5


def config(corpus: dict):
    return load_config(str(CONFIG), [f"model.text.bert={corpus['bert']}", f"eval.test_files=[{corpus['test']}]",
                                     f"eval.image_root={corpus['image_root']}", f"eval.k_test={K}",
                                     "eval.batch_size=4"])


def scores_and_result(corpus: dict) -> tuple[dict, dict]:
    from albef.build import build_model
    from albef.tasks.retrieval import evaluate_retrieval, retrieval_scores

    cfg = config(corpus)
    torch.manual_seed(0)
    model = build_model(cfg)
    scores = retrieval_scores(model, cfg, "cpu")
    matrices = {name: getattr(scores, name) for name in ("sims", "i2t", "t2i", "i2t_itm_itc", "t2i_itm_itc")}
    result = evaluate_retrieval(model, cfg, "cpu")
    return matrices, {k: v for k, v in result.items() if not k.startswith("time_")}


def worker(corpora_json: str, out: str) -> None:
    from albef.dist import destroy_distributed, get_rank, init_distributed

    assert init_distributed().world_size == 2
    for n, corpus in enumerate(json.loads(corpora_json)):
        matrices, result = scores_and_result(corpus)
        torch.save({"matrices": matrices, "result": result}, Path(out) / f"set{n}_rank{get_rank()}.pt")
    destroy_distributed()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from albef.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("sharded")
    return [generate_corpus(str(root / str(n)), num_train=1, num_test=n, image_size=32, captions_per_image=CAPTIONS)
            for n in (NUM_IMAGES, 1)]


def test_two_ranks_equal_one_process(corpora, tmp_path):
    run_torchrun([__file__, json.dumps(corpora), str(tmp_path)])
    for n, corpus in enumerate(corpora):
        single_matrices, single_result = scores_and_result(corpus)
        assert single_result["num_pairs"] > 0
        for rank in (0, 1):  # every rank ends with the full matrices and the same result
            saved = torch.load(tmp_path / f"set{n}_rank{rank}.pt", weights_only=True)
            for name, matrix in single_matrices.items():
                assert torch.equal(saved["matrices"][name] == -100, matrix == -100), name
                torch.testing.assert_close(saved["matrices"][name], matrix, rtol=1e-5, atol=1e-5, msg=name)
            assert saved["result"] == single_result


if __name__ == "__main__":
    worker(*sys.argv[1:])
