import datetime as dt
import json
import os

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs import generate_sample_data as job
from lib import car_marketplace, feature_spec
from lib.sample_data import MarketplaceSize, generate_marketplace, write_marketplace
from lib.sample_world import SEGMENTS, haversine_km
from lib.schema_check import check_matches, conform
from schemas import interactions

END = dt.date(2025, 3, 1)
TINY = MarketplaceSize(n_listings=300, n_users=200, n_events=5_000, days=14)
WINDOW_START = dt.datetime(2025, 2, 15, tzinfo=dt.UTC)
WINDOW_END = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def market():
    return generate_marketplace(TINY, END, seed=11)


@pytest.fixture(scope="module")
def frames(market):
    """pandas views of the tables, with bots known and joined ground truth."""
    lst = market.listings.to_pandas()
    ev = market.interactions.to_pandas()
    users = market.user_truth.to_pandas()
    truth = market.listing_truth.to_pandas()
    return lst, ev, users, truth


def _types(df):
    return [(f.name, f.dataType) for f in df.schema.fields]


def test_tables_read_back_with_spark_match_the_specs(spark, market, tmp_path):
    paths = write_marketplace(market, str(tmp_path))

    raw_listings = spark.read.parquet(paths["listings"])
    raw_events = spark.read.parquet(paths["interactions"])
    # The listings carry the car marketplace's own columns and types, the events the contract's
    # (event_date from the path); both read under their contracts, the spec written beside them.
    assert pq.read_schema(paths["listings"] + "/part-00000.parquet").equals(
        car_marketplace.LISTINGS_SCHEMA
    )
    assert _types(raw_events) == _types_of(interactions.SPEC)
    assert feature_spec.read(paths["feature_spec"]) == car_marketplace.FEATURE_SPEC
    contract = feature_spec.listings_table_spec(car_marketplace.FEATURE_SPEC)
    assert set(contract.schema.fieldNames()) <= set(raw_listings.columns)
    check_matches(conform(raw_listings, contract), contract)
    check_matches(conform(raw_events, interactions.SPEC), interactions.SPEC)
    # Every contract column but the numeric features (ints widen to double) reads as written.
    numeric = {f.column for f in car_marketplace.FEATURE_SPEC.of_kind("numeric")}
    written = dict(_types(raw_listings))
    assert {n: t for n, t in _types_of(contract) if n not in numeric} == {
        n: written[n] for n in contract.schema.fieldNames() if n not in numeric
    }

    assert raw_listings.count() == market.listings.num_rows == TINY.n_listings
    assert raw_events.count() == market.interactions.num_rows
    assert pq.read_table(paths["truth_users"]).equals(market.user_truth)
    assert pq.read_table(paths["truth_listings"]).equals(market.listing_truth)
    partitions = sorted(os.listdir(paths["interactions"]))
    assert partitions[0] == "event_date=2025-02-15"
    assert partitions[-1] == "event_date=2025-02-28"


def _types_of(spec):
    return [(f.name, f.dataType) for f in spec.schema.fields]


def test_write_replaces_earlier_output(tmp_path):
    first = generate_marketplace(MarketplaceSize(50, 40, 800, days=3), dt.date(2024, 6, 1))
    write_marketplace(first, str(tmp_path))
    (tmp_path / "keep.txt").write_text("not ours")
    second = generate_marketplace(MarketplaceSize(60, 40, 900, days=2), END)
    paths = write_marketplace(second, str(tmp_path))

    assert sorted(os.listdir(paths["interactions"])) == [
        "event_date=2025-02-27",
        "event_date=2025-02-28",
    ]
    assert pq.read_table(paths["listings"]).num_rows == 60
    assert ds.dataset(paths["interactions"]).count_rows() == second.interactions.num_rows
    assert (tmp_path / "keep.txt").exists()


def test_same_seed_gives_identical_tables_and_another_seed_does_not(market):
    again = generate_marketplace(TINY, END, seed=11)
    other = generate_marketplace(TINY, END, seed=12)
    for name in ("listings", "interactions", "user_truth", "listing_truth"):
        assert getattr(again, name).equals(getattr(market, name)), name
    assert not other.listings.equals(market.listings)
    assert not other.interactions.equals(market.interactions)


