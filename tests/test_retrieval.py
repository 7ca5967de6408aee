"""Retrieval evaluation: recall on hand-made score matrices, chance levels, ITM re-ranking."""
from pathlib import Path

import numpy as np
import pytest
import torch

from albef.metrics import RECALL_AT, chance_recall, retrieval_recall

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def one_caption_each(n: int):
    return list(range(n)), [[i] for i in range(n)]


def test_perfect_scores_give_full_recall():
    txt2img, img2txt = one_caption_each(12)
    scores = torch.eye(12)
    result = retrieval_recall(scores, scores, txt2img, img2txt)
    assert all(result[f"{d}_r{k}"] == 100.0 for d in ("txt", "img") for k in RECALL_AT)
    assert result["r_mean"] == 100.0


def test_reversed_scores_rank_the_match_last():
    n = 12
    txt2img, img2txt = one_caption_each(n)
    scores = -torch.eye(n)  # the match scores lowest in every row
    result = retrieval_recall(scores, scores, txt2img, img2txt)
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
    result = retrieval_recall(scores, scores, txt2img, img2txt)
    for k in RECALL_AT:
        assert result[f"txt_r{k}"] == pytest.approx(100.0 * k / n)
        assert result[f"img_r{k}"] == pytest.approx(100.0 * k / n)
    assert result["txt_r_mean"] == pytest.approx(100.0 * 16 / 3 / n)


def test_ties_follow_numpys_order_and_are_counted():
    # A tie between the match and one negative: the rank is the match's place in
    # np.argsort(row)[::-1] (itm_eval's order), and the query is counted in the ties.
    txt2img, img2txt = one_caption_each(4)
    scores = torch.eye(4) + torch.eye(4).roll(1, dims=1)
    result = retrieval_recall(scores, scores, txt2img, img2txt)
    first = sum(int(np.argsort(row)[::-1][0] == i) for i, row in enumerate(scores.numpy()))
    assert result["txt_r1"] == result["img_r1"] == 100.0 * first / 4
    assert result["txt_r5"] == result["img_r5"] == 100.0
    assert result["txt_ties"] == result["img_ties"] == 4


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
    result = retrieval_recall(i2t, t2i, txt2img, img2txt)
    assert result["txt_r1"] == pytest.approx(200.0 / 3)
    assert result["txt_r5"] == 100.0
    # texts 1, 3, 5 rank a wrong image first: 3 of 6 hits at R@1; all within 3 images at R@5
    assert result["img_r1"] == pytest.approx(50.0)
    assert result["img_r5"] == 100.0


def test_accepts_numpy_and_dict_maps():
    np = pytest.importorskip("numpy")
    scores = np.eye(3)
    result = retrieval_recall(scores, scores, {0: 0, 1: 1, 2: 2}, {0: [0], 1: [1], 2: [2]})
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
    runs = [retrieval_recall(torch.rand(30, 60), torch.rand(60, 30), txt2img, img2txt) for _ in range(200)]
    for key in ("txt_r5", "img_r5", "txt_r10"):
        mean = sum(r[key] for r in runs) / len(runs)
        assert mean == pytest.approx(chance[key], abs=2.5)


def brute_force_recall(scores, positives, k):
    """Percentage of queries (rows) with a positive among the first k of np.argsort(row)[::-1]
    (itm_eval's order, ties included); written without retrieval_recall's logic."""
    hits = 0
    for row, wanted in zip(scores.numpy(), positives):
        order = np.argsort(row)[::-1].tolist()
        first_hit = min(order.index(j) for j in wanted)
        hits += first_hit < k
    return 100.0 * hits / len(positives)


@pytest.mark.parametrize("seed", range(5))
def test_recall_equals_brute_force_with_several_captions_per_image(seed):
    gen = torch.Generator().manual_seed(seed)
    num_images = 9
    captions = torch.randint(1, 6, (num_images,), generator=gen).tolist()  # 1 to 5 captions each
    img2txt, txt2img = [], []
    for image, count in enumerate(captions):
        img2txt.append(list(range(len(txt2img), len(txt2img) + count)))
        txt2img += [image] * count
    num_texts = len(txt2img)
    # one decimal: plenty of ties, ranked in numpy's order as itm_eval ranks them
    i2t = (torch.rand(num_images, num_texts, generator=gen) * 2).round(decimals=1)
    t2i = (torch.rand(num_texts, num_images, generator=gen) * 2).round(decimals=1)
    result = retrieval_recall(i2t, t2i, txt2img, img2txt)
    for k in RECALL_AT:
        assert result[f"txt_r{k}"] == pytest.approx(brute_force_recall(i2t, [set(t) for t in img2txt], k))
        assert result[f"img_r{k}"] == pytest.approx(brute_force_recall(t2i, [{i} for i in txt2img], k))


