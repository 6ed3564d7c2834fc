"""Listing feature encoding shared by training and inference, driven by the feature spec.

``fit_feature_encoding`` learns small statistics from the listing snapshot (a few Spark
aggregations; returns a JSON-able dict saved with the shards and inside the model artifact);
``encode_listing_features`` is the pure transform that applies them. Per declared kind:

- categorical: a code per value (1.. by frequency, 0 unknown);
- numeric: a quantile-bucket code and a z-scored value (of log1p where the values span orders
  of magnitude);
- geo: a grid-cell code and the z-scored coordinates;
- multi-valued categorical and text: up to ``slots`` token codes per listing (0 pads).

Single codes go to ``codes``, z-scores to ``dense``, token codes to ``tokens`` (fixed widths
per spec, so every row of ``listing_features`` has the same shape).
"""

from __future__ import annotations

import math
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from lib.feature_spec import GEO, Feature, FeatureSpec, from_dict
from lib.schema_check import SchemaError
from schemas import listings as listings_schema

ENCODING_VERSION = 2
# A value this many standard deviations out is as far as the tower needs to see it.
_CLIP = 5.0
# Words split on anything that is not a letter or a digit.
_TOKEN_SPLIT = r"[^\p{L}\p{N}]+"


def _geo_cell_key(cell_degrees: float) -> Column:
    # Cells of equal degrees: ~55 km × 35 km at 0.5° in Germany, coarse enough that a cell has
    # many listings and fine enough that two listings in one cell are a short drive apart.
    row = F.floor(F.col("latitude") / cell_degrees).cast("long")
    col = F.floor(F.col("longitude") / cell_degrees).cast("long")
    return F.when(
        F.col("latitude").isNotNull() & F.col("longitude").isNotNull(),
        F.concat_ws(":", row.cast("string"), col.cast("string")),
    )


def token_values(feature: Feature) -> Column:
    """A listing's distinct tokens of a multi-valued or text feature, in order of appearance."""
    source = F.col(feature.column)
    if feature.kind == "text":
        words = F.split(F.lower(source), _TOKEN_SPLIT)
        return F.array_distinct(F.filter(words, lambda w: F.length(w) >= 2))
    separator = feature.option("separator")
    values = source if separator is None else F.split(source, _quoted(separator))
    trimmed = F.transform(values, lambda v: F.trim(v))
    return F.array_distinct(F.filter(trimmed, lambda v: v.isNotNull() & (F.length(v) > 0)))


def _quoted(separator: str) -> str:
    return "".join(f"\\{c}" if not c.isalnum() else c for c in separator)


def _value_counts(snapshot: DataFrame, spec: FeatureSpec) -> dict[str, list[str]]:
    """Per categorical, token and geo feature, its values by descending frequency (capped)."""
    stacked = []
    limits: dict[str, tuple[int, int]] = {}
    for feature in spec.of_kind("categorical"):
        stacked.append(F.array(F.col(feature.column).cast("string")))
        limits[feature.column] = (feature.option("max_vocabulary"), 1)
    for feature in spec.of_kind("multi_categorical", "text"):
        stacked.append(token_values(feature))
        min_count = feature.option("min_count") if feature.kind == "text" else 1
        limits[feature.column] = (feature.option("max_vocabulary"), min_count)
    if spec.geo:
        stacked.append(F.array(_geo_cell_key(float(spec.geo.option("cell_degrees")))))
        limits[GEO] = (1 << 30, 1)
    if not stacked:
        return {}
    names = list(limits)
    pairs = snapshot.select(
        F.explode(
            F.array(
                *[
                    F.struct(F.lit(name).alias("feature"), values.alias("values"))
                    for name, values in zip(names, stacked, strict=True)
                ]
            )
        ).alias("kv")
    ).select("kv.feature", F.explode_outer("kv.values").alias("value"))
    counts = pairs.where(F.col("value").isNotNull()).groupBy("feature", "value").count()
    # Bounded by the caps: a catalogue of millions of distinct words never reaches the driver.
    ranked = counts.withColumn(
        "rank",
        F.row_number().over(Window.partitionBy("feature").orderBy(F.desc("count"), F.asc("value"))),
    )
    cap = F.lit(0)
    floor = F.lit(0)
    for name, (max_vocabulary, min_count) in limits.items():
        cap = F.when(F.col("feature") == name, F.lit(max_vocabulary)).otherwise(cap)
        floor = F.when(F.col("feature") == name, F.lit(min_count)).otherwise(floor)
    kept = ranked.where((F.col("rank") <= cap) & (F.col("count") >= floor)).collect()
    vocabularies: dict[str, list[str]] = {name: [] for name in names}
    for row in sorted(kept, key=lambda r: (r["feature"], r["rank"])):
        vocabularies[row["feature"]].append(row["value"])
    return vocabularies


