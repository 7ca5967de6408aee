"""Retrieval evaluation: recall on hand-made score matrices, chance levels, ITM re-ranking."""
from pathlib import Path

import pytest
import torch

from albef.tasks.retrieval import RECALL_AT, chance_recall, itm_eval, rerank

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def one_caption_each(n: int):
    return list(range(n)), [[i] for i in range(n)]


def test_perfect_scores_give_full_recall():
    txt2img, img2txt = one_caption_each(12)
    scores = torch.eye(12)
    result = itm_eval(scores, scores, txt2img, img2txt)
    assert all(result[f"{d}_r{k}"] == 100.0 for d in ("txt", "img") for k in RECALL_AT)
    assert result["r_mean"] == 100.0


def test_reversed_scores_rank_the_match_last():
    n = 12
    txt2img, img2txt = one_caption_each(n)
    scores = -torch.eye(n)  # the match scores lowest in every row
    result = itm_eval(scores, scores, txt2img, img2txt)
    assert result["txt_r1"] == result["txt_r5"] == result["txt_r10"] == 0.0
    assert result["img_r10"] == 0.0


def test_known_ranks():
    # Match of row i sits at rank i (0-based) among 12 candidates: R@K = K rows out of 12.
    n = 12
    txt2img, img2txt = one_caption_each(n)
    scores = torch.zeros(n, n)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        scores[i, others] = torch.linspace(1.0, 0.0, n - 1) * 10  # strictly decreasing
        scores[i, i] = scores[i, others[i - 1]] - 0.5 if i else 100.0
    result = itm_eval(scores, scores, txt2img, img2txt)
    for k in RECALL_AT:
        assert result[f"txt_r{k}"] == pytest.approx(100.0 * k / n)
        assert result[f"img_r{k}"] == pytest.approx(100.0 * k / n)
    assert result["txt_r_mean"] == pytest.approx(100.0 * 16 / 3 / n)


def test_ties_count_against_the_query():
    # Every candidate scores the same: a random-looking ranking must not count as a hit.
    txt2img, img2txt = one_caption_each(4)
    scores = torch.full((4, 4), -100.0)
    result = itm_eval(scores, scores, txt2img, img2txt)
    assert result["txt_r1"] == result["img_r1"] == 0.0
    # A tie between the match and one negative is a miss at R@1 and a hit at R@5.
    scores = torch.eye(4) + torch.eye(4).roll(1, dims=1)
    result = itm_eval(scores, scores, txt2img, img2txt)
    assert result["txt_r1"] == result["img_r1"] == 0.0
    assert result["txt_r5"] == result["img_r5"] == 100.0


def test_multiple_captions_per_image():
    # 3 images x 2 captions; image->text is a hit when any of the image's captions ranks in.
    txt2img = [0, 0, 1, 1, 2, 2]
    img2txt = [[0, 1], [2, 3], [4, 5]]
    i2t = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.0, 0.0, 0.0],  # second caption first: hit at R@1
            [0.9, 0.0, 0.1, 0.0, 0.8, 0.0],  # best own caption (0.1) is 3rd behind 0.9, 0.8
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.9],  # own caption first
        ]
    )
    t2i = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    result = itm_eval(i2t, t2i, txt2img, img2txt)
    assert result["txt_r1"] == pytest.approx(200.0 / 3)
    assert result["txt_r5"] == 100.0
    # texts 1, 3, 5 rank a wrong image first: 3 of 6 hits at R@1; all within 3 images at R@5
    assert result["img_r1"] == pytest.approx(50.0)
    assert result["img_r5"] == 100.0


def test_accepts_numpy_and_dict_maps():
    np = pytest.importorskip("numpy")
    scores = np.eye(3)
    result = itm_eval(scores, scores, {0: 0, 1: 1, 2: 2}, {0: [0], 1: [1], 2: [2]})
    assert result["txt_r1"] == 100.0


def test_chance_levels():
    chance = chance_recall([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]] * 4, num_texts=40)
    assert chance["img_r1"] == pytest.approx(100.0 / 20)
    assert chance["img_r10"] == pytest.approx(100.0 * 10 / 20)
    # image->text R@1 with 2 of 40 captions correct: 2 / 40
    assert chance["txt_r1"] == pytest.approx(100.0 * 2 / 40)
    # R@5: 1 - C(38, 5) / C(40, 5)
    assert chance["txt_r5"] == pytest.approx(100.0 * (1 - (35 * 34) / (40 * 39)))
    # more candidates than K images: recall saturates at 100
    assert chance_recall([[0], [1], [2]], 3)["img_r5"] == 100.0


def test_chance_matches_random_scores():
    torch.manual_seed(0)
    img2txt = [[2 * i, 2 * i + 1] for i in range(30)]
    txt2img = [i // 2 for i in range(60)]
    chance = chance_recall(img2txt, 60)
    runs = [itm_eval(torch.rand(30, 60), torch.rand(60, 30), txt2img, img2txt) for _ in range(200)]
    for key in ("txt_r5", "img_r5", "txt_r10"):
        mean = sum(r[key] for r in runs) / len(runs)
        assert mean == pytest.approx(chance[key], abs=2.5)


def test_rerank_scores_exactly_the_top_k():
    sims = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.6, 0.0]])
    calls = []

    def pair_scores(rows, cols):
        calls.append(len(rows))
        return 10.0 * rows + cols  # distinguishable per pair

    scores, with_itc = rerank(sims, k=2, pair_scores=pair_scores, batch_size=3)
    expected = torch.full((2, 4), -100.0)
    expected[0, 0], expected[0, 3] = 0.0, 3.0
    expected[1, 1], expected[1, 2] = 11.0, 12.0
    assert torch.equal(scores, expected)
    in_top_k = expected > -100
    assert torch.equal(with_itc[in_top_k], (expected + sims)[in_top_k])
    assert (with_itc[~in_top_k] == -100).all()
    assert calls == [3, 1]  # 4 pairs in fusion batches of at most 3


