"""Submit one pipeline stage, or any ``jobs/`` entry point, to any Spark master.

    python deploy/submit.py --master spark://host:7077 --env-archive pyenv-….zip \\
        stage train --root /data/ls --run-date 2026-11-20 --run-key scheduled__2026-11-20

    python deploy/submit.py --master 'local[2]' job jobs/compute_neighbours.py -- --k 20 …

    python deploy/submit.py … stage evaluate --root … --run-date … -- --no-report

``stage NAME`` builds the stage's command line with ``jobs.pipeline.stage_argv`` (the same
flags ``listing-similarity run`` uses), so a stage submitted here does exactly what it does
inside the pipeline. The run id comes from ``--run-key`` (the orchestrator's run id), so every
stage of one run, and every retry of it, agrees on the run id and the model directory: a
retried training resumes from its last checkpoint.

What the wrapper adds on top of ``spark-submit``:

* the code zip (``--py-files``) and, on a cluster, the Python environment archive
  (``--archives ….zip#env``) with ``spark.pyspark.python=./env/bin/python``;
  ``spark.executorEnv.PYTHONPATH`` names the code zip so the torchrun processes that
  TorchDistributor starts on executors (fresh interpreters) import ``lib`` too;
* ``--no-local-mode`` for the train stage on a cluster: DDP ranks run as barrier tasks on
  executors, not on the driver;
* the settings in ``deploy/conf/<kind>.conf`` for the master's kind (local, standalone, yarn,
  k8s), then ``--conf`` overrides; ``spark.sql.shuffle.partitions`` = 2 × the cores in use
  unless a conf sets it;
* with ``--delta`` (or ``LISTING_SIMILARITY_DELTA=1``): Delta's package and SQL extension, for
  clusters that can fetch ``io.delta:delta-spark_2.13`` (the jobs then write with Delta's
  Spark writer; without it they use the embedded delta-rs writer).

The last line of the job's output is its JSON stats; ``--dry-run`` prints the command instead.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "deploy" / "conf"
DEFAULT_ZIP = REPO / "dist" / "listing_similarity.zip"
DELTA_PACKAGE = "io.delta:delta-spark_2.13:4.4.1"
DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
ENV_ALIAS = "env"  # the archive is unpacked as ./env in each executor's working directory
# The Spark stages of a run in order, then `record`: the runs-table row of a DAG run.
STAGES = ("shards", "train", "embeddings", "neighbours", "evaluate", "record")
STAGE_JOBS = {
    "shards": "jobs/build_training_shards.py",
    "train": "jobs/train_embeddings.py",
    "embeddings": "jobs/compute_embeddings.py",
    "neighbours": "jobs/compute_neighbours.py",
    "evaluate": "jobs/evaluate.py",
    "record": "deploy/record_run.py",
}
RUN_NAMESPACE = uuid.UUID("8a1f2c4e-5b7d-4e0a-9c3b-6d2e1f0a7b95")


@dataclass(frozen=True)
class SubmitSpec:
    """Everything one spark-submit call needs; ``build_command`` turns it into argv."""

    master: str
    job: str
    job_args: tuple[str, ...] = ()
    py_files: str | None = str(DEFAULT_ZIP)
    env_archive: str | None = None
    driver_python: str = sys.executable
    deploy_mode: str = "client"
    delta: bool = False
    conf: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None
    spark_submit: str = "spark-submit"


def master_kind(master: str) -> str:
    """``local``, ``standalone``, ``yarn`` or ``k8s`` for a ``--master`` value."""
    if master.startswith("local"):
        return "local"
    if master.startswith("spark://"):
        return "standalone"
    if master == "yarn":
        return "yarn"
    if master.startswith("k8s://"):
        return "k8s"
    raise ValueError(f"unknown master {master!r}: use local[N], spark://…, yarn or k8s://…")


def read_conf_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``key value`` lines (spark-defaults.conf syntax); ``#`` starts a comment."""
    conf: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].startswith("spark."):
            raise ValueError(f"{path}:{number}: expected 'spark.key value', got {raw!r}")
        conf[parts[0]] = parts[1].strip()
    return conf


