"""Nothing lost without a reason: every event, example and evaluation that real data made vanish
is now either a clear error before anything is written or a counted, reported decision."""

import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from jobs import build_training_shards, compute_neighbours, evaluate, pipeline, train_embeddings
from lib import delta_io, shards, sufficiency
from lib.car_marketplace import FEATURE_SPEC
from lib.feature_spec import listings_table_spec
from lib.parquet_io import read_parquet
from lib.paths import Layout
from lib.schema_check import SchemaError
from lib.shard_writer import BOT_WARNING_SHARE, ShardParams, write_shards
from schemas import interactions, training_examples

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # deploy/ is not installed

from deploy import evaluation_gate, record_run

RUN_DATE = dt.date(2026, 11, 20)
CAR_LISTINGS = listings_table_spec(FEATURE_SPEC)


# --- 1. every shard and search flag reaches its stage from `listing-similarity run` -------------


def test_run_passes_every_shard_and_search_flag_to_its_stage():
    args = pipeline.parse_args(
        shlex.split(
            "--root /r --run-date 2026-11-20 --max-events-per-user-day 5000 "
            "--event-weights view=1,save=2,rating=4 --num-files 4 --validation-days 3 "
            "--nprobe 32 --candidates 80 --min-recall 0.95 --min-pairs 50"
        )
    )
    argv = pipeline.stage_argv(args, Layout("/r"), "run1", "v1")
    params = build_training_shards.parse_args(argv["shards"]).params
    assert params.max_events_per_user_day == 5000
    assert params.event_weights == (("view", 1.0), ("save", 2.0), ("rating", 4.0))
    assert params.num_files == 4 and params.validation_days == 3
    search = compute_neighbours.parse_args(argv["neighbours"])
    assert (search.nprobe, search.candidates, search.min_recall) == (32, 80, 0.95)
    assert args.min_pairs == 50


def test_run_defaults_are_the_stages_own_and_bad_weights_fail_early():
    args = pipeline.parse_args(["--root", "/r", "--run-date", "2026-11-20"])
    argv = pipeline.stage_argv(args, Layout("/r"), "run1", "v1")
    defaults = ShardParams(run_date=RUN_DATE)
    params = build_training_shards.parse_args(argv["shards"]).params
    assert params.max_events_per_user_day == defaults.max_events_per_user_day == 300
    assert params.event_weights == defaults.event_weights
    assert params.num_files == defaults.num_files
    search = compute_neighbours.parse_args(argv["neighbours"])
    default_search = compute_neighbours.NeighbourArgs("", "", RUN_DATE)
    assert (search.nprobe, search.candidates, search.min_recall) == (
        default_search.nprobe,
        default_search.candidates,
        default_search.min_recall,
    )
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--root", "/r", "--run-date", "2026-11-20", "--event-weights", "x"])


def test_run_passes_any_other_stage_flag_and_refuses_bad_ones_early():
    args = pipeline.parse_args(
        [
            *("--root", "/r", "--run-date", "2026-11-20"),
            *("--train-args", "--lr 0.02 --temperature 0.1"),
            *("--neighbours-args", "--nlist 64 --retain-runs 3"),
            *("--evaluate-args", "--baselines itemknn,als --no-report"),
        ]
    )
    argv = pipeline.stage_argv(args, Layout("/r"), "run1", "v1")
    train = train_embeddings.parse_args(argv["train"])
    assert (train.lr, train.temperature) == (0.02, 0.1)
    search = compute_neighbours.parse_args(argv["neighbours"])
    assert (search.nlist, search.retain_runs) == (64, 3)
    assessed = evaluate.parse_args(argv["evaluate"])
    assert assessed.baselines == ("itemknn", "als") and assessed.report is False
    assert (
        argv["shards"]
        == pipeline.stage_argv(
            pipeline.parse_args(["--root", "/r", "--run-date", "2026-11-20"]),
            Layout("/r"),
            "run1",
            "v1",
        )["shards"]
    )
    base = ["--root", "/r", "--run-date", "2026-11-20"]
    for bad in (["--train-args", "--epochs 3"], ["--neighbours-args", "--nlst 3"]):
        with pytest.raises(SystemExit):
            pipeline.parse_args([*base, *bad])


