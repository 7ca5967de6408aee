"""Write the demo's zero-shot classification images: ImageFolders of single-shape scenes, one
class per shape (OUT/shape/<shape>/*.jpg) and one per colour (OUT/color/<colour>/*.jpg).

    PYTHONPATH=$PWD python scripts/make_zeroshot_set.py --out demo_data/zeroshot [--per-class 50] [--image-size 48]
"""
from __future__ import annotations

import argparse
import os
import sys

from albef.data.synthetic import generate_zeroshot_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_data/zeroshot")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    for by in ("shape", "color"):
        classes = generate_zeroshot_set(os.path.join(args.out, by), by, args.per_class, args.image_size, args.seed)
        print(f"{os.path.join(args.out, by)}: {len(classes)} classes x {args.per_class} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