def default_conf_file(master: str) -> Path:
    return CONF_DIR / f"{master_kind(master)}.conf"


def local_cores(master: str) -> int:
    """Cores a ``local[N]`` / ``local[*]`` / ``local`` master uses."""
    inside = master[master.find("[") + 1 : master.find("]")] if "[" in master else "1"
    cores = inside.split(",")[0]
    return (os.cpu_count() or 2) if cores == "*" else int(cores)


def default_shuffle_partitions(master: str, conf: Mapping[str, str]) -> int | None:
    """2 × the cores the application gets, when the master or the confs say how many."""
    if master_kind(master) == "local":
        return 2 * local_cores(master)
    if "spark.cores.max" in conf:
        return 2 * int(conf["spark.cores.max"])
    if "spark.executor.instances" in conf:
        return 2 * int(conf["spark.executor.instances"]) * int(conf.get("spark.executor.cores", 1))
    return None


def job_arguments(spec: SubmitSpec) -> list[str]:
    """The job's own flags, plus ``--no-local-mode`` for training on a cluster."""
    args = list(spec.job_args)
    on_cluster = master_kind(spec.master) != "local"
    is_train = Path(spec.job).name == Path(STAGE_JOBS["train"]).name
    if on_cluster and is_train and not {"--local-mode", "--no-local-mode"} & set(args):
        args.append("--no-local-mode")
    return args


def effective_conf(spec: SubmitSpec) -> dict[str, str]:
    """The ``--conf`` settings the command passes, in order: derived ones, then ``spec.conf``."""
    kind = master_kind(spec.master)
    conf: dict[str, str] = {"spark.sql.session.timeZone": "UTC"}
    if kind == "local":
        conf["spark.pyspark.python"] = spec.driver_python
    elif spec.env_archive:
        conf["spark.pyspark.python"] = f"./{ENV_ALIAS}/bin/python"
        on_driver = spec.deploy_mode == "client"
        conf["spark.pyspark.driver.python"] = (
            spec.driver_python if on_driver else f"./{ENV_ALIAS}/bin/python"
        )
    if kind != "local" and spec.py_files:
        # Spark puts --py-files on sys.path of its Python workers but not on PYTHONPATH, and
        # TorchDistributor's torchrun ranks are new interpreters that need PYTHONPATH; the
        # zip sits in the executor's working directory, so its bare name resolves there.
        conf["spark.executorEnv.PYTHONPATH"] = ":".join(
            Path(p).name for p in spec.py_files.split(",")
        )
    if spec.delta:
        conf.update(DELTA_CONF)
    conf.update(spec.conf)
    if "spark.sql.shuffle.partitions" not in conf:
        partitions = default_shuffle_partitions(spec.master, conf)
        if partitions:
            conf["spark.sql.shuffle.partitions"] = str(partitions)
    return conf


def build_command(spec: SubmitSpec) -> list[str]:
    """The spark-submit argv for ``spec``."""
    kind = master_kind(spec.master)
    if kind != "local" and not spec.env_archive and "spark.pyspark.python" not in spec.conf:
        raise ValueError(
            f"master {spec.master!r} needs --env-archive (build it: make package) or a "
            "spark.pyspark.python conf naming an installed environment: executors would "
            "otherwise start the cluster's default Python without torch/pandas"
        )
    if kind == "local" and spec.deploy_mode != "client":
        raise ValueError("local masters run the driver here: --deploy-mode client only")
    command = [spec.spark_submit, "--master", spec.master, "--deploy-mode", spec.deploy_mode]
    command += ["--name", spec.name or f"listing-similarity-{Path(spec.job).stem}"]
    if spec.py_files:
        command += ["--py-files", spec.py_files]
    if spec.env_archive and kind != "local":
        command += ["--archives", f"{spec.env_archive}#{ENV_ALIAS}"]
    if spec.delta:
        command += ["--packages", DELTA_PACKAGE]
    for key, value in effective_conf(spec).items():
        command += ["--conf", f"{key}={value}"]
    return [*command, spec.job, *job_arguments(spec)]


