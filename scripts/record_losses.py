"""Print, as JSON, the first steps' logged losses of every task's tiny command-line run on CPU.

    PYTHONPATH=$PWD python scripts/record_losses.py [--steps 5] > losses.json

Each task runs through its own command (`albef <task>`) on configs/test_tiny.yaml and a tiny
generated data set (the generators the tests use), one thread, no evaluation; the losses are read
back from the run's log.jsonl (train.log_every=1: one row per step). Used to show that a refactor
leaves training bit-identical: record before, record after, compare the two files.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "test_tiny.yaml"


def _run(task: str, out: Path, overrides: list[str], steps: int) -> dict[str, list[float]]:
    from albef.command import main

    run = out / f"run_{task}"
    argv = [task, "--config", str(TINY), "--output-dir", str(run), f"train.max_steps={steps}",
            "train.log_every=1", "train.batch_size=4", "eval.val_files=[]", "eval.test_files=[]",
            "train.async_checkpoint=false", *overrides]
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    if code != 0:
        raise SystemExit(f"{task}: exit {code}: {err.getvalue()[-2000:]}")
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step" in r and any(k.startswith("loss") for k in r)]
    losses: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("loss"):
                losses.setdefault(key, []).append(value)
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tasks", nargs="*", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from albef.data.synthetic import (generate_corpus, generate_grounding_set, generate_reasoning_sets,
                                      generate_vqa_set)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()):
            corpus = generate_corpus(str(tmp / "corpus"), num_train=24, num_test=4, image_size=32,
                                     captions_per_image=2)
            sets = generate_reasoning_sets(str(tmp / "reasoning"), num_train=24, num_val=4, num_test=4,
                                           image_size=32)
            vqa = generate_vqa_set(str(tmp / "vqa"), num_train=24, num_test=4, image_size=32)
            generate_grounding_set(str(tmp / "grounding"), num_train=24, num_val=4, num_test=4, image_size=32)
        g = tmp / "grounding"
        captions = [f"model.text.bert={corpus['bert']}", f"data.train_files=[{corpus['train']}]",
                    f"data.image_root={corpus['image_root']}"]

        def reasoning(task: str) -> list[str]:
            return [f"model.text.bert={corpus['bert']}", f"data.train_files=[{sets[f'{task}_train']}]",
                    f"data.image_root={sets['image_root']}"]

        runs = {
            "pretrain": captions,
            "retrieval": captions + ["loss.weights.mlm=0", "loss.same_id_positives=true"],
            "ve": reasoning("ve"),
            "nlvr": reasoning("nlvr"),
            "nlvr-pretrain": captions,
            "vqa": [f"model.text.bert={vqa['bert']}", f"data.train_files=[{vqa['train']}]",
                    f"data.image_root={vqa['image_root']}", f"vqa.answer_list={vqa['answer_list']}", "vqa.k_test=3"],
            "grounding": [f"model.text.bert={g / 'bert'}", f"data.train_files=[{g / 'train.json'}]",
                          f"data.image_root={g}", f"grounding.det_file={g / 'dets.json'}", "grounding.block_num=3",
                          "loss.weights.mlm=0", "loss.same_id_positives=true"],
        }
        result = {task: _run(task, tmp, overrides, args.steps)
                  for task, overrides in runs.items() if not args.tasks or task in args.tasks}
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
