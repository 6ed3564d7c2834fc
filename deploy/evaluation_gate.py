"""The evaluation gate: a run's offline evaluation against rules, before the run is recorded good.

The neighbours stage has its own gate (recall@k against exact search, coverage against the last
run) and refuses to commit a bad table. This one runs after ``evaluate``: it decides whether the
run is recorded ``succeeded`` in the ``runs`` table, the signal consumers read.

    python deploy/evaluation_gate.py --root ROOT --run-date 2026-11-20 \\
        --rule "model.hit_rate_at_10 >= popularity.hit_rate_at_10" --rule "model.full_lists_at_10 >= 0.99"

Reads ``ROOT/reports/<date>/metrics.json`` (written by the evaluate stage), writes the verdict to
``evaluation_gate.json`` beside it (``record_run`` puts it in the ``runs`` table) and exits 1
when a rule fails or a metric it names is missing. A rule is ``A OP B`` with OP one of ``>= > <= <``
and each side a number or ``method.metric``. The verdict's ``status`` is ``passed``, ``failed``
or ``insufficient``: the model scored fewer than ``--min-pairs`` (default 100) held-out pairs,
too few for any rule to mean something (``lib.sufficiency``); ``reason`` says why. Insufficient
exits 1 too: such a day must not be recorded good. No Spark: it runs on the orchestrator.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import operator
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from lib import sufficiency
from lib.paths import Layout

OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_RULE = re.compile(r"^\s*(\S+)\s*(>=|<=|>|<)\s*(\S+)\s*$")
VERDICT = "evaluation_gate.json"


def metrics_path(root: str, run_date: dt.date) -> Path:
    return Path(Layout(root).report(run_date)).parent / "metrics.json"


def _value(term: str, metrics: Mapping[str, Mapping[str, float | None]]) -> float:
    try:
        return float(term)
    except ValueError:
        pass
    method, _, name = term.partition(".")
    value = metrics.get(method, {}).get(name)
    if value is None:
        raise KeyError(f"metric {term!r} is missing from the evaluation")
    return float(value)


def check(rules: Sequence[str], metrics: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """The rules that fail (each with the numbers it compared); empty when all pass."""
    failures = []
    for rule in rules:
        match = _RULE.match(rule)
        if not match:
            raise ValueError(f"rule {rule!r}: expected 'A >= B' (operators {', '.join(OPERATORS)})")
        left, op, right = match.groups()
        try:
            a, b = _value(left, metrics), _value(right, metrics)
        except KeyError as missing:
            failures.append(f"{rule}: {missing.args[0]}")
            continue
        if not OPERATORS[op](a, b):
            failures.append(f"{rule}: {a:.4g} {op} {b:.4g} is false")
    return failures


def decide(
    rules: Sequence[str],
    metrics: Mapping[str, Mapping[str, float | None]],
    min_pairs: int = sufficiency.MIN_PAIRS,
) -> dict:
    """``passed``, ``status`` (passed / failed / insufficient), ``reason``, the model's held-out
    ``pairs`` and ``min_pairs``, and the rule ``failures`` (still listed when insufficient)."""
    failures = check(rules, metrics)
    evaluation = sufficiency.assess(sufficiency.model_pairs(metrics), min_pairs)
    if evaluation["status"] == sufficiency.INSUFFICIENT:
        status, reason = sufficiency.INSUFFICIENT, evaluation["reason"]
    elif failures:
        status, reason = "failed", "; ".join(failures)
    else:
        status, reason = "passed", None
    return {
        "passed": status == "passed",
        "status": status,
        "reason": reason,
        "pairs": evaluation["pairs"],
        "min_pairs": min_pairs,
        "failures": failures,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--run-date", required=True, type=dt.date.fromisoformat)
    p.add_argument("--rule", action="append", default=[], help="repeatable; all must hold")
    p.add_argument(
        "--min-pairs",
        type=int,
        default=sufficiency.MIN_PAIRS,
        help="fewer held-out pairs of the model: insufficient",
    )
    args = p.parse_args(argv)
    path = metrics_path(args.root, args.run_date)
    if path.is_file():
        decided = decide(args.rule, json.loads(path.read_text())["metrics"], args.min_pairs)
    else:
        missing = f"{path} is missing: did the evaluate stage run?"
        decided = {"passed": False, "status": "failed", "reason": missing, "failures": [missing]}
    verdict = {"run_date": args.run_date.isoformat(), "rules": args.rule, **decided}
    if path.parent.is_dir():
        (path.parent / VERDICT).write_text(json.dumps(verdict, indent=2))
    print(json.dumps(verdict))
    if not decided["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
