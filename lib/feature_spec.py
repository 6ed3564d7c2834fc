"""The listing features a marketplace declares: which columns, and what kind each one is.

A car marketplace has makes and mileages, a rental platform room types and amenities, a shop
item descriptions and prices, a click log nothing at all. The pipeline encodes, embeds, compares
and shows whatever the spec declares, so one code path serves all of them. A spec is a JSON file
(or the equivalent CLI flags)::

    {"features": [
        {"column": "make", "kind": "categorical"},
        {"column": "price_eur", "kind": "numeric", "log": true},
        {"column": "amenities", "kind": "multi_categorical", "separator": ","},
        {"column": "description", "kind": "text"},
        {"kind": "geo"}
     ],
     "display": ["make", "price_eur", "city"]}

``display`` lists the snapshot columns shown next to a listing (``similar``, the report); it
defaults to the declared feature columns. The spec is saved in the shard manifest and the model
artifact, so every later stage reads the features the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pyspark.sql import types as T

from schemas import listings

KINDS = ("categorical", "multi_categorical", "numeric", "text", "geo")
# The options each kind takes, with their defaults: enough for most catalogues untouched.
DEFAULTS: dict[str, dict[str, Any]] = {
    "categorical": {"max_vocabulary": 50_000},
    # Values per listing kept (the first ones), and the distinct values kept overall.
    "multi_categorical": {"separator": None, "max_values": 32, "max_vocabulary": 5_000},
    # "auto": log1p when the values are non-negative and spread over orders of magnitude.
    "numeric": {"buckets": 16, "log": "auto"},
    # Lower-cased words of at least two characters seen on at least two listings.
    "text": {"max_tokens": 16, "max_vocabulary": 20_000, "min_count": 2},
    "geo": {"cell_degrees": 0.5},
}
GEO = "geo"


@dataclass(frozen=True)
class Feature:
    """One declared feature: a snapshot column (the geo feature reads latitude/longitude)."""

    column: str
    kind: str
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str) -> Any:
        return dict(self.options).get(name, DEFAULTS[self.kind][name])

    @property
    def source_columns(self) -> tuple[str, ...]:
        return ("latitude", "longitude") if self.kind == GEO else (self.column,)

    def contract_type(self) -> T.DataType:
        """The type the listings snapshot must hold this column in."""
        if self.kind == "numeric":
            return T.DoubleType()
        if self.kind == "multi_categorical" and self.option("separator") is None:
            return T.ArrayType(T.StringType())
        return T.StringType()

    def to_dict(self) -> dict[str, Any]:
        head = {"kind": self.kind} if self.kind == GEO else {"column": self.column}
        return {**head, "kind": self.kind, **dict(self.options)}


@dataclass(frozen=True)
class FeatureSpec:
    features: tuple[Feature, ...] = ()
    display: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        names = [f.column for f in self.features]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"feature spec: {repeated} declared more than once")
        reserved = {"listing_id", "is_active", "latitude", "longitude", "created_date"}
        clash = sorted(n for n in names if n in reserved and n != GEO)
        if clash:
            raise ValueError(
                f"feature spec: {clash} are contract columns, not features (declare "
                '{"kind": "geo"} for the coordinates)'
            )

    def of_kind(self, *kinds: str) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if f.kind in kinds)

    @property
    def geo(self) -> Feature | None:
        found = self.of_kind(GEO)
        return found[0] if found else None

    @property
    def shown(self) -> tuple[str, ...]:
        """Snapshot columns shown beside a listing: ``display`` or else the feature columns."""
        if self.display:
            return self.display
        return tuple(f.column for f in self.features if f.kind != GEO)

    def snapshot_columns(self) -> dict[str, T.DataType]:
        """Declared and shown columns beyond the contract's, with the type each must have."""
        out = {f.column: f.contract_type() for f in self.features if f.kind != GEO}
        for name in self.display:
            out.setdefault(name, T.StringType())
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"features": [f.to_dict() for f in self.features]}
        if self.display:
            out["display"] = list(self.display)
        return out

    def with_display(self, display: Iterable[str]) -> FeatureSpec:
        return replace(self, display=tuple(display))


# A catalogue of ids only (a click log): listings embedded from behaviour alone.
NO_FEATURES = FeatureSpec()


