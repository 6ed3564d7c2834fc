"""The id tables' sparse gradients: a faster lazy Adam, and their average across ranks.

The user and listing id tables are ``sparse=True`` embeddings, so a step touches only the rows
of its batch. ``SparseRowAdam`` is SparseAdam's update done with row gathers and scatters (a
single rank's optimizer); ``SparseGradientSync`` averages the tables' sparse gradients across
DDP ranks with dense gloo all-gathers: DDP's own sparse all-reduce corrupted the heap at two
ranks, and NCCL has none (``lib.training._distributed`` wires them up).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class SparseRowAdam(torch.optim.Optimizer):
    """``torch.optim.SparseAdam``'s update (lazy Adam: only the rows in the gradient move), done
    with row gathers and scatters.

    SparseAdam builds sparse tensors for every moment update (``sparse_mask`` twice, three
    sparse adds); gathering the touched rows once, updating them densely and writing them back
    is the same arithmetic with fewer passes over the batch's rows. The state has SparseAdam's
    layout (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints look the same.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if lr <= 0 or eps <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid SparseRowAdam settings lr={lr} betas={betas} eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseRowAdam needs sparse gradients (sparse=True tables)")
                grad = p.grad.coalesce()
                rows, values = grad._indices()[0], grad._values()
                if rows.numel() == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
                exp_avg_sq.mul_(beta2).addcmul_(values, values, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                update = exp_avg.div_(exp_avg_sq.sqrt_().add_(group["eps"]))
                p.index_add_(0, rows, update, alpha=-step_size)
        return loss


class SparseGradientSync:
    """Average sparse (COO, row-indexed) gradients across ranks: every rank all-gathers the
    others' touched rows and values, padded to the largest count, and sums duplicates. The same
    arithmetic as DDP's sparse all-reduce, through dense gloo collectives only."""

    def __init__(self, params: list[torch.nn.Parameter], group=None):
        self.params = params
        self.group = group

    def broadcast_from_rank_zero(self) -> None:
        """Start every rank from rank 0's tables, as DDP does for the parameters it manages."""
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=0, group=self.group)

    def __call__(self) -> None:
        world = dist.get_world_size(self.group)
        grads = [self._coalesced(p) for p in self.params]
        counts = torch.tensor([g.indices().shape[1] for g in grads], dtype=torch.int64)
        gathered = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts, group=self.group)
        sizes = torch.stack(gathered)  # (world, params)
        for i, (p, grad) in enumerate(zip(self.params, grads, strict=True)):
            most = int(sizes[:, i].max())
            rows = torch.zeros(most, dtype=torch.int64)
            values = torch.zeros((most, *grad.shape[1:]), dtype=grad.dtype)
            n = grad.indices().shape[1]
            rows[:n] = grad.indices()[0].cpu()
            values[:n] = grad.values().cpu()
            all_rows = [torch.empty_like(rows) for _ in range(world)]
            all_values = [torch.empty_like(values) for _ in range(world)]
            dist.all_gather(all_rows, rows, group=self.group)
            dist.all_gather(all_values, values, group=self.group)
            keep = [int(c) for c in sizes[:, i]]
            merged = torch.sparse_coo_tensor(
                torch.cat([r[:c] for r, c in zip(all_rows, keep, strict=True)])[None],
                torch.cat([v[:c] for v, c in zip(all_values, keep, strict=True)]) / world,
                grad.shape,
                # Indices come from coalesced gradients of this very table: in range by
                # construction, so the check would only cost time (and torch warns without it).
                check_invariants=False,
            )
            p.grad = merged.coalesce().to(p.device)

    @staticmethod
    def _coalesced(p: torch.nn.Parameter) -> torch.Tensor:
        if p.grad is None:  # no row of this table in the rank's batch
            return torch.sparse_coo_tensor(
                torch.empty((1, 0), dtype=torch.int64),
                torch.empty((0, *p.shape[1:]), dtype=p.dtype),
                p.shape,
                check_invariants=False,
            )
        return p.grad.coalesce()
