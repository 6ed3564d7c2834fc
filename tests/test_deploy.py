"""deploy/: the spark-submit wrapper's commands, the packaging, the DAG's tasks, the gate.

Fast and Spark-free: nothing here submits anything (``make test-cluster`` does that for real).
"""

import datetime as dt
import importlib.util
import json
import os
import stat
import sys
import zipfile
from pathlib import Path

import pytest

from jobs import pipeline
from lib.paths import Layout

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deploy import evaluation_gate, package, record_run, submit  # noqa: E402


def _load_dag_tasks():
    spec = importlib.util.spec_from_file_location(
        "dag_tasks", REPO / "deploy" / "airflow" / "dag_tasks.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


dag_tasks = _load_dag_tasks()

RUN = ["--root", "/data/ls", "--run-date", "2026-11-20", "--k", "7", "--epochs", "3"]


def conf_of(command: list[str]) -> dict[str, str]:
    pairs = [command[i + 1] for i, a in enumerate(command) if a == "--conf"]
    return dict(p.split("=", 1) for p in pairs)


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


# --- the wrapper: command building ----------------------------------------------------------


@pytest.mark.parametrize(
    ("master", "kind"),
    [
        ("local[2]", "local"),
        ("local[*]", "local"),
        ("spark://h:7077", "standalone"),
        ("yarn", "yarn"),
        ("k8s://https://api:443", "k8s"),
    ],
)
def test_master_kind(master, kind):
    assert submit.master_kind(master) == kind


def test_unknown_master_is_refused():
    with pytest.raises(ValueError, match="unknown master 'mesos://h'"):
        submit.master_kind("mesos://h")


def test_local_submit_uses_this_python_and_no_archive():
    spec = submit.SubmitSpec(
        master="local[3]",
        job="/r/jobs/compute_neighbours.py",
        job_args=("--k", "5"),
        py_files="/r/dist/listing_similarity.zip",
        env_archive="/cache/pyenv.zip",
        driver_python="/venv/bin/python",
    )
    command = submit.build_command(spec)
    conf = conf_of(command)
    assert command[-3:] == ["/r/jobs/compute_neighbours.py", "--k", "5"]
    assert "--archives" not in command
    assert option(command, "--py-files") == "/r/dist/listing_similarity.zip"
    assert conf["spark.pyspark.python"] == "/venv/bin/python"
    assert conf["spark.sql.shuffle.partitions"] == "6"  # 2 x local cores
    assert "spark.executorEnv.PYTHONPATH" not in conf
    assert "--packages" not in command and "spark.sql.extensions" not in conf


def test_cluster_submit_ships_the_environment_and_trains_on_executors():
    spec = submit.SubmitSpec(
        master="spark://10.0.0.1:7077",
        job="/r/jobs/train_embeddings.py",
        job_args=("--shards", "s", "--out", "m"),
        py_files="/r/dist/listing_similarity.zip",
        env_archive="/cache/pyenv-abc.zip",
        driver_python="/venv/bin/python",
        conf={"spark.cores.max": "8"},
    )
    command = submit.build_command(spec)
    conf = conf_of(command)
    assert option(command, "--archives") == "/cache/pyenv-abc.zip#env"
    assert conf["spark.pyspark.python"] == "./env/bin/python"
    assert conf["spark.pyspark.driver.python"] == "/venv/bin/python"  # client mode
    assert conf["spark.executorEnv.PYTHONPATH"] == "listing_similarity.zip"
    assert conf["spark.sql.shuffle.partitions"] == "16"
    assert command[-1] == "--no-local-mode"


def test_cluster_mode_driver_also_uses_the_archive_python():
    spec = submit.SubmitSpec(
        master="yarn",
        job="j.py",
        env_archive="a.zip",
        deploy_mode="cluster",
        conf={"spark.executor.instances": "3", "spark.executor.cores": "4"},
    )
    conf = conf_of(submit.build_command(spec))
    assert conf["spark.pyspark.driver.python"] == "./env/bin/python"
    assert conf["spark.sql.shuffle.partitions"] == "24"


def test_explicit_local_mode_and_other_jobs_are_left_alone():
    base = dict(master="spark://h:7077", env_archive="a.zip")
    train = submit.SubmitSpec(job="jobs/train_embeddings.py", job_args=("--local-mode",), **base)
    other = submit.SubmitSpec(job="jobs/compute_embeddings.py", **base)
    assert submit.build_command(train)[-2:] == ["jobs/train_embeddings.py", "--local-mode"]
    assert submit.build_command(other)[-1] == "jobs/compute_embeddings.py"


def test_cluster_without_an_environment_is_refused():
    spec = submit.SubmitSpec(master="spark://h:7077", job="j.py")
    with pytest.raises(ValueError, match="needs --env-archive"):
        submit.build_command(spec)
    # ... unless a conf names an environment installed on the nodes (a k8s image).
    installed = submit.SubmitSpec(
        master="k8s://https://api",
        job="local:///opt/ls/jobs/j.py",
        py_files=None,
        deploy_mode="cluster",
        conf={"spark.pyspark.python": "/opt/venv/bin/python"},
    )
    command = submit.build_command(installed)
    assert "--archives" not in command and "--py-files" not in command
    assert conf_of(command)["spark.pyspark.python"] == "/opt/venv/bin/python"


def test_local_master_refuses_cluster_deploy_mode():
    with pytest.raises(ValueError, match="client only"):
        submit.build_command(submit.SubmitSpec(master="local[2]", job="j", deploy_mode="cluster"))


def test_delta_flag_adds_package_and_extension():
    spec = submit.SubmitSpec(master="local[2]", job="j.py", delta=True)
    command = submit.build_command(spec)
    conf = conf_of(command)
    assert option(command, "--packages") == "io.delta:delta-spark_2.13:4.4.1"
    assert conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert conf["spark.sql.catalog.spark_catalog"].endswith("DeltaCatalog")


def test_explicit_conf_wins_over_derived_settings():
    spec = submit.SubmitSpec(
        master="local[2]",
        job="j.py",
        conf={"spark.sql.shuffle.partitions": "3", "spark.pyspark.python": "/other/python"},
    )
    conf = conf_of(submit.build_command(spec))
    assert conf["spark.sql.shuffle.partitions"] == "3"
    assert conf["spark.pyspark.python"] == "/other/python"


def test_submit_environment_follows_the_confs():
    spec = submit.SubmitSpec(
        master="spark://h:7077", job="j", env_archive="a.zip", driver_python="/venv/bin/python"
    )
    env = submit.submit_environment(spec, {"PYSPARK_PYTHON": "/wrong", "HOME": "/root"})
    assert env == {
        "PYSPARK_PYTHON": "./env/bin/python",
        "PYSPARK_DRIVER_PYTHON": "/venv/bin/python",
        "HOME": "/root",
    }


# --- conf files ------------------------------------------------------------------------------


def test_conf_file_syntax(tmp_path):
    path = tmp_path / "x.conf"
    path.write_text("# comment\n\nspark.a   1\nspark.b  two words  # trailing\n")
    assert submit.read_conf_file(path) == {"spark.a": "1", "spark.b": "two words"}
    path.write_text("spark.a\n")
    with pytest.raises(ValueError, match=r"x.conf:1: expected 'spark.key value'"):
        submit.read_conf_file(path)


@pytest.mark.parametrize("kind", ["local", "standalone", "yarn", "k8s"])
def test_shipped_conf_files_parse(kind):
    conf = submit.read_conf_file(REPO / "deploy" / "conf" / f"{kind}.conf")
    assert conf and all(key.startswith("spark.") for key in conf)
    if kind != "local":  # barrier stages (TorchDistributor) need fixed executors
        assert conf["spark.dynamicAllocation.enabled"] == "false"


# --- stages of one run -----------------------------------------------------------------------


def test_stage_arguments_come_from_the_pipeline():
    run_id = submit.run_id_for("scheduled__2026-11-20")
    version = submit.model_version_for(dt.date(2026, 11, 20), run_id)
    expected = pipeline.stage_argv(pipeline.parse_args(RUN), Layout("/data/ls"), run_id, version)
    for stage, argv in expected.items():
        job, args, facts = submit.stage_job(stage, RUN, run_id)
        assert job == submit.STAGE_JOBS[stage] and args == argv
        assert facts == {"run_id": run_id, "model_version": version, "run_date": "2026-11-20"}


@pytest.mark.parametrize("stage", submit.STAGES)
def test_every_stage_command_parses_with_its_job(stage):
    # What the wrapper builds must be accepted by the entry point it submits.
    job, args, _ = submit.stage_job(stage, RUN, submit.run_id_for("k"))
    path = REPO / job
    if not path.is_file():
        pytest.skip(f"{job} is not in this checkout")
    module = importlib.import_module(job.removesuffix(".py").replace("/", "."))
    parsed = module.parse_args(args)
    run_date = getattr(parsed, "run_date", None) or getattr(
        getattr(parsed, "params", None), "run_date", None
    )
    assert run_date in (None, dt.date(2026, 11, 20))


def test_run_ids_are_stable_per_key():
    assert submit.run_id_for("a") == submit.run_id_for("a") != submit.run_id_for("b")
    assert len(submit.run_id_for("a")) == 32
    assert submit.model_version_for(dt.date(2026, 1, 2), "abcdef0123") == "20260102-abcdef01"


def test_parse_args_stage_and_job(monkeypatch):
    monkeypatch.delenv("LISTING_SIMILARITY_ENV_ARCHIVE", raising=False)
    monkeypatch.delenv("SPARK_MASTER", raising=False)
    spec, a = submit.parse_args(["--conf", "spark.x=1", "stage", "train", "--run-key", "r1", *RUN])
    assert spec.master == "local[2]" and spec.job == f"{REPO}/jobs/train_embeddings.py"
    assert spec.conf["spark.x"] == "1" and spec.conf["spark.driver.memory"]  # + local.conf
    assert option(list(spec.job_args), "--epochs") == "3"
    assert a.facts["run_id"] == submit.run_id_for("r1")
    # Without a run key a date's stages share the date's run id (reruns resume training).
    _, b = submit.parse_args(["stage", "shards", *RUN])
    assert b.facts["run_id"] == submit.run_id_for("2026-11-20")
    spec, _ = submit.parse_args(
        ["--code-root", "local:///opt/ls", "job", "jobs/x.py", "--", "--k", "3"]
    )
    assert spec.job == "local:///opt/ls/jobs/x.py" and spec.job_args == ("--k", "3")
    with pytest.raises(SystemExit):
        submit.parse_args(["stage", "deploy-everything", *RUN])


def test_bad_conf_override_is_refused():
    with pytest.raises(ValueError, match=r"spark\.key=value"):
        submit.parse_conf_overrides(["executor.memory=2g"])


# --- packaging -------------------------------------------------------------------------------


def test_code_zip_holds_the_three_packages(tmp_path):
    path = package.build_code_zip(tmp_path)
    names = zipfile.ZipFile(path).namelist()
    assert {"lib/__init__.py", "jobs/pipeline.py", "schemas/runs.py"} <= set(names)
    assert all(n.split("/")[0] in package.CODE_PACKAGES and n.endswith(".py") for n in names)


def _fake_venv(root: Path) -> Path:
    venv = root / "venv"
    site = venv / "lib" / "python3.11" / "site-packages"
    for rel in (
        "torch/__init__.py",
        "torch/include/x.h",
        "pandas/tests/t.py",
        "pyspark/jars/spark.jar",
        "pyspark/__init__.py",
        "__editable__.ls.pth",
        "listing_similarity-0.1.0.dist-info/METADATA",
        "torch-2.13.0.dist-info/METADATA",
        "duckdb/__init__.py",
        "_duckdb.cpython-311-x86_64-linux-gnu.so",
        "polars/__init__.py",
        "_pytest/python.py",
        "pytest-9.2.0.dist-info/METADATA",
    ):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(rel)
    (venv / "bin").mkdir()
    real = root / "python3.11"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    (venv / "bin" / "python").symlink_to(real)
    (venv / "lib64").symlink_to("lib")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.7\n")
    return venv


def test_env_archive_leaves_out_what_executors_never_use(tmp_path):
    venv = _fake_venv(tmp_path)
    archive, built = package.build_env_archive(venv, tmp_path / "cache")
    assert built and archive.suffix == ".zip"
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        python_mode = z.getinfo("bin/python").external_attr >> 16
    site = "lib/python3.11/site-packages"
    assert names == {
        "bin/python",
        "pyvenv.cfg",
        f"{site}/torch/__init__.py",
        f"{site}/pyspark/__init__.py",
        f"{site}/torch-2.13.0.dist-info/METADATA",
    }
    assert python_mode & stat.S_IXUSR  # the symlink became the executable it points to
    assert package.build_env_archive(venv, tmp_path / "cache") == (archive, False)


def test_env_fingerprint_tracks_dependencies_not_code(tmp_path):
    venv = _fake_venv(tmp_path)
    site = venv / "lib" / "python3.11" / "site-packages"
    before = package.env_fingerprint(venv)
    (site / "listing_similarity-0.1.0.dist-info").rename(
        site / "listing_similarity-0.2.0.dist-info"
    )
    assert package.env_fingerprint(venv) == before
    (site / "numpy-2.0.0.dist-info").mkdir()
    assert package.env_fingerprint(venv) != before


def test_env_archive_needs_a_venv(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a virtual environment"):
        package.build_env_archive(tmp_path, tmp_path / "cache")


# --- the DAG's tasks -------------------------------------------------------------------------


def test_dag_runs_every_stage_then_gate_then_record():
    assert dag_tasks.TASKS == (
        "shards",
        "train",
        "embeddings",
        "neighbours",
        "evaluate",
        "evaluation_gate",
        "record_run",
    )
    assert dag_tasks.EDGES[0] == ("shards", "train")
    assert dag_tasks.EDGES[-1] == ("evaluation_gate", "record_run")
    assert set(dag_tasks.SPARK_STAGES) | {"record"} == set(submit.STAGES)


def test_dag_commands_submit_through_the_wrapper():
    settings = dag_tasks.Settings(
        project="/opt/ls",
        python="/opt/ls/.venv/bin/python",
        root="/data/ls",
        master="yarn",
        submit_flags=("--env-archive", "/opt/ls/env.zip"),
    )
    train = dag_tasks.command(settings, "train")
    assert train.startswith("/opt/ls/.venv/bin/python /opt/ls/deploy/submit.py --master yarn")
    assert "--env-archive /opt/ls/env.zip stage train --run-key '{{ run_id }}'" in train
    assert "--run-date '{{ ds }}'" in train and "--k '{{ params.k }}'" in train
    assert "stage record " in dag_tasks.command(settings, "record_run")
    gate = dag_tasks.command(settings, "evaluation_gate")
    assert "deploy/evaluation_gate.py --root /data/ls" in gate
    assert "--rule 'model.hit_rate_at_10 >= popularity.hit_rate_at_10'" in gate
    with pytest.raises(ValueError, match="not a Spark stage"):
        dag_tasks.submit_command(settings, "evaluation_gate")


def test_dag_settings_from_environment():
    settings = dag_tasks.settings_from_env(
        {
            "LISTING_SIMILARITY_HOME": "/opt/ls",
            "LISTING_SIMILARITY_SUBMIT_FLAGS": "--delta -v",
            "LISTING_SIMILARITY_GATE_RULES": "model.x > 0.1; model.y >= 1",
            "LISTING_SIMILARITY_FLAGS_NEIGHBOURS": "--nprobe 32",
        }
    )
    assert settings.python == "/opt/ls/.venv/bin/python"
    assert settings.submit_flags == ("--delta", "-v")
    assert settings.gate_rules == ("model.x > 0.1", "model.y >= 1")
    assert settings.stage_flags == {"neighbours": ("--nprobe", "32")}
    assert dag_tasks.command(settings, "neighbours").endswith(" -- --nprobe 32")
    assert " -- " not in dag_tasks.command(settings, "train")


def test_dag_shell_commands_parse_back_into_the_stage_flags():
    # Rendered by Airflow, the command is the wrapper's argv: check it parses as one.
    import shlex

    settings = dag_tasks.Settings(project=str(REPO), python=sys.executable, root="/data/ls")
    rendered = (
        dag_tasks.command(settings, "neighbours")
        .replace("{{ ds }}", "2026-11-20")
        .replace("{{ run_id }}", "scheduled__2026-11-20T02:30:00+00:00")
    )
    for name, value in (
        ("k", 9),
        ("epochs", 1),
        ("dim", 16),
        ("num_processes", 2),
        ("batch_size", 64),
    ):
        rendered = rendered.replace(f"{{{{ params.{name} }}}}", str(value))
    argv = shlex.split(rendered)[2:]
    spec, a = submit.parse_args(argv)
    assert spec.job.endswith("jobs/compute_neighbours.py")
    assert option(list(spec.job_args), "--k") == "9"
    assert a.facts["run_id"] == submit.run_id_for("scheduled__2026-11-20T02:30:00+00:00")


# --- evaluation gate and record_run ------------------------------------------------------------

METRICS = {
    "model": {"hit_rate_at_10": 0.3, "full_lists_at_10": 1.0, "pairs": 500},
    "popularity": {"hit_rate_at_10": 0.1, "full_lists_at_10": 1.0},
}


def test_gate_rules():
    assert evaluation_gate.check(dag_tasks.DEFAULT_GATE_RULES, METRICS) == []
    worse = {**METRICS, "model": {"hit_rate_at_10": 0.05, "full_lists_at_10": 0.5}}
    failures = evaluation_gate.check(dag_tasks.DEFAULT_GATE_RULES, worse)
    assert failures == [
        "model.hit_rate_at_10 >= popularity.hit_rate_at_10: 0.05 >= 0.1 is false",
        "model.full_lists_at_10 >= 0.99: 0.5 >= 0.99 is false",
    ]
    assert evaluation_gate.check(["model.recall > 0.9"], METRICS) == [
        "model.recall > 0.9: metric 'model.recall' is missing from the evaluation"
    ]
    with pytest.raises(ValueError, match="expected 'A >= B'"):
        evaluation_gate.check(["model.x == 1"], METRICS)


def test_gate_writes_its_verdict_and_fails_the_task(tmp_path, capsys):
    day = dt.date(2026, 11, 20)
    path = evaluation_gate.metrics_path(str(tmp_path), day)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": METRICS}))
    evaluation_gate.main(
        [
            "--root",
            str(tmp_path),
            "--run-date",
            "2026-11-20",
            "--rule",
            "model.hit_rate_at_10 >= 0.2",
        ]
    )
    assert json.loads((path.parent / "evaluation_gate.json").read_text())["passed"] is True
    with pytest.raises(SystemExit) as exit_:
        evaluation_gate.main(
            [
                "--root",
                str(tmp_path),
                "--run-date",
                "2026-11-20",
                "--rule",
                "model.hit_rate_at_10 >= 0.5",
            ]
        )
    assert exit_.value.code == 1
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["passed"] is False


def test_record_run_collects_a_failed_run(tmp_path):
    # Nothing but the shard manifest: the row says failed and names every missing piece.
    layout = Layout(str(tmp_path))
    day = dt.date(2026, 11, 20)
    shards = Path(layout.shards(day))
    shards.mkdir(parents=True)
    (shards / "manifest.json").write_text(
        json.dumps(
            {
                "counts": {"events_kept": 10, "note": "x"},
                "input_versions": {"listings": 3},
                "seconds": 4.5,
            }
        )
    )
    args = record_run.parse_args(
        [
            "--root",
            str(tmp_path),
            "--run-date",
            "2026-11-20",
            "--run-id",
            "abc",
            "--model-version",
            "20261120-abc",
            "--parameters",
            '{"k": 20}',
        ]
    )
    record = record_run.collect(args)
    assert record.status == "failed"
    assert record.counts == {"events_kept": 10} and record.input_versions == {"listings": "3"}
    assert record.stage_seconds == {"shards": 4.5} and record.parameters == {"k": "20"}
    assert record.error == (
        "train: no metrics.json | neighbours: no commit with this run id | evaluation gate: no verdict"
    )


def test_record_stage_arguments_parse():
    _, args, facts = submit.stage_job("record", RUN, "f" * 32)
    parsed = record_run.parse_args(args)
    assert parsed.run_id == "f" * 32 and parsed.model_version == facts["model_version"]
    assert parsed.parameters["k"] == "7"


def test_cluster_env_keeps_the_project_python_away(monkeypatch):
    from deploy import cluster_test

    monkeypatch.setenv("PYSPARK_PYTHON", "/venv/bin/python")
    monkeypatch.setenv("PATH", f"{Path(sys.prefix) / 'bin'}{os.pathsep}/usr/bin")
    env = cluster_test.cluster_environment(Path("/spark"))
    assert "PYSPARK_PYTHON" not in env and env["PATH"] == "/usr/bin"
    assert env["SPARK_HOME"] == "/spark" and env["SPARK_LOCAL_IP"] == "127.0.0.1"


def test_extra_stage_flags_after_double_dash():
    spec, _ = submit.parse_args(["stage", "evaluate", *RUN, "--", "--no-report"])
    assert spec.job_args[-1] == "--no-report"
    with pytest.raises(SystemExit):
        submit.parse_args(["job", "jobs/x.py", "--k", "3"])  # job flags belong after --


def _event(kind, **fields):
    return json.dumps({"Event": kind, **fields})


def test_cluster_test_counts_executors_from_the_event_log(tmp_path):
    from deploy import cluster_test

    def task_end(stage, executor):
        return _event(
            "SparkListenerTaskEnd",
            **{
                "Stage ID": stage,
                "Stage Attempt ID": 0,
                "Task Info": {"Executor ID": executor, "Host": "127.0.0.1"},
            },
        )

    def submitted(stage, barrier):
        return _event(
            "SparkListenerStageSubmitted",
            **{
                "Stage Info": {
                    "Stage ID": stage,
                    "Stage Attempt ID": 0,
                    "RDD Info": [{"Barrier": barrier}],
                }
            },
        )

    lines = [
        _event("SparkListenerApplicationStart", **{"App ID": "app-1"}),
        submitted(0, False),
        task_end(0, "0"),
        task_end(0, "0"),
        task_end(0, "driver"),
        submitted(1, True),
        task_end(1, "0"),
        task_end(1, "1"),
        "not json {",
    ]
    logs = tmp_path / "events"
    logs.mkdir()
    (logs / "app-1").write_text("\n".join(lines) + "\n")
    found = cluster_test.read_event_logs(logs)
    assert found == {
        "app_id": "app-1",
        "executors": ["0", "1"],
        "tasks": 4,
        "barrier_executors": ["0", "1"],
    }
    cluster_test._check_executors("train", found, 2, 2)
    one = {**found, "executors": ["0"]}
    with pytest.raises(AssertionError, match=r"stage shards .* on 1 executor"):
        cluster_test._check_executors("shards", one, 2, 2)
    with pytest.raises(AssertionError, match="DDP ranks"):
        cluster_test._check_executors("train", {**found, "barrier_executors": ["1"]}, 2, 2)
    (logs / "app-2.inprogress").write_text("")
    with pytest.raises(AssertionError, match="expected one Spark event log"):
        cluster_test.read_event_logs(logs)


def test_cluster_test_defaults_to_two_single_core_workers():
    from deploy import cluster_test

    args = cluster_test.parse_args([])
    assert (args.workers, args.cores, args.executor_cores, args.min_executors) == (2, 1, 1, 2)
    with pytest.raises(SystemExit):
        cluster_test.parse_args(["--workers", "1"])  # one executor cannot show two