# --- 1 and 2: drop shares, the bot warning, zero weights and the decay floor -------------------


def _listing(listing_id):
    """A car listing under the generated marketplace's contract (``CAR_LISTINGS``)."""
    return {
        "listing_id": listing_id,
        "make": "VW",
        "model": "Golf",
        "body_type": "hatchback",
        "fuel_type": "petrol",
        "transmission": "manual",
        "colour": "red",
        "year": 2019.0,
        "mileage_km": 60_000.0,
        "price_eur": 10_000.0,
        "power_kw": 80.0,
        "latitude": 52.5,
        "longitude": 13.4,
        "city": "Berlin",
        "is_active": True,
        "created_date": dt.date(2026, 1, 1),
    }


def _event(user, listing_id, when, kind="view"):
    return (user, listing_id, kind, when, f"{user}-s", "web", when.date())


def _day(day, minute=0):
    return dt.datetime(2026, 11, day, 10, minute)


TEN_YEARS_AGO = dt.datetime(2016, 11, 20, 10, 0)
EVENTS = [
    # A heavy user: 6 distinct events on one day, above a ceiling of 5.
    *(_event("bot", f"L{1 + i % 3}", _day(17, i)) for i in range(6)),
    _event("u1", "L1", _day(17)),
    _event("u1", "L2", _day(17, 1)),
    _event("u1", "L3", _day(17, 2), kind="share"),  # a type weighted 0: nothing to learn
    _event("u1", "L1", _day(20)),  # held out
    _event("u2", "L2", TEN_YEARS_AGO),  # 174 half-lives: 0.5**174 underflows float32
    _event("u2", "L3", _day(17)),
    _event("u3", "L1", _day(17)),
    _event("u3", "L3", _day(17, 1)),
    _event("u3", "L2", _day(20)),
]


def _write(spark, tmp_path, name, ceiling):
    params = ShardParams(
        run_date=RUN_DATE,
        lookback_days=4000,  # reaches the ten-year-old event
        holdout_days=1,
        validation_days=1,
        event_weights=(("view", 1.0), ("save", 3.0), ("contact", 5.0), ("share", 0.0)),
        max_events_per_user_day=ceiling,
        num_files=1,
    )
    events = spark.createDataFrame(EVENTS, interactions.SCHEMA)
    snapshot = spark.createDataFrame([_listing(f"L{i}") for i in (1, 2, 3)], CAR_LISTINGS.schema)
    out = tmp_path / name
    return write_shards(spark, events, snapshot, str(out), params, spec=FEATURE_SPEC), out


def test_drops_are_counted_shared_and_a_high_bot_share_warns(spark, tmp_path, capsys):
    manifest, out = _write(spark, tmp_path, "low", ceiling=5)
    counts = manifest["counts"]
    assert counts["events_read"] == len(EVENTS) == 15
    assert counts["dropped_bot_user"] == 6
    assert counts["share_dropped"]["bot_user"] == round(6 / 15, 6) > BOT_WARNING_SHARE
    assert set(counts["share_dropped"]) == {"duplicate", *shards.DROP_REASONS}
    assert json.loads((out / "manifest.json").read_text())["counts"] == counts
    err = capsys.readouterr().err
    assert "[shards] 15 events read, 9 kept; dropped: bot_user 40.00%" in err
    warning = [line for line in err.splitlines() if line.startswith("[shards] WARNING")]
    assert len(warning) == 1
    assert "40.0% of the events" in warning[0] and "--max-events-per-user-day" in warning[0]

    # (u1, L3) has only a `share`, weighted 0: dropped as an example, but counted.
    assert counts["examples_dropped_zero_weight"] == 1
    assert counts["examples_dropped_zero_weight_full"] == 1
    # The ten-year-old view keeps a positive weight (the decay floor), so u2-L2 is an example.
    examples = read_parquet(spark, out / "train", training_examples.SPEC)
    assert counts["training_examples"] == examples.count() == 6
    weights = sorted(r.weight for r in examples.select("weight").collect())
    assert weights[0] == pytest.approx(shards.MIN_DECAY, rel=1e-6)
    assert weights[1] > 0.5  # the other examples are days old: barely decayed

    # The ceiling raised, as the warning says: the heavy user's events are kept, no warning.
    manifest, _ = _write(spark, tmp_path, "high", ceiling=10)
    assert manifest["counts"].get("dropped_bot_user", 0) == 0
    assert manifest["counts"]["share_dropped"]["bot_user"] == 0.0
    assert "WARNING" not in capsys.readouterr().err