def submit_environment(spec: SubmitSpec, base: Mapping[str, str]) -> dict[str, str]:
    """The environment for spark-submit: the worker Python must come from the confs only."""
    env = dict(base)
    conf = effective_conf(spec)
    for variable, key in (
        ("PYSPARK_PYTHON", "spark.pyspark.python"),
        ("PYSPARK_DRIVER_PYTHON", "spark.pyspark.driver.python"),
    ):
        env.pop(variable, None)
        if key in conf:
            env[variable] = conf[key]
    return env


def find_spark_submit() -> str:
    """``$SPARK_HOME/bin/spark-submit``, else the one in the pyspark package, else PATH's."""
    if os.environ.get("SPARK_HOME"):
        return str(Path(os.environ["SPARK_HOME"]) / "bin" / "spark-submit")
    try:
        import pyspark
    except ImportError:
        return "spark-submit"
    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")


# ---------------------------------------------------------------------------------------------
# Stages of one run


def run_id_for(run_key: str) -> str:
    """A stable run id (uuid hex) for an orchestrator's run key: same key, same run."""
    return uuid.uuid5(RUN_NAMESPACE, run_key).hex


def model_version_for(run_date: dt.date, run_id: str) -> str:
    # Same rule as jobs.pipeline.run, so a DAG run and a `listing-similarity run` look alike.
    return f"{run_date:%Y%m%d}-{run_id[:8]}"


def stage_job(
    stage: str, pipeline_argv: Sequence[str], run_id: str
) -> tuple[str, list[str], dict[str, str]]:
    """(job file, its arguments, run facts) for ``stage`` of the run ``pipeline_argv`` describes.

    ``pipeline_argv`` are ``listing-similarity run`` flags (``--root``, ``--run-date``, ``--k``…).
    """
    from jobs import pipeline
    from lib.paths import Layout

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    args = pipeline.parse_args(list(pipeline_argv))
    layout = Layout(args.root)
    model_version = model_version_for(args.run_date, run_id)
    argvs = pipeline.stage_argv(args, layout, run_id, model_version)
    if stage == "evaluate" and stage not in argvs:
        argvs[stage] = _evaluate_argv(args, layout, run_id, model_version)
    argvs["record"] = [
        "--root",
        args.root,
        "--run-date",
        args.run_date.isoformat(),
        "--run-id",
        run_id,
        "--model-version",
        model_version,
        "--parameters",
        json.dumps({k: str(v) for k, v in vars(args).items()}),
    ]
    facts = {"run_id": run_id, "model_version": model_version, "run_date": str(args.run_date)}
    return STAGE_JOBS[stage], list(argvs[stage]), facts


def _evaluate_argv(args, layout, run_id: str, model_version: str) -> list[str]:
    # Until jobs.pipeline.stage_argv lists the evaluate stage itself.
    day = args.run_date.isoformat()
    return [
        "--shards",
        layout.shards(args.run_date),
        "--listings",
        layout.listings,
        "--embeddings",
        layout.table("listing_embeddings"),
        "--neighbours",
        layout.table("listing_neighbours"),
        "--model",
        layout.model_dir(model_version),
        "--out",
        str(Path(layout.report(args.run_date)).parent),
        "--run-date",
        day,
        "--k",
        str(args.k),
        "--seed",
        str(args.seed),
        "--run-id",
        run_id,
    ]


# ---------------------------------------------------------------------------------------------
# Command line


def parse_conf_overrides(pairs: Sequence[str]) -> dict[str, str]:
    conf = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("spark."):
            raise ValueError(f"--conf expects spark.key=value, got {pair!r}")
        conf[key] = value
    return conf


