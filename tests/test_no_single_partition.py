"""Global orders without a single-partition step: same numbers as the one-window versions.

``extend_vocabulary``, ``popularity_ranks`` and ``random_neighbours`` used an ordered window
without ``partitionBy``, which moves every row into one partition. They now go through
``lib.ordering.sorted_positions``; these tests pin their results to plain Python sorts and
check that no physical plan of the shard stage's transforms (or of these three) moves all rows
into one partition.
"""

from __future__ import annotations

import datetime as dt
import random
from contextlib import contextmanager

import pytest
from pyspark.sql import Row, Window
from pyspark.sql import functions as F

from lib import baselines, evaluation, features, shards
from lib.car_marketplace import FEATURE_SPEC
from lib.feature_spec import listings_table_spec
from lib.ordering import sorted_positions
from lib.session import sql_conf
from schemas import interactions

RUN_DATE = dt.date(2026, 11, 20)
PARTITION_COUNTS = (1, 3, 8, 40)
WINDOW_WARNING = "No Partition Defined for Window operation"


def shuffle_partitions(spark, n: int):
    return sql_conf(spark, "spark.sql.shuffle.partitions", str(n))


def ids_df(spark, ids, partitions=4):
    return spark.createDataFrame([(i,) for i in ids], "id string").repartition(partitions)


# ---- extend_vocabulary: the old numbering, recomputed with a Python sort ------------------


def expected_vocabulary(ids, previous=None):
    vocabulary = dict(previous or {})
    start = max(vocabulary.values(), default=-1) + 1
    new = sorted({i for i in ids if i is not None} - set(vocabulary))
    vocabulary.update({i: start + k for k, i in enumerate(new)})
    return vocabulary


RNG = random.Random(11)
RAW_IDS = [f"u{RNG.randrange(50_000):06d}" for _ in range(1_500)] + [
    None,
    "Zürich",
    "zz",
    "A",
    "a",
    "",
    "u000001",
]


@pytest.mark.parametrize("partitions", PARTITION_COUNTS)
def test_first_vocabulary_numbers_ids_in_sorted_order(spark, partitions):
    with shuffle_partitions(spark, partitions):
        got = dict(map(tuple, shards.extend_vocabulary(ids_df(spark, RAW_IDS)).collect()))
    assert got == expected_vocabulary(RAW_IDS)
    assert sorted(got.values()) == list(range(len(got)))


@pytest.mark.parametrize("partitions", PARTITION_COUNTS)
def test_extended_vocabulary_keeps_old_indices_and_appends_in_id_order(spark, partitions):
    # Not dense on purpose: new ids go after the largest index, not after the count.
    previous = {"u000001": 0, "b": 7, "gone": 3}
    prior = spark.createDataFrame(list(previous.items()), "id string, idx int").repartition(2)
    with shuffle_partitions(spark, partitions):
        got = dict(map(tuple, shards.extend_vocabulary(ids_df(spark, RAW_IDS), prior).collect()))
    assert got == expected_vocabulary(RAW_IDS, previous)
    assert min(v for k, v in got.items() if k not in previous) == 8


def test_extend_vocabulary_with_nothing_new_or_no_previous_rows(spark):
    prior = spark.createDataFrame([("a", 0), ("b", 1)], "id string, idx int")
    same = shards.extend_vocabulary(ids_df(spark, ["b", "a", None]), prior)
    assert sorted(map(tuple, same.collect())) == [("a", 0), ("b", 1)]
    empty = spark.createDataFrame([], "id string, idx int")
    fresh = shards.extend_vocabulary(ids_df(spark, ["b", "a"]), empty)
    assert sorted(map(tuple, fresh.collect())) == [("a", 0), ("b", 1)]


# ---- sorted_positions itself --------------------------------------------------------------


@pytest.mark.parametrize("num_partitions", PARTITION_COUNTS)
def test_sorted_positions_are_dense_and_do_not_depend_on_partitions(spark, num_partitions):
    rng = random.Random(3)
    rows = [(rng.randrange(5), f"k{i:04d}") for i in range(700)]
    df = spark.createDataFrame(rows, "a int, b string").repartition(5)
    got = sorted_positions(
        df, ["a", "b"], "pos", ascending=[False, True], num_partitions=num_partitions
    )
    expected = sorted(rows, key=lambda r: (-r[0], r[1]))
    assert {(r.a, r.b): r.pos for r in got.collect()} == {r: p for p, r in enumerate(expected)}