def test_event_count_and_mix(frames):
    _, ev, _, _ = frames
    assert 0.9 * TINY.n_events <= len(ev) <= 1.1 * TINY.n_events
    counts = ev.event_type.value_counts()
    assert set(counts.index) == {"view", "save", "contact"}
    assert 0.05 < counts["save"] / counts["view"] < 0.15
    assert 0.01 < counts["contact"] / counts["view"] < 0.06
    assert set(ev.source) == {"web", "app"}
    assert ev.session_id.notna().all()
    sessions = ev.groupby("session_id")
    assert (sessions.user_id.nunique() == 1).all() and (sessions.source.nunique() == 1).all()


def test_saves_and_contacts_follow_a_view_of_the_same_listing_in_the_session(frames):
    _, ev, _, _ = frames
    views = ev[ev.event_type == "view"]
    key = ["user_id", "listing_id", "session_id"]
    first_view = views.groupby(key).event_ts.min().rename("first_view").reset_index()
    acts = ev[ev.event_type != "view"].merge(first_view, on=key, how="left")
    assert acts.first_view.notna().all()
    assert (acts.event_ts > acts.first_view).all()


def test_events_lie_in_the_window_and_event_date_is_the_utc_date(market):
    ev = market.interactions
    assert pc.min(ev["event_ts"]).as_py() >= WINDOW_START
    assert pc.max(ev["event_ts"]).as_py() < WINDOW_END
    dates = pc.cast(ev["event_ts"], "date32")
    assert pc.all(pc.equal(dates, ev["event_date"])).as_py()


def test_listings_look_like_a_german_used_car_market(frames):
    lst, _, _, truth = frames
    assert lst.listing_id.is_unique
    assert lst.latitude.between(47.0, 55.5).all() and lst.longitude.between(5.5, 15.5).all()
    assert lst.year.between(2005, 2025).all()
    assert (lst.mileage_km > 0).all() and (lst.price_eur >= 400).all() and (lst.power_kw > 0).all()
    assert (lst.created_date < END).all()
    assert 0.9 < lst.is_active.mean() < 0.99
    assert 0.1 < lst.dealer_id.isna().mean() < 0.4
    assert lst.city.value_counts().index[0] == "Berlin"
    assert (lst.dropna(subset=["dealer_id"]).groupby("dealer_id").city.nunique() == 1).all()
    assert set(truth.segment) <= set(SEGMENTS)
    # Older cars have more kilometres and cost less.
    old, new = lst[lst.year <= 2015], lst[lst.year >= 2022]
    assert old.mileage_km.median() > 3 * new.mileage_km.median()
    assert old.price_eur.median() < 0.6 * new.price_eur.median()


def test_cold_listings_are_new_and_have_events_only_since_they_went_online(frames):
    lst, ev, _, truth = frames
    cold = set(truth.listing_id[truth.is_cold])
    assert len(cold) == round(0.05 * lst.is_active.sum())
    cold_rows = lst[lst.listing_id.isin(cold)]
    assert cold_rows.is_active.all()
    # Online during the last four days: the default holdout (2) and validation (2) days.
    assert (cold_rows.created_date >= END - dt.timedelta(days=4)).all()
    assert not ev[ev.listing_id.isin(cold)].event_date.lt(END - dt.timedelta(days=4)).any()
    # Every listing, new or not, went online before its first event.
    first = ev.groupby("listing_id").event_date.min()
    created = lst.set_index("listing_id").created_date.reindex(first.index).dropna()
    assert (created <= first.reindex(created.index)).all()


def test_new_listings_appear_in_the_last_days_and_collect_views():
    # Big enough that most (city, segment) buckets have older listings whose viewers see the
    # new ones (TINY has about one listing per bucket).
    market = generate_marketplace(MarketplaceSize(2000, 1000, 30_000, days=14), END, seed=11)
    lst, ev = market.listings.to_pandas(), market.interactions.to_pandas()
    truth = market.listing_truth.to_pandas()
    new = truth.listing_id[truth.is_cold]
    first = ev[ev.listing_id.isin(new)].groupby("listing_id").event_date.min()
    holdout = END - dt.timedelta(days=2)
    # Most get views; some first in the holdout (cold there), some in the days just before.
    assert len(first) >= 0.6 * len(new)
    assert (first >= holdout).sum() >= 3 and (first < holdout).sum() >= 3
    # As on a real marketplace a new car draws views fast: more per day online than the rest.
    last_days = ev[ev.event_date >= END - dt.timedelta(days=4)]
    created = lst.set_index("listing_id").created_date
    online_days = (END - created[new]).map(lambda d: d.days)
    per_day_new = last_days.listing_id.isin(new).sum() / online_days.sum()
    older = lst.listing_id[~lst.listing_id.isin(new)]
    per_day_old = last_days.listing_id.isin(older).sum() / (4 * len(older))
    assert per_day_new > 1.5 * per_day_old


