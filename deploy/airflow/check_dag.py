"""`make airflow-check`: load the DAG folder with Airflow's own DagBag and check the DAG.

Runs in Airflow's virtual environment (``.venv-airflow``, its own pins), never the project's.
Fails on any import error and on any difference from the intended graph and policies; with
``--dags-test DATE`` it then also runs ``airflow dags test`` for one date, every Spark task
submitting to ``local[2]`` with the project's Python on a small generated marketplace
(``--root``; generate it first). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPECTED_TASKS = [
    "shards",
    "train",
    "embeddings",
    "neighbours",
    "evaluate",
    "evaluation_gate",
    "record_run",
]


def airflow_home() -> Path:
    home = Path(os.environ.get("AIRFLOW_HOME") or tempfile.mkdtemp(prefix="airflow-home-"))
    os.environ.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(HERE),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
    )
    return home


def check_graph() -> dict:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 2
        from airflow.models.dagbag import DagBag

    bag = (
        DagBag(dag_folder=str(HERE), include_examples=False)
        if _has_examples_arg()
        else DagBag(dag_folder=str(HERE))
    )
    problems = [f"import error in {path}: {error}" for path, error in bag.import_errors.items()]
    dag = bag.dags.get("listing_similarity")
    if dag is None:
        raise SystemExit(json.dumps({"ok": False, "problems": [*problems, "no DAG loaded"]}))
    order = [t.task_id for t in _topological(dag)]
    if order != EXPECTED_TASKS:
        problems.append(f"tasks {order}, expected {EXPECTED_TASKS}")
    for upstream, downstream in itertools.pairwise(EXPECTED_TASKS):
        if dag.get_task(upstream).downstream_task_ids != {downstream}:
            problems.append(f"{upstream} -> {sorted(dag.get_task(upstream).downstream_task_ids)}")
    record = dag.get_task("record_run")
    if (
        str(
            record.trigger_rule.value
            if hasattr(record.trigger_rule, "value")
            else record.trigger_rule
        )
        != "all_done"
    ):
        problems.append(f"record_run trigger rule is {record.trigger_rule}")
    if not dag.get_task("shards").depends_on_past:
        problems.append("shards must depend on past (vocabularies chain day to day)")
    for task in dag.tasks:
        if task.task_id not in ("evaluation_gate", "record_run") and task.retries < 1:
            problems.append(f"{task.task_id} has no retries")
        if not task.on_failure_callback:
            problems.append(f"{task.task_id} has no failure alert")
        if task.execution_timeout is None:
            problems.append(f"{task.task_id} has no execution timeout")
    if type(dag.timetable).__name__ != "CronDataIntervalTimetable":
        problems.append(f"{type(dag.timetable).__name__}: {{{{ ds }}}} must be the logs' day")
    if dag.max_active_runs != 1:
        problems.append("max_active_runs must be 1 (days build on each other)")
    train = dag.get_task("train").bash_command
    if "stage train" not in train or "{{ ds }}" not in train or "{{ run_id }}" not in train:
        problems.append(f"train command does not template the run: {train}")
    result = {
        "ok": not problems,
        "problems": problems,
        "dag_id": dag.dag_id,
        "tasks": order,
        "timetable": type(dag.timetable).__name__,
        "params": {k: dag.params[k] for k in dag.params},
    }
    return result


def _has_examples_arg() -> bool:
    import inspect

    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:
        from airflow.models.dagbag import DagBag
    return "include_examples" in inspect.signature(DagBag.__init__).parameters


def _topological(dag) -> list:
    return (
        list(dag.topological_sort())
        if hasattr(dag, "topological_sort")
        else [dag.get_task(t) for t in _kahn(dag)]
    )


def _kahn(dag) -> list[str]:
    upstream = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    order = []
    while upstream:
        ready = sorted(t for t, ups in upstream.items() if not ups)
        if not ready:
            raise ValueError("the DAG has a cycle")
        for task in ready:
            order.append(task)
            del upstream[task]
        for ups in upstream.values():
            ups.difference_update(ready)
    return order


def dags_test(run_date: str, run_conf: str | None) -> dict:
    """``airflow dags test`` for one date: every task runs for real, in this process tree.

    The tasks read their settings (root, master, the project's Python, gate rules) from the
    ``LISTING_SIMILARITY_*`` environment, as on an Airflow worker.
    """
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True)
    started = time.perf_counter()
    command = [airflow, "dags", "test", "listing_similarity", run_date]
    done = subprocess.run(
        [*command, *(["--conf", run_conf] if run_conf else [])],
        capture_output=True,
        text=True,
        # A failed task fails the test at once instead of waiting out the retry backoff.
        env={**os.environ, "LISTING_SIMILARITY_RETRIES": "0"},
    )
    output = (done.stdout + done.stderr).splitlines()
    failed = [line for line in output if "Marking task as FAILED" in line or "task failed" in line]
    return {
        "returncode": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "failed": failed[-5:],
        "tail": output[-15:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dags-test", metavar="DATE", help="also run `airflow dags test` for DATE")
    p.add_argument("--conf", help="DAG run conf (JSON) for --dags-test, e.g. smaller params")
    args = p.parse_args()
    airflow_home()
    started = time.perf_counter()
    result = check_graph()
    result["seconds"] = round(time.perf_counter() - started, 1)
    if result["ok"] and args.dags_test:
        result["dags_test"] = test = dags_test(args.dags_test, args.conf)
        result["ok"] = test["returncode"] == 0
    print(json.dumps(result, default=str))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
