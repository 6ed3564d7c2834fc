"""Training started from the Spark driver: TorchDistributor, the ranks' environment, restarts.

``run_distributed`` hands ``lib.training.train_worker`` to TorchDistributor, which starts one
process per rank (torchrun) on the driver (local mode) or as barrier tasks on executors;
``run_with_restarts`` runs it again from the latest epoch checkpoint when a rank dies. What a
rank does once started is ``lib.training``'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from lib.checkpoints import latest_checkpoint
from lib.training import TrainParams, log, train_worker


@contextmanager
def _rank_environment() -> Iterator[None]:
    """Environment for the rank processes TorchDistributor spawns on this machine.

    torchrun starts fresh interpreters whose ``sys.path`` is the temp dir of the pickled
    function: putting this package's root on PYTHONPATH lets them import ``lib`` even when the
    project is not pip-installed. OpenMP's default busy-waiting makes ``threads > 1`` several
    times slower than one thread when cores are shared (Spark tasks, other ranks), so ranks
    wait passively unless the caller chose a policy.
    """
    root = str(Path(__file__).resolve().parent.parent)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    parts = [p for p in (saved["PYTHONPATH"] or "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # torchrun's own default (each rank then sets its torch threads), without its banner.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_distributed(
    params: TrainParams, num_processes: int = 2, local_mode: bool = True, use_gpu: bool = False
) -> dict[str, Any]:
    """Train with ``num_processes`` DDP ranks via TorchDistributor; returns rank 0's metrics.

    Needs an active SparkSession. ``local_mode=True`` runs the ranks on the driver;
    ``False`` runs them as barrier tasks on executors (which must be able to import ``lib``).
    With ``use_gpu`` one rank runs per GPU (nccl); TorchDistributor takes the GPUs from Spark's
    resource scheduling, so the driver (local mode) or the executors and tasks must declare
    them (``spark.{driver,executor,task}.resource.gpu.amount`` plus a discovery script).
    """
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if use_gpu and local_mode and spark is not None and "gpu" not in spark.sparkContext.resources:
        raise ValueError(
            "use_gpu in local mode, but the Spark driver declares no GPUs: set "
            "spark.driver.resource.gpu.amount and spark.driver.resource.gpu.discoveryScript"
        )
    params = replace(params, use_gpu=use_gpu)
    distributor = TorchDistributor(
        num_processes=num_processes, local_mode=local_mode, use_gpu=use_gpu
    )
    if local_mode:
        with _rank_environment():
            return distributor.run(train_worker, params)
    return distributor.run(train_worker, params)


def run_with_restarts(
    params: TrainParams,
    num_processes: int,
    *,
    local_mode: bool = True,
    use_gpu: bool = False,
    max_restarts: int = 3,
) -> dict[str, Any]:
    """``run_distributed``, restarted from the latest epoch checkpoint when a rank dies.

    Rank processes can die mid-epoch (preemption, a lost executor; here 2-rank DDP on CPU used to
    abort with heap corruption, see README). A restart resumes from the last
    checkpoint, which reaches the same weights as an uninterrupted run. ``max_restarts`` counts
    consecutive failures without a new checkpoint, so a long run is not given up for failures
    spread over many epochs.
    """
    failures_without_progress = 0
    while True:
        before = latest_checkpoint(params.out_dir)
        try:
            return run_distributed(params, num_processes, local_mode=local_mode, use_gpu=use_gpu)
        except RuntimeError as error:
            progressed = latest_checkpoint(params.out_dir) != before
            failures_without_progress = 1 if progressed else failures_without_progress + 1
            if failures_without_progress > max_restarts:
                raise
            log(
                f"training failed ({str(error).splitlines()[0][:200]}); restarting from "
                f"{latest_checkpoint(params.out_dir) or 'the start'} "
                f"({failures_without_progress}/{max_restarts} without progress)"
            )