@pytest.mark.parametrize("num_partitions", PARTITION_COUNTS)
def test_sorted_positions_with_ties_are_sql_rank(spark, num_partitions):
    # Few distinct values, so tie groups run over range boundaries (some over several).
    rng = random.Random(5)
    rows = [(f"L{i:04d}", rng.choice([0.0, 0.0, 0.0, 0.0, 1.0, 2.5, 2.5, 9.0])) for i in range(600)]
    df = spark.createDataFrame(rows, "listing_id string, p double").repartition(3)
    got = sorted_positions(
        df,
        ["p", "listing_id"],
        "rank0",
        ascending=[False, True],
        ties=["p"],
        num_partitions=num_partitions,
    )
    sql_rank = {lst: 1 + sum(q > p for _, q in rows) for lst, p in rows}
    assert {r.listing_id: r.rank0 + 1 for r in got.collect()} == sql_rank


def test_sorted_positions_are_exact_at_a_size_spread_over_many_partitions(spark):
    # 30,000 ids over 8 input partitions and 16 buckets: every id gets its sorted position.
    ids = [f"u{(i * 7919) % 30_000:05d}x" for i in range(30_000)]
    df = ids_df(spark, ids).repartition(8)
    got = sorted_positions(df, ["id"], num_partitions=16).toPandas()
    assert sorted(got["position"]) == list(range(30_000))
    expected = {v: i for i, v in enumerate(sorted(ids))}
    assert all(expected[r.id] == r.position for r in got.itertuples())
    with pytest.raises(ValueError, match="prefix"):
        sorted_positions(ids_df(spark, ["a"]), ["id"], ties=["other"])


# ---- popularity ranks and random neighbours -----------------------------------------------


@pytest.mark.parametrize("partitions", PARTITION_COUNTS)
def test_popularity_ranks_are_sql_rank_with_absent_listings_last(spark, partitions):
    popularity = {"A": 5.0, "B": 3.0, "C": 3.0, "D": 1.0, "E": 3.0, "X": 9.0}  # X is inactive
    active = ["A", "B", "C", "D", "E", "F", "G", "A"]  # F, G never interacted with
    pop = spark.createDataFrame(list(popularity.items()), "listing_id string, popularity double")
    act = spark.createDataFrame([(a,) for a in active], "listing_id string").repartition(3)
    with shuffle_partitions(spark, partitions):
        got = dict(map(tuple, evaluation.popularity_ranks(pop, act).collect()))
    assert got == {"A": 1, "B": 2, "C": 2, "E": 2, "D": 5, "F": 6, "G": 6}


def listing_features_df(spark, n, inactive=()):
    rows = [(i, f"L{i:03d}", i not in inactive) for i in range(n)]
    return spark.createDataFrame(rows, "listing_idx int, listing_id string, is_active boolean")


def neighbour_lists(df):
    lists = {}
    for r in df.orderBy("listing_id", "rank").collect():
        lists.setdefault(r.listing_id, []).append(r.neighbour_id)
    return lists


def test_random_neighbours_keep_their_contract(spark):
    catalogue = listing_features_df(spark, 60, inactive={5, 17}).repartition(4)
    active = {f"L{i:03d}" for i in range(60)} - {"L005", "L017"}
    runs = []
    for partitions in (1, 3, 8):
        with shuffle_partitions(spark, partitions):
            runs.append(neighbour_lists(baselines.random_neighbours(catalogue, k=4, seed=5)))
    first = runs[0]
    assert set(first) == active
    for listing, neighbours in first.items():
        assert len(neighbours) == len(set(neighbours)) == 4
        assert listing not in neighbours and set(neighbours) <= active
    # The same seed gives the same lists, whatever the partitioning; another seed does not.
    assert all(run == first for run in runs)
    assert (
        neighbour_lists(baselines.random_neighbours(catalogue.repartition(2), k=4, seed=5)) == first
    )
    assert neighbour_lists(baselines.random_neighbours(catalogue, k=4, seed=6)) != first


