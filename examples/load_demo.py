"""albef.load on a trained run: ITC similarity and ITM match probability of test images and
their own captions, as labelled tables.

    python examples/load_demo.py RUN_DIR [--annotations FILE] [--image-root DIR] [--num N]

RUN_DIR is a run directory (its best.pt, else its newest checkpoint) or a weight file with its
config inside, e.g. demo_runs/pretrain after `python -m albef.demo`. The images and captions are
the first N entries of FILE (default: the run's `eval.test_files[0]`, images under the run's
`eval.image_root`); each image is shown with the first caption of every entry, so the diagonal
pairs each image with its own caption. Every path is taken as given on the command line
(relative to the current directory) or as written in the run's config: it runs from any
directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _import_albef():
    """`albef`, or one line saying why the import found a folder instead of the package."""
    import albef

    if getattr(albef, "__file__", None) is None:  # a namespace package: a folder named albef
        folders = ", ".join(getattr(albef, "__path__", []))
        sys.exit(f"error: `import albef` found the folder {folders} (a directory named albef without "
                 "__init__.py, e.g. the clone itself), not the package; run from another directory or "
                 "install the package (pip install -e CLONE)")
    return albef


def _run_config(run: Path) -> dict:
    import yaml

    config = run / "config.yaml" if run.is_dir() else run.parent / "config.yaml"
    return yaml.safe_load(config.read_text()) if config.is_file() else {}


def table(title: str, values, rows: list[str], columns: list[str]) -> str:
    width = max(len(r) for r in rows)
    lines = [title, " " * width + "".join(f"{c:>11s}" for c in columns)]
    for label, row in zip(rows, values.tolist()):
        lines.append(f"{label:{width}s}" + "".join(f"{v:11.3f}" for v in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory or weight file (e.g. demo_runs/pretrain)")
    parser.add_argument("--annotations", type=Path, help="ALBEF annotation file (default: the run's eval.test_files[0])")
    parser.add_argument("--image-root", type=Path, help="folder the annotation's image paths are relative to")
    parser.add_argument("--num", type=int, default=3, help="how many images and captions")
    args = parser.parse_args(argv)
    albef = _import_albef()
    from PIL import Image

    run = args.run.resolve()
    config = _run_config(run).get("eval", {})
    annotations = args.annotations or (Path(config["test_files"][0]) if config.get("test_files") else None)
    if annotations is None:
        sys.exit(f"error: {run} names no eval.test_files; pass --annotations FILE")
    image_root = args.image_root or Path(config.get("image_root") or annotations.parent)
    entries = json.loads(annotations.read_text(encoding="utf-8"))[: args.num]
    images = [Image.open(image_root / entry["image"]).convert("RGB") for entry in entries]
    captions = [entry["caption"] if isinstance(entry["caption"], str) else entry["caption"][0] for entry in entries]

    model, _ = albef.load(run, device="cpu")
    rows = [f"image {i} ({Path(entry['image']).name})" for i, entry in enumerate(entries)]
    columns = [f"caption {j}" for j in range(len(captions))]
    print("captions (caption j is the annotation of image j):")
    for j, caption in enumerate(captions):
        print(f"  caption {j}: {caption}")
    print(table("ITC cosine similarity (rows: images, columns: captions)",
                model.similarity(images, captions), rows, columns))
    print(table("ITM match probability (softmax of the ITM logits, 'match' class)",
                model.itm_score(images, captions), rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