def _numeric_stats(snapshot: DataFrame, spec: FeatureSpec) -> dict[str, dict[str, float]]:
    columns = [f.column for f in spec.of_kind("numeric")]
    if spec.geo:
        columns += ["latitude", "longitude"]
    if not columns:
        return {}
    logged = {c: F.log1p(F.when(F.col(c) >= 0, F.col(c))) for c in columns}
    row = snapshot.agg(
        *[F.count(F.col(c)).alias(f"{c}|n") for c in columns],
        *[F.min(c).alias(f"{c}|min") for c in columns],
        *[F.mean(c).alias(f"{c}|mean") for c in columns],
        *[F.stddev_pop(c).alias(f"{c}|std") for c in columns],
        *[F.skewness(c).alias(f"{c}|skew") for c in columns],
        *[F.mean(logged[c]).alias(f"{c}|log_mean") for c in columns],
        *[F.stddev_pop(logged[c]).alias(f"{c}|log_std") for c in columns],
        *[F.skewness(logged[c]).alias(f"{c}|log_skew") for c in columns],
    ).first()
    return {c: {k: row[f"{c}|{k}"] for k in _STAT_KEYS} for c in columns}


_STAT_KEYS = ("n", "min", "mean", "std", "skew", "log_mean", "log_std", "log_skew")


def _use_log(feature: Feature, stats: dict[str, float]) -> bool:
    choice = feature.option("log")
    if choice != "auto":
        return bool(choice)
    # Prices, mileages, counts: non-negative and right-skewed; log1p makes them less so.
    skew, log_skew = stats["skew"] or 0.0, stats["log_skew"] or 0.0
    return (stats["min"] or 0.0) >= 0 and skew > 1.0 and abs(log_skew) < abs(skew)


def _z(mean: float | None, std: float | None) -> dict[str, float]:
    std = float(std or 0.0)
    return {"mean": float(mean or 0.0), "std": std if std > 0 and math.isfinite(std) else 1.0}


def fit_feature_encoding(
    listings: DataFrame, spec: FeatureSpec, *, max_listings_per_quantile: float = 0.001
) -> dict[str, Any]:
    """Learn vocabularies, quantile buckets and normalisation statistics for ``spec``.

    Runs Spark jobs (a grouped count, one aggregation and an approximate quantile pass) and
    returns a small dict. A declared column that holds no value at all is refused: it would
    encode to the unknown code everywhere, which is a mapping error more often than a choice.
    """
    vocabularies = _value_counts(listings, spec)
    stats = _numeric_stats(listings, spec)
    for feature in spec.features:
        source = "latitude" if feature.kind == GEO else feature.column
        empty = not stats[source]["n"] if source in stats else not vocabularies.get(feature.column)
        if empty:
            raise SchemaError(
                listings_schema.SPEC.name,
                ", ".join(feature.source_columns),
                f"declared {feature.kind} in the feature spec, but no listing has a value"
                + (
                    f" (text: no word is on {feature.option('min_count')} listings)"
                    if feature.kind == "text"
                    else ""
                ),
            )
    numeric = spec.of_kind("numeric")
    boundaries: list[list[float]] = []
    if numeric:
        cuts = []
        for feature in numeric:
            buckets = feature.option("buckets")
            cuts.append([i / buckets for i in range(1, buckets)])
        probabilities = sorted({p for c in cuts for p in c})
        found = listings.approxQuantile(
            [f.column for f in numeric], probabilities, max_listings_per_quantile
        )
        for wanted, values in zip(cuts, found, strict=True):
            by_p = dict(zip(probabilities, values, strict=True))
            # Distinct boundaries only: a quantile repeated (many listings at one price) is one cut.
            boundaries.append(sorted({by_p[p] for p in wanted}))

    codes: list[dict[str, Any]] = []
    dense: list[dict[str, Any]] = []
    tokens: list[dict[str, Any]] = []
    for feature in spec.of_kind("categorical"):
        codes.append(
            {
                "name": feature.column,
                "source": feature.column,
                "kind": "categorical",
                "vocabulary": vocabularies[feature.column],
            }
        )
    for feature, bounds in zip(numeric, boundaries, strict=True):
        codes.append(
            {
                "name": f"{feature.column}_bucket",
                "source": feature.column,
                "kind": "bucket",
                "bounds": bounds,
            }
        )
        s = stats[feature.column]
        log = _use_log(feature, s)
        dense.append(
            {
                "name": f"{feature.column}_norm",
                "source": feature.column,
                "log": log,
                **(_z(s["log_mean"], s["log_std"]) if log else _z(s["mean"], s["std"])),
            }
        )
    if spec.geo:
        codes.append(
            {
                "name": "geo_cell",
                "source": GEO,
                "kind": "geo_cell",
                "cell_degrees": float(spec.geo.option("cell_degrees")),
                "vocabulary": vocabularies[GEO],
            }
        )
        for axis in ("latitude", "longitude"):
            s = stats[axis]
            dense.append(
                {"name": f"{axis}_norm", "source": axis, "log": False, **_z(s["mean"], s["std"])}
            )
    for feature in spec.of_kind("multi_categorical", "text"):
        slots = feature.option(
            "max_values" if feature.kind == "multi_categorical" else "max_tokens"
        )
        tokens.append(
            {
                "name": feature.column,
                "source": feature.column,
                "kind": feature.kind,
                "slots": int(slots),
                "vocabulary": vocabularies[feature.column],
            }
        )
    return {
        "version": ENCODING_VERSION,
        "spec": spec.to_dict(),
        "codes": codes,
        "dense": dense,
        "tokens": tokens,
    }


