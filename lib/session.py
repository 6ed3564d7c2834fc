"""The one place a SparkSession is built.

Local ("embedded") sessions run everything on this machine with the current interpreter as the
Python worker; cluster sessions take master, resources and Delta's jars from spark-submit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyspark.sql import SparkSession

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
# Warnings and errors only, without the start-up notices of a local JVM (lib/log4j2.properties).
LOCAL_LOG_CONFIG = Path(__file__).with_name("log4j2.properties")


def is_local_master(master: str | None) -> bool:
    return master is None or master.startswith("local")


def build_session(
    app_name: str,
    master: str | None = None,
    *,
    shuffle_partitions: int | None = None,
    ui: bool = True,
    extra_conf: dict[str, str] | None = None,
) -> SparkSession:
    """Return a SparkSession for a job.

    With no master (or ``local[...]``) the session is local: the worker Python is this
    interpreter (otherwise workers start the system Python without pandas/torch), time zone UTC,
    and a shuffle partition count sized for a laptop. Under spark-submit on a cluster, the master
    and resources come from spark-submit and only the settings the jobs rely on are set here.
    """
    master = master or os.environ.get("SPARK_MASTER")
    builder = SparkSession.builder.appName(app_name)
    if is_local_master(master) and not launched_by_spark_submit():
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        # One machine: bind to loopback rather than warn that the hostname resolves to it.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        cores = os.cpu_count() or 2
        builder = (
            builder.master(master or f"local[{cores}]")
            .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
            .config("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "6g"))
            # The throughput collector: these are batch jobs, and G1's bookkeeping cost the
            # shard stage ~15 % of its time on 2 cores (README, Stage 1 -> Speed).
            .config(
                "spark.driver.extraJavaOptions",
                f"-XX:+UseParallelGC -Dlog4j2.configurationFile={LOCAL_LOG_CONFIG.as_uri()}",
            )
            .config("spark.sql.shuffle.partitions", str(shuffle_partitions or 2 * cores))
            # Listing a local input's directories (e.g. 90 date partitions) is quicker on the
            # driver than as a Spark job of one task per directory.
            .config("spark.sql.sources.parallelPartitionDiscovery.threshold", "10000")
            .config("spark.ui.enabled", "true" if ui else "false")
            # The stages print a line each; Spark's progress bars would interleave with them.
            .config("spark.ui.showConsoleProgress", "false")
        )
    elif shuffle_partitions:
        builder = builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions))
    builder = (
        builder.config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # The embedded Delta writer lists exactly the files Spark wrote; _SUCCESS is noise there.
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    )
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("SPARK_LOG_LEVEL", "WARN"))
    return spark


def has_delta_extension(spark: SparkSession) -> bool:
    """True when the session was started with Delta Lake's SQL extension (native Delta writes)."""
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    return DELTA_EXTENSION in extensions


def launched_by_spark_submit() -> bool:
    """spark-submit starts the JVM first and hands the Python driver its gateway port."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


@contextmanager
def sql_conf(spark: SparkSession, key: str, value: str) -> Iterator[None]:
    """Set one runtime SQL setting for the block, then restore what the session had."""
    previous = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        if previous is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, previous)


def uncompressed_cache(spark: SparkSession):
    """Caches declared inside this block skip Spark's columnar compression.

    For the millions of events the shard stage caches and reads back a few times, compressing
    cost more CPU (~15 s for 10M events on 2 cores) than the memory it saves is worth; a cache
    that does not fit spills to disk. Spark reads the setting when a cache is declared, so wrap
    the ``persist()`` call.
    """
    return sql_conf(spark, "spark.sql.inMemoryColumnarStorage.compressed", "false")
