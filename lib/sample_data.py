"""A seeded synthetic used-car marketplace in Germany: listings, interactions and ground truth.

It is the embedded default input of the pipeline and the test fixture for everything downstream,
so it must carry a learnable signal: users view cars near home (relative to their search radius),
in their preferred segments and near their budget. The evaluation needs to know that signal, so
the hidden user preferences and listing segments are returned as ground-truth tables.

Everything is vectorised with numpy (no per-event Python loops) and drawn from one seed: the
same seed and size give identical tables. Noise the cleaning step must handle is injected on
purpose: bot users, exact duplicate events and events for listing ids missing from the snapshot.

New listings keep coming, as on a real marketplace: ``cold_share`` of the active listings go
online during the last ``_NEW_LISTING_DAYS`` days of the window (the pipeline's default holdout
and validation days) and collect views from then on, more than older listings of their city
and segment. Those that go online in the holdout are the cold pairs an evaluation scores.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lib import car_marketplace, feature_spec
from lib.schema_check import arrow_schema
from schemas import interactions as interactions_schema

# --- the world ---------------------------------------------------------------------------------

# name, latitude, longitude, population in thousands
CITIES: tuple[tuple[str, float, float, int], ...] = (
    ("Berlin", 52.5200, 13.4050, 3755),
    ("Hamburg", 53.5511, 9.9937, 1892),
    ("München", 48.1351, 11.5820, 1512),
    ("Köln", 50.9375, 6.9603, 1084),
    ("Frankfurt am Main", 50.1109, 8.6821, 773),
    ("Stuttgart", 48.7758, 9.1829, 633),
    ("Düsseldorf", 51.2277, 6.7735, 629),
    ("Leipzig", 51.3397, 12.3731, 616),
    ("Dortmund", 51.5136, 7.4653, 593),
    ("Essen", 51.4556, 7.0116, 584),
    ("Bremen", 53.0793, 8.8017, 569),
    ("Dresden", 51.0504, 13.7373, 563),
    ("Hannover", 52.3759, 9.7320, 546),
    ("Nürnberg", 49.4521, 11.0767, 523),
    ("Duisburg", 51.4344, 6.7623, 502),
    ("Bochum", 51.4818, 7.2162, 365),
    ("Wuppertal", 51.2562, 7.1508, 358),
    ("Bielefeld", 52.0302, 8.5325, 336),
    ("Bonn", 50.7374, 7.0982, 336),
    ("Münster", 51.9607, 7.6261, 320),
    ("Mannheim", 49.4875, 8.4660, 315),
    ("Karlsruhe", 49.0069, 8.4037, 308),
    ("Augsburg", 48.3705, 10.8978, 301),
    ("Wiesbaden", 50.0782, 8.2398, 283),
    ("Aachen", 50.7753, 6.0839, 252),
    ("Braunschweig", 52.2689, 10.5268, 251),
    ("Kiel", 54.3233, 10.1228, 247),
    ("Chemnitz", 50.8278, 12.9214, 248),
    ("Halle (Saale)", 51.4969, 11.9688, 242),
    ("Magdeburg", 52.1205, 11.6276, 240),
    ("Freiburg im Breisgau", 47.9990, 7.8421, 237),
    ("Mainz", 49.9929, 8.2473, 220),
    ("Lübeck", 53.8655, 10.6866, 218),
    ("Erfurt", 50.9848, 11.0299, 215),
    ("Rostock", 54.0924, 12.0991, 210),
    ("Kassel", 51.3127, 9.4797, 201),
    ("Saarbrücken", 49.2402, 6.9969, 181),
    ("Oldenburg", 53.1435, 8.2146, 170),
    ("Osnabrück", 52.2799, 8.0472, 165),
    ("Regensburg", 49.0134, 12.1016, 153),
)

SEGMENTS = ("small", "compact", "midsize", "suv", "premium", "van", "sports")
FUEL_TYPES = ("petrol", "diesel", "hybrid", "electric", "lpg")
TRANSMISSIONS = ("manual", "automatic")
COLOURS = ("black", "grey", "white", "silver", "blue", "red", "green", "brown", "beige", "orange")
_COLOUR_SHARES = (0.24, 0.20, 0.19, 0.12, 0.11, 0.07, 0.025, 0.02, 0.015, 0.01)

# Fuel mix per segment (rows follow SEGMENTS, columns FUEL_TYPES).
_FUEL_SHARES = np.array(
    [
        [0.78, 0.08, 0.07, 0.04, 0.03],
        [0.55, 0.30, 0.08, 0.04, 0.03],
        [0.28, 0.60, 0.08, 0.02, 0.02],
        [0.45, 0.35, 0.14, 0.05, 0.01],
        [0.32, 0.52, 0.12, 0.03, 0.01],
        [0.35, 0.58, 0.03, 0.02, 0.02],
        [0.95, 0.02, 0.02, 0.01, 0.00],
    ]
)
_AUTOMATIC_SHARE = np.array([0.20, 0.45, 0.60, 0.70, 0.90, 0.55, 0.60])
# Yearly value retention; sports cars hold value, premium saloons lose it fastest.
_RETENTION = np.array([0.885, 0.885, 0.88, 0.89, 0.87, 0.885, 0.93])

# make | model | segment | body (a|b: either) | new price EUR | kW min | kW max | weight | since | fuel
_MODEL_TABLE = """
Volkswagen|up!|small|hatchback|14500|44|66|2.5|2011|
Volkswagen|Polo|small|hatchback|21000|59|147|6|2005|
Volkswagen|Golf|compact|hatchback|estate|31000|81|235|10|2005|
Volkswagen|ID.3|compact|hatchback|40000|107|150|1.5|2020|electric
Volkswagen|Passat|midsize|estate|sedan|43000|110|206|6|2005|
Volkswagen|Arteon|midsize|sedan|50000|110|235|1|2017|
Volkswagen|T-Roc|suv|suv|31000|81|221|4|2017|
Volkswagen|Tiguan|suv|suv|40000|110|235|5|2007|
Volkswagen|Touareg|suv|suv|75000|170|340|1|2005|
Volkswagen|Touran|van|van|36000|85|140|3|2005|
Volkswagen|Sharan|van|van|42000|110|162|1.5|2005|
Volkswagen|Multivan|van|van|55000|110|150|2|2005|
Volkswagen|Scirocco|sports|coupe|32000|92|206|0.6|2008|
Mercedes-Benz|A-Klasse|compact|hatchback|36000|80|225|4|2005|
Mercedes-Benz|B-Klasse|van|van|38000|80|165|1.5|2005|
Mercedes-Benz|C-Klasse|premium|sedan|estate|50000|115|300|5|2005|
Mercedes-Benz|E-Klasse|premium|sedan|estate|62000|145|330|3.5|2005|
Mercedes-Benz|S-Klasse|premium|sedan|115000|210|450|0.6|2005|
Mercedes-Benz|GLA|suv|suv|42000|100|225|1.2|2014|
Mercedes-Benz|GLC|suv|suv|58000|145|300|2|2015|
Mercedes-Benz|GLE|suv|suv|85000|200|320|0.8|2005|
Mercedes-Benz|V-Klasse|van|van|60000|120|175|0.8|2005|
Mercedes-Benz|SL|sports|convertible|110000|190|430|0.3|2005|
BMW|1er|compact|hatchback|35000|85|225|3|2005|
BMW|3er|premium|sedan|estate|48000|115|275|5|2005|
BMW|5er|premium|sedan|estate|60000|140|390|3|2005|
BMW|X1|suv|suv|42000|100|230|2|2009|
BMW|X3|suv|suv|55000|135|265|2.5|2005|
BMW|X5|suv|suv|80000|195|390|1.2|2005|
BMW|2er Active Tourer|van|van|38000|100|160|1|2014|
BMW|Z4|sports|convertible|50000|145|250|0.4|2005|
BMW|M4|sports|coupe|90000|317|375|0.3|2014|
Audi|A1|small|hatchback|24000|70|147|1.5|2010|
Audi|A3|compact|hatchback|sedan|34000|81|228|4|2005|
Audi|A4|premium|estate|sedan|46000|110|260|4.5|2005|
Audi|A6|premium|estate|sedan|58000|150|300|3|2005|
Audi|Q3|suv|suv|40000|110|228|2|2011|
Audi|Q5|suv|suv|55000|150|270|2|2008|
Audi|TT|sports|coupe|convertible|45000|145|290|0.5|2005|
Audi|Q8 e-tron|suv|suv|75000|230|300|0.4|2019|electric
Opel|Adam|small|hatchback|15000|51|110|0.8|2013|
Opel|Corsa|small|hatchback|19000|55|96|5|2005|
Opel|Astra|compact|hatchback|estate|27000|81|147|5|2005|
Opel|Insignia|midsize|estate|sedan|36000|90|191|2|2008|
Opel|Mokka|suv|suv|27000|74|100|1.5|2012|
Opel|Grandland|suv|suv|33000|96|165|1.5|2017|
Opel|Zafira|van|van|33000|100|147|1.5|2005|
Ford|Fiesta|small|hatchback|18000|55|147|4|2005|
Ford|Focus|compact|hatchback|estate|27000|74|206|4.5|2005|
Ford|Mondeo|midsize|estate|sedan|36000|110|177|2|2005|
Ford|Kuga|suv|suv|35000|88|165|2|2008|
Ford|S-Max|van|van|40000|110|176|1|2006|
Ford|Mustang|sports|coupe|55000|213|331|0.4|2015|
Skoda|Fabia|small|hatchback|18000|55|81|3|2005|
Skoda|Octavia|compact|estate|hatchback|31000|81|180|6|2005|
Skoda|Superb|midsize|estate|sedan|40000|110|206|2.5|2005|
Skoda|Karoq|suv|suv|33000|81|140|1.5|2017|
Skoda|Kodiaq|suv|suv|40000|110|176|2|2016|
Skoda|Enyaq|suv|suv|48000|109|220|0.8|2021|electric
Seat|Ibiza|small|hatchback|18000|59|110|2.5|2005|
Seat|Leon|compact|hatchback|estate|27000|81|221|3|2005|
Seat|Ateca|suv|suv|32000|81|140|1.2|2016|
Seat|Alhambra|van|van|40000|110|162|0.8|2005|
Renault|Clio|small|hatchback|19000|48|103|3|2005|
Renault|Zoe|small|hatchback|32000|68|100|1|2013|electric
Renault|Megane|compact|hatchback|estate|27000|85|221|2|2005|
Renault|Captur|suv|suv|25000|67|116|1.5|2013|
Renault|Kangoo|van|van|26000|55|96|1|2005|
Peugeot|208|small|hatchback|21000|55|100|2.5|2012|
Peugeot|308|compact|hatchback|estate|28000|81|165|2|2007|
Peugeot|3008|suv|suv|34000|96|165|1.5|2009|
Peugeot|5008|suv|suv|38000|96|165|0.8|2009|
Citroen|C3|small|hatchback|18000|61|81|2|2005|
Citroen|C4|compact|hatchback|26000|74|114|1|2005|
Citroen|Berlingo|van|van|26000|75|96|1.2|2005|
Fiat|500|small|hatchback|convertible|17000|51|77|3|2007|
Fiat|Panda|small|hatchback|14000|51|63|2|2005|
Fiat|Tipo|compact|sedan|estate|22000|70|96|0.8|2016|
Toyota|Yaris|small|hatchback|21000|53|96|2.5|2005|
Toyota|Corolla|compact|hatchback|estate|30000|90|145|2|2005|
Toyota|C-HR|suv|suv|32000|90|135|1|2016|
Toyota|RAV4|suv|suv|40000|131|225|1.5|2005|
Toyota|GR86|sports|coupe|38000|172|172|0.2|2021|
Hyundai|i10|small|hatchback|14000|49|74|1.5|2008|
Hyundai|i20|small|hatchback|19000|62|150|1.5|2008|
Hyundai|i30|compact|hatchback|estate|25000|74|206|2|2007|
Hyundai|Kona|suv|suv|30000|88|160|1.2|2017|
Hyundai|Tucson|suv|suv|35000|110|195|2|2005|
Hyundai|Ioniq 5|suv|suv|46000|125|239|0.6|2021|electric
Kia|Picanto|small|hatchback|13500|49|74|1.5|2005|
Kia|Ceed|compact|hatchback|estate|25000|74|150|2|2007|
Kia|Niro|suv|suv|33000|95|150|1|2016|
Kia|Sportage|suv|suv|34000|100|195|2|2005|
Kia|EV6|midsize|suv|48000|125|430|0.3|2021|electric
Mazda|Mazda2|small|hatchback|18000|55|85|1|2007|
Mazda|Mazda3|compact|hatchback|sedan|27000|90|137|1|2005|
Mazda|CX-5|suv|suv|35000|121|143|1.5|2012|
Mazda|MX-5|sports|convertible|30000|97|135|0.8|2005|
Nissan|Micra|small|hatchback|17000|52|86|1.2|2005|
Nissan|Juke|suv|suv|24000|84|105|1|2010|
Nissan|Qashqai|suv|suv|30000|103|140|2|2007|
Nissan|Leaf|compact|hatchback|35000|110|160|0.5|2011|electric
Volvo|V40|compact|hatchback|30000|90|180|0.6|2012|
Volvo|V60|premium|estate|47000|145|300|1.2|2010|
Volvo|V90|premium|estate|60000|145|300|0.6|2016|
Volvo|XC60|suv|suv|55000|145|300|1.2|2008|
Volvo|XC90|suv|suv|75000|173|335|0.6|2005|
Porsche|911|sports|coupe|convertible|120000|283|478|0.6|2005|
Porsche|718 Boxster|sports|convertible|65000|220|294|0.3|2005|
Porsche|Macan|suv|suv|70000|185|324|0.5|2014|
Porsche|Cayenne|suv|suv|90000|250|515|0.5|2005|
Porsche|Panamera|premium|sedan|100000|243|463|0.2|2009|
Tesla|Model 3|midsize|sedan|45000|208|377|0.8|2019|electric
Tesla|Model Y|suv|suv|50000|220|378|0.8|2021|electric
Dacia|Sandero|small|hatchback|13000|49|74|2|2008|
Dacia|Duster|suv|suv|18000|67|110|2|2010|
Dacia|Jogger|van|van|18000|74|103|0.5|2022|
Mini|Cooper|small|hatchback|convertible|26000|75|170|2.5|2005|
Mini|Countryman|suv|suv|35000|100|225|1|2010|
Smart|fortwo|small|hatchback|17000|52|82|1.5|2005|
Suzuki|Swift|small|hatchback|17000|61|95|1|2005|
Suzuki|Vitara|suv|suv|25000|95|103|0.8|2005|
Honda|Jazz|small|hatchback|22000|80|90|0.6|2005|
Honda|Civic|compact|hatchback|30000|95|235|0.6|2005|
Honda|CR-V|suv|suv|38000|135|150|0.5|2005|
Jeep|Compass|suv|suv|35000|96|177|0.5|2007|
Jeep|Wrangler|suv|suv|55000|147|200|0.3|2005|
Land Rover|Range Rover Evoque|suv|suv|50000|120|221|0.4|2011|
Land Rover|Discovery|suv|suv|65000|150|265|0.3|2005|
Alfa Romeo|Giulia|premium|sedan|48000|100|375|0.3|2016|
"""

_OLDEST_YEAR = 2005
_KM_PER_YEAR = 14_000
_DEALER_SHARE = 0.75
_LISTINGS_PER_DEALER = 35
_ACTIVE_SHARE = 0.95
# New listings go online during the last four days: the pipeline's default holdout (2 days)
# and its validation days before it (as many). A model fitted on the days before has seen none
# of them (the truth's is_cold), the holdout finds those of its own days cold.
_NEW_LISTING_DAYS = 4
# A new listing draws this many times the views of an older one of its city and segment:
# newest-first sorting and saved-search alerts show it first. At 3 the default demo's holdout
# has 9.8 % cold pairs (4,063 of 41,522; 5 % is the least that measures cold start).
_FRESH_BOOST = 3.0

_BOT_USER_SHARE = 0.002
_BOT_EVENT_SHARE = 0.05  # of n_events, spread over the bots' active days
_BOT_DAILY_VIEWS = (400, 900)  # well above any human and the pipeline's 300/day ceiling
_DUPLICATE_SHARE = 0.01
_UNKNOWN_LISTING_SHARE = 0.001

_MEAN_VIEWS_PER_SESSION = 7.0
_SAVE_RATE = 0.10
_CONTACT_RATE = 0.02  # plus _CONTACT_AFTER_SAVE for saved views: ~3% of views overall
_CONTACT_AFTER_SAVE = 0.10
_REVISIT_RATE = 0.08
_EXPLORE_SESSION_SHARE = 0.12
_APP_SHARE = 0.55
# Relative session starts per hour of the day in German local time (evening peak).
_HOURLY_LOCAL = (
    0.30, 0.15, 0.10, 0.08, 0.08, 0.15, 0.40, 0.80, 1.00, 1.10, 1.20, 1.30,
    1.50, 1.40, 1.30, 1.30, 1.40, 1.60, 1.90, 2.20, 2.40, 2.20, 1.60, 0.80,
)  # fmt: skip
_CHUNK = 250_000
_US_PER_DAY = 86_400_000_000


def _parse_models() -> dict[str, np.ndarray]:
    rows = [line.split("|") for line in _MODEL_TABLE.strip().splitlines()]
    out: dict[str, list] = {k: [] for k in ("make", "model", "segment", "body_a", "body_b")}
    out |= {k: [] for k in ("new_price", "kw_min", "kw_max", "weight", "since", "ev_only")}
    for r in rows:
        # A body column may be followed by a second body (the model comes in both).
        bodies = r[3:-6]
        new_price, kw_min, kw_max, weight, since, fuel = r[-6:]
        out["make"].append(r[0])
        out["model"].append(r[1])
        out["segment"].append(SEGMENTS.index(r[2]))
        out["body_a"].append(bodies[0])
        out["body_b"].append(bodies[-1])
        out["new_price"].append(float(new_price))
        out["kw_min"].append(int(kw_min))
        out["kw_max"].append(int(kw_max))
        out["weight"].append(float(weight))
        out["since"].append(int(since))
        out["ev_only"].append(fuel == "electric")
    return {k: np.array(v) for k, v in out.items()}


MODELS = _parse_models()
_CITY_LAT = np.array([c[1] for c in CITIES])
_CITY_LON = np.array([c[2] for c in CITIES])
_CITY_POP = np.array([c[3] for c in CITIES], dtype=float)
# Bigger cities sprawl further: jitter scale in km around the centre.
_CITY_SPREAD_KM = 2.0 + 3.0 * np.sqrt(_CITY_POP / 1000.0)
_BODY_TYPES = tuple(sorted(set(MODELS["body_a"]) | set(MODELS["body_b"])))

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
        # New: online only in the last _NEW_LISTING_DAYS days, no event before its created_date.
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


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (numpy broadcasting)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


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

    lst = _draw_listings(rng_listings, size.n_listings, end_date, cold_share)
    lst["online_day"] = _online_days(rng_listings, lst["cold"], size.days)
    usr = _draw_users(rng_users, size.n_users, lst)
    bots = _draw_bot_events(rng_noise, size, lst, usr, start_us)
    noise = (1 + _UNKNOWN_LISTING_SHARE) * (1 + _DUPLICATE_SHARE)
    human_target = size.n_events / noise - len(bots["ts"])
    ev = _draw_human_events(rng_events, size, lst, usr, start_us, human_target)
    bots["session"] += ev["session"].max() + 1
    ev, stats = _add_noise(rng_noise, size.n_listings, _concat(ev, bots))
    stats["bot_events"] = len(bots["ts"])
    order = np.argsort(ev["ts"], kind="stable")
    ev = {k: v[order] for k, v in ev.items()}

    created = _created_days(rng_listings, lst, ev, end_date, size.days)
    width = max(7, len(str(2 * size.n_listings)))
    listing_ids = _ids("L", size.n_listings + _unknown_pool(size.n_listings), width)
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


# --- listings ----------------------------------------------------------------------------------


def _check_size(size: MarketplaceSize, cold_share: float) -> None:
    if size.n_listings < 1 or size.n_users < 1 or size.n_events < 1 or size.days < 1:
        raise ValueError(f"every size must be positive: {size}")
    if not 0.0 <= cold_share < 1.0:
        raise ValueError(f"cold_share must be in [0, 1): {cold_share}")


def _jitter(rng, lat, lon, spread_km):
    """Move points by a 2-D normal offset with the given standard deviation in km."""
    dy, dx = rng.normal(size=(2, len(lat))) * spread_km
    return lat + dy / 110.57, lon + dx / (111.32 * np.cos(np.radians(lat)))


def _draw_listings(rng, n: int, end_date: dt.date, cold_share: float) -> dict[str, np.ndarray]:
    available = MODELS["since"] <= max((end_date - dt.timedelta(days=1)).year, _OLDEST_YEAR)
    weights = MODELS["weight"] * available
    model = rng.choice(len(weights), size=n, p=weights / weights.sum())
    segment = MODELS["segment"][model]

    # Age in years, mode ~3, mean ~6, within the model's production years.
    last_day = end_date - dt.timedelta(days=1)
    now = last_day.year + (last_day.timetuple().tm_yday - 0.5) / 365.25
    first_year = np.minimum(np.maximum(MODELS["since"][model], _OLDEST_YEAR), last_day.year)
    span = np.maximum(now - first_year, 0.05)
    age = rng.gamma(2.0, 3.0, n)
    age = np.where(age > span, rng.uniform(0, span), age)
    year = np.maximum(np.floor(now - age), first_year).astype(np.int32)

    mileage = (age + 0.05) * _KM_PER_YEAR * rng.lognormal(0, 0.35, n)
    mileage = np.clip(np.round(mileage, -2), 100, 450_000).astype(np.int32)

    kw_min, kw_max = MODELS["kw_min"][model], MODELS["kw_max"][model]
    power = np.round(kw_min + (kw_max - kw_min) * rng.beta(1.3, 2.5, n)).astype(np.int32)

    fuel_cdf = np.cumsum(_FUEL_SHARES[segment], axis=1)
    fuel = (fuel_cdf < rng.random(n)[:, None] * fuel_cdf[:, -1:]).sum(axis=1)
    fuel = np.where((fuel == 3) & (year < 2014), 0, fuel)  # no used EVs of a combustion model
    fuel = np.where((fuel == 2) & (year < 2010), 0, fuel)
    fuel = np.where(MODELS["ev_only"][model], 3, fuel)

    p_auto = np.clip(_AUTOMATIC_SHARE[segment] + 0.02 * (year - 2015), 0.05, 0.98)
    transmission = np.where((fuel == 3) | (rng.random(n) < p_auto), 1, 0)
    colour = rng.choice(len(COLOURS), size=n, p=np.array(_COLOUR_SHARES) / sum(_COLOUR_SHARES))
    body_names = np.where(rng.random(n) < 0.5, MODELS["body_a"][model], MODELS["body_b"][model])
    body = np.searchsorted(np.array(_BODY_TYPES), body_names)

    new_price = MODELS["new_price"][model] * (power / kw_min) ** 0.5
    value = 0.88 * _RETENTION[segment] ** age * np.exp(-mileage / 500_000)
    deal = rng.normal(0, 0.12, n)
    price = new_price * value * np.exp(-deal)
    # Asking prices end in ...50/...00, half of them just under a round number.
    price = np.maximum(np.round(price / 50) * 50, 500) - 10 * (rng.random(n) < 0.5)

    # Listings follow population; three in four sit at a dealer of their city (dealers of very
    # different sizes), the rest at a private seller's address somewhere in the city.
    pop_p = _CITY_POP / _CITY_POP.sum()
    city = rng.choice(len(CITIES), size=n, p=pop_p)
    per_city = np.maximum(1, np.round(n / _LISTINGS_PER_DEALER * pop_p)).astype(np.int64)
    dealer_city = np.repeat(np.arange(len(CITIES)), per_city)
    dealer_lat, dealer_lon = _jitter(
        rng, _CITY_LAT[dealer_city], _CITY_LON[dealer_city], _CITY_SPREAD_KM[dealer_city]
    )
    dealer_size = rng.lognormal(0, 0.8, len(dealer_city))
    cum = np.cumsum(dealer_size)
    city_end = np.cumsum(per_city) - 1
    city_base = cum[city_end] - np.add.reduceat(dealer_size, city_end - per_city + 1)
    share_so_far = (cum - city_base[dealer_city]) / (cum[city_end] - city_base)[dealer_city]
    dealer_key = dealer_city + share_so_far  # city c's dealers cover (c, c + 1]
    is_dealer = rng.random(n) < _DEALER_SHARE
    picked = np.searchsorted(dealer_key, city + rng.random(n), side="right")
    dealer = np.where(is_dealer, np.minimum(picked, len(dealer_city) - 1), -1)
    p_lat, p_lon = _jitter(rng, _CITY_LAT[city], _CITY_LON[city], _CITY_SPREAD_KM[city])
    lat = np.where(is_dealer, dealer_lat[dealer], p_lat)
    lon = np.where(is_dealer, dealer_lon[dealer], p_lon)

    active = rng.random(n) < _ACTIVE_SHARE
    cold = np.zeros(n, dtype=bool)
    active_idx = np.flatnonzero(active)
    n_cold = min(round(cold_share * len(active_idx)), len(active_idx) - 1)
    cold[rng.choice(active_idx, size=max(n_cold, 0), replace=False)] = True
    return {
        "model": model,
        "segment": segment,
        "body": body,
        "fuel": fuel,
        "transmission": transmission,
        "colour": colour,
        "year": year.astype(np.int32),
        "mileage": mileage,
        "power": power,
        "price": price,
        "city": city,
        "lat": np.round(lat, 5),
        "lon": np.round(lon, 5),
        "dealer": dealer,
        "active": active,
        "cold": cold,
        # How much a listing stands out (a good deal, good photos) when users compare two.
        "appeal": deal + rng.normal(0, 0.1, n),
    }


# --- users -------------------------------------------------------------------------------------


def _segment_shares(lst) -> np.ndarray:
    counts = np.bincount(lst["segment"][~lst["cold"]], minlength=len(SEGMENTS)) + 1.0
    return counts / counts.sum()


def _draw_users(rng, n: int, lst: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pop_p = _CITY_POP / _CITY_POP.sum()
    city = rng.choice(len(CITIES), size=n, p=pop_p)
    lat, lon = _jitter(rng, _CITY_LAT[city], _CITY_LON[city], _CITY_SPREAD_KM[city])
    radius = np.round(np.clip(rng.lognormal(math.log(50), 0.55, n), 10, 300), 1)

    # Two distinct segments per user, drawn by market share (Gumbel top-2 without replacement).
    keys = np.log(_segment_shares(lst)) + rng.gumbel(size=(n, len(SEGMENTS)))
    top2 = np.argsort(-keys, axis=1, kind="stable")[:, :2]
    seg1 = top2[:, 0]
    seg2 = np.where(rng.random(n) < 0.5, top2[:, 1], -1)

    typical = np.array(
        [
            np.median(lst["price"][lst["segment"] == s])
            if (lst["segment"] == s).any()
            else 0.45 * MODELS["new_price"][MODELS["segment"] == s].mean()
            for s in range(len(SEGMENTS))
        ]
    )
    budget = np.maximum(np.round(typical[seg1] * rng.lognormal(0, 0.4, n), -2), 500.0)
    fuel_cdf = np.cumsum(_FUEL_SHARES[seg1], axis=1)
    fuel = (fuel_cdf < rng.random(n)[:, None] * fuel_cdf[:, -1:]).sum(axis=1)
    fuel_pref = np.where(rng.random(n) < 0.3, fuel, -1)

    is_bot = np.zeros(n, dtype=bool)
    n_bots = min(max(1, round(_BOT_USER_SHARE * n)), n - 1)  # someone must be human
    is_bot[rng.choice(n, size=n_bots, replace=False)] = True
    return {
        "city": city,
        "lat": np.round(lat, 5),
        "lon": np.round(lon, 5),
        "radius": radius,
        "seg1": seg1,
        "seg2": seg2,
        "budget": budget,
        "fuel_pref": fuel_pref,
        "activity": rng.lognormal(0, 1.0, n),
        "is_bot": is_bot,
        "typical_price": typical,
        "kernel": _city_kernel(lat, lon, radius),
    }


def _city_kernel(lat, lon, radius, chunk: int = 100_000) -> np.ndarray:
    """Per user and city: how willing the user is to look there, 1 at home, ~(r/d)^3 far away."""
    out = np.empty((len(lat), len(CITIES)), dtype=np.float32)
    for i in range(0, len(lat), chunk):
        sl = slice(i, i + chunk)
        d = haversine_km(lat[sl, None], lon[sl, None], _CITY_LAT[None, :], _CITY_LON[None, :])
        out[sl] = 1.0 / (1.0 + (d / radius[sl, None]) ** 3) + 1e-9
    return out


# --- events ------------------------------------------------------------------------------------


def _draw_human_events(rng, size, lst, usr, start_us: int, target: float) -> dict:
    """About ``target`` events of people: sessions of views, each view maybe saved/contacted."""
    per_view = 1 + _SAVE_RATE + _CONTACT_RATE + _SAVE_RATE * _CONTACT_AFTER_SAVE
    n_sessions = max(1, round(max(target, 1) / per_view / _MEAN_VIEWS_PER_SESSION))
    activity = usr["activity"] * ~usr["is_bot"]
    s_user = rng.choice(len(activity), size=n_sessions, p=activity / activity.sum())
    s_views = rng.geometric(1 / _MEAN_VIEWS_PER_SESSION, n_sessions)
    seg2 = usr["seg2"][s_user]
    preferred = np.where((seg2 >= 0) & (rng.random(n_sessions) < 0.35), seg2, usr["seg1"][s_user])
    s_explore = rng.random(n_sessions) < _EXPLORE_SESSION_SHARE
    random_seg = rng.choice(len(SEGMENTS), size=n_sessions, p=_segment_shares(lst))
    s_segment = np.where(s_explore, random_seg, preferred)
    # A budget is set with the first segment in mind; other segments shift it part of the way.
    typical = usr["typical_price"]
    shift = (typical[s_segment] / typical[usr["seg1"][s_user]]) ** 0.7
    s_price = usr["budget"][s_user] * shift * rng.lognormal(0, 0.2, n_sessions)
    s_source = (rng.random(n_sessions) < _APP_SHARE).astype(np.int8)

    n_views = int(s_views.sum())
    e_session = np.repeat(np.arange(n_sessions), s_views)
    first = np.cumsum(s_views) - s_views
    e_rank = np.arange(n_views) - first[e_session]
    # Seconds between views; saves and contacts land in the gap after their view.
    gaps = 35 + rng.exponential(45, n_views)
    before = np.cumsum(gaps) - gaps
    offset = before - before[first][e_session]
    duration = np.ceil(offset[first + s_views - 1]) + 60
    window_s = size.days * 86_400
    hourly = np.roll(np.array(_HOURLY_LOCAL), -1)  # CET is UTC+1
    s_start = (
        rng.integers(0, size.days, n_sessions) * 86_400
        + rng.choice(24, size=n_sessions, p=hourly / hourly.sum()) * 3600
        + rng.integers(0, 3600, n_sessions)
    )
    s_start = np.clip(s_start, 0, np.maximum(window_s - duration, 0)).astype(np.int64)
    e_ts = (
        start_us + s_start[e_session] * 1_000_000 + np.floor(offset * 1000).astype(np.int64) * 1000
    )

    e_user = s_user[e_session]
    e_listing = _choose_listings(
        rng,
        lst,
        usr,
        e_user,
        s_segment[e_session],
        s_explore[e_session],
        s_price[e_session] * rng.lognormal(0, 0.15, n_views),
    )
    # Before revisits, saves and contacts copy the listing, so they follow the new one too.
    e_listing = _fresh_listings(rng, lst, e_listing, s_start[e_session] // 86_400, size.days)
    revisit = (e_rank >= 1) & (rng.random(n_views) < _REVISIT_RATE)
    earlier = first[e_session] + np.floor(rng.random(n_views) * e_rank).astype(np.int64)
    e_listing[revisit] = e_listing[earlier[revisit]]

    save = rng.random(n_views) < _SAVE_RATE
    contact = rng.random(n_views) < _CONTACT_RATE + _CONTACT_AFTER_SAVE * save
    rows = np.concatenate([np.arange(n_views), np.flatnonzero(save), np.flatnonzero(contact)])
    kind = np.repeat(np.array([0, 1, 2], dtype=np.int8), [n_views, save.sum(), contact.sum()])
    delay_ms = np.concatenate(
        [
            np.zeros(n_views, dtype=np.int64),
            rng.integers(2_000, 15_000, int(save.sum())),
            rng.integers(16_000, 30_000, int(contact.sum())),
        ]
    )
    return {
        "user": e_user[rows].astype(np.int32),
        "listing": e_listing[rows].astype(np.int32),
        "type": kind,
        "ts": e_ts[rows] + delay_ms * 1000,
        "session": e_session[rows].astype(np.int64),
        "source": s_source[e_session][rows],
    }


def _sample_rows(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One column per row of a non-negative weight matrix, by row-wise inverse CDF."""
    cum = np.cumsum(weights, axis=1)
    picked = (cum <= (u * cum[:, -1])[:, None]).sum(axis=1)
    return np.minimum(picked, weights.shape[1] - 1)


