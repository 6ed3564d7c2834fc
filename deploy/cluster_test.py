"""`make test-cluster`: every stage submitted to a real Spark standalone cluster on this machine.

Starts a master and a worker on 127.0.0.1 from the pyspark distribution (``bin/spark-class``),
builds the code zip and the Python environment archive (``deploy/package.py``), generates a
small marketplace, submits each stage with ``deploy/submit.py`` exactly as the Airflow DAG does
(training through TorchDistributor with ``local_mode=False``: DDP ranks as barrier tasks on
executors), checks the published tables with delta-rs, and stops the cluster, also when a step
fails or the run is interrupted. The cluster processes get no ``PYSPARK_PYTHON`` and no venv on
``PATH``: executors only have the Python that comes in the archive.

The last line printed is one JSON object: ``master``, ``executors``, ``stages_ok``,
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
                ["--host", "127.0.0.1", "--cores", str(self.cores), "--memory", self.memory,
                 "--work-dir", str(work), "--webui-port", str(free_port()), self.master],
                env,
            )  # fmt: skip
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


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def generate(root: Path, listings: int, users: int, events: int) -> None:
    subprocess.run(
        [sys.executable, "-m", "jobs.generate_sample_data", "--out", str(root / "inputs"),
         "--listings", str(listings), "--users", str(users), "--events", str(events),
         "--days", "60", "--end-date", (RUN_DATE + dt.timedelta(days=1)).isoformat(),
         "--seed", "11"],
        check=True, cwd=REPO, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def gate(root: Path, rules: list[str]) -> None:
    argv = [sys.executable, str(REPO / "deploy" / "evaluation_gate.py"), "--root", str(root),
            "--run-date", RUN_DATE.isoformat()]  # fmt: skip
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
    return {"active_listings": len(active), "embedding_rows": len(embedded),
            "neighbour_rows": rows.num_rows}  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, help="data root (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the data root and cluster logs")
    p.add_argument("--listings", type=int, default=1500)
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cores", type=int, default=2, help="cores per worker; all = DDP ranks")
    p.add_argument(
        "--executor-cores",
        type=int,
        default=2,
        help="2: one executor per worker (each executor JVM unpacks the 1.3 GB environment, so "
        "fewer is faster on a 2-core box); 1: an executor per core, DDP across executors",
    )
    p.add_argument("--stages", default=",".join(submit.STAGES))
    p.add_argument("--cache-dir", type=Path, default=package.default_cache_dir())
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    root = args.root or Path(tempfile.mkdtemp(prefix="listing-similarity-cluster-"))
    stages = [s for s in args.stages.split(",") if (REPO / submit.STAGE_JOBS[s]).is_file()]
    result: dict = {"master": None, "executors": 0, "stages_ok": [], "neighbour_rows": 0}
    seconds: dict[str, float] = {}
    executors: dict[str, int] = {}
    failed = None

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    cluster = StandaloneCluster(root / "cluster", workers=args.workers, cores=args.cores)
    try:
        mark = time.perf_counter()
        code_zip = package.build_code_zip(REPO / "dist")
        archive, built = package.build_env_archive(Path(sys.prefix), args.cache_dir)
        seconds["package"] = round(time.perf_counter() - mark, 1)
        result["env_archive"] = {"path": str(archive), "bytes": archive.stat().st_size,
                                 "built": built}  # fmt: skip
        mark = time.perf_counter()
        generate(root, args.listings, args.users, args.events)
        seconds["generate"] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()
        with cluster:
            result["master"] = cluster.master
            seconds["cluster_start"] = round(time.perf_counter() - mark, 1)
            ranks = args.workers * args.cores
            pipeline_flags = ["--root", str(root), "--run-date", RUN_DATE.isoformat(),
                              "--k", str(args.k), "--epochs", str(args.epochs), "--min-steps", "0",
                              "--num-processes", str(ranks), "--batch-size", "512"]  # fmt: skip
            small = ["--conf", f"spark.executor.cores={args.executor_cores}",
                     "--conf", "spark.executor.memory=1500m",
                     "--conf", f"spark.cores.max={ranks}", "--conf", "spark.driver.memory=2g",
                     "--conf", "spark.driver.host=127.0.0.1"]  # fmt: skip
            for stage in stages:
                if stage == "record":
                    # The DAG's gate runs between evaluate and record; on this tiny marketplace
                    # only the coverage rule is meaningful.
                    gate(root, [f"model.full_lists_at_{args.k} >= 0.99"])
                mark = time.perf_counter()
                spec, _ = submit.parse_args(
                    ["--master", cluster.master, "--env-archive", str(archive),
                     "--py-files", str(code_zip), *small,
                     "stage", stage, "--run-key", "cluster-test", *pipeline_flags]
                )  # fmt: skip
                print(f"[cluster-test] submitting {stage}", flush=True)
                code, stats = submit.run_submit(spec)
                seconds[stage] = round(time.perf_counter() - mark, 1)
                if code != 0:
                    raise RuntimeError(f"stage {stage} failed: spark-submit exited {code}")
                if stage == "train" and (stats or {}).get("world_size") != ranks:
                    raise AssertionError(f"training ran with {stats and stats.get('world_size')}"
                                         f" ranks, expected {ranks}")  # fmt: skip
                result["stages_ok"].append(stage)
                executors[stage] = cluster.take_executors()
                result["executors"] = max(executors.values())
                print(f"[cluster-test] {stage} ok in {seconds[stage]}s", flush=True)
            if not all(executors.values()):
                raise AssertionError(f"a stage ran without executors from the archive: {executors}")
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
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["executors_by_stage"] = executors
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
