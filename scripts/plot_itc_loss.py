"""Plot the ITC loss terms of a run: soft cross-entropy, KL and target entropy per step.

With soft targets q, CE(q, p) = H(q) + KL(q || p), so `itc_ce - itc_kl` must lie on
`itc_entropy`; the right panel shows both.

    python scripts/plot_itc_loss.py RUN_DIR/log.jsonl --out RUN_DIR/itc_ce_kl.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KEYS = ("itc_ce", "itc_kl", "itc_entropy")


def read_log(path: Path) -> dict[str, list[float]]:
    """Step and ITC terms of every record that has all of them."""
    series: dict[str, list[float]] = {key: [] for key in ("step", *KEYS)}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON line ({e}); is this a run's log.jsonl?") from e
            if all(key in record for key in ("step", *KEYS)):
                for key in series:
                    series[key].append(float(record[key]))
    if not series["step"]:
        raise ValueError(f"{path}: no record with step, {', '.join(KEYS)}; was the run logging ITC terms?")
    return series


def plot(series: dict[str, list[float]], out: Path) -> None:
    steps = series["step"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in KEYS:
        left.plot(steps, series[key], label=key)
    left.set(xlabel="step", ylabel="nats", title="ITC loss terms")
    left.legend()
    ce_minus_kl = [ce - kl for ce, kl in zip(series["itc_ce"], series["itc_kl"])]
    right.plot(steps, series["itc_entropy"], label="itc_entropy", linewidth=3, alpha=0.5)
    right.plot(steps, ce_minus_kl, "--", label="itc_ce - itc_kl")
    right.set(xlabel="step", ylabel="nats", title="CE - KL = target entropy")
    right.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="a run's log.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        series = read_log(args.log)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    plot(series, args.out)
    final = {key: series[key][-1] for key in KEYS}
    gap = final["itc_ce"] - final["itc_kl"] - final["itc_entropy"]
    print(
        f"step {series['step'][-1]:.0f}: "
        + ", ".join(f"{key} {value:.4f}" for key, value in final.items())
        + f"; ce - kl - entropy {gap:+.2e}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
