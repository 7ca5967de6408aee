"""What a newcomer reads: every task's --evaluate in one results format, the load report's one
vocabulary, and the albef.load example run from another directory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from albef.checkpoint import save_pretrained
from albef.config import load_config
from albef.data.synthetic import generate_corpus, generate_grounding_set, generate_reasoning_sets, generate_vqa_set
from albef.engine.results import format_results, results_record, unit_of
from albef.engine.trainer import init_weights
from albef.tasks.pretrain import PretrainTask
from albef.tasks.retrieval import RetrievalTask

pytestmark = pytest.mark.slow  # every task's --evaluate end to end

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "test_tiny.yaml"
UNITS = {"%", "count", "s"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = generate_corpus(str(root), num_train=4, num_test=3, image_size=32)
    paths.update(generate_reasoning_sets(str(root), num_train=2, num_val=3, num_test=3, image_size=32))
    paths.update({f"vqa_{k}": v for k, v in generate_vqa_set(str(root), num_train=2, num_test=2, image_size=32).items()})
    generate_grounding_set(str(root / "g"), num_train=2, num_val=2, num_test=2, image_size=32)
    paths["root"] = str(root)
    return paths


def _task_args(task: str, d: dict) -> list[str]:
    root = d["root"]
    common = [f"model.text.bert={d['bert']}", f"eval.image_root={root}", f"data.image_root={root}"]
    if task in ("pretrain", "retrieval", "nlvr_pretrain"):
        files = [f"data.train_files=[{d['train']}]", f"eval.test_files=[{d['test']}]"]
        mlm = ["loss.weights.mlm=0"] if task != "pretrain" else []
        return common + files + mlm
    if task in ("ve", "nlvr"):
        return common + [f"data.train_files=[{d[f'{task}_train']}]", f"eval.val_files=[{d[f'{task}_val']}]",
                         f"eval.test_files=[{d[f'{task}_test']}]"]
    if task == "vqa":
        return common + [f"data.train_files=[{d['vqa_train']}]", f"eval.test_files=[{d['vqa_test']}]",
                         f"vqa.answer_list={d['vqa_answer_list']}", "vqa.k_test=3"]
    g = Path(root) / "g"
    return [f"model.text.bert={g / 'bert'}", f"eval.image_root={g}", f"data.image_root={g}",
            f"data.train_files=[{g / 'train.json'}]", f"eval.test_files=[{g / 'test.json'}]",
            f"grounding.det_file={g / 'dets.json'}", "grounding.block_num=3", "loss.weights.mlm=0",
            "loss.same_id_positives=true"]


def _main(task: str):
    import importlib

    module = "albef.pretrain" if task == "pretrain" else f"albef.tasks.{task}"
    return importlib.import_module(module).main


@pytest.mark.parametrize("task", ["pretrain", "retrieval", "ve", "nlvr", "nlvr_pretrain", "vqa", "grounding"])
def test_every_tasks_evaluate_writes_the_same_results_schema(task, data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--config", str(TINY_YAML), "--evaluate", f"output_dir={run}", *_task_args(task, data)]
    assert _main(task)(args) == 0
    out = capsys.readouterr().out
    # --evaluate without --output-dir writes under OUTPUT_DIR/eval, apart from training runs
    results = run / "eval" / "results"
    assert sorted(p.name for p in results.glob("test_*.json") if p.name.startswith("test_step")) == ["test_step0.json"]
    record = json.loads((results / "test_latest.json").read_text())
    units = record["units"]
    numeric = {k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(units) == numeric and numeric and set(units.values()) <= UNITS
    assert "%" in units.values() and "count" in units.values()
    for key, unit in units.items():
        value = record[key]
        if unit == "%":
            assert isinstance(value, float) and 0.0 <= value <= 100.0, (key, value)
            assert f"{value:.2f}" in out, (key, value)  # the same number on stdout, two decimals
        elif unit == "count":
            assert isinstance(value, int), (key, value)
    # printed once, with the split's header
    assert out.count("test results (%):") == 1
    # the same numbers in log.jsonl (and TensorBoard, written from the same dict)
    lines = [json.loads(line) for line in (run / "eval" / "log.jsonl").read_text().splitlines()]
    logged = next(line for line in lines if line.get("event") == "eval_test")
    assert {k: logged[k] for k in numeric} == {k: record[k] for k in numeric}


def test_format_results_units_and_the_vqa_split():
    result = {"acc": 65.16983304548067, "acc_yes_no": 80.0, "acc_number": 40.5, "acc_other": 61.0,
              "num_questions": 579.0, "num_yes_no": 200.0, "time_answer_s": 3.25}
    text = format_results("test", result)
    assert text.splitlines()[0] == "test results (%):"
    assert "  acc           65.17" in text and "acc_number    40.50" in text
    assert text.splitlines()[-1] == "  num_questions 579, num_yes_no 200, time_answer_s 3.25 s"
    record = results_record(result)
    assert record["num_questions"] == 579 and isinstance(record["num_questions"], int)
    assert record["units"]["acc_other"] == "%" and record["units"]["time_answer_s"] == "s"
    assert unit_of("txt_r1_ties") == "count" and unit_of("epoch") == "count" and unit_of("val_d") == "%"


def _tiny_cfg(data, *overrides):
    return load_config(str(TINY_YAML), [f"model.text.bert={data['bert']}", *overrides])


def test_load_report_of_a_pretraining_checkpoint_for_retrieval_lists_each_key_once(data, tmp_path, capsys):
    torch.manual_seed(0)
    pretrained = PretrainTask().build_model(_tiny_cfg(data))
    path = save_pretrained(pretrained, tmp_path / "pretrain.pt")
    cfg = _tiny_cfg(data, "loss.weights.mlm=0", "model.vision.image_size=48")  # pos_embed resampled
    task = RetrievalTask()
    report = init_weights(task, task.build_model(cfg), path, cfg)
    assert report.duplicates() == []
    assert report.skipped and "idx_queue" in report.skipped and "idx_queue" not in report.missing + report.new
    err = capsys.readouterr().err
    assert err.count("idx_queue") == 1, err
    assert err.count("visual_encoder.pos_embed") == 1, err
    assert "resampled: visual_encoder.pos_embed, visual_encoder_m.pos_embed" in err


def test_the_load_example_runs_from_another_directory(data, tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_cfg(data, f"eval.test_files=[{data['test']}]", f"eval.image_root={data['root']}")
    run = tmp_path / "runs" / "tiny"
    save_pretrained(PretrainTask().build_model(cfg), run / "best.pt", cfg.to_dict())
    (run / "config.yaml").write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "load_demo.py"), "../runs/tiny"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    captions = [entry["caption"][0] for entry in json.loads(Path(data["test"]).read_text())]
    assert lines[0] == "captions (caption j is the annotation of image j):"
    assert lines[1:4] == [f"  caption {j}: {c}" for j, c in enumerate(captions)]
    itc = lines.index("ITC cosine similarity (rows: images, columns: captions)")
    itm = lines.index("ITM match probability (softmax of the ITM logits, 'match' class)")
    for start in (itc, itm):
        assert lines[start + 1].split() == ["caption", "0", "caption", "1", "caption", "2"]
        for i in range(3):
            row = lines[start + 2 + i]
            assert row.startswith(f"image {i} (test_{i:06d}.jpg)")
            values = [float(v) for v in row.split(")")[1].split()]
            assert len(values) == 3 and all(-1.0 <= v <= 1.0 for v in values)
            if start == itm:
                assert all(0.0 <= v <= 1.0 for v in values)
