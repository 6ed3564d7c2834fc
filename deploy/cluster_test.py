"""`make test-cluster`: every stage submitted to a real Spark standalone cluster on this machine.

Starts a master and two workers (one core each) on 127.0.0.1 from the pyspark distribution
(``bin/spark-class``), builds the code zip and the Python environment archive
(``deploy/package.py``), generates a small marketplace, submits each stage with
``deploy/submit.py`` exactly as the Airflow DAG does (training through TorchDistributor with
``local_mode=False``: one DDP rank per executor as barrier tasks, the ranks talking gloo over
TCP), checks the published tables with delta-rs, and stops the cluster, also when a step fails
or the run is interrupted. The cluster processes get no ``PYSPARK_PYTHON`` and no venv on
``PATH``: executors only have the Python that comes in the archive.

Each application writes a Spark event log into a directory of its own; after each submit the
log is read back and the executors that ran the application's tasks are counted (and, for
training, those that ran the barrier tasks). Shards, train and neighbours must have run on at
least ``--min-executors`` (2) executors, so shuffles cross executors and the DDP ranks sit in
different ones; the run fails, naming the stage, if one did not. The driver waits for every
executor to register before it schedules (``spark.scheduler.minRegisteredResourcesRatio=1``).

The last line printed is one JSON object: ``master``, ``workers``, ``executors`` (fewest of the
checked stages), ``executors_by_stage``, ``barrier_executors`` (train), ``stages_ok``,
``neighbour_rows``, ``seconds`` (and details); the exit code is non-zero on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy import package, submit

REPO = Path(__file__).resolve().parent.parent

RUN_DATE = dt.date(2026, 11, 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_home() -> Path:
    if os.environ.get("SPARK_HOME"):
        return Path(os.environ["SPARK_HOME"])
    import pyspark

    return Path(pyspark.__file__).parent


def cluster_environment(home: Path) -> dict[str, str]:
    """This process's environment without any hint of the project's Python."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "VIRTUAL_ENV", "PYTHONPATH")
    }
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_LEVEL="WARN")
    return env


