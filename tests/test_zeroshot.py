"""Zero-shot classification (albef/tasks/zeroshot.py) and the shape it proves: a task registered
from one file runs through `albef <name>`, validates its own config section and is listed."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from albef.command import main as albef
from albef.data.synthetic import generate_corpus, generate_zeroshot_set
from albef.metrics import confusion_matrix, per_class_accuracy, topk_accuracy
from albef.tasks.base import Task, register_task
from albef.tasks.zeroshot import ensemble_class_embeddings, rerank_topk
from conftest import TINY_YAML


def test_accuracies_equal_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 7))
    labels = rng.integers(0, 7, size=50)
    ranking = np.argsort(-scores, axis=1)
    for k in (1, 3, 5):
        brute = 100.0 * sum(labels[i] in sorted(range(7), key=lambda c: -scores[i, c])[:k] for i in range(50)) / 50
        assert topk_accuracy(ranking, labels, k) == pytest.approx(brute)
    predictions = ranking[:, 0]
    matrix = confusion_matrix(predictions, labels, 7)
    for t in range(7):
        for p in range(7):
            assert matrix[t, p] == sum(1 for i in range(50) if labels[i] == t and predictions[i] == p)
    per_class = per_class_accuracy(predictions, labels, 7)
    for c in range(7):
        members = [i for i in range(50) if labels[i] == c]
        if members:
            assert per_class[c] == pytest.approx(100.0 * sum(predictions[i] == c for i in members) / len(members))
        else:
            assert np.isnan(per_class[c])


def test_template_ensemble_is_the_renormalised_mean_of_normalised_embeddings():
    feats = torch.randn(4, 3, 8) * torch.tensor([1.0, 5.0, 0.1])[None, :, None]  # templates of other norms
    got = ensemble_class_embeddings(feats)
    for c in range(4):
        mean = sum(feats[c, t] / feats[c, t].norm() for t in range(3)) / 3
        assert torch.allclose(got[c], mean / mean.norm(), atol=1e-6)
    assert torch.allclose(got, F.normalize(feats.mean(1), dim=-1)) is False  # not the plain mean


def test_rerank_only_reorders_the_top_k():
    gen = torch.Generator().manual_seed(0)
    itc = torch.randn(20, 9, generator=gen)
    k = 4
    itm = torch.randn(20, k, generator=gen)
    ranking = rerank_topk(itc, itm)
    plain = itc.argsort(dim=1, descending=True)
    for i in range(20):
        assert set(ranking[i, :k].tolist()) == set(plain[i, :k].tolist())
        assert ranking[i, k:].tolist() == plain[i, k:].tolist()
        top = plain[i, :k].tolist()
        by_itm = [c for _, c in sorted(zip(itm[i].tolist(), top), reverse=True)]
        assert ranking[i, :k].tolist() == by_itm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("zs")
    corpus = generate_corpus(str(out / "corpus"), num_train=8, num_test=2, image_size=32)
    classes = generate_zeroshot_set(str(out / "shape"), "shape", per_class=2, image_size=32)
    return corpus, out / "shape", classes


@pytest.mark.slow
def test_zeroshot_command_writes_metrics_confusion_and_results(data, tmp_path, capsys):
    corpus, folder, classes = data
    run = tmp_path / "run"
    args = ["zeroshot", "--config", str(TINY_YAML), "--output-dir", str(run), f"model.text.bert={corpus['bert']}",
            f"eval.test_files=[{folder}]", f"eval.image_root={folder}", "zeroshot.rerank_k=3", 'zeroshot.templates=["a {}", "a large {}"]']
    assert albef(args) == 0
    details = json.loads((run / "zeroshot" / "test.json").read_text())
    assert details["classes"] == sorted(classes) and len(details["labels"]) == 2 * len(classes)
    result = details["result"]
    ranking_top1 = np.asarray(details["predictions"])[:, None]
    assert result["top1"] == pytest.approx(topk_accuracy(ranking_top1, details["labels"], 1))
    assert "itc_top1" in result and result["chance_top1"] == pytest.approx(100 / len(classes))
    assert (run / "zeroshot" / "test_confusion.png").stat().st_size > 0
    assert list((run / "results").glob("test_*.json"))
    assert list((run / "tb").iterdir())
    assert "itc + itm" in capsys.readouterr().out
    # a template without "{}" is one line, exit 2
    assert albef(args + ['zeroshot.templates=["a shape"]']) == 2
    assert "zeroshot.templates" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a task from this file alone

@dataclass
class ToyConfig:
    """The toy task's own section."""
    scale: float = 1.0
    label: str = "toy"


class ToyEvalTask(Task):
    """Counts the evaluation images of a caption file (no training)."""

    best_metric = "num"
    config_section, config_class = "toy", ToyConfig
    config_ranges = {"scale": "(0, 10]"}

    def build_model(self, cfg):
        return torch.nn.Linear(1, 1)

    def evaluate(self, model, cfg, dist, split):
        entries = json.loads(open(cfg.eval.test_files[0]).read())
        return {"num": float(len(entries)) * cfg.toy.scale}


@pytest.fixture(scope="module", autouse=True)
def _toy_task():
    """Registered while this file's tests run, not at collection: the other test files (collected
    in the same process) must see the built-in tasks only, or their saved configs gain `toy:`."""
    from albef.registry import unregister_task
    register_task("toy-eval", help="a toy task registered by a test file")(ToyEvalTask)
    yield
    unregister_task("toy-eval")


@pytest.mark.slow
def test_a_task_registered_by_a_test_file_runs_validates_and_is_listed(data, tmp_path, capsys):
    corpus = data[0]
    assert albef(["--help"]) == 0
    assert "  toy-eval " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        albef(["toy-eval", "--help"])
    out = capsys.readouterr().out
    assert "toy.scale: float = 1.0  in (0, 10]" in out
    base = ["toy-eval", "--config", str(TINY_YAML), "--output-dir", str(tmp_path / "toy"), "--evaluate",
            f"model.text.bert={corpus['bert']}", f"eval.test_files=[{corpus['test']}]",
            f"eval.image_root={corpus['image_root']}"]
    assert albef(base + ["toy.scale=2"]) == 0
    results = json.loads(next((tmp_path / "toy" / "results").glob("test_*.json")).read_text())
    assert results["num"] == 4.0
    assert albef(base + ["toy.scale=20"]) == 2
    assert "toy.scale: must be in (0, 10] (got 20.0)" in capsys.readouterr().err
    assert albef(base + ["toy.scael=2"]) == 2
    assert "did you mean 'toy.scale'?" in capsys.readouterr().err
