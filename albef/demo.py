"""End-to-end demo: synthetic corpus -> pretraining -> retrieval evaluation, on CPU in minutes.

    python -m albef.demo [--out demo_data] [--run-dir demo_runs/pretrain] [--quick] [key.sub=value ...]

1. generates the procedural-scenes corpus in `--out` unless it is there already,
2. pretrains with configs/demo.yaml exactly as a user would (`python -m albef.pretrain`),
   resuming a run already in `--run-dir`,
3. plots the ITC loss terms of the run (scripts/plot_itc_loss.py -> RUN_DIR/itc_ce_kl.png),
4. checks the retrieval evaluation of the test split that pretraining ran (and printed, R@1/5/10
   next to chance) at its end.

Exits 1 when the mean R@1 of the two directions is not at least `--min-ratio` times chance.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import albef
from albef.data.synthetic import generate_corpus

REPO = Path(albef.__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
PLOT_SCRIPT = REPO / "scripts" / "plot_itc_loss.py"
QUICK = {"num_train": 1000, "num_test": 100, "max_steps": 300}


def corpus_overrides(corpus: Path) -> list[str]:
    """Point the demo config's data, tokenizer and eval paths at `corpus` (values as JSON/YAML)."""
    root = json.dumps(str(corpus))
    return [
        f"data.train_files={json.dumps([str(corpus / 'train.json')])}",
        f"data.image_root={root}",
        f"model.text.bert={json.dumps(str(corpus / 'bert'))}",
        f"eval.test_files={json.dumps([str(corpus / 'test.json')])}",
        f"eval.image_root={root}",
    ]


def recall_ratio(result: dict[str, float]) -> float:
    """Mean R@1 of both directions over its chance level."""
    r1 = (result["txt_r1"] + result["img_r1"]) / 2
    chance = (result["chance_txt_r1"] + result["chance_img_r1"]) / 2
    return r1 / chance


def _shown(path: Path) -> Path:
    """`path` relative to the current directory when it lies below it (shorter lines)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def run(cmd: list[str]) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="albef-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_data"), help="corpus directory")
    parser.add_argument("--run-dir", type=Path, default=Path("demo_runs/pretrain"), help="pretraining output dir")
    parser.add_argument("--quick", action="store_true", help="smaller corpus and fewer steps (tests)")
    parser.add_argument("--min-ratio", type=float, default=3.0, help="required mean R@1 / chance")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    corpus = args.out.resolve()
    if not (corpus / "test.json").is_file():
        sizes = {k: QUICK[k] for k in ("num_train", "num_test")} if args.quick else {}
        print(f"generating the demo corpus in {corpus}", flush=True)
        generate_corpus(str(corpus), **sizes)
    overrides = corpus_overrides(corpus) + (
        [f"train.max_steps={QUICK['max_steps']}"] if args.quick else []
    ) + list(args.overrides)

    run_dir = args.run_dir.resolve()
    pretrain = [sys.executable, "-m", "albef.pretrain", "--config", str(DEMO_CONFIG), "--output-dir", str(run_dir)]
    plot = [sys.executable, str(PLOT_SCRIPT), str(run_dir / "log.jsonl"), "--out", str(run_dir / "itc_ce_kl.png")]
    for cmd in (pretrain + ["--resume", "auto", *overrides], plot):
        code = run(cmd)
        if code:
            print(f"error: {' '.join(cmd[1:3])} exited with code {code}", file=sys.stderr)
            return code

    results = run_dir / "results" / "test_latest.json"  # the engine evaluates test_files at the end
    if not results.is_file():
        print(f"error: pretraining wrote no retrieval results ({results})", file=sys.stderr)
        return 1
    result = json.loads(results.read_text())
    # the table is the `test:` table pretraining printed above (also in {results}): not repeated
    ratio = recall_ratio(result)
    verdict = "ok" if ratio >= args.min_ratio else "FAILED"
    print(f"results: {_shown(results)} (retrieval on {_shown(corpus / 'test.json')}, final weights of "
          f"{_shown(run_dir)})")
    print(f"mean R@1 is {ratio:.1f}x chance (required {args.min_ratio:g}x): {verdict}")
    return 0 if ratio >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