@dataclass
class StandaloneCluster:
    """A Spark standalone master and ``workers`` workers on 127.0.0.1, as child processes."""

    workdir: Path
    workers: int = 1
    cores: int = 2
    memory: str = "3g"
    home: Path = field(default_factory=spark_home)
    timeout: float = 240.0
    port: int = 0
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def master(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def __enter__(self) -> StandaloneCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, cls: str, args: list[str], env: dict[str, str]) -> Path:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            # A session of its own: stop() ends the process group, i.e. the JVM and everything
            # it started (executors, their Python workers, torchrun ranks).
            process = subprocess.Popen(
                [str(self.home / "bin" / "spark-class"), cls, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.processes.append(process)
        return log

    def _wait_for(self, log: Path, pattern: str, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if re.search(pattern, log.read_text(errors="replace")):
                return
            if process.poll() is not None:
                raise RuntimeError(f"{log.name}: exited with {process.returncode}:\n{tail(log)}")
            time.sleep(1)
        raise TimeoutError(f"{log.name}: no {pattern!r} after {self.timeout:.0f}s:\n{tail(log)}")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = cluster_environment(self.home)
        self.port = free_port()
        master_env = {**env, "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"}
        log = self._spawn(
            "master",
            "org.apache.spark.deploy.master.Master",
            ["--host", "127.0.0.1", "--port", str(self.port), "--webui-port", str(free_port())],
            master_env,
        )
        self._wait_for(log, r"I have been elected leader", self.processes[-1])
        for i in range(self.workers):
            work = self.workdir / f"worker-{i}"
            log = self._spawn(
                f"worker-{i}",
                "org.apache.spark.deploy.worker.Worker",
                [
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    str(self.cores),
                    "--memory",
                    self.memory,
                    "--work-dir",
                    str(work),
                    "--webui-port",
                    str(free_port()),
                    self.master,
                ],
                env,
            )
            self._wait_for(log, r"Successfully registered with master", self.processes[-1])

    def stop(self) -> None:
        """SIGTERM each process group (workers first), then SIGKILL what is left."""
        for process in reversed(self.processes):
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in reversed(self.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            # The JVM may be gone while its executors or Python workers linger in the group.
            _signal_group(process, signal.SIGKILL)
            process.wait()
        self.processes.clear()

    def take_executors(self) -> int:
        """How many executors since the last call ran from the unpacked environment archive
        (``env/bin/python`` in their working directory); deletes those copies (1.3 GB each)."""
        count = 0
        for executor in sorted(self.workdir.glob("worker-*/app-*/*/")):
            env = executor / "env"
            if (env / "bin" / "python").exists():
                count += 1
            if env.exists():
                shutil.rmtree(env, ignore_errors=True)
        return count


def executors_in_event_log(path: Path) -> dict:
    """The application id, the distinct executors that ran its tasks and those that ran its
    barrier tasks (TorchDistributor's ranks), from one Spark event log (JSON lines)."""
    app_id, executors, barrier_executors, tasks = None, set(), set(), 0
    barrier_stages: set[tuple[int, int]] = set()
    with open(path, encoding="utf-8", errors="replace") as events:
        for line in events:
            if not any(kind in line[:80] for kind in _EVENT_KINDS):
                continue
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                kind = event.get("Event")
                if kind == "SparkListenerApplicationStart":
                    app_id = event.get("App ID")
                elif kind == "SparkListenerStageSubmitted":
                    info = event["Stage Info"]
                    if any(rdd.get("Barrier") for rdd in info.get("RDD Info", [])):
                        barrier_stages.add((info["Stage ID"], info.get("Stage Attempt ID", 0)))
                elif kind == "SparkListenerTaskEnd":
                    executor = event["Task Info"]["Executor ID"]
                    if executor == "driver":
                        continue
                    tasks += 1
                    executors.add(executor)
                    if (event["Stage ID"], event.get("Stage Attempt ID", 0)) in barrier_stages:
                        barrier_executors.add(executor)
    return {
        "app_id": app_id,
        "executors": sorted(executors),
        "tasks": tasks,
        "barrier_executors": sorted(barrier_executors),
    }


_EVENT_KINDS = (
    "SparkListenerApplicationStart",
    "SparkListenerStageSubmitted",
    "SparkListenerTaskEnd",
)


def read_event_logs(directory: Path) -> dict:
    """``executors_in_event_log`` of the one application that logged into ``directory``."""
    logs = sorted(p for p in directory.glob("*") if p.is_file() and not p.name.startswith("."))
    if len(logs) != 1:
        raise AssertionError(
            f"expected one Spark event log in {directory}, found {len(logs)}: "
            f"{[p.name for p in logs]}"
        )
    return executors_in_event_log(logs[0])


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def generate(root: Path, listings: int, users: int, events: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.generate_sample_data",
            "--out",
            str(root / "inputs"),
            "--listings",
            str(listings),
            "--users",
            str(users),
            "--events",
            str(events),
            "--days",
            "60",
            "--end-date",
            (RUN_DATE + dt.timedelta(days=1)).isoformat(),
            "--seed",
            "11",
        ],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )


def gate(root: Path, rules: list[str]) -> None:
    argv = [
        sys.executable,
        str(REPO / "deploy" / "evaluation_gate.py"),
        "--root",
        str(root),
        "--run-date",
        RUN_DATE.isoformat(),
    ]
    for rule in rules:
        argv += ["--rule", rule]
    subprocess.run(argv, check=True, cwd=REPO)


def check_runs_row(root: Path) -> str:
    """The status of the one ``runs`` row (record stage), read with delta-rs."""
    from deltalake import DeltaTable

    from lib.paths import Layout

    rows = DeltaTable(Layout(str(root)).table("runs")).to_pyarrow_table().to_pylist()
    if len(rows) != 1 or rows[0]["status"] != "succeeded":
        raise AssertionError(f"runs table: expected one succeeded row, got {rows}")
    return rows[0]["status"]


def check_tables(root: Path, k: int) -> dict[str, int]:
    """The published tables, read with delta-rs (no Spark): complete and well formed."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    from lib.paths import Layout

    layout = Layout(str(root))
    day = pc.field("run_date") == pc.scalar(RUN_DATE)
    listings = ds.dataset(layout.listings).to_table(columns=["listing_id", "is_active"])
    active = set(listings.filter(listings["is_active"])["listing_id"].to_pylist())
    embeddings = DeltaTable(layout.table("listing_embeddings")).to_pyarrow_dataset()
    embedded = embeddings.to_table(filter=day, columns=["listing_id"])["listing_id"].to_pylist()
    neighbours = DeltaTable(layout.table("listing_neighbours")).to_pyarrow_dataset()
    rows = neighbours.to_table(filter=day, columns=["listing_id", "neighbour_id", "rank"])
    problems = []
    if set(embedded) != active or len(embedded) != len(active):
        problems.append(f"{len(embedded)} embeddings for {len(active)} active listings")
    if rows.num_rows != len(active) * k:
        problems.append(f"{rows.num_rows} neighbour rows, expected {len(active)} x {k}")
    if set(rows["listing_id"].to_pylist()) != active:
        problems.append("neighbour lists are not exactly the active listings")
    if pc.any(pc.equal(rows["listing_id"], rows["neighbour_id"])).as_py():
        problems.append("a listing is its own neighbour")
    ranks = rows["rank"]
    if pc.min(ranks).as_py() != 1 or pc.max(ranks).as_py() != k:
        problems.append(f"ranks span {pc.min(ranks)}..{pc.max(ranks)}, expected 1..{k}")
    if problems:
        raise AssertionError("published tables: " + "; ".join(problems))
    return {
        "active_listings": len(active),
        "embedding_rows": len(embedded),
        "neighbour_rows": rows.num_rows,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, help="data root (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the data root and cluster logs")
    p.add_argument("--listings", type=int, default=1500)
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--baselines",
        default="itemknn,content,embedding,popularity",
        help="evaluate's baselines (all: itemknn,rp3beta,ease,als,content,embedding,popularity,random)",
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cores", type=int, default=1, help="cores per worker; all = DDP ranks")
    p.add_argument(
        "--worker-memory", default="3g", help="memory each worker offers (2 x 3g on a 24 GiB box)"
    )
    p.add_argument(
        "--executor-cores",
        type=int,
        default=1,
        help="1: an executor per core, so DDP ranks sit in different executors (each executor "
        "JVM unpacks the 1.3 GB environment, so fewer executors start faster)",
    )
    p.add_argument(
        "--min-executors",
        type=int,
        default=2,
        help="fail unless each of --check-stages ran tasks on at least this many executors",
    )
    p.add_argument("--check-stages", default="shards,train,neighbours")
    p.add_argument("--stages", default=",".join(submit.STAGES))
    p.add_argument("--cache-dir", type=Path, default=package.default_cache_dir())
    args = p.parse_args(argv)
    slots = args.workers * (args.cores // max(args.executor_cores, 1))
    if slots < args.min_executors:
        p.error(
            f"{args.workers} worker(s) x {args.cores} core(s) with --executor-cores "
            f"{args.executor_cores} give {slots} executor(s), fewer than --min-executors "
            f"{args.min_executors}"
        )
    return args


def _check_executors(stage: str, log: dict, minimum: int, ranks: int) -> None:
    """Fail unless ``stage``'s application ran tasks on ``minimum`` executors or more (and, for
    training, its barrier tasks: one DDP rank per executor)."""
    found = log["executors"]
    if len(found) < minimum:
        raise AssertionError(
            f"stage {stage} ({log['app_id']}) ran its {log['tasks']} tasks on {len(found)} "
            f"executor(s) {found}, expected at least {minimum}: its work never crossed executors"
        )
    if stage == "train":
        barrier = log["barrier_executors"]
        if len(barrier) < min(minimum, ranks):
            raise AssertionError(
                f"stage train ({log['app_id']}): the {ranks} DDP ranks (barrier tasks) ran on "
                f"{len(barrier)} executor(s) {barrier}, expected at least {min(minimum, ranks)}"
            )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    root = args.root or Path(tempfile.mkdtemp(prefix="listing-similarity-cluster-"))
    stages = [s for s in args.stages.split(",") if (REPO / submit.STAGE_JOBS[s]).is_file()]
    checked = [s for s in args.check_stages.split(",") if s in stages]
    result: dict = {
        "master": None,
        "workers": args.workers,
        "executors": 0,
        "stages_ok": [],
        "neighbour_rows": 0,
    }
    seconds: dict[str, float] = {}
    executors: dict[str, int] = {}  # stage -> distinct executors that ran its tasks
    unpacked: dict[str, int] = {}  # stage -> executors that unpacked the environment archive
    applications: dict[str, str | None] = {}
    failed = None

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    cluster = StandaloneCluster(
        root / "cluster", workers=args.workers, cores=args.cores, memory=args.worker_memory
    )
    try:
        mark = time.perf_counter()
        code_zip = package.build_code_zip(REPO / "dist")
        archive, built = package.build_env_archive(Path(sys.prefix), args.cache_dir)
        seconds["package"] = round(time.perf_counter() - mark, 1)
        result["env_archive"] = {
            "path": str(archive),
            "bytes": archive.stat().st_size,
            "built": built,
        }
        mark = time.perf_counter()
        generate(root, args.listings, args.users, args.events)
        seconds["generate"] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()
        with cluster:
            result["master"] = cluster.master
            seconds["cluster_start"] = round(time.perf_counter() - mark, 1)
            ranks = args.workers * args.cores
            pipeline_flags = [
                "--root",
                str(root),
                "--run-date",
                RUN_DATE.isoformat(),
                "--k",
                str(args.k),
                "--epochs",
                str(args.epochs),
                "--min-steps",
                "0",
                "--num-processes",
                str(ranks),
                "--batch-size",
                "512",
                # ALS's tuning grid is most of evaluate's time on two 1-core executors; the
                # baselines are checked by the test suite, here the stage's path is.
                "--evaluate-args",
                f"--baselines {args.baselines}",
            ]
            small = [
                "--conf",
                f"spark.executor.cores={args.executor_cores}",
                "--conf",
                "spark.executor.memory=1500m",
                "--conf",
                f"spark.cores.max={ranks}",
                "--conf",
                "spark.driver.memory=2g",
                "--conf",
                "spark.driver.host=127.0.0.1",
                # No task before every executor is up: else the first one to register
                # could run a small stage alone.
                "--conf",
                "spark.scheduler.minRegisteredResourcesRatio=1.0",
                "--conf",
                "spark.scheduler.maxRegisteredResourcesWaitingTime=300s",
                "--conf",
                "spark.eventLog.enabled=true",
                "--conf",
                "spark.eventLog.compress=false",
                "--conf",
                "spark.eventLog.rolling.enabled=false",
            ]
            for stage in stages:
                if stage == "record":
                    # The DAG's gate runs between evaluate and record; on this tiny marketplace
                    # only the coverage rule is meaningful.
                    gate(root, [f"model.full_lists_at_{args.k} >= 0.99"])
                mark = time.perf_counter()
                event_dir = root / "cluster" / "events" / stage
                shutil.rmtree(event_dir, ignore_errors=True)
                event_dir.mkdir(parents=True)
                spec, _ = submit.parse_args(
                    [
                        "--master",
                        cluster.master,
                        "--env-archive",
                        str(archive),
                        "--py-files",
                        str(code_zip),
                        *small,
                        "--conf",
                        f"spark.eventLog.dir={event_dir.as_uri()}",
                        "stage",
                        stage,
                        "--run-key",
                        "cluster-test",
                        *pipeline_flags,
                    ]
                )
                print(f"[cluster-test] submitting {stage}", flush=True)
                code, stats = submit.run_submit(spec)
                seconds[stage] = round(time.perf_counter() - mark, 1)
                if code != 0:
                    raise RuntimeError(f"stage {stage} failed: spark-submit exited {code}")
                if stage == "train" and (stats or {}).get("world_size") != ranks:
                    raise AssertionError(
                        f"training ran with {stats and stats.get('world_size')}"
                        f" ranks, expected {ranks}"
                    )
                unpacked[stage] = cluster.take_executors()
                log = read_event_logs(event_dir)
                applications[stage] = log["app_id"]
                executors[stage] = len(log["executors"])
                if stage == "train":
                    result["barrier_executors"] = len(log["barrier_executors"])
                if stage in checked:
                    _check_executors(stage, log, args.min_executors, ranks)
                result["stages_ok"].append(stage)
                print(
                    f"[cluster-test] {stage} ok in {seconds[stage]}s on "
                    f"{executors[stage]} executor(s) ({log['tasks']} tasks)",
                    flush=True,
                )
            if not all(unpacked.values()):
                raise AssertionError(f"a stage ran without executors from the archive: {unpacked}")
        result.update(check_tables(root, args.k))
        if "record" in stages:
            result["run_status"] = check_runs_row(root)
    except BaseException as error:
        failed = f"{type(error).__name__}: {error}"
        print(f"[cluster-test] FAILED: {failed}", file=sys.stderr, flush=True)
        for log in sorted((root / "cluster").glob("*.log")):
            print(f"--- {log.name}\n{tail(log, 15)}", file=sys.stderr)
    finally:
        cluster.stop()
    result["executors"] = min((executors.get(s, 0) for s in checked), default=0)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["executors_by_stage"] = executors
    result["executors_required"] = {s: args.min_executors for s in checked}
    result["env_unpacked_by_stage"] = unpacked
    result["applications"] = applications
    result["stage_seconds"] = seconds
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if failed:
        result["error"] = failed
        result["root"] = str(root)
    elif not args.keep and not args.root:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
