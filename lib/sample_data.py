"""A seeded synthetic used-car marketplace in Germany: listings, interactions and ground truth.

It is the embedded default input of the pipeline and the test fixture for everything downstream,
so it must carry a learnable signal: users view cars near home (relative to their search radius),
in their preferred segments and near their budget. The evaluation needs to know that signal, so
the hidden user preferences and listing segments are returned as ground-truth tables.

Everything is vectorised with numpy (no per-event Python loops) and drawn from one seed: the
same seed and size give identical tables. Noise the cleaning step must handle is injected on
purpose: bot users, exact duplicate events and events for listing ids missing from the snapshot.

New listings keep coming, as on a real marketplace: ``cold_share`` of the active listings go
online during the last ``_NEW_LISTING_DAYS`` days of the window (``lib.sample_world``; the
pipeline's default holdout and validation days) and collect views from then on, more than
older listings of their city and segment. Those that go online in the holdout are the cold
pairs an evaluation scores.

This module is the entry point and the output: ``generate_marketplace`` runs the draws and
turns them into Arrow tables (listings, interactions, truth) and ``write_marketplace`` writes
them. The draws live beside it, one idea each: ``lib.sample_world`` (cities, car models, the
listings and the users with their hidden preferences) and ``lib.sample_events`` (what the
users do, the bots and the injected noise).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lib import car_marketplace, feature_spec
from lib.sample_events import (
    DUPLICATE_SHARE,
    UNKNOWN_LISTING_SHARE,
    US_PER_DAY,
    add_noise,
    concat,
    draw_bot_events,
    draw_human_events,
    unknown_pool,
)
from lib.sample_world import (
    BODY_TYPES,
    CITIES,
    COLOURS,
    FUEL_TYPES,
    MODELS,
    SEGMENTS,
    TRANSMISSIONS,
    draw_listings,
    draw_users,
    online_days,
)
from lib.schema_check import arrow_schema
from schemas import interactions as interactions_schema

USER_TRUTH_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("home_lat", pa.float64()),
        pa.field("home_lon", pa.float64()),
        pa.field("home_city", pa.string()),
        pa.field("radius_km", pa.float64()),
        pa.field("segments", pa.list_(pa.string())),
        pa.field("budget_eur", pa.float64()),
        pa.field("fuel_preference", pa.string()),
        pa.field("is_bot", pa.bool_(), nullable=False),
    ]
)
LISTING_TRUTH_SCHEMA = pa.schema(
    [
        pa.field("listing_id", pa.string(), nullable=False),
        pa.field("segment", pa.string()),
        # New: online only in the last _NEW_LISTING_DAYS days (lib.sample_world), no event
        # before its created_date.
        pa.field("is_cold", pa.bool_(), nullable=False),
    ]
)


# --- public API --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarketplaceSize:
    """How big a marketplace to generate; ``n_events`` is met within a few percent."""

    n_listings: int = 20_000
    n_users: int = 50_000
    n_events: int = 2_000_000
    days: int = 60


@dataclass(frozen=True)
class Marketplace:
    """Generated tables (pyarrow) plus counts of the noise injected on purpose."""

    listings: pa.Table
    interactions: pa.Table
    user_truth: pa.Table
    listing_truth: pa.Table
    stats: dict[str, int] = field(default_factory=dict)


def generate_marketplace(
    size: MarketplaceSize, end_date: dt.date, seed: int = 7, cold_share: float = 0.05
) -> Marketplace:
    """Generate listings, interactions in the ``size.days`` days before ``end_date`` (exclusive)
    and the ground truth behind them; the same arguments always give identical tables."""
    _check_size(size, cold_share)
    rng_listings, rng_users, rng_events, rng_noise = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    window_start = dt.datetime.combine(end_date - dt.timedelta(days=size.days), dt.time())
    start_us = (window_start - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)

    lst = draw_listings(rng_listings, size.n_listings, end_date, cold_share)
    lst["online_day"] = online_days(rng_listings, lst["cold"], size.days)
    usr = draw_users(rng_users, size.n_users, lst)
    bots = draw_bot_events(rng_noise, size, lst, usr, start_us)
    noise = (1 + UNKNOWN_LISTING_SHARE) * (1 + DUPLICATE_SHARE)
    human_target = size.n_events / noise - len(bots["ts"])
    ev = draw_human_events(rng_events, size, lst, usr, start_us, human_target)
    bots["session"] += ev["session"].max() + 1
    ev, stats = add_noise(rng_noise, size.n_listings, concat(ev, bots))
    stats["bot_events"] = len(bots["ts"])
    order = np.argsort(ev["ts"], kind="stable")
    ev = {k: v[order] for k, v in ev.items()}

    created = _created_days(rng_listings, lst, ev, end_date, size.days)
    width = max(7, len(str(2 * size.n_listings)))
    listing_ids = _ids("L", size.n_listings + unknown_pool(size.n_listings), width)
    user_ids = _ids("U", size.n_users, max(7, len(str(size.n_users))))
    views, saves, contacts = np.bincount(ev["type"], minlength=3).tolist()
    stats |= {
        "listings": size.n_listings,
        "active_listings": int(lst["active"].sum()),
        "cold_listings": int(lst["cold"].sum()),
        "cold_listing_events": int(np.isin(ev["listing"], np.flatnonzero(lst["cold"])).sum()),
        "users": size.n_users,
        "bot_users": int(usr["is_bot"].sum()),
        "events": len(ev["ts"]),
        "views": views,
        "saves": saves,
        "contacts": contacts,
        "sessions": int(ev["session"].max()) + 1,
    }
    return Marketplace(
        listings=_listings_table(lst, listing_ids, created),
        interactions=_interactions_table(ev, user_ids, listing_ids),
        user_truth=_user_truth_table(usr, user_ids),
        listing_truth=_listing_truth_table(lst, listing_ids),
        stats=stats,
    )


def write_marketplace(market: Marketplace, out_dir: str) -> dict[str, str]:
    """Write the tables under ``out_dir`` (replacing earlier output); return their paths.

    ``listings/`` is one Parquet file, ``interactions/`` is hive-partitioned by ``event_date``,
    ``truth/users.parquet`` and ``truth/listings.parquet`` hold the ground truth,
    ``feature_spec.json`` the features a car marketplace declares.
    """
    paths = {
        "feature_spec": os.path.join(out_dir, "feature_spec.json"),
        "listings": os.path.join(out_dir, "listings"),
        "interactions": os.path.join(out_dir, "interactions"),
        "truth_users": os.path.join(out_dir, "truth", "users.parquet"),
        "truth_listings": os.path.join(out_dir, "truth", "listings.parquet"),
    }
    for sub in ("listings", "interactions", "truth"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    os.makedirs(paths["listings"])
    os.makedirs(os.path.dirname(paths["truth_users"]))
    pq.write_table(market.listings, os.path.join(paths["listings"], "part-00000.parquet"))
    feature_spec.write(car_marketplace.FEATURE_SPEC, paths["feature_spec"])
    date_field = market.interactions.schema.field("event_date")
    ds.write_dataset(
        market.interactions,
        paths["interactions"],
        format="parquet",
        partitioning=ds.partitioning(pa.schema([date_field]), flavor="hive"),
        basename_template="part-{i}.parquet",
        existing_data_behavior="overwrite_or_ignore",
        max_partitions=100_000,
        preserve_order=True,
    )
    pq.write_table(market.user_truth, paths["truth_users"])
    pq.write_table(market.listing_truth, paths["truth_listings"])
    return paths


def _check_size(size: MarketplaceSize, cold_share: float) -> None:
    if size.n_listings < 1 or size.n_users < 1 or size.n_events < 1 or size.days < 1:
        raise ValueError(f"every size must be positive: {size}")
    if not 0.0 <= cold_share < 1.0:
        raise ValueError(f"cold_share must be in [0, 1): {cold_share}")


def _created_days(rng, lst, ev, end_date: dt.date, days: int) -> np.ndarray:
    """Days since the epoch each listing went online: before its first event, if it had any;
    a new listing's is its online day, which no event of it precedes."""
    n = len(lst["segment"])
    end_day = (end_date - dt.date(1970, 1, 1)).days
    known = ev["listing"] < n
    first = np.full(n, end_day, dtype=np.int64)
    np.minimum.at(first, ev["listing"][known], ev["ts"][known] // US_PER_DAY)
    lead = np.minimum(rng.exponential(7, n), 45).astype(np.int64)
    unseen = end_day - 1 - rng.integers(0, days + 60, n)
    created = np.where(first < end_day, first - lead, unseen)
    fresh = end_day - days + lst["online_day"]
    return np.where(lst["cold"], fresh, created).astype(np.int32)


# --- arrow tables ------------------------------------------------------------------------------


def _ids(prefix: str, n: int, width: int) -> pa.Array:
    digits = pc.cast(pa.array(np.arange(1, n + 1, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(digits, width, "0"), "")


def _names(names, codes: np.ndarray) -> pa.Array:
    codes = np.asarray(codes)
    return pc.take(pa.array(list(names), pa.string()), pa.array(codes, mask=codes < 0))


def _listings_table(lst, listing_ids: pa.Array, created: np.ndarray) -> pa.Table:
    n = len(lst["segment"])
    n_dealers = int(lst["dealer"].max()) + 1 if (lst["dealer"] >= 0).any() else 0
    dealer_ids = _ids("D", max(n_dealers, 1), max(5, len(str(n_dealers))))
    columns = {
        "listing_id": listing_ids.slice(0, n),
        "make": _names(MODELS["make"], lst["model"]),
        "model": _names(MODELS["model"], lst["model"]),
        "body_type": _names(BODY_TYPES, lst["body"]),
        "fuel_type": _names(FUEL_TYPES, lst["fuel"]),
        "transmission": _names(TRANSMISSIONS, lst["transmission"]),
        "colour": _names(COLOURS, lst["colour"]),
        "year": pa.array(lst["year"], pa.int32()),
        "mileage_km": pa.array(lst["mileage"], pa.int32()),
        "price_eur": pa.array(lst["price"], pa.float64()),
        "power_kw": pa.array(lst["power"], pa.int32()),
        "latitude": pa.array(lst["lat"], pa.float64()),
        "longitude": pa.array(lst["lon"], pa.float64()),
        "city": _names([c[0] for c in CITIES], lst["city"]),
        "dealer_id": pc.take(dealer_ids, pa.array(lst["dealer"], mask=lst["dealer"] < 0)),
        "is_active": pa.array(lst["active"], pa.bool_()),
        "created_date": pa.array(created, pa.int32()).cast(pa.date32()),
    }
    schema = car_marketplace.LISTINGS_SCHEMA
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _interactions_table(ev, user_ids: pa.Array, listing_ids: pa.Array) -> pa.Table:
    n_sessions = int(ev["session"].max()) + 1 if len(ev["session"]) else 1
    session_ids = _ids("S", n_sessions, max(9, len(str(n_sessions))))
    day = (ev["ts"] // US_PER_DAY).astype(np.int32)
    columns = {
        "user_id": pc.take(user_ids, pa.array(ev["user"])),
        "listing_id": pc.take(listing_ids, pa.array(ev["listing"])),
        "event_type": _names(interactions_schema.EVENT_TYPES, ev["type"]),
        "event_ts": pa.array(ev["ts"], pa.timestamp("us", tz="UTC")),
        "session_id": pc.take(session_ids, pa.array(ev["session"])),
        "source": _names(("web", "app"), ev["source"]),
        "event_date": pa.array(day, pa.int32()).cast(pa.date32()),
    }
    schema = arrow_schema(interactions_schema.SPEC.schema)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _user_truth_table(usr, user_ids: pa.Array) -> pa.Table:
    has2 = usr["seg2"] >= 0
    offsets = np.concatenate([[0], np.cumsum(1 + has2)]).astype(np.int32)
    values = np.empty(offsets[-1], dtype=np.int64)
    values[offsets[:-1]] = usr["seg1"]
    values[offsets[:-1][has2] + 1] = usr["seg2"][has2]
    segments = pa.ListArray.from_arrays(pa.array(offsets), _names(SEGMENTS, values))
    columns = {
        "user_id": user_ids,
        "home_lat": pa.array(usr["lat"]),
        "home_lon": pa.array(usr["lon"]),
        "home_city": _names([c[0] for c in CITIES], usr["city"]),
        "radius_km": pa.array(usr["radius"]),
        "segments": segments,
        "budget_eur": pa.array(usr["budget"]),
        "fuel_preference": _names(FUEL_TYPES, usr["fuel_pref"]),
        "is_bot": pa.array(usr["is_bot"]),
    }
    return pa.Table.from_arrays(
        [columns[f.name] for f in USER_TRUTH_SCHEMA], schema=USER_TRUTH_SCHEMA
    )


def _listing_truth_table(lst, listing_ids: pa.Array) -> pa.Table:
    n = len(lst["segment"])
    columns = [listing_ids.slice(0, n), _names(SEGMENTS, lst["segment"]), pa.array(lst["cold"])]
    return pa.Table.from_arrays(columns, schema=LISTING_TRUTH_SCHEMA)
