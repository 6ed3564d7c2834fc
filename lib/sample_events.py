"""What the synthetic marketplace's users do: sessions of views, saves and contacts, and noise.

Human events follow the hidden preferences of ``lib.sample_world``'s users: a session looks at
one segment near the user's budget, in cities weighted by the user's distance kernel; views of
an older listing move to a new one of its city and segment once that is online (the cold-start
signal). Bots view random listings hundreds of times a day; ``add_noise`` adds events for
listing ids missing from the snapshot and exact duplicates. Everything is vectorised: arrays of
users, listings, event types, timestamps, sessions and sources, no per-event Python loops.
"""

from __future__ import annotations

import functools

import numpy as np

from lib.sample_world import CITIES, SEGMENTS, segment_shares

# A new listing draws this many times the views of an older one of its city and segment:
# newest-first sorting and saved-search alerts show it first. At 3 the default demo's holdout
# has 9.8 % cold pairs (4,063 of 41,522; 5 % is the least that measures cold start).
_FRESH_BOOST = 3.0

_BOT_EVENT_SHARE = 0.05  # of n_events, spread over the bots' active days
_BOT_DAILY_VIEWS = (400, 900)  # well above any human and the pipeline's 300/day ceiling
DUPLICATE_SHARE = 0.01
UNKNOWN_LISTING_SHARE = 0.001

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
US_PER_DAY = 86_400_000_000


def draw_human_events(rng, size, lst, usr, start_us: int, target: float) -> dict:
    """About ``target`` events of people: sessions of views, each view maybe saved/contacted."""
    per_view = 1 + _SAVE_RATE + _CONTACT_RATE + _SAVE_RATE * _CONTACT_AFTER_SAVE
    n_sessions = max(1, round(max(target, 1) / per_view / _MEAN_VIEWS_PER_SESSION))
    activity = usr["activity"] * ~usr["is_bot"]
    s_user = rng.choice(len(activity), size=n_sessions, p=activity / activity.sum())
    s_views = rng.geometric(1 / _MEAN_VIEWS_PER_SESSION, n_sessions)
    seg2 = usr["seg2"][s_user]
    preferred = np.where((seg2 >= 0) & (rng.random(n_sessions) < 0.35), seg2, usr["seg1"][s_user])
    s_explore = rng.random(n_sessions) < _EXPLORE_SESSION_SHARE
    random_seg = rng.choice(len(SEGMENTS), size=n_sessions, p=segment_shares(lst))
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


def draw_bot_events(rng, size, lst, usr, start_us: int) -> dict:
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
        "ts": start_us + day[e_bot_day] * US_PER_DAY + rng.integers(0, 86_400_000, n) * 1000,
        "session": e_bot_day.astype(np.int64),
        "source": np.zeros(n, dtype=np.int8),
    }


def concat(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def unknown_pool(n_listings: int) -> int:
    return max(10, n_listings // 50)


def add_noise(rng, n_listings: int, ev: dict) -> tuple[dict, dict[str, int]]:
    """Add views of listing ids missing from the snapshot and exact duplicates of a few events."""
    n = len(ev["ts"])
    views = np.flatnonzero(ev["type"] == 0)
    n_unknown = min(max(1, round(UNKNOWN_LISTING_SHARE * n)), len(views))
    src = np.sort(rng.choice(views, size=n_unknown, replace=False))
    unknown = {k: v[src] for k, v in ev.items()}
    unknown["listing"] = (n_listings + rng.integers(0, unknown_pool(n_listings), n_unknown)).astype(
        np.int32
    )
    ev = concat(ev, unknown)
    n_dup = max(1, round(DUPLICATE_SHARE * len(ev["ts"])))
    dup = np.sort(rng.choice(len(ev["ts"]), size=n_dup, replace=False))
    ev = {k: np.concatenate([v, v[dup]]) for k, v in ev.items()}
    return ev, {"unknown_listing_events": n_unknown, "duplicate_events": n_dup}