def test_cold_share_zero_means_no_cold_listings():
    small = generate_marketplace(MarketplaceSize(80, 50, 1_000, days=5), END, cold_share=0.0)
    assert not pc.any(small.listing_truth["is_cold"]).as_py()


def test_noise_is_present(frames):
    lst, ev, users, _ = frames
    duplicates = ev.duplicated().sum()
    assert 0.005 * len(ev) < duplicates < 0.02 * len(ev)
    unknown = ~ev.listing_id.isin(lst.listing_id)
    assert 1 <= unknown.sum() <= 0.005 * len(ev)

    bots = set(users.user_id[users.is_bot])
    assert len(bots) >= 1
    per_day = ev.groupby(["user_id", "event_date"]).size()
    is_bot = per_day.index.get_level_values("user_id").isin(bots)
    assert per_day[is_bot].min() >= 300
    assert per_day[~is_bot].max() < 150
    # Bots view at random: their views spread over many listings and cities.
    bot_views = ev[ev.user_id.isin(bots)].merge(lst, on="listing_id")
    assert bot_views.city.nunique() >= 20


def test_views_follow_the_users_hidden_preferences(frames):
    lst, ev, users, truth = frames
    humans = users[~users.is_bot]
    views = (
        ev[ev.event_type == "view"]
        .merge(humans, on="user_id")
        .merge(lst, on="listing_id")
        .merge(truth, on="listing_id")
    )
    assert len(views) > 2_000

    seen = haversine_km(views.home_lat, views.home_lon, views.latitude, views.longitude)
    anywhere = haversine_km(
        humans.home_lat.to_numpy()[:, None],
        humans.home_lon.to_numpy()[:, None],
        lst.latitude.to_numpy()[None, :],
        lst.longitude.to_numpy()[None, :],
    )
    assert np.median(seen) < 0.3 * np.median(anywhere)
    assert np.mean(seen <= views.radius_km) > 0.5

    in_segments = np.array(
        [s in segs for s, segs in zip(views.segment, views.segments, strict=True)]
    )
    share = truth.segment.value_counts(normalize=True)
    base = np.array([share.reindex(list(segs)).fillna(0).sum() for segs in views.segments])
    assert in_segments.mean() > 2 * base.mean()
    assert in_segments.mean() > base.mean() + 0.35

    # In their first segment, people look at cars around their budget.
    own = views[views.segment == views.segments.str[0]]
    assert np.corrcoef(np.log(own.price_eur), np.log(own.budget_eur))[0, 1] > 0.3


def test_user_truth_is_complete(frames):
    _, _, users, _ = frames
    assert users.user_id.is_unique and len(users) == TINY.n_users
    assert users.radius_km.between(10, 300).all()
    assert users.segments.map(len).between(1, 2).all()
    assert users.segments.map(lambda s: len(set(s)) == len(s)).all()
    assert (users.budget_eur > 0).all()


@pytest.mark.parametrize(
    ("size", "cold_share"),
    [
        (MarketplaceSize(0, 10, 100, 5), 0.05),
        (MarketplaceSize(10, 10, 100, 0), 0.05),
        (MarketplaceSize(10, 0, 100, 5), 0.05),
        (MarketplaceSize(10, 10, 100, 5), 1.0),
        (MarketplaceSize(10, 10, 100, 5), -0.1),
    ],
)
def test_invalid_arguments_are_rejected(size, cold_share):
    with pytest.raises(ValueError):
        generate_marketplace(size, END, cold_share=cold_share)


def test_job_writes_the_tables_and_prints_stats(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--listings", "120", "--users", "80", "--events", "2000"]
    job.main([*argv, "--days", "4", "--end-date", "2025-03-01", "--seed", "3"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["listings"] == 120 and stats["users"] == 80
    assert stats["end_date"] == "2025-03-01"
    assert stats["views"] + stats["saves"] + stats["contacts"] == stats["events"]
    assert os.path.isfile(stats["paths"]["truth_users"])
    assert len(os.listdir(stats["paths"]["interactions"])) == 4


def test_job_defaults():
    args = job.parse_args(["--out", "/tmp/x"])
    assert args == job.GenerateArgs(out="/tmp/x")
    assert job.parse_args(["--out", "o", "--end-date", "2024-01-31"]).end_date == dt.date(
        2024, 1, 31
    )
