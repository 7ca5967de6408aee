"""albef.metrics against the official definitions: the VQA toolkit's vqaEval.py (normalisation,
leave-one-annotator-out, the all-identical quirk, answer types), ALBEF's itm_eval (np.argsort tie
order) and ALBEF's grounding_eval box slices (Python slice semantics for negative corners).

Every expected value is worked out here from those definitions, not taken from our output."""
import numpy as np
import pytest
import torch

from albef.metrics import (RECALL_AT, classification_accuracy, grounding_accuracy, pick_box, retrieval_recall,
                           score_boxes, vqa_accuracy, vqa_digits_articles, vqa_normalize, vqa_punctuation,
                           vqa_score)

# ----------------------------------------------------------------------------- VQA: normalisation


@pytest.mark.parametrize("text, expected", [
    ("1,000", "1000"),          # a comma between digits: every mark is deleted, not spaced
    ("1,000 (approx)", "1000 approx"),
    ("red,white", "red white"),  # a mark not next to a space becomes a space
    ("red, white", "red white"),  # a mark next to a space is deleted
    ("yes!", "yes"),
    ("(left)", "left"),
    ("2.5", "2.5"),              # a period before a digit stays
    ("dogs.", "dogs"),           # any other period goes
    ("u.s.a.", "usa"),
    ("don't", "don't"),          # the apostrophe is not in the punctuation list
    ("a/b", "b"),                # "/" -> space, then the article "a" is dropped
])
def test_vqa_punctuation_then_words(text, expected):
    assert vqa_normalize(text) == expected


def test_vqa_punctuation_alone():
    assert vqa_punctuation("red,white") == "red white"
    assert vqa_punctuation("red, white") == "red white"
    assert vqa_punctuation("1,000") == "1000"
    assert vqa_punctuation("x-ray?") == "x ray "
    # vqaEval passes re.UNICODE (= 32) as the `count` of re.sub: only the first 32 periods go
    assert vqa_punctuation("." * 40 + "x") == "." * 8 + "x"


@pytest.mark.parametrize("text, expected", [
    ("two", "2"), ("none", "0"), ("zero", "0"), ("ten", "10"), ("eleven", "eleven"),  # number words
    ("a dog", "dog"), ("the an apple", "apple"), ("another", "another"),              # articles
    ("dont", "don't"), ("isnt", "isn't"), ("whats up", "what's up"),                   # contractions
    ("Im", "im"),          # the table's "Im" never matches: words are lower-cased first
    ("  Red\tBALL \n", "red ball"),                                                    # case, whitespace
    ("Two Dogs", "2 dogs"),
])
def test_vqa_number_words_articles_contractions_case(text, expected):
    assert vqa_digits_articles(text) == expected


# ----------------------------------------------------------------------------- VQA: the score


def _humans(matching: int, answer: str = "2", total: int = 10) -> list[str]:
    others = ["3", "4", "5", "6", "7", "8", "9", "10", "11", "12"]
    return [answer] * matching + others[: total - matching]


@pytest.mark.parametrize("matching, expected", [
    # n = 10 annotators, m matching: leaving out a matching one leaves m - 1, any other leaves m;
    # score = (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),        # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),        # 0.9
    (4, (4 * 1 + 6 * 1) / 10),              # 1.0
    (10, 1.0),
])
def test_vqa_leave_one_out_of_ten(matching, expected):
    assert vqa_score("2", _humans(matching)) == pytest.approx(expected)
    assert [round(vqa_score("2", _humans(m)), 10) for m in (1, 2, 3, 4)] == [0.3, 0.6, 0.9, 1.0]


