"""What the shard stage hands to training and inference.

``training_examples``: one row per (user, listing) with its aggregated, decayed weight: ids and
two floats only. ``listing_features``: one row per indexed listing with its encoded features;
the training loader holds it in memory and looks the features up by ``listing_idx`` (a
catalogue is far smaller than its interactions, so writing the features onto every example
cost the shard stage more than the lookup costs the loader), and inference embeds every active
listing from it. ``holdout``: the held-out events, for evaluation.
"""

from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    FloatType,
    IntegerType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from schemas._spec import TableSpec

SCHEMA = StructType(
    [
        StructField("user_idx", IntegerType(), nullable=False),
        StructField("listing_idx", IntegerType(), nullable=False),
        StructField("weight", FloatType(), nullable=False),
        # log of the listing's share of training examples: the sampling-bias (log-Q) correction.
        StructField("log_q", FloatType(), nullable=False),
    ]
)
# Version 2: the listing features moved off the examples into ``listing_features``.
SPEC = TableSpec(
    name="training_examples", schema=SCHEMA, key=("user_idx", "listing_idx"), version=2
)

LISTING_FEATURES_SCHEMA = StructType(
    [
        StructField("listing_idx", IntegerType(), nullable=False),
        StructField("listing_id", StringType(), nullable=False),
        StructField("is_active", BooleanType(), nullable=False),
        # False for listings no training example mentions: embedded from features alone.
        StructField("has_interactions", BooleanType(), nullable=False),
        # The encoding's single codes, z-scores and token codes (``lib.features``): the same
        # widths on every row, their names and sizes in the shard manifest.
        StructField("codes", ArrayType(IntegerType(), containsNull=False), nullable=False),
        StructField("dense", ArrayType(FloatType(), containsNull=False), nullable=False),
        StructField("tokens", ArrayType(IntegerType(), containsNull=False), nullable=False),
    ]
)
# Version 2: the features of the marketplace's own spec, as three fixed-width arrays.
LISTING_FEATURES_SPEC = TableSpec(
    name="listing_features", schema=LISTING_FEATURES_SCHEMA, key=("listing_idx",), version=2
)

HOLDOUT_SCHEMA = StructType(
    [
        StructField("user_id", StringType(), nullable=False),
        StructField("listing_id", StringType(), nullable=False),
        StructField("event_type", StringType(), nullable=False),
        StructField("event_ts", TimestampType(), nullable=False),
        StructField("session_id", StringType(), nullable=True),
    ]
)
HOLDOUT_SPEC = TableSpec(name="holdout", schema=HOLDOUT_SCHEMA)

VOCABULARY_SCHEMA = StructType(
    [
        StructField("id", StringType(), nullable=False),
        StructField("idx", IntegerType(), nullable=False),
    ]
)
USER_VOCABULARY_SPEC = TableSpec(name="user_vocabulary", schema=VOCABULARY_SCHEMA, key=("id",))
LISTING_VOCABULARY_SPEC = TableSpec(
    name="listing_vocabulary", schema=VOCABULARY_SCHEMA, key=("id",)
)

# Co-interaction statistics (``lib.cointeraction``): one row per (listing, partner) that share
# a user, the union of each similarity variant's best partners.
COINTERACTION_SCHEMA = StructType(
    [
        StructField("listing_id", StringType(), nullable=False),
        StructField("neighbour_id", StringType(), nullable=False),
        StructField("common", IntegerType(), nullable=False),
        StructField("dot", FloatType(), nullable=False),
        StructField("listing_users", IntegerType(), nullable=False),
        StructField("neighbour_users", IntegerType(), nullable=False),
        StructField("listing_norm", FloatType(), nullable=False),
        StructField("neighbour_norm", FloatType(), nullable=False),
        # Σ over the common users of deg(user)^-alpha, one entry per lib.cointeraction.RP3_ALPHAS.
        StructField("rp3", ArrayType(FloatType(), containsNull=False), nullable=False),
    ]
)
COINTERACTION_SPEC = TableSpec(
    name="cointeraction", schema=COINTERACTION_SCHEMA, key=("listing_id", "neighbour_id")
)

# Held-out pairs as the evaluate stage scores them (``lib.evaluation.label_pairs``).
PAIRS_SCHEMA = StructType(
    [
        StructField("user_id", StringType(), nullable=False),
        StructField("query_id", StringType(), nullable=False),
        StructField("target_id", StringType(), nullable=False),
        StructField("is_cold", BooleanType(), nullable=False),
    ]
)
PAIRS_SPEC = TableSpec(name="holdout_pairs", schema=PAIRS_SCHEMA)

# The validation days' pairs by listing index: what training scores its epochs on.
VALIDATION_PAIRS_SCHEMA = StructType(
    [
        StructField("query_idx", IntegerType(), nullable=False),
        StructField("target_idx", IntegerType(), nullable=False),
    ]
)
VALIDATION_PAIRS_SPEC = TableSpec(name="validation_pairs", schema=VALIDATION_PAIRS_SCHEMA)

# Listing-listing training pairs (``lib.shards.pair_examples``): a context listing and a listing
# co-interacted with it before the validation days, weighted by the users they share.
PAIR_EXAMPLES_SCHEMA = StructType(
    [
        StructField("context_idx", IntegerType(), nullable=False),
        StructField("listing_idx", IntegerType(), nullable=False),
        StructField("weight", FloatType(), nullable=False),
        StructField("log_q", FloatType(), nullable=False),
    ]
)
PAIR_EXAMPLES_SPEC = TableSpec(
    name="pair_examples", schema=PAIR_EXAMPLES_SCHEMA, key=("context_idx", "listing_idx")
)
