"""Nightly listing similarity: shards, train, embeddings, neighbours, evaluate, gate, record.

Each Spark task runs ``deploy/submit.py … stage NAME`` in the project's own Python environment
(not Airflow's), against the master in ``LISTING_SIMILARITY_MASTER``. The run date is the
schedule's logical date ``{{ ds }}``; every stage is idempotent for its run date (shards are
rebuilt, training resumes from its last checkpoint in the run's model directory, embeddings and
neighbours replace their ``run_date`` partition in one Delta commit), so retries, clearing a
failed task and backfilling a date range are all safe. Runs go one at a time, oldest first:
a day's shards reuse the previous day's id vocabularies.

Two gates: ``neighbours`` measures its recall@k against exact search and its coverage against the
last run and refuses to commit a table that fails (the published table stays as it was);
``evaluation_gate`` checks the offline evaluation (model vs baselines) against rules. Then
``record_run`` writes the ``runs`` row (``succeeded`` only when the neighbours are committed and
the evaluation gate passed: consumers read the newest ``run_date`` with a succeeded row) and
fails the DAG run otherwise. Any task failure calls
``alert``: a JSON POST to ``LISTING_SIMILARITY_ALERT_WEBHOOK`` when set, an ERROR log line always.

Settings (environment of the Airflow workers): LISTING_SIMILARITY_HOME (this repository),
LISTING_SIMILARITY_PYTHON, LISTING_SIMILARITY_ROOT, LISTING_SIMILARITY_MASTER,
LISTING_SIMILARITY_SUBMIT_FLAGS (e.g. ``--env-archive /opt/ls/pyenv.zip --delta``),
LISTING_SIMILARITY_GATE_RULES, LISTING_SIMILARITY_FLAGS_<STAGE> (extra flags of one stage's job,
e.g. ``LISTING_SIMILARITY_FLAGS_NEIGHBOURS="--nprobe 32 --min-recall 0.95"``),
LISTING_SIMILARITY_ALERT_WEBHOOK, LISTING_SIMILARITY_RETRIES (default 2).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import urllib.request
from pathlib import Path

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG, Asset, CronDataIntervalTimetable, Param, TriggerRule, chain
except ImportError:  # Airflow 2.7+
    from airflow import DAG
    from airflow.datasets import Dataset as Asset
    from airflow.models.baseoperator import chain
    from airflow.models.param import Param
    from airflow.operators.bash import BashOperator
    from airflow.timetables.interval import CronDataIntervalTimetable
    from airflow.utils.trigger_rule import TriggerRule

# dag_tasks.py lies beside this file; it builds the commands without importing Airflow (tested).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dag_tasks

log = logging.getLogger(__name__)
SETTINGS = dag_tasks.settings_from_env()
TIMEOUTS = {
    "shards": dt.timedelta(hours=1),
    "train": dt.timedelta(hours=3),
    "embeddings": dt.timedelta(hours=1),
    "neighbours": dt.timedelta(hours=2),
    "evaluate": dt.timedelta(hours=1),
    dag_tasks.GATE: dt.timedelta(minutes=10),
    dag_tasks.RECORD: dt.timedelta(minutes=30),
}


def alert(context) -> None:
    """Failure hook: one ERROR line, and a POST to the alert webhook when one is configured."""
    ti = context["task_instance"]
    message = {
        "text": f"listing_similarity: task {ti.task_id} failed for {context.get('ds')} "
        f"(try {ti.try_number}, run {context.get('run_id')}): {context.get('exception')}",
        "dag_id": ti.dag_id,
        "task_id": ti.task_id,
        "run_id": context.get("run_id"),
        "run_date": context.get("ds"),
    }
    log.error("ALERT %s", message["text"])
    url = os.environ.get("LISTING_SIMILARITY_ALERT_WEBHOOK")
    if url:
        request = urllib.request.Request(
            url, json.dumps(message).encode(), {"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError as error:
            log.error("alert webhook %s failed: %s", url, error)


with DAG(
    dag_id="listing_similarity",
    description="Nightly listing embeddings and top-k neighbours (Delta tables)",
    doc_md=__doc__,
    # 02:30 UTC, after the previous day's logs have landed. A data-interval timetable, so
    # {{ ds }} is the day the logs cover (the interval's start): Airflow 3 would otherwise read
    # a bare cron string as a trigger timetable whose {{ ds }} is the day the run starts.
    schedule=CronDataIntervalTimetable("30 2 * * *", timezone="UTC"),
    start_date=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=dt.timedelta(hours=8),
    default_args={
        "owner": "ml-platform",
        "retries": int(os.environ.get("LISTING_SIMILARITY_RETRIES", "2")),
        "retry_delay": dt.timedelta(minutes=5),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(hours=1),
        "on_failure_callback": alert,
    },
    params={
        "k": Param(20, type="integer", minimum=1, description="neighbours per listing"),
        "epochs": Param(4, type="integer", minimum=1),
        "dim": Param(32, type="integer", minimum=2, description="embedding size"),
        "num_processes": Param(2, type="integer", minimum=1, description="DDP ranks"),
        "batch_size": Param(1024, type="integer", minimum=1),
    },
    tags=["ml", "listing-similarity"],
) as dag:
    tasks = []
    for name in dag_tasks.TASKS:
        extra: dict = {}
        if name == "shards":
            # A day's vocabularies extend the previous day's shards: no day before it may be
            # missing, also in a backfill.
            extra["depends_on_past"] = True
        if name in (dag_tasks.GATE, dag_tasks.RECORD):
            extra["retries"] = 0  # deterministic: a retry would give the same answer
        if name == dag_tasks.RECORD:
            extra["trigger_rule"] = TriggerRule.ALL_DONE  # record failed runs too
            extra["outlets"] = [Asset(f"file://{SETTINGS.root}/tables/listing_neighbours")]
        tasks.append(
            BashOperator(
                task_id=name,
                bash_command=dag_tasks.command(SETTINGS, name),
                execution_timeout=TIMEOUTS[name],
                **extra,
            )
        )
    chain(*tasks)