def cardinalities(encoding: dict[str, Any]) -> dict[str, int]:
    """Number of codes per single-code feature, in ``codes`` order, unknown (0) included."""
    return {
        c["name"]: (len(c["bounds"]) + 2 if c["kind"] == "bucket" else len(c["vocabulary"]) + 1)
        for c in encoding["codes"]
    }


def dense_names(encoding: dict[str, Any]) -> list[str]:
    return [d["name"] for d in encoding["dense"]]


def token_fields(encoding: dict[str, Any]) -> list[tuple[str, int, int]]:
    """``(name, codes incl. the 0 pad, slots per listing)`` per token feature, in order."""
    return [(t["name"], len(t["vocabulary"]) + 1, t["slots"]) for t in encoding["tokens"]]


def _lookup(column: Column, vocabulary: list[str]) -> Column:
    if not vocabulary:
        return F.lit(0)
    mapping = F.create_map(
        *[x for i, v in enumerate(vocabulary, start=1) for x in (F.lit(v), F.lit(i))]
    )
    return F.coalesce(mapping[column.cast("string")], F.lit(0))


def _bucket(column: Column, bounds: list[float]) -> Column:
    index = F.lit(1)
    for bound in bounds:
        index = index + F.when(column >= F.lit(bound), 1).otherwise(0)
    return F.when(column.isNull(), F.lit(0)).otherwise(index)


def _normalised(column: Column, entry: dict[str, Any]) -> Column:
    value = F.log1p(F.when(column >= 0, column)) if entry["log"] else column
    # A missing value is the mean (0) before clipping: greatest/least skip nulls, so clipping
    # first would turn it into -_CLIP.
    z = F.coalesce((value - F.lit(entry["mean"])) / F.lit(entry["std"]), F.lit(0.0))
    return F.least(F.greatest(z, F.lit(-_CLIP)), F.lit(_CLIP))


def _token_codes(feature: Feature, entry: dict[str, Any]) -> Column:
    vocabulary = entry["vocabulary"]
    slots = int(entry["slots"])
    if not vocabulary:
        return F.array_repeat(F.lit(0), slots)
    mapping = F.create_map(
        *[x for i, v in enumerate(vocabulary, start=1) for x in (F.lit(v), F.lit(i))]
    )
    known = F.filter(
        F.transform(F.coalesce(token_values(feature), F.array()), lambda t: mapping[t]),
        lambda code: code.isNotNull(),
    )
    first = F.slice(known, 1, slots)
    return F.concat(first, F.array_repeat(F.lit(0), F.lit(slots) - F.size(first)))


def _int_array(columns: list[Column]) -> Column:
    return F.array(*columns).cast("array<int>") if columns else F.array().cast("array<int>")


def encode_listing_features(
    listings: DataFrame, listing_vocabulary: DataFrame, encoding: dict[str, Any]
) -> DataFrame:
    """Encode every listing of the snapshot into the ``listing_features`` contract.

    ``has_interactions`` is left False here; ``mark_listings_with_interactions`` sets it once the
    training examples exist.
    """
    spec = from_dict(encoding["spec"])
    code_columns = []
    for entry in encoding["codes"]:
        if entry["kind"] == "categorical":
            code_columns.append(_lookup(F.col(entry["source"]), entry["vocabulary"]))
        elif entry["kind"] == "bucket":
            code_columns.append(_bucket(F.col(entry["source"]).cast("double"), entry["bounds"]))
        else:
            code_columns.append(_lookup(_geo_cell_key(entry["cell_degrees"]), entry["vocabulary"]))
    dense_columns = [_normalised(F.col(d["source"]).cast("double"), d) for d in encoding["dense"]]
    by_name = {f.column: f for f in spec.features}
    token_columns = [_token_codes(by_name[t["source"]], t) for t in encoding["tokens"]]
    tokens = F.concat(*token_columns) if token_columns else F.array()
    vocab = listing_vocabulary.select(
        F.col("id").alias("listing_id"), F.col("idx").alias("listing_idx")
    )
    return listings.join(vocab, "listing_id").select(
        F.col("listing_idx").cast("int"),
        "listing_id",
        "is_active",
        F.lit(False).alias("has_interactions"),
        _int_array(code_columns).alias("codes"),
        (
            F.array(*dense_columns).cast("array<float>")
            if dense_columns
            else F.array().cast("array<float>")
        ).alias("dense"),
        tokens.cast("array<int>").alias("tokens"),
    )
