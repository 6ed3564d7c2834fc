"""The world of the synthetic used-car marketplace: where people live and what is for sale.

German cities (with population and sprawl), the car models on offer (the ``_MODEL_TABLE``
literal: segment, body, price when new, power range, market weight, first year), the fuel,
transmission and colour mixes, and the two draws built on them: the listings (each a car of a
model, at a dealer or private seller in a city, priced by age, mileage and power) and the users
(a home, a search radius, one or two preferred segments, a budget, maybe a fuel). The users'
hidden preferences are what ``lib.sample_events`` turns into views and what the ground truth
of ``lib.sample_data`` exposes.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np

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

_BOT_USER_SHARE = 0.002


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
BODY_TYPES = tuple(sorted(set(MODELS["body_a"]) | set(MODELS["body_b"])))


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (numpy broadcasting)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


# --- listings ----------------------------------------------------------------------------------


def _jitter(rng, lat, lon, spread_km):
    """Move points by a 2-D normal offset with the given standard deviation in km."""
    dy, dx = rng.normal(size=(2, len(lat))) * spread_km
    return lat + dy / 110.57, lon + dx / (111.32 * np.cos(np.radians(lat)))


def draw_listings(rng, n: int, end_date: dt.date, cold_share: float) -> dict[str, np.ndarray]:
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
    body = np.searchsorted(np.array(BODY_TYPES), body_names)

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


def online_days(rng, new: np.ndarray, days: int) -> np.ndarray:
    """Day of the window (0: its first) each listing is online from; 0 for all but the new."""
    recent = min(_NEW_LISTING_DAYS, days)
    return np.where(new, days - 1 - rng.integers(0, recent, len(new)), 0).astype(np.int64)


# --- users -------------------------------------------------------------------------------------


def segment_shares(lst) -> np.ndarray:
    counts = np.bincount(lst["segment"][~lst["cold"]], minlength=len(SEGMENTS)) + 1.0
    return counts / counts.sum()


def draw_users(rng, n: int, lst: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    pop_p = _CITY_POP / _CITY_POP.sum()
    city = rng.choice(len(CITIES), size=n, p=pop_p)
    lat, lon = _jitter(rng, _CITY_LAT[city], _CITY_LON[city], _CITY_SPREAD_KM[city])
    radius = np.round(np.clip(rng.lognormal(math.log(50), 0.55, n), 10, 300), 1)

    # Two distinct segments per user, drawn by market share (Gumbel top-2 without replacement).
    keys = np.log(segment_shares(lst)) + rng.gumbel(size=(n, len(SEGMENTS)))
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