def parse_args(argv: Sequence[str] | None = None) -> tuple[SubmitSpec, argparse.Namespace]:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--master", default=env.get("SPARK_MASTER", "local[2]"))
    p.add_argument("--deploy-mode", choices=("client", "cluster"), default="client")
    p.add_argument("--conf-file", help="default: deploy/conf/<local|standalone|yarn|k8s>.conf")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--env-archive", default=env.get("LISTING_SIMILARITY_ENV_ARCHIVE"))
    p.add_argument("--py-files", default=env.get("LISTING_SIMILARITY_PY_FILES", str(DEFAULT_ZIP)))
    p.add_argument(
        "--delta",
        action=argparse.BooleanOptionalAction,
        default=env.get("LISTING_SIMILARITY_DELTA", "") in ("1", "true", "yes"),
    )
    p.add_argument("--spark-submit", default=None, help="default: $SPARK_HOME/bin/spark-submit")
    p.add_argument(
        "--code-root",
        default=env.get("LISTING_SIMILARITY_CODE_ROOT", str(REPO)),
        help="where the cluster finds jobs/*.py, e.g. local:///opt/listing-similarity in an image",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    sub = p.add_subparsers(dest="what", required=True)
    stage = sub.add_parser(
        "stage", help="one stage of a run (flags as for listing-similarity run)", allow_abbrev=False
    )
    stage.add_argument("stage", choices=STAGES)
    stage.add_argument("--run-key", help="orchestrator's run id; default: the run date")
    job = sub.add_parser(
        "job", help="any jobs/*.py entry point with its own flags after --", allow_abbrev=False
    )
    job.add_argument("job")
    argv = list(sys.argv[1:] if argv is None else argv)
    # After "--": the job's own flags (job), or extra flags appended to the stage's (stage).
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    a, rest = p.parse_known_args(argv)

    if a.what == "stage":
        run_key = a.run_key or pipeline_run_date(rest)
        job_file, job_args, a.facts = stage_job(a.stage, rest, run_id_for(run_key))
        job_args += extra
        name = f"listing-similarity-{a.stage}-{a.facts['run_date']}"
    else:
        if rest:
            p.error(f"unrecognized arguments before --: {' '.join(rest)}")
        job_file, job_args, a.facts, name = a.job, extra, {}, None
    conf_file = a.conf_file or default_conf_file(a.master)
    conf = read_conf_file(conf_file) if Path(conf_file).is_file() else {}
    conf.update(parse_conf_overrides(a.conf))
    spec = SubmitSpec(
        master=a.master,
        job=job_file if Path(job_file).is_absolute() else f"{a.code_root}/{job_file}",
        job_args=tuple(job_args),
        py_files=a.py_files or None,
        env_archive=a.env_archive or None,
        deploy_mode=a.deploy_mode,
        delta=a.delta,
        conf=conf,
        name=name,
        spark_submit=a.spark_submit or find_spark_submit(),
    )
    return spec, a


def pipeline_run_date(argv: Sequence[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--run-date" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--run-date="):
            return arg.split("=", 1)[1]
    raise ValueError("stage needs --run-date")


def run_submit(spec: SubmitSpec, *, echo: bool = True) -> tuple[int, dict | None]:
    """Run spark-submit, streaming its output; returns (exit code, the job's JSON stats)."""
    if spec.py_files and not all(Path(p).exists() for p in spec.py_files.split(",")):
        raise FileNotFoundError(f"{spec.py_files} missing: build it with `make package`")
    command = build_command(spec)
    print("[submit] " + shlex.join(command), file=sys.stderr, flush=True)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        env=submit_environment(spec, os.environ),
        text=True,
        cwd=REPO,
    )
    stats = None
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    stats = json.loads(line)
        return process.wait(), stats
    except BaseException:
        # Interrupted (Airflow timeout, SIGTERM): take the driver down with us.
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise


def main(argv: Sequence[str] | None = None) -> None:
    spec, a = parse_args(argv)
    if a.dry_run:
        print(shlex.join(build_command(spec)))
        return
    code, _ = run_submit(spec)
    sys.exit(code)


if __name__ == "__main__":
    main()
