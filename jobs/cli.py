"""The ``listing-similarity`` command: one subcommand per stage, ``run`` for all, ``demo``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "generate": ("jobs.generate_sample_data", "generate a sample used-car marketplace"),
    "shards": ("jobs.build_training_shards", "stage 1: interaction logs -> training shards"),
    "train": ("jobs.train_embeddings", "stage 2: train the two-tower model (TorchDistributor)"),
    "embeddings": ("jobs.compute_embeddings", "stage 3: embed every active listing"),
    "neighbours": ("jobs.compute_neighbours", "stage 4: top-k neighbours -> Delta"),
    "evaluate": ("jobs.evaluate", "stage 5: model vs baselines on the holdout -> report"),
    "run": ("jobs.pipeline", "all stages for one run date"),
    "demo": ("jobs.demo", "generate data and run everything end to end under ./demo"),
    "similar": ("jobs.similar", "print a listing and its top neighbours from the table"),
    "import": ("jobs.import_files", "plain CSV/Parquet files + a column mapping -> our inputs"),
    "import-insideairbnb": ("jobs.import_insideairbnb", "Inside Airbnb scrapes -> our inputs"),
}


def usage() -> str:
    lines = ["usage: listing-similarity COMMAND [--help | options]", "", "commands:"]
    lines += [f"  {name:<19} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(usage())
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])


if __name__ == "__main__":
    main()