def test_vqa_fewer_than_ten_answers():
    # 3 answers, 2 match: leave out either "red" -> 1 match (1/3), leave out "blue" -> 2 (2/3)
    assert vqa_score("red", ["red", "red", "blue"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    # 3 identical answers: each subset of 2 has 2 matches
    assert vqa_score("red", ["red"] * 3) == pytest.approx(2 / 3)
    # one answer (a VG-style entry): leaving it out leaves nobody
    assert vqa_score("red", ["red"]) == 0.0
    # 5 answers, 4 match: leaving out a match leaves 3 (1), leaving out the other leaves 4 (1)
    assert vqa_score("red", ["red"] * 4 + ["blue"]) == 1.0
    with pytest.raises(ValueError):
        vqa_score("red", [])


def test_vqa_duplicate_answers_are_separate_annotators():
    # Every annotator is left out once on its own (vqaEval's answers carry distinct answer_ids),
    # not all copies of its answer at once: 3 of 10 give 0.9 (all copies at once would give 0.7).
    assert vqa_score("2", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)
    # 5 and 5: any subset keeps >= 4 of either answer
    assert vqa_score("3", ["2"] * 5 + ["3"] * 5) == 1.0


def test_vqa_normalises_only_when_humans_disagree():
    # Humans not all identical: humans and prediction are normalised ("two" -> "2", "Two." -> "2")
    humans = ["2", "2", "2", "two", "2", "2", "3", "2", "2", "2"]  # the README example
    assert vqa_score("two", humans) == 1.0   # 9 of 10 humans say "2" once normalised
    assert vqa_score("Two.", humans) == 1.0
    assert vqa_score("3", humans) == pytest.approx(0.3)
    # All identical: nothing but newline/tab/space clean-up, so "two" and "Yes" miss
    assert vqa_score("two", ["2"] * 10) == 0.0
    assert vqa_score("yes", ["Yes"] * 10) == 0.0
    assert vqa_score("yes", ["Yes"] * 9 + ["yes."]) == 1.0  # not identical: both become "yes"
    assert vqa_score(" yes\t", ["yes\n"] * 10) == 1.0  # the clean-up always applies
    # The clean-up comes first: "yes " and "yes" are identical answers, so no normalisation
    assert vqa_score("YES", ["yes ", "yes"] * 5) == 0.0


def test_vqa_accuracy_is_the_mean_with_answer_types():
    annotations = [
        {"question_id": 1, "answer": _humans(1), "answer_type": "number"},        # "2" -> 0.3
        {"question_id": 2, "answer": ["yes"] * 10, "answer_type": "yes/no"},      # "yes" -> 1
        {"question_id": 3, "answer": ["no"] * 8 + ["yes"] * 2, "answer_type": "yes/no"},  # "yes" -> 0.6
        {"question_id": 4, "answer": ["red", "red", "blue"], "answer_type": "other"},     # "red" -> 4/9
        {"question_id": 5, "answer": None, "answer_type": "other"},                # no answers: skipped
    ]
    predictions = [{"question_id": 1, "answer": "2"}, {"question_id": 2, "answer": "yes"},
                   {"question_id": 3, "answer": "yes"}, {"question_id": 4, "answer": "red"},
                   {"question_id": 5, "answer": "red"}, {"question_id": 6, "answer": "no"}]
    result = vqa_accuracy(predictions, annotations)
    assert result["acc"] == pytest.approx(100 * (0.3 + 1 + 0.6 + 4 / 9) / 4)
    assert result["num_scored"] == 4
    assert result["acc_yes_no"] == pytest.approx(100 * (1 + 0.6) / 2) and result["num_yes_no"] == 2
    assert result["acc_number"] == pytest.approx(30.0) and result["num_number"] == 1
    assert result["acc_other"] == pytest.approx(100 * 4 / 9) and result["num_other"] == 1
    # without answer types only the overall figure; nothing answerable -> empty
    plain = vqa_accuracy(predictions, [{k: v for k, v in a.items() if k != "answer_type"} for a in annotations])
    assert set(plain) == {"acc", "num_scored"} and plain["acc"] == result["acc"]
    assert vqa_accuracy(predictions, [{"question_id": 1, "answer": None}]) == {}


def test_classification_accuracy():
    assert classification_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 75.0
    assert classification_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        classification_accuracy([0], [0, 1])


# ----------------------------------------------------------------------------- retrieval


def itm_eval_reference(scores_i2t, scores_t2i, txt2img, img2txt):
    """ALBEF's itm_eval (Retrieval.py), step for step: rank = position of the (best) positive in
    np.argsort(score)[::-1]."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    txt = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in RECALL_AT]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    img = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in RECALL_AT]
    result = {f"txt_r{k}": v for k, v in zip(RECALL_AT, txt)}
    result.update({f"img_r{k}": v for k, v in zip(RECALL_AT, img)})
    result["txt_r_mean"], result["img_r_mean"] = sum(txt) / 3, sum(img) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def pessimistic_recall(scores, positives, k):
    """Ties counted against the query (the rank = negatives scoring at least the best positive):
    the same as itm_eval when nothing ties."""
    hits = 0
    for row, wanted in zip(scores.tolist(), positives):
        best = max(row[j] for j in wanted)
        hits += sum(s >= best for j, s in enumerate(row) if j not in wanted) < k
    return 100.0 * hits / len(positives)


def _maps(captions_per_image):
    img2txt, txt2img = [], []
    for image, count in enumerate(captions_per_image):
        img2txt.append(list(range(len(txt2img), len(txt2img) + count)))
        txt2img += [image] * count
    return txt2img, img2txt


def _topk_fill(scores, k):
    """ALBEF's matrix: each row's top-k keep their score, the rest -100 (ties when k < 10)."""
    out = np.full_like(scores, -100.0)
    for row in range(scores.shape[0]):
        top = np.argsort(-scores[row], kind="stable")[:k]
        out[row, top] = scores[row, top]
    return out


def _assert_matches_reference(i2t, t2i, txt2img, img2txt):
    ours = retrieval_recall(i2t, t2i, txt2img, img2txt)
    ref = itm_eval_reference(np.asarray(i2t), np.asarray(t2i), txt2img, img2txt)
    assert {key: ours[key] for key in ref} == ref
    return ours


@pytest.mark.parametrize("seed", range(4))
def test_recall_with_ties_equals_argsort_reference(seed):
    rng = np.random.default_rng(seed)
    txt2img, img2txt = _maps(rng.integers(1, 6, 40).tolist())
    num_images, num_texts = len(img2txt), len(txt2img)
    # few distinct values: plenty of ties at every rank
    i2t = rng.integers(0, 4, (num_images, num_texts)).astype(np.float32)
    t2i = rng.integers(0, 4, (num_texts, num_images)).astype(np.float32)
    ours = _assert_matches_reference(i2t, t2i, txt2img, img2txt)
    assert ours["txt_ties"] > 0 and ours["img_ties"] > 0
    # ALBEF's -100 fill outside a small top-k (k < 10), float64 this time
    i2t = _topk_fill(rng.random((num_images, num_texts)).round(1), 3)
    t2i = _topk_fill(rng.random((num_texts, num_images)).round(1), 3)
    _assert_matches_reference(i2t, t2i, txt2img, img2txt)


def test_all_equal_scores_equal_argsort_reference():
    txt2img, img2txt = _maps([5] * 20)
    i2t, t2i = np.zeros((20, 100), np.float32), np.zeros((100, 20), np.float32)
    ours = _assert_matches_reference(i2t, t2i, txt2img, img2txt)
    assert ours["txt_ties"] == 20 and ours["img_ties"] == 100


def test_bf16_torch_scores_sort_as_albefs_float32_matrix():
    gen = torch.Generator().manual_seed(0)
    txt2img, img2txt = _maps([2] * 30)
    i2t = (torch.randn(30, 60, generator=gen) * 0.01).to(torch.bfloat16)  # coarse: ties
    t2i = (torch.randn(60, 30, generator=gen) * 0.01).to(torch.bfloat16)
    ours = retrieval_recall(i2t, t2i, txt2img, img2txt)
    ref = itm_eval_reference(i2t.float().numpy(), t2i.float().numpy(), txt2img, img2txt)
    assert {key: ours[key] for key in ref} == ref


@pytest.mark.parametrize("seed", range(3))
def test_recall_without_ties_is_unchanged(seed):
    rng = np.random.default_rng(10 + seed)
    txt2img, img2txt = _maps(rng.integers(1, 6, 25).tolist())
    i2t = rng.standard_normal((len(img2txt), len(txt2img)))
    t2i = rng.standard_normal((len(txt2img), len(img2txt)))
    ours = _assert_matches_reference(i2t, t2i, txt2img, img2txt)
    assert ours["txt_ties"] == ours["img_ties"] == 0
    for k in RECALL_AT:  # the figures of the tie-pessimistic ranking (ours before) are unchanged
        assert ours[f"txt_r{k}"] == pytest.approx(pessimistic_recall(i2t, [set(t) for t in img2txt], k))
        assert ours[f"img_r{k}"] == pytest.approx(pessimistic_recall(t2i, [{i} for i in txt2img], k))


def test_tie_counter_counts_ties_at_the_positive_only():
    txt2img, img2txt = [0, 0, 1, 2], [[0, 1], [2], [3]]
    i2t = np.array([
        [0.9, 0.5, 0.9, 0.1],  # image 0: its best caption (0.9) ties caption 2 (a negative): tie
        [0.2, 0.2, 0.8, 0.1],  # image 1: negatives tie each other, below the positive: no tie
        [0.3, 0.3, 0.1, 0.2],  # image 2: tie above the positive, not at it: no tie
    ])
    t2i = np.array([
        [0.7, 0.7, 0.0],  # caption 0 (image 0) ties image 1: tie
        [0.5, 0.1, 0.1],  # negatives tie each other: no tie
        [0.4, 0.4, 0.4],  # caption 2 (image 1): all equal: tie
        [0.1, 0.2, 0.3],  # no tie
    ])
    ours = _assert_matches_reference(i2t, t2i, txt2img, img2txt)
    assert ours["txt_ties"] == 1 and ours["img_ties"] == 2
    # two positives tied with each other are no tie
    assert retrieval_recall(np.array([[0.5, 0.5, 0.1]]), np.eye(3)[:, :1], [0, 0, 0], [[0, 1]])["txt_ties"] == 0


# ----------------------------------------------------------------------------- grounding


def _heat(kind):
    heat = np.arange(100, dtype=np.float64).reshape(10, 10)  # heat[r, c] = 10 r + c
    return torch.from_numpy(heat) if kind == "torch" else heat


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_negative_corner_slices_as_grounding_eval(kind):
    heat = _heat(kind)
    # x = -3, w = 6: grounding_eval slices columns [-3:3], an empty range (start 7 > stop 3)
    # in Python's slice semantics, so the box scores 0 (clamping to 0 would sum columns 0..2).
    assert float(score_boxes(heat, [[-3, 2, 6, 4]])[0]) == 0.0
    # y = -3, h = 2: rows [-3:-1] are rows 7 and 8 (counted from the bottom edge), columns 0..1
    expected = sum(10 * r + c for r in (7, 8) for c in (0, 1)) / (2 * 2) ** 0.5
    assert float(score_boxes(heat, [[0, -3, 2, 2]])[0]) == pytest.approx(expected)
    # -0.5 truncates to 0 (int()), so that box is the plain top-left one: columns [0:2], rows [0:2]
    assert float(score_boxes(heat, [[-0.5, 0, 2.5, 2]])[0]) == pytest.approx((0 + 1 + 10 + 11) / 5 ** 0.5)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_negative_corner_changes_the_pick_as_grounding_eval(kind):
    heat = _heat(kind)
    # Box 0 reaches past the top edge: ALBEF sums rows [-2:2] = nothing -> 0. Clamped it would sum
    # rows 0..1 of columns 0..9 (sum 190, score 190 / sqrt(40) = 30.0) and beat box 2 (22).
    boxes = [[0, -2, 10, 4], [0, 0, 1, 1], [2, 2, 1, 1]]
    scores = [float(s) for s in score_boxes(heat, boxes)]
    assert scores == pytest.approx([0.0, 0.0, 22.0])
    assert pick_box(heat, boxes) == 2
    # a box whose slice is non-empty only thanks to the negative stop wraps to the far edge:
    # x = -4, w = 2 -> columns [-4:-2] = 6, 7 of rows 0..0 -> (6 + 7) / sqrt(2)
    assert float(score_boxes(heat, [[-4, 0, 2, 1]])[0]) == pytest.approx(13 / 2 ** 0.5)
    assert grounding_accuracy(["val", "testA", "val"], [0.5, 0.1, 0.2]) == {"val_d": 0.5, "testA_d": 0.0}