def _feature(entry: Mapping[str, Any], where: str) -> Feature:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: each feature is an object, got {entry!r}")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    column = GEO if kind == GEO else entry.get("column")
    if not isinstance(column, str) or not column:
        raise ValueError(f"{where}: a {kind} feature needs a 'column'")
    options = {k: v for k, v in entry.items() if k not in ("column", "kind")}
    unknown = sorted(set(options) - set(DEFAULTS[kind]))
    if unknown:
        raise ValueError(
            f"{where}: {column}: unknown option(s) {unknown} for kind {kind} "
            f"(known: {', '.join(DEFAULTS[kind])})"
        )
    for name, value in options.items():
        default = DEFAULTS[kind][name]
        if isinstance(default, int) and not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{where}: {column}: {name} must be a positive integer, got {value!r}")
    if kind == "numeric" and options.get("log", "auto") not in (True, False, "auto"):
        raise ValueError(f'{where}: {column}: log must be true, false or "auto"')
    if kind == GEO and not float(options.get("cell_degrees", 0.5)) > 0:
        raise ValueError(f"{where}: geo: cell_degrees must be > 0")
    return Feature(column=column, kind=kind, options=tuple(sorted(options.items())))


def from_dict(data: Mapping[str, Any], where: str = "feature spec") -> FeatureSpec:
    """Parse and check a spec; errors name the file, the feature and the problem."""
    if not isinstance(data, Mapping) or not isinstance(data.get("features", []), list):
        raise ValueError(f'{where}: expected {{"features": [...], "display": [...]}}')
    unknown = sorted(set(data) - {"features", "display"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}")
    features = tuple(_feature(e, where) for e in data.get("features", []))
    display = data.get("display", [])
    if not isinstance(display, list) or not all(isinstance(d, str) for d in display):
        raise ValueError(f"{where}: display is a list of column names")
    try:
        return FeatureSpec(features=features, display=tuple(display))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def read(path: str | Path) -> FeatureSpec:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"feature spec {path}: not JSON ({error})") from None
    return from_dict(data, f"feature spec {path}")


def write(spec: FeatureSpec, path: str | Path) -> None:
    Path(path).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")


def from_flags(
    *,
    categorical: Sequence[str] = (),
    multi_categorical: Sequence[str] = (),
    numeric: Sequence[str] = (),
    text: Sequence[str] = (),
    geo: bool = False,
    display: Sequence[str] = (),
) -> FeatureSpec:
    """The spec the CLI flags declare (``--categorical a,b --numeric price:log ...``).

    A numeric ``name:log`` / ``name:linear`` fixes the transform; a multi-valued ``name:SEP``
    splits a string column at SEP.
    """
    entries: list[dict[str, Any]] = [{"column": c, "kind": "categorical"} for c in categorical]
    for item in multi_categorical:
        name, _, separator = item.partition(":")
        entries.append(
            {
                "column": name,
                "kind": "multi_categorical",
                **({"separator": separator} if separator else {}),
            }
        )
    for item in numeric:
        name, _, transform = item.partition(":")
        if transform not in ("", "log", "linear"):
            raise ValueError(f"--numeric {item}: the transform is log or linear")
        entries.append(
            {
                "column": name,
                "kind": "numeric",
                **({"log": transform == "log"} if transform else {}),
            }
        )
    entries += [{"column": c, "kind": "text"} for c in text]
    if geo:
        entries.append({"kind": GEO})
    return from_dict({"features": entries, "display": list(display)}, "feature flags")


def listings_table_spec(spec: FeatureSpec):
    """The listings contract for this spec: the fixed columns plus the declared ones."""
    return listings.spec_with(spec.snapshot_columns())


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def add_arguments(parser) -> None:
    """``--feature-spec FILE`` or the per-kind flags: how a stage learns the features."""
    group = parser.add_argument_group(
        "listing features (a spec file, or the flags; neither: the listings have no features)"
    )
    group.add_argument("--feature-spec", help="JSON feature spec (see lib/feature_spec.py)")
    group.add_argument("--categorical", type=_names, default=(), help="columns, comma-separated")
    group.add_argument(
        "--multi-categorical", type=_names, default=(), help="array columns (or name:SEP)"
    )
    group.add_argument("--numeric", type=_names, default=(), help="columns (name:log, name:linear)")
    group.add_argument("--text", type=_names, default=(), help="short text columns, as words")
    group.add_argument("--geo", action="store_true", help="latitude/longitude as a feature")
    group.add_argument("--display", type=_names, default=(), help="columns shown per listing")


def from_arguments(args) -> FeatureSpec:
    flags = (args.categorical, args.multi_categorical, args.numeric, args.text, args.display)
    if args.feature_spec:
        if any(flags) or args.geo:
            raise ValueError("give --feature-spec or the per-kind feature flags, not both")
        return read(args.feature_spec)
    return from_flags(
        categorical=args.categorical,
        multi_categorical=args.multi_categorical,
        numeric=args.numeric,
        text=args.text,
        geo=args.geo,
        display=args.display,
    )