def test_candidate_pairs_are_the_union_of_both_top_k_lists():
    from albef.tasks.retrieval import candidate_pairs

    gen = torch.Generator().manual_seed(0)
    sims = torch.randn(5, 11, generator=gen)
    k = 3
    pairs, i2t, t2i = candidate_pairs(sims, k)
    expected = set()
    for i in range(5):
        expected |= {(i, t) for t in sorted(range(11), key=lambda t: -sims[i, t])[:k]}
    for t in range(11):
        expected |= {(i, t) for i in sorted(range(5), key=lambda i: -sims[i, t])[:k]}
    assert pairs.tolist() == sorted(i * 11 + t for i, t in expected)  # sorted by image, then text
    assert {(i, t) for i in range(5) for t in i2t[i].tolist()} | {(i, t) for t in range(11) for i in t2i[t].tolist()} == expected


def test_topk_matrix_scores_exactly_each_querys_top_k():
    from albef.tasks.retrieval import candidate_pairs, topk_matrix

    sims = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.6, 0.0]])
    pairs, i2t_topk, t2i_topk = candidate_pairs(sims, k=2)
    scores = (10.0 * (pairs // 4) + pairs % 4).float()  # ITM score of pair (i, t): 10 i + t
    itm, itm_itc = topk_matrix(sims, i2t_topk, pairs, scores, transpose=False)
    expected = torch.full((2, 4), -100.0)
    expected[0, 0], expected[0, 3] = 0.0, 3.0
    expected[1, 1], expected[1, 2] = 11.0, 12.0
    assert torch.equal(itm, expected)
    top = expected > -100
    assert torch.equal(itm_itc[top], (expected + sims)[top]) and (itm_itc[~top] == -100).all()
    # text -> image: with 2 images and k=2 every text's both images are scored
    itm, itm_itc = topk_matrix(sims, t2i_topk, pairs, scores, transpose=True)
    assert torch.equal(itm, torch.tensor([[10.0 * i + t for i in range(2)] for t in range(4)]))
    assert torch.allclose(itm_itc, itm + sims.t())


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
    from albef.build import build_model

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


def test_itm_rescoring_touches_exactly_the_top_k_pairs_once(corpus, model, monkeypatch):
    from albef.tasks import retrieval_eval as retrieval  # where the ITM pair scoring lives

    pairs, batches = set(), []
    original = retrieval.pair_itm_logits

    def counting(model, image_embeds, image_index, text_embeds, attention_mask):
        batches.append(len(text_embeds))
        return original(model, image_embeds, image_index, text_embeds, attention_mask)

    monkeypatch.setattr(retrieval, "pair_itm_logits", counting)
    k = 3
    cfg = tiny_config(corpus, f"eval.k_test={k}", "eval.batch_size=5")
    scores = retrieval.retrieval_scores(model, cfg, "cpu")
    sims = scores.sims
    for i in range(NUM_TEST):
        pairs |= {(i, t) for t in sims[i].topk(k).indices.tolist()}
    for t in range(NUM_TEST * CAPTIONS):
        pairs |= {(i, t) for i in sims[:, t].topk(k).indices.tolist()}
    assert sum(batches) == len(pairs) == scores.num_pairs  # a pair in both top-k lists is scored once
    assert max(batches) == 5  # fusion batches of max(k_test, eval.batch_size) pairs
    assert ((scores.i2t > -100).sum(dim=1) == k).all() and ((scores.t2i > -100).sum(dim=1) == k).all()


def albef_reference(model, cfg):
    """ALBEF's evaluation loop as written in its Retrieval.py: per query, its k candidates by ITC
    similarity, the image tokens repeated for each, ITM logit (positive class) as the score."""
    from albef.data.transforms import eval_transform
    from albef.models import build_tokenizer
    from albef.tasks.retrieval import RetrievalDataset

    data = RetrievalDataset(cfg.eval.test_files, cfg.eval.image_root,
                            eval_transform(cfg.model.vision.image_size, cfg.data.mean, cfg.data.std), cfg.data.max_words)
    tokens = build_tokenizer(cfg.model)(data.texts, padding="max_length", truncation=True, max_length=cfg.eval.max_tokens,
                                  return_tensors="pt")
    with torch.no_grad():
        text_embeds, text_feats = model.text_tokens(tokens.input_ids, tokens.attention_mask)
        image_embeds, image_feats = model.image_tokens(torch.stack([data[i] for i in range(len(data))]))
        sims = image_feats @ text_feats.t()
        k = cfg.eval.k_test
        i2t = torch.full_like(sims, -100.0)
        for i in range(len(data)):
            top = sims[i].topk(k).indices
            logits = model.itm_logits(image_embeds[i].repeat(k, 1, 1), text_embeds[top], tokens.attention_mask[top])
            i2t[i, top] = logits[:, 1]
        t2i = torch.full_like(sims.t(), -100.0)
        for t in range(len(data.texts)):
            top = sims[:, t].topk(k).indices
            logits = model.itm_logits(image_embeds[top], text_embeds[t].repeat(k, 1, 1),
                                      tokens.attention_mask[t].repeat(k, 1))
            t2i[t, top] = logits[:, 1]
    return data, sims, i2t, t2i


@pytest.mark.slow
def test_scores_equal_albefs_per_query_loop(corpus, model):
    from albef.tasks.retrieval import evaluate_retrieval, retrieval_scores

    cfg = tiny_config(corpus, "eval.k_test=5")
    data, sims, i2t, t2i = albef_reference(model, cfg)
    scores = retrieval_scores(model, cfg, "cpu")
    torch.testing.assert_close(scores.sims, sims, rtol=1e-5, atol=1e-6)
    assert torch.equal(scores.i2t == -100, i2t == -100) and torch.equal(scores.t2i == -100, t2i == -100)
    torch.testing.assert_close(scores.i2t, i2t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.t2i, t2i, rtol=1e-5, atol=1e-5)
    result = evaluate_retrieval(model, cfg, "cpu")
    expected = retrieval_recall(i2t, t2i, data.txt2img, data.img2txt)
    assert {key: result[key] for key in expected} == expected
    assert result["time_encode_s"] > 0 and result["time_rerank_s"] > 0


def test_k_test_one_keeps_the_itc_top_1(corpus, model):
    from albef.tasks.retrieval import evaluate_retrieval

    result = evaluate_retrieval(model, tiny_config(corpus, "eval.k_test=1"), "cpu")
    assert result["txt_r1"] == result["itc_txt_r1"]
    assert result["img_r1"] == result["itc_img_r1"]
    # everything below the single re-ranked candidate ties at the -100 floor: a query missed at R@1
    # has its positive in that tie, so it is counted, and R@5/R@10 follow numpy's tie order (itm_eval)
    assert result["txt_ties"] == round((100 - result["txt_r1"]) / 100 * result["num_images"])
    assert result["img_ties"] == round((100 - result["img_r1"]) / 100 * result["num_texts"])
    assert result["txt_r10"] >= result["txt_r1"] and result["img_r10"] >= result["img_r1"]


def test_missing_eval_image_names_the_file(corpus, model, tmp_path):
    from albef.tasks.retrieval import RetrievalDataError, evaluate_retrieval

    cfg = tiny_config(corpus, f"eval.image_root={tmp_path}")
    with pytest.raises(RetrievalDataError, match=r"test_000000\.jpg.*eval\.image_root"):
        evaluate_retrieval(model, cfg, "cpu")


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_save_examples_writes_marked_grids_to_png_and_tensorboard(corpus, model, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from albef.checkpoint import save_pretrained
    from albef.tasks.retrieval import main
    from albef.visualize_retrieval import DPI, IMAGE_QUERY_INCHES, TEXT_QUERY_INCHES

    path = save_pretrained(model, tmp_path / "model.pt")
    run = tmp_path / "run"
    args = ["--config", str(CONFIGS / "test_tiny.yaml"), "--evaluate", "--init-from", str(path), "--save-examples", "3",
            "--output-dir", str(run), "loss.weights.mlm=0", f"model.text.bert={corpus / 'bert'}",
            f"eval.test_files=[{corpus / 'test.json'}]", f"eval.image_root={corpus}"]
    assert main(args) == 0
    pngs = sorted((run / "examples" / "test").glob("*.png"))
    texts = [p for p in pngs if p.name.startswith("text_to_image_")]
    images = [p for p in pngs if p.name.startswith("image_to_text_")]
    assert len(texts) == len(images) == 3 and len(pngs) == 6
    for files, inches in ((texts, TEXT_QUERY_INCHES), (images, IMAGE_QUERY_INCHES)):
        for png in files:
            with Image.open(png) as picture:
                assert picture.size == (int(inches[0] * DPI), int(inches[1] * DPI))
                assert len(picture.getcolors(1 << 16) or range(1 << 16)) > 50  # drawn, not blank
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert len([tag for tag in events.Tags()["images"] if tag.startswith("test_examples/")]) == 6
    # a negative count is one line naming the key
    assert main(args[:6] + ["-1"] + args[7:]) == 2


def test_example_grids_mark_the_correct_candidates():
    import numpy as np
    from PIL import Image

    from albef.visualize_retrieval import RIGHT, WRONG, text_query_figure

    red = Image.new("RGB", (32, 32), (200, 0, 0))
    rgb = text_query_figure("a red square", [red] * 5, [True, False, False, False, False],
                            ["itm 3.0", "itm 1.0", "itm 0.5", "itc 0.2", "itc 0.1"])
    hex_rgb = lambda h: np.array([int(h[i:i + 2], 16) for i in (1, 3, 5)])  # noqa: E731
    green_px = (np.abs(rgb.astype(int) - hex_rgb(RIGHT)).sum(-1) < 30).sum()
    red_px = (np.abs(rgb.astype(int) - hex_rgb(WRONG)).sum(-1) < 30).sum()
    assert green_px > 100 and red_px > 4 * green_px  # one frame green, four red
