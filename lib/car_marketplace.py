"""What the generated used-car marketplace declares: its listing columns and feature spec.

The pipeline knows no car columns; this is the spec a used-car marketplace would write, and the
one ``generate`` puts beside the listings it writes (``inputs/feature_spec.json``).
"""

from __future__ import annotations

import pyarrow as pa

from lib.feature_spec import FeatureSpec, from_dict

FEATURE_SPEC: FeatureSpec = from_dict(
    {
        "features": [
            {"column": "make", "kind": "categorical"},
            {"column": "model", "kind": "categorical"},
            {"column": "body_type", "kind": "categorical"},
            {"column": "fuel_type", "kind": "categorical"},
            {"column": "transmission", "kind": "categorical"},
            {"column": "colour", "kind": "categorical"},
            {"column": "year", "kind": "numeric", "log": False},
            {"column": "mileage_km", "kind": "numeric", "log": False},
            {"column": "price_eur", "kind": "numeric", "log": True},
            {"column": "power_kw", "kind": "numeric", "log": False},
            {"kind": "geo"},
        ],
        "display": ["make", "model", "body_type", "year", "mileage_km", "price_eur", "city"],
    },
    "the generated marketplace's feature spec",
)

LISTINGS_SCHEMA = pa.schema(
    [
        pa.field("listing_id", pa.string(), nullable=False),
        pa.field("make", pa.string()),
        pa.field("model", pa.string()),
        pa.field("body_type", pa.string()),
        pa.field("fuel_type", pa.string()),
        pa.field("transmission", pa.string()),
        pa.field("colour", pa.string()),
        pa.field("year", pa.int32()),
        pa.field("mileage_km", pa.int32()),
        pa.field("price_eur", pa.float64()),
        pa.field("power_kw", pa.int32()),
        pa.field("latitude", pa.float64()),
        pa.field("longitude", pa.float64()),
        pa.field("city", pa.string()),
        pa.field("dealer_id", pa.string()),
        pa.field("is_active", pa.bool_(), nullable=False),
        pa.field("created_date", pa.date32()),
    ]
)