def _choose_listings(rng, lst, usr, e_user, e_segment, e_explore, e_price) -> np.ndarray:
    """Pick one warm listing per view: a city by the user's distance kernel weighted by how many
    listings of the segment it has, then a listing of that (city, segment) near the price.

    Warm listings are sorted by (city, segment, price), so a (city, segment) bucket is one
    contiguous range. The target price becomes a quantile of the segment's prices, and the pick
    is that quantile (plus noise, reflected at the ends) of the bucket: an out-of-range budget
    lands on the bucket's cheapest or dearest few listings rather than on a single one.
    """
    n_seg = len(SEGMENTS)
    warm = np.flatnonzero(~lst["cold"])
    price, seg_of = lst["price"][warm], lst["segment"][warm]
    order = np.lexsort((price, seg_of, lst["city"][warm]))
    by_key = warm[order]
    bucket_of = lst["city"][by_key] * n_seg + lst["segment"][by_key]
    starts = np.searchsorted(bucket_of, np.arange(len(CITIES) * n_seg + 1))
    counts = np.diff(starts).reshape(len(CITIES), n_seg).T.astype(np.float32)
    counts_all = counts.sum(axis=0)
    # Per segment, sorted prices for the quantile lookup (segment-major, one searchsorted).
    seg_order = np.lexsort((price, seg_of))
    seg_key = seg_of[seg_order] * 64.0 + np.log(price[seg_order])
    seg_starts = np.searchsorted(seg_of[seg_order], np.arange(n_seg + 1))
    seg_sizes = np.maximum(np.diff(seg_starts), 1)
    fuel, pref, appeal = lst["fuel"], usr["fuel_pref"], lst["appeal"]

    out = np.empty(len(e_user), dtype=np.int64)
    for i in range(0, len(e_user), _CHUNK):
        sl = slice(i, i + _CHUNK)
        user, seg, explore = e_user[sl], e_segment[sl], e_explore[sl]
        m = len(user)
        kernel = usr["kernel"][user]
        weights = kernel * counts[seg]
        # A segment without warm listings: any listing in a city near the user.
        fallback = weights.sum(axis=1) <= 0
        weights[fallback] = kernel[fallback] * counts_all
        city = _sample_rows(weights, rng.random(m))
        bucket = city * n_seg + seg
        start = np.where(fallback, starts[city * n_seg], starts[bucket])
        width = np.where(fallback, starts[(city + 1) * n_seg], starts[bucket + 1]) - start
        rank = np.searchsorted(seg_key, seg * 64.0 + np.log(e_price[sl])) - seg_starts[seg]
        quantile = np.clip(rank / seg_sizes[seg], 0.0, 1.0)

        draw = functools.partial(_quantile_pick, rng, quantile, explore | fallback, start, width)
        # Of two similar candidates users open the better deal.
        pos, alt = draw(0.06), draw(0.06)
        pos = np.where(appeal[by_key[alt]] > appeal[by_key[pos]], alt, pos)
        # Users who care about fuel look twice more, wider in price, when the pick is off.
        want = pref[user]
        for _ in range(2):
            alt = draw(0.15)
            retry = (want >= 0) & (fuel[by_key[pos]] != want)
            pos = np.where(retry & (fuel[by_key[alt]] == want), alt, pos)
        out[sl] = by_key[pos]
    return out


