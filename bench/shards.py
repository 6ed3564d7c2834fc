"""Time the shard stage on a large generated marketplace.

    .venv/bin/python bench/shards.py [--events 10000000 --listings 200000 --users 500000]

Generates the inputs once under --data (reused when present with the same sizes), runs stage 1
(`jobs/build_training_shards.py`) in a fresh local[2] session, then, in the same session on the
same events, a floor: what any job that cleans events per user has to do at least, i.e. one
scan of the interaction log, one shuffle of every event by user (``repartition(user_id)``) and
one Parquet write. The floor runs second, on a warm JVM and page cache, so the ratio errs high.

Prints as its last line one JSON object: events, seconds (stage time), events_per_second,
floor_seconds, ratio_to_floor (stage seconds / floor seconds; goal <= 2), step_seconds (the
stage's own clock per step), peak_rss_gb (driver Python + JVM).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import build_training_shards, generate_sample_data  # noqa: E402
from lib.session import build_session  # noqa: E402

RUN_DATE = dt.date(2026, 11, 20)
GOAL_RATIO_TO_FLOOR = 2.0


def ensure_inputs(data: Path, listings: int, users: int, events: int) -> dict:
    marker = data / "bench-inputs.json"
    wanted = {"listings": listings, "users": users, "events": events}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return {"generated": False}
    stats = generate_sample_data.run(
        None,
        generate_sample_data.parse_args(
            [
                "--out",
                str(data),
                "--listings",
                str(listings),
                "--users",
                str(users),
                "--events",
                str(events),
                "--days",
                "90",
                "--end-date",
                (RUN_DATE + dt.timedelta(days=1)).isoformat(),
            ]
        ),
    )
    marker.write_text(json.dumps(wanted))
    return {"generated": True, "generate": stats}


def time_floor(spark, interactions: Path, out: Path) -> dict:
    """One scan, one shuffle by user, one Parquet write of the same events; seconds and rows."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    events = spark.read.parquet(str(interactions))
    events.repartition(F.col("user_id")).write.mode("overwrite").parquet(str(out))
    seconds = time.perf_counter() - started
    rows = spark.read.parquet(str(out)).count()
    return {
        "seconds": seconds,
        "rows": rows,
        "partitions": spark.conf.get("spark.sql.shuffle.partitions"),
    }


def peak_rss_gb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The JVM is a child of this process; it is still alive, so read its high-water mark.
    jvm = 0
    for pid in subprocess.run(
        ["pgrep", "-P", str(os.getpid())], capture_output=True, text=True
    ).stdout.split():
        status = Path(f"/proc/{pid}/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    jvm = max(jvm, int(line.split()[1]))
    return round((own + jvm) / 1024 / 1024, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--listings", type=int, default=200_000)
    p.add_argument("--users", type=int, default=500_000)
    p.add_argument("--data", default="/tmp/listing-similarity-bench/shards-input")
    p.add_argument("--out", default="/tmp/listing-similarity-bench/shards")
    p.add_argument("--floor-out", default="/tmp/listing-similarity-bench/shards-floor")
    a = p.parse_args()
    data = Path(a.data)
    data.mkdir(parents=True, exist_ok=True)
    generation = ensure_inputs(data, a.listings, a.users, a.events)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = build_session("bench-shards", "local[2]")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    stats = build_training_shards.run(
        spark,
        build_training_shards.parse_args(
            [
                "--interactions",
                str(data / "interactions"),
                "--listings",
                str(data / "listings"),
                "--out",
                a.out,
                "--run-date",
                RUN_DATE.isoformat(),
            ]
        ),
    )
    seconds = time.perf_counter() - started
    counts = stats["counts"]
    events = sum(v for k, v in counts.items() if k.startswith("dropped_")) + counts["events_kept"]
    print(json.dumps({"counts": counts, **generation}, default=str))
    floor = time_floor(spark, data / "interactions", Path(a.floor_out))
    print(json.dumps({"floor": floor}), flush=True)
    print(
        json.dumps(
            {
                "events": events,
                "listings": a.listings,
                "seconds": round(seconds, 1),
                "events_per_second": round(events / seconds),
                "floor_seconds": round(floor["seconds"], 1),
                "ratio_to_floor": round(seconds / floor["seconds"], 2),
                "goal_ratio_to_floor_max": GOAL_RATIO_TO_FLOOR,
                "peak_rss_gb": peak_rss_gb(),
                "training_examples": counts["training_examples"],
                "step_seconds": stats["step_seconds"],
                "load_average_at_start": round(load_before, 2),
                "cores": os.cpu_count(),
            }
        )
    )
    spark.stop()


if __name__ == "__main__":
    main()