def test_random_neighbours_of_a_tiny_catalogue(spark):
    got = neighbour_lists(baselines.random_neighbours(listing_features_df(spark, 3), k=5))
    assert {k: sorted(v) for k, v in got.items()} == {
        "L000": ["L001", "L002"],
        "L001": ["L000", "L002"],
        "L002": ["L000", "L001"],
    }
    assert baselines.random_neighbours(listing_features_df(spark, 1), k=5).count() == 0


# ---- plans: nothing moves all rows into one partition --------------------------------------


def plan_nodes(df):
    """Every physical operator of ``df``'s plan, through adaptive plans, stages and reuses."""
    found, stack = [], [df._jdf.queryExecution().executedPlan()]
    while stack:
        node = stack.pop()
        found.append(node)
        name = node.getClass().getSimpleName()
        if name == "AdaptiveSparkPlanExec":
            stack.append(node.executedPlan())
        elif name.endswith("QueryStageExec"):
            stack.append(node.plan())
        elif name == "ReusedExchangeExec":
            stack.append(node.child())
        for seq in (node.children(), node.subqueries()):
            stack.extend(seq.apply(i) for i in range(seq.size()))
    return found


def _only_partial_aggregates(node) -> bool:
    """A global aggregate's exchange: one pre-aggregated row per partition crosses it."""
    while node.getClass().getSimpleName() in ("WholeStageCodegenExec", "InputAdapter"):
        node = node.child()
    if "Aggregate" not in node.getClass().getSimpleName():
        return False
    aggregates = node.aggregateExpressions()
    return node.groupingExpressions().isEmpty() and all(
        aggregates.apply(i).mode().toString() == "Partial" for i in range(aggregates.size())
    )


def single_partition_steps(df) -> list[str]:
    """Operators that put all rows in one partition: unpartitioned windows, and exchanges to
    a single partition other than a global aggregate's (which only moves partial results)."""
    steps = []
    for node in plan_nodes(df):
        name = node.getClass().getSimpleName()
        if "Window" in name and node.partitionSpec().isEmpty():
            steps.append(f"{name} without partitionBy")
        if name == "ShuffleExchangeExec":
            partitioning = node.outputPartitioning().getClass().getSimpleName()
            if partitioning.startswith("SinglePartition") and not _only_partial_aggregates(
                node.child()
            ):
                steps.append(f"Exchange SinglePartition over {node.child().nodeName()}")
    return steps


@contextmanager
def captured_spark_log(spark):
    """What Spark's JVM logs meanwhile (log4j2, at the session's level), as one string."""
    jvm = spark._jvm
    core = jvm.org.apache.logging.log4j.core
    context = jvm.org.apache.logging.log4j.LogManager.getContext(False)
    root = context.getConfiguration().getRootLogger()
    writer = jvm.java.io.StringWriter()
    layout = core.layout.PatternLayout.newBuilder().withPattern("%c{1}: %m%n").build()
    appender = core.appender.WriterAppender.createAppender(
        layout, None, writer, "test-no-single-partition", False, True
    )
    appender.start()
    root.addAppender(appender, None, None)
    context.updateLoggers()
    log = []
    try:
        yield log
    finally:
        root.removeAppender("test-no-single-partition")
        context.updateLoggers()
        appender.stop()
        log.append(writer.toString())


def test_the_checks_see_a_global_window(spark):
    df = ids_df(spark, ["b", "a", "c"])
    with captured_spark_log(spark) as log:
        numbered = df.select("id", F.row_number().over(Window.orderBy("id")).alias("n"))
        steps = single_partition_steps(numbered)
    assert "WindowExec without partitionBy" in steps
    assert any("Exchange SinglePartition" in s for s in steps)
    assert WINDOW_WARNING in log[0]
    assert single_partition_steps(df.agg(F.count(F.lit(1)))) == []  # partial counts only
    assert single_partition_steps(df.repartition(1)) != []