def _online_days(rng, new: np.ndarray, days: int) -> np.ndarray:
    """Day of the window (0: its first) each listing is online from; 0 for all but the new."""
    recent = min(_NEW_LISTING_DAYS, days)
    return np.where(new, days - 1 - rng.integers(0, recent, len(new)), 0).astype(np.int64)


def _fresh_listings(rng, lst, e_listing, e_day, days: int) -> np.ndarray:
    """Send some views to a new listing of the viewed one's (city, segment), once it is online.

    With k new listings of the bucket online on the view's day and w older ones, a view moves
    with probability k·B / (w + k·B) (B: ``_FRESH_BOOST``), to the closer in price of two of
    the k: users keep their place and budget, they just see the new car first.
    """
    new = np.flatnonzero(lst["cold"])
    if not len(new):
        return e_listing
    n_seg = len(SEGMENTS)
    bucket = lst["city"].astype(np.int64) * n_seg + lst["segment"]
    new = new[np.lexsort((lst["online_day"][new], bucket[new]))]
    # Sorted by (bucket, online day): those online by day d are a prefix of the bucket's run.
    key = bucket[new] * (days + 1) + lst["online_day"][new]
    e_bucket = bucket[e_listing]
    start = np.searchsorted(key, e_bucket * (days + 1), side="left")
    online = np.searchsorted(key, e_bucket * (days + 1) + e_day, side="right") - start
    older = np.bincount(bucket[~lst["cold"]], minlength=len(CITIES) * n_seg)[e_bucket]
    boosted = online * _FRESH_BOOST
    moves = rng.random(len(e_listing)) * (older + boosted) < boosted

    def pick() -> np.ndarray:
        offset = (rng.random(len(e_listing)) * online).astype(np.int64)
        return new[np.minimum(start + offset, len(new) - 1)]  # clipped where none is online

    log_price = np.log(lst["price"])
    a, b = pick(), pick()
    gap_a, gap_b = (np.abs(log_price[x] - log_price[e_listing]) for x in (a, b))
    return np.where(moves, np.where(gap_b < gap_a, b, a), e_listing)