def test_decay_never_underflows_to_zero(spark):
    events = spark.createDataFrame(
        [_event("u", "L1", TEN_YEARS_AGO), _event("u", "L2", _day(20, 0))], interactions.SCHEMA
    )
    weighted = shards.weight_interactions(
        events, run_date=RUN_DATE, event_weights={"view": 1.0}, half_life_days=21.0
    )
    got = {r.listing_id: r.weight for r in weighted.collect()}
    assert got["L1"] == pytest.approx(shards.MIN_DECAY, rel=1e-6)  # 0.5**174 would be 0.0
    assert got["L2"] == pytest.approx(0.5 ** ((14 / 24) / 21), rel=1e-6)  # 14 h old
    # Only a zero type weight makes a pair worthless; pair_weights keeps it for counting.
    zero = shards.pair_weights(
        events, run_date=RUN_DATE, event_weights={"view": 0.0}, half_life_days=21.0
    )
    assert [r.weight for r in zero.collect()] == [0.0, 0.0]


# --- 3. too few held-out pairs: insufficient, not succeeded -------------------------------------

FEW = {"model": {"hit_rate_at_10": 0.5, "pairs": 7}, "popularity": {"hit_rate_at_10": 0.1}}
RULE = "model.hit_rate_at_10 >= popularity.hit_rate_at_10"


def test_gate_marks_a_tiny_evaluation_insufficient(tmp_path, capsys):
    verdict = evaluation_gate.decide([RULE], FEW)
    assert verdict["status"] == "insufficient" and verdict["passed"] is False
    assert verdict["pairs"] == 7 and verdict["min_pairs"] == 100
    assert verdict["reason"].startswith("7 held-out pairs of the model, fewer than 100")
    assert verdict["failures"] == []  # the rule held, by chance: it does not count
    assert evaluation_gate.decide([RULE], FEW, min_pairs=5)["status"] == "passed"
    missing = evaluation_gate.decide([], {"model": {"hit_rate_at_10": 0.5}})
    assert missing["status"] == "insufficient" and "no model.pairs" in missing["reason"]
    worse = {**FEW, "model": {"hit_rate_at_10": 0.0, "pairs": 500}}
    assert evaluation_gate.decide([RULE], worse)["status"] == "failed"

    path = evaluation_gate.metrics_path(str(tmp_path), RUN_DATE)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": FEW}))
    argv = ["--root", str(tmp_path), "--run-date", "2026-11-20", "--rule", RULE]
    with pytest.raises(SystemExit) as exit_:
        evaluation_gate.main(argv)
    assert exit_.value.code == 1
    written = json.loads((path.parent / evaluation_gate.VERDICT).read_text())
    assert written["status"] == "insufficient" and "fewer than 100" in written["reason"]
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == written
    evaluation_gate.main([*argv, "--min-pairs", "5"])  # configurable: passes, no exit
    assert json.loads((path.parent / evaluation_gate.VERDICT).read_text())["status"] == "passed"