# ----------------------------------------------------------------------------- end to end

NUM_TEST, CAPTIONS = 12, 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from albef.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(str(out), num_train=1, num_test=NUM_TEST, image_size=32, captions_per_image=CAPTIONS)
    return out


def tiny_config(corpus: Path, *overrides: str):
    from albef.config import load_config

    return load_config(
        str(CONFIGS / "test_tiny.yaml"),
        [
            f"model.text.bert={corpus / 'bert'}",
            f"eval.test_files=[{corpus / 'test.json'}]",
            f"eval.image_root={corpus}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def model(corpus):
    from albef.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_config(corpus)).eval()


def test_evaluate_retrieval_tiny(corpus, model):
    from albef.tasks.retrieval import evaluate_retrieval

    result = evaluate_retrieval(model, tiny_config(corpus), "cpu")
    assert (result["num_images"], result["num_texts"]) == (NUM_TEST, NUM_TEST * CAPTIONS)
    for prefix in ("", "itc_", "chance_"):
        for direction in ("txt", "img"):
            for k in RECALL_AT:
                assert 0.0 <= result[f"{prefix}{direction}_r{k}"] <= 100.0
    assert 0.0 <= result["r_mean"] <= 100.0 and 0.0 <= result["itc_r_mean"] <= 100.0
    expected = chance_recall([[2 * i, 2 * i + 1] for i in range(NUM_TEST)], NUM_TEST * CAPTIONS)
    for key, value in expected.items():
        assert result[f"chance_{key}"] == pytest.approx(value)
    assert model.training is False


def test_itm_rescoring_touches_exactly_top_k(corpus, model, monkeypatch):
    from albef.tasks.retrieval import evaluate_retrieval

    pairs = []
    original = model.itm_logits

    def counting(image_embeds, text_embeds, attention_mask):
        pairs.append(image_embeds.shape[0])
        return original(image_embeds, text_embeds, attention_mask)

    monkeypatch.setattr(model, "itm_logits", counting)
    k = 3
    cfg = tiny_config(corpus, f"eval.k_test={k}", "eval.batch_size=5")
    evaluate_retrieval(model, cfg, "cpu")
    assert sum(pairs) == k * (NUM_TEST + NUM_TEST * CAPTIONS)
    assert max(pairs) <= 5


def test_k_test_one_keeps_the_itc_top_1(corpus, model):
    from albef.tasks.retrieval import evaluate_retrieval

    result = evaluate_retrieval(model, tiny_config(corpus, "eval.k_test=1"), "cpu")
    assert result["txt_r1"] == result["itc_txt_r1"]
    assert result["img_r1"] == result["itc_img_r1"]
    # everything below the single re-ranked candidate ties at the floor: no hits past R@1
    assert result["txt_r10"] == result["txt_r1"] and result["img_r10"] == result["img_r1"]


def test_missing_eval_image_names_the_file(corpus, model, tmp_path):
    from albef.tasks.retrieval import RetrievalDataError, evaluate_retrieval

    cfg = tiny_config(corpus, f"eval.image_root={tmp_path}")
    with pytest.raises(RetrievalDataError, match=r"test_000000\.jpg.*eval\.image_root"):
        evaluate_retrieval(model, cfg, "cpu")


def test_cli_evaluates_a_checkpoint(corpus, model, tmp_path, capsys):
    from albef.checkpoint import save_pretrained
    from albef.tasks.retrieval import main

    path = save_pretrained(model, tmp_path / "model.pt")
    args = ["--config", str(CONFIGS / "test_tiny.yaml"), "--evaluate", "--init-from", str(path),
            "--output-dir", str(tmp_path / "run"), "loss.weights.mlm=0"]
    args += [f"model.text.bert={corpus / 'bert'}", f"eval.test_files=[{corpus / 'test.json'}]", f"eval.image_root={corpus}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "text -> image" in out and "image -> text" in out and "chance" in out
    assert (tmp_path / "run" / "results" / "test_latest.json").is_file()
    # a weight file that does not exist: a one-line error, exit code 2
    assert main(args[:4] + [str(tmp_path / "nothing.pt")] + args[5:]) == 2
    assert "model.init_checkpoint" in capsys.readouterr().err


def test_cli_loads_a_checkpoint_without_mlm_heads_as_albef_retrieval_ones(corpus, model, tmp_path, capsys):
    """Released ALBEF retrieval checkpoints have no MLM heads: evaluation does not use them, so
    they are a declared skip; any other missing key still fails."""
    from albef.tasks.retrieval import main

    state = {k: v for k, v in model.state_dict().items() if ".cls." not in k}
    torch.save({"model": state}, tmp_path / "retrieval.pth")
    args = ["--config", str(CONFIGS / "test_tiny.yaml"), "--init-from", str(tmp_path / "retrieval.pth"), "--evaluate",
            f"model.text.bert={corpus / 'bert'}", f"eval.test_files=[{corpus / 'test.json'}]", f"eval.image_root={corpus}",
            "loss.weights.mlm=0", "--output-dir", str(tmp_path / "run")]
    assert main(args) == 0
    assert "text -> image" in capsys.readouterr().out

    del state["itm_head.weight"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    assert main(args[:3] + [str(tmp_path / "broken.pth")] + args[4:]) == 2
    err = capsys.readouterr().err
    assert "itm_head.weight" in err and len(err.strip().splitlines()) == 1