def _quantile_pick(rng, quantile, anywhere, start, width, spread: float) -> np.ndarray:
    """Positions at ``quantile`` (+ noise, reflected into [0, 1)) of each bucket; uniform where
    ``anywhere``."""
    m = len(start)
    q = np.where(anywhere, rng.random(m), quantile + rng.normal(0, spread, m))
    q = np.abs(q) % 2.0
    q = np.minimum(np.where(q > 1.0, 2.0 - q, q), 1.0 - 1e-9)
    return start + np.floor(q * width).astype(np.int64)


def _draw_bot_events(rng, size, lst, usr, start_us: int) -> dict:
    """Bots view random warm listings, hundreds a day, on a few days each, one session a day."""
    bots = np.flatnonzero(usr["is_bot"])
    per_bot = _BOT_EVENT_SHARE * size.n_events / max(len(bots), 1) / np.mean(_BOT_DAILY_VIEWS)
    days_each = int(np.clip(round(per_bot), 1, size.days)) if len(bots) else 0
    bot_day_user = np.repeat(bots, days_each)
    n_bot_days = len(bot_day_user)
    day = np.argsort(rng.random((len(bots), size.days)), axis=1)[:, :days_each].ravel()
    cap = max(1, int(0.2 * size.n_events / max(n_bot_days, 1)))
    views = np.minimum(rng.integers(_BOT_DAILY_VIEWS[0], _BOT_DAILY_VIEWS[1] + 1, n_bot_days), cap)
    e_bot_day = np.repeat(np.arange(n_bot_days), views)
    n = len(e_bot_day)
    warm = np.flatnonzero(~lst["cold"])
    return {
        "user": bot_day_user[e_bot_day].astype(np.int32),
        "listing": warm[rng.integers(0, len(warm), n)].astype(np.int32),
        "type": np.zeros(n, dtype=np.int8),
        "ts": start_us + day[e_bot_day] * _US_PER_DAY + rng.integers(0, 86_400_000, n) * 1000,
        "session": e_bot_day.astype(np.int64),
        "source": np.zeros(n, dtype=np.int8),
    }


