"""The nightly DAG's tasks and their shell commands, without importing Airflow.

Kept apart from ``listing_similarity_dag.py`` so the command lines can be unit-tested in the
project's environment (tests/test_deploy.py), where Airflow is not installed. Every Spark task is
``deploy/submit.py … stage NAME``: the wrapper builds the stage's flags with
``jobs.pipeline.stage_argv``, so the DAG and ``listing-similarity run`` can never disagree.
"""

from __future__ import annotations

import itertools
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SPARK_STAGES = ("shards", "train", "embeddings", "neighbours", "evaluate")
GATE = "evaluation_gate"
RECORD = "record_run"
TASKS = (*SPARK_STAGES, GATE, RECORD)
# (upstream, downstream): a straight line; record_run also runs when something upstream failed.
EDGES = tuple(itertools.pairwise(TASKS))
# Airflow templates: the run date is the schedule's logical date (the last full day of logs: the
# 02:30 run on the 21st builds the 20th); the run key is Airflow's run id, so every task and
# every retry of one DAG run agree on the run id and the model directory.
RUN_DATE = "{{ ds }}"
RUN_KEY = "{{ run_id }}"
PIPELINE_PARAMS = ("k", "epochs", "dim", "num_processes", "batch_size")
# What a gate checks: model better than the popularity baseline, and (nearly) every active
# listing has a full list. Override with LISTING_SIMILARITY_GATE_RULES (semicolon-separated).
DEFAULT_GATE_RULES = (
    "model.hit_rate_at_10 >= popularity.hit_rate_at_10",
    "model.full_lists_at_10 >= 0.99",
)


@dataclass(frozen=True)
class Settings:
    """Where things are on the machine that runs the tasks (the Airflow worker)."""

    project: str  # a checkout or release of this repository (deploy/, jobs/…)
    python: str  # the project's environment (pyspark, torch…), not Airflow's
    root: str  # the deployment root: inputs/, work/, models/, tables/, reports/
    master: str = "local[2]"
    submit_flags: tuple[str, ...] = ()  # e.g. --env-archive …, --conf-file …, --delta
    gate_rules: tuple[str, ...] = DEFAULT_GATE_RULES
    # Extra flags of one stage's job, e.g. {"neighbours": ("--nprobe", "32", "--min-recall", "0.95")}
    stage_flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def settings_from_env(env: Mapping[str, str] = os.environ) -> Settings:
    """Settings from ``LISTING_SIMILARITY_*`` variables (documented in the README runbook)."""
    project = env.get("LISTING_SIMILARITY_HOME", str(Path(__file__).resolve().parents[2]))
    rules = env.get("LISTING_SIMILARITY_GATE_RULES")
    return Settings(
        project=project,
        python=env.get("LISTING_SIMILARITY_PYTHON", f"{project}/.venv/bin/python"),
        root=env.get("LISTING_SIMILARITY_ROOT", "/data/listing-similarity"),
        master=env.get("LISTING_SIMILARITY_MASTER", "local[2]"),
        submit_flags=tuple(shlex.split(env.get("LISTING_SIMILARITY_SUBMIT_FLAGS", ""))),
        gate_rules=tuple(r.strip() for r in rules.split(";") if r.strip())
        if rules
        else DEFAULT_GATE_RULES,
        stage_flags={
            stage: tuple(shlex.split(env[f"LISTING_SIMILARITY_FLAGS_{stage.upper()}"]))
            for stage in SPARK_STAGES
            if env.get(f"LISTING_SIMILARITY_FLAGS_{stage.upper()}")
        },
    )


def _run_flags(settings: Settings) -> list[str]:
    flags = ["--root", settings.root, "--run-date", RUN_DATE]
    for name in PIPELINE_PARAMS:
        flags += [f"--{name.replace('_', '-')}", f"{{{{ params.{name} }}}}"]
    return flags


def submit_command(settings: Settings, stage: str) -> str:
    """The bash command of a Spark task: submit ``stage`` of this DAG run."""
    if stage not in (*SPARK_STAGES, RECORD):
        raise ValueError(f"{stage!r} is not a Spark stage")
    name = "record" if stage == RECORD else stage
    argv = [
        settings.python,
        f"{settings.project}/deploy/submit.py",
        "--master",
        settings.master,
        *settings.submit_flags,
        "stage",
        name,
        "--run-key",
        RUN_KEY,
        *_run_flags(settings),
    ]
    extra = settings.stage_flags.get(stage, ())
    if extra:
        argv += ["--", *extra]
    return _join(argv)


def gate_command(settings: Settings) -> str:
    """The bash command of the evaluation gate: the run's evaluation against the rules."""
    argv = [
        settings.python,
        f"{settings.project}/deploy/evaluation_gate.py",
        "--root",
        settings.root,
        "--run-date",
        RUN_DATE,
    ]
    for rule in settings.gate_rules:
        argv += ["--rule", rule]
    return _join(argv)


def command(settings: Settings, task: str) -> str:
    return gate_command(settings) if task == GATE else submit_command(settings, task)


def _join(argv: list[str]) -> str:
    # shlex.quote keeps each argument one word; Jinja renders inside the quotes.
    return " ".join(shlex.quote(a) for a in argv)
