"""albef.load: a weight file or run directory -> (model, preprocess) that score PIL images
against strings as the retrieval evaluation does."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import albef
from albef.checkpoint import CheckpointError, save_checkpoint, save_pretrained
from albef.config import load_config, save_config
from albef.build import build_model

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NUM_TEST = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model's run directory (config.yaml + a training checkpoint) and its corpus."""
    from albef.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("inference")
    corpus = generate_corpus(str(root / "corpus"), num_train=1, num_test=NUM_TEST, image_size=32)
    cfg = load_config(str(CONFIGS / "test_tiny.yaml"), [
        f"model.text.bert={corpus['bert']}", f"eval.test_files=[{corpus['test']}]",
        f"eval.image_root={corpus['image_root']}", f"output_dir={root / 'run'}", "eval.k_test=36"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_config(cfg, str(root / "run" / "config.yaml"))
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict()}, root / "run" / "checkpoints", 7, 1)
    test = json.loads(Path(corpus["test"]).read_text())
    images = [Image.open(Path(corpus["image_root"]) / e["image"]) for e in test]
    captions = [e["caption"][0] for e in test]
    return root, cfg, model, images, captions


def test_load_a_run_directory_scores_as_the_retrieval_evaluation(setup):
    from albef.tasks.retrieval import retrieval_scores

    root, cfg, model, images, captions = setup
    loaded, preprocess = albef.load(root / "run")
    assert loaded.preprocess is preprocess and not loaded.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    sims = loaded.similarity(images, captions)
    assert sims.shape == (NUM_TEST, NUM_TEST)
    # the same ITC similarities as the evaluation (its first caption of each image)
    reference = retrieval_scores(model, cfg, "cpu")
    first = [texts[0] for texts in reference.dataset.img2txt]
    torch.testing.assert_close(sims, reference.sims[:, first], rtol=1e-4, atol=1e-5)
    # ITM probabilities of every pair: the model's own per-pair itm_score on the eval tensors
    itm = loaded.itm_score(images, captions)
    assert itm.shape == (NUM_TEST, NUM_TEST) and ((itm >= 0) & (itm <= 1)).all()
    pixels = torch.stack([reference.dataset[i] for i in range(NUM_TEST)])
    tokens = preprocess.tokenizer([reference.dataset.texts[t] for t in first], padding="max_length",
                                  max_length=cfg.eval.max_tokens, return_tensors="pt")
    rows, cols = torch.arange(NUM_TEST).repeat_interleave(NUM_TEST), torch.arange(NUM_TEST).repeat(NUM_TEST)
    with torch.no_grad():
        expected = model.itm_score(pixels[rows], tokens.input_ids[cols], tokens.attention_mask[cols])
    torch.testing.assert_close(itm, expected.view(NUM_TEST, NUM_TEST), rtol=1e-4, atol=1e-5)
    # pairwise: image i against caption i, the diagonal of the matrix
    torch.testing.assert_close(loaded.itm_score(images, captions, pairwise=True), itm.diagonal(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pairwise"):
        loaded.itm_score(images, captions[:2], pairwise=True)


def test_load_files_with_or_without_a_stored_config(setup, tmp_path):
    root, cfg, model, images, captions = setup
    reference = albef.load(root / "run")[0].similarity(images[:2], captions[:3])
    best = save_pretrained(model, tmp_path / "best.pt", cfg.to_dict())  # what the trainer writes
    safetensors = save_pretrained(model, tmp_path / "model.safetensors", cfg.to_dict())
    step = root / "run" / "checkpoints" / "step_00000007.pt"  # config inside, and config.yaml two levels up
    for path in (best, safetensors, step):
        assert torch.allclose(albef.load(path)[0].similarity(images[:2], captions[:3]), reference), path
    plain = tmp_path / "plain" / "weights.pth"  # a released-ALBEF-style file: weights only
    plain.parent.mkdir()
    torch.save({"model": model.state_dict()}, plain)
    with pytest.raises(CheckpointError, match="no config stored.*config=PATH"):
        albef.load(plain)
    save_config(cfg, str(tmp_path / "cfg.yaml"))
    assert torch.allclose(albef.load(plain, config=tmp_path / "cfg.yaml")[0].similarity(images[:2], captions[:3]),
                          reference)
    with pytest.raises(CheckpointError, match="no such"):
        albef.load(tmp_path / "missing")


def test_preprocess_bundles_the_eval_transform_caption_cleaning_and_tokenizer(setup):
    root, cfg, _, images, _ = setup
    _, preprocess = albef.load(root / "run")
    assert preprocess.images(images[:2]).shape == (2, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    assert preprocess.caption("A Red,  Circle!") == "a red circle"
    input_ids, mask = preprocess.texts(["A red circle", " ".join(["red"] * 100)])
    assert input_ids.shape == mask.shape == (2, cfg.eval.max_tokens)  # truncated to eval.max_tokens