def _concat(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def _unknown_pool(n_listings: int) -> int:
    return max(10, n_listings // 50)


def _add_noise(rng, n_listings: int, ev: dict) -> tuple[dict, dict[str, int]]:
    """Add views of listing ids missing from the snapshot and exact duplicates of a few events."""
    n = len(ev["ts"])
    views = np.flatnonzero(ev["type"] == 0)
    n_unknown = min(max(1, round(_UNKNOWN_LISTING_SHARE * n)), len(views))
    src = np.sort(rng.choice(views, size=n_unknown, replace=False))
    unknown = {k: v[src] for k, v in ev.items()}
    unknown["listing"] = (
        n_listings + rng.integers(0, _unknown_pool(n_listings), n_unknown)
    ).astype(np.int32)
    ev = _concat(ev, unknown)
    n_dup = max(1, round(_DUPLICATE_SHARE * len(ev["ts"])))
    dup = np.sort(rng.choice(len(ev["ts"]), size=n_dup, replace=False))
    ev = {k: np.concatenate([v, v[dup]]) for k, v in ev.items()}
    return ev, {"unknown_listing_events": n_unknown, "duplicate_events": n_dup}


def _created_days(rng, lst, ev, end_date: dt.date, days: int) -> np.ndarray:
    """Days since the epoch each listing went online: before its first event, if it had any;
    a new listing's is its online day, which no event of it precedes."""
    n = len(lst["segment"])
    end_day = (end_date - dt.date(1970, 1, 1)).days
    known = ev["listing"] < n
    first = np.full(n, end_day, dtype=np.int64)
    np.minimum.at(first, ev["listing"][known], ev["ts"][known] // _US_PER_DAY)
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
        "body_type": _names(_BODY_TYPES, lst["body"]),
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
    day = (ev["ts"] // _US_PER_DAY).astype(np.int32)
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