def marketplace(spark, *, listings_count=40, users=30, seed=1):
    rng = random.Random(seed)
    catalogue = [
        {
            "listing_id": f"L{i:03d}",
            "make": rng.choice(["VW", "BMW", "Audi"]),
            "model": "m",
            "body_type": "hatchback",
            "fuel_type": "petrol",
            "transmission": "manual",
            "colour": "black",
            "year": 2015.0 + i % 8,
            "mileage_km": 10_000.0 * (1 + i % 9),
            "price_eur": 5_000.0 + 250 * i,
            "power_kw": 60.0 + i,
            "latitude": 52.0 + i / 100,
            "longitude": 13.0 + i / 100,
            "city": "Berlin",
            "is_active": i % 7 != 0,
            "created_date": dt.date(2026, 1, 1),
        }
        for i in range(listings_count)
    ]
    events = []
    for n in range(600):
        day = RUN_DATE - dt.timedelta(days=rng.randrange(20))
        when = dt.datetime.combine(day, dt.time(rng.randrange(24)))
        events.append(
            Row(
                user_id=f"u{rng.randrange(users):03d}",
                listing_id=f"L{rng.randrange(listings_count):03d}",
                event_type=rng.choice(["view", "view", "save", "contact"]),
                event_ts=when,
                session_id=f"s{n}",
                source="web",
                event_date=day,
            )
        )
    snapshot = spark.createDataFrame(catalogue, listings_table_spec(FEATURE_SPEC).schema)
    snapshot = snapshot.repartition(3)
    return spark.createDataFrame(events, interactions.SCHEMA).repartition(4), snapshot


@pytest.mark.parametrize("broadcast_listings", [True, False])
def test_no_plan_moves_all_rows_into_one_partition(spark, broadcast_listings):
    events, snapshot = marketplace(spark)
    with captured_spark_log(spark) as log:
        tagged = shards.tag_drop_reasons(
            events,
            snapshot,
            run_date=RUN_DATE,
            lookback_days=30,
            event_types=("view", "save", "contact"),
            max_events_per_user_day=300,
            broadcast_listings=broadcast_listings,
        )
        kept = tagged.where(F.col("drop_reason").isNull()).drop("drop_reason", "copies")
        train, holdout = shards.split_holdout(kept, run_date=RUN_DATE, holdout_days=2)
        weighted = shards.weight_interactions(
            train,
            run_date=RUN_DATE,
            event_weights={"view": 1.0, "save": 3.0, "contact": 5.0},
            half_life_days=21.0,
        )
        listing_vocab = shards.extend_vocabulary(snapshot.select(F.col("listing_id").alias("id")))
        previous_users = events.select(F.col("user_id").alias("id")).where(F.col("id") < "u010")
        user_vocab = shards.extend_vocabulary(
            train.select(F.col("user_id").alias("id")),
            shards.extend_vocabulary(previous_users),
        )
        examples = shards.assemble_training_examples(
            weighted,
            user_vocab,
            listing_vocab,
            broadcast_listings=broadcast_listings,
            num_files=3,
            seed=7,
        )
        encoding = features.fit_feature_encoding(snapshot, FEATURE_SPEC)
        encoded = features.encode_listing_features(snapshot, listing_vocab, encoding)
        listing_features = shards.mark_listings_with_interactions(encoded, examples)
        popularity = baselines.listing_popularity(examples, listing_features)
        active = listing_features.where(F.col("is_active")).select("listing_id")
        transforms = {
            "tag_drop_reasons": tagged,
            "holdout": holdout,
            "weight_interactions": weighted,
            "listing_vocabulary": listing_vocab,
            "user_vocabulary": user_vocab,
            "assemble_training_examples": examples,
            "encode_listing_features": encoded,
            "mark_listings_with_interactions": listing_features,
            "popularity_ranks": evaluation.popularity_ranks(popularity, active),
            "random_neighbours": baselines.random_neighbours(listing_features, k=3, seed=7),
        }
        steps = {name: single_partition_steps(df) for name, df in transforms.items()}
    assert {name: s for name, s in steps.items() if s} == {}
    assert WINDOW_WARNING not in log[0]
    if not broadcast_listings:
        return
    # And they run: the executed (adaptive, final) plans hold no such step either.
    for name in ("user_vocabulary", "popularity_ranks", "random_neighbours"):
        assert transforms[name].collect()
        executed = transforms[name]._jdf.queryExecution().executedPlan().toString()
        assert "isFinalPlan=true" in executed
        assert single_partition_steps(transforms[name]) == [], name
