from lib.session import sql_conf, uncompressed_cache

COMPRESSED = "spark.sql.inMemoryColumnarStorage.compressed"


def test_sql_conf_sets_for_the_block_and_restores(spark):
    spark.conf.set(COMPRESSED, "true")
    with uncompressed_cache(spark):
        assert spark.conf.get(COMPRESSED) == "false"
    assert spark.conf.get(COMPRESSED) == "true"


def test_sql_conf_restores_after_an_error_and_unsets_what_was_unset(spark):
    key = "spark.sql.listing_similarity.test_only"
    try:
        with sql_conf(spark, key, "x"):
            assert spark.conf.get(key) == "x"
            raise RuntimeError("stage failed")
    except RuntimeError:
        pass
    assert spark.conf.get(key, None) is None
