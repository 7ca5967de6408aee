"""One results format for every task's evaluation.

A task's `evaluate` returns a flat dict of numbers. Each key has one unit, told by its name:

* ``count``: ``num_*``, ``*_count``, ``count_*``, keys naming ties (``*ties*``), ``epoch``, ``step``;
* ``s`` (seconds): ``time_*`` and ``*_s``;
* ``%``: everything else (accuracies, recalls, their chance levels), in percent.

The same numbers go everywhere: the table printed once on stdout (`format_results`, percentages
with two decimals, counts as integers), OUTPUT_DIR/results/{split}_step{N}.json
(`results_record`: the metrics, counts as integers, plus ``"units"``: key -> unit) and
TensorBoard (`{split}/{key}`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

PERCENT, COUNT, SECONDS = "%", "count", "s"


def unit_of(key: str) -> str:
    """The unit of a result key (see the module docstring)."""
    if (key.startswith(("num_", "count_")) or key.endswith("_count") or "ties" in key
            or key in ("epoch", "step")):
        return COUNT
    if key.startswith("time_") or key.endswith("_s"):
        return SECONDS
    return PERCENT


def numbers(result: Mapping[str, Any]) -> dict[str, float | int]:
    """The numeric entries of `result`, counts as integers."""
    out: dict[str, float | int] = {}
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = int(round(value)) if unit_of(key) == COUNT and float(value).is_integer() else value
    return out


def results_record(result: Mapping[str, Any]) -> dict[str, Any]:
    """What results/*.json holds: the numbers (counts as integers), any other entries of
    `result` as they are, and ``units`` (key -> '%', 'count' or 's')."""
    values = numbers(result)
    record = {**{k: v for k, v in result.items() if k not in values and k != "units"}, **values}
    record["units"] = {key: unit_of(key) for key in values}
    return record


def format_value(key: str, value: float) -> str:
    """`value` of `key` as the table shows it: '67.25' (%), '400' (count), '1.23 s'."""
    unit = unit_of(key)
    if unit == COUNT:
        return f"{int(round(value))}"
    if unit == SECONDS:
        return f"{value:.2f} s"
    return f"{value:.2f}"


def format_results(split: str, result: Mapping[str, Any],
                   table: Callable[[Mapping[str, Any]], str] | None = None) -> str:
    """The printed results of one evaluation: a header line naming the split, the task's own
    table (`table(result)`, its numbers in % with two decimals) or else one row per percentage,
    then one line with the counts and times."""
    values = numbers(result)
    lines = [f"{split} results (%):"]
    own = table(result) if table is not None else None
    if own is not None:
        lines.append(own)
    else:
        metrics = [k for k in values if unit_of(k) == PERCENT]
        width = max([len(k) for k in metrics] + [6])
        lines += [f"  {key:{width}s} {values[key]:8.2f}" for key in metrics]
    others = [f"{key} {format_value(key, value)}" for key, value in values.items() if unit_of(key) != PERCENT]
    if others:
        lines.append("  " + ", ".join(others))
    return "\n".join(lines)