def test_record_run_writes_insufficient_from_the_gate(tmp_path, monkeypatch):
    layout = Layout(str(tmp_path))
    manifest = {"counts": {"events_kept": 9}, "input_versions": {}, "seconds": 1.0}
    shards_dir = Path(layout.shards(RUN_DATE))
    shards_dir.mkdir(parents=True)
    (shards_dir / "manifest.json").write_text(json.dumps(manifest))
    model = Path(layout.model_dir("v1"))
    model.mkdir(parents=True)
    (model / "metrics.json").write_text(json.dumps({"loss_per_epoch": [1.0]}))
    reports = evaluation_gate.metrics_path(str(tmp_path), RUN_DATE).parent
    reports.mkdir(parents=True)
    (reports / "metrics.json").write_text(json.dumps({"metrics": FEW}))
    verdict = {"run_date": "2026-11-20", "rules": [RULE], **evaluation_gate.decide([RULE], FEW)}
    (reports / evaluation_gate.VERDICT).write_text(json.dumps(verdict))
    # The neighbours commit of this run (read from the Delta log in production).
    monkeypatch.setattr(record_run, "_history", lambda path: [{"metadata": {"run_id": "r1"}}])

    args = record_run.parse_args(
        [
            "--root",
            str(tmp_path),
            "--run-date",
            "2026-11-20",
            "--run-id",
            "r1",
            "--model-version",
            "v1",
        ]
    )
    record = record_run.collect(args)
    assert record.status == "insufficient"
    assert record.error.startswith("evaluation insufficient: 7 held-out pairs of the model")
    assert record.metrics["model.pairs"] == 7


def test_pipeline_reads_the_pair_count_from_the_evaluate_stage_result():
    flat = {"model.pairs": 7.0, "model.hit_rate_at_10": 0.5}  # what evaluate.run returns
    assert sufficiency.model_pairs(flat) == 7.0
    assert sufficiency.assess(sufficiency.model_pairs(flat), 100)["status"] == "insufficient"
    assert sufficiency.assess(250.0, 100) == {
        "status": "sufficient",
        "reason": None,
        "pairs": 250,
        "min_pairs": 100,
    }


# --- 4. pandas' nanosecond timestamps: the project's SchemaError, before anything is written ---


def test_pandas_nanosecond_parquet_fails_with_table_and_column(spark, tmp_path):
    frame = pd.DataFrame(
        {
            "user_id": ["u1"],
            "listing_id": ["L1"],
            "event_type": ["view"],
            "event_ts": pd.to_datetime(["2026-11-20 10:00:00"]).tz_localize("UTC"),
            "event_date": [dt.date(2026, 11, 20)],
        }
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    frame.to_parquet(bad / "part-0.parquet")  # pandas' default: nanoseconds
    with pytest.raises(SchemaError, match="nanosecond timestamps") as error:
        delta_io.read_input(spark, str(bad), interactions.SPEC)
    assert (error.value.table, error.value.column) == ("interactions", "event_ts")
    assert "coerce_timestamps='us'" in str(error.value)
    # The stage fails the same way, before it writes anything.
    out = tmp_path / "shards"
    with pytest.raises(SchemaError, match="column 'event_ts'"):
        build_training_shards.run(
            spark,
            build_training_shards.parse_args(
                [
                    "--interactions",
                    str(bad),
                    "--listings",
                    str(bad),
                    "--out",
                    str(out),
                    "--run-date",
                    "2026-11-20",
                ]
            ),
        )
    assert not out.exists()

    # Written as the message says, the same data reads, to the microsecond.
    good = tmp_path / "good"
    good.mkdir()
    frame.to_parquet(good / "part-0.parquet", coerce_timestamps="us")
    row = delta_io.read_input(spark, str(good), interactions.SPEC).select(
        F.unix_timestamp("event_ts").alias("s")
    )
    assert row.first().s == int(dt.datetime(2026, 11, 20, 10, tzinfo=dt.UTC).timestamp())
