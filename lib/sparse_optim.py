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


def _aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to 8: each part of the sync buffer starts where int64 rows can be
    viewed."""
    return -(-nbytes // 8) * 8


class SparseGradientSync:
    """Average sparse (COO, row-indexed) gradients across ranks: every rank all-gathers the
    others' touched rows and values and sums duplicates. The same arithmetic as DDP's sparse
    all-reduce, through dense gloo collectives only.

    One collective per step whatever the number of tables: a byte buffer holding every table's
    row count, rows and values, each table padded to ``row_bounds`` (the most rows a step's
    gradient can have in it, the same on every rank, so no rank needs the others' counts
    first). On a 2-core box a gloo collective costs about a millisecond, as much as a tenth of
    a step's compute.
    """

    def __init__(self, params: list[torch.nn.Parameter], row_bounds: list[int], group=None):
        if len(row_bounds) != len(params):
            raise ValueError(f"{len(row_bounds)} row bounds for {len(params)} tables")
        self.params = params
        self.row_bounds = [int(b) for b in row_bounds]
        self.group = group

    def broadcast_from_rank_zero(self) -> None:
        """Start every rank from rank 0's tables, as DDP does for the parameters it manages."""
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=0, group=self.group)

    def __call__(self) -> None:
        grads = [
            self._gradient(p, most) for p, most in zip(self.params, self.row_bounds, strict=True)
        ]
        for i, (grad, most) in enumerate(zip(grads, self.row_bounds, strict=True)):
            if grad._nnz() > most:
                raise RuntimeError(
                    f"sparse gradient of table {i} ({tuple(grad.shape)}) has {grad._nnz()} rows, "
                    f"more than its bound of {most} rows per step: the bound is wrong"
                )
        world = dist.get_world_size(self.group)
        counts = torch.tensor([g._nnz() for g in grads], dtype=torch.int64)
        buffer = torch.cat(
            [
                counts.view(torch.uint8),
                *(
                    self._padded_bytes(grad, most)
                    for grad, most in zip(grads, self.row_bounds, strict=True)
                ),
            ]
        )
        buffers = [torch.empty_like(buffer) for _ in range(world)]
        dist.all_gather(buffers, buffer, group=self.group)
        sizes = [received[: counts.numel() * 8].view(torch.int64).tolist() for received in buffers]
        offset = counts.numel() * 8
        for i, (p, grad, most) in enumerate(zip(self.params, grads, self.row_bounds, strict=True)):
            row_bytes, value_bytes = most * 8, self._value_bytes(grad, most)
            parts = []
            for rank, received in enumerate(buffers):
                n = sizes[rank][i]
                rows = received[offset : offset + row_bytes].view(torch.int64)[:n]
                values = received[offset + row_bytes : offset + row_bytes + value_bytes]
                parts.append((rows, values.view(grad.dtype).view(most, *grad.shape[1:])[:n]))
            offset += row_bytes + _aligned(value_bytes)
            merged = torch.sparse_coo_tensor(
                torch.cat([rows for rows, _ in parts])[None],
                torch.cat([values for _, values in parts]) / world,
                grad.shape,
                # Indices come from gradients of this very table: in range by construction, so
                # the check would only cost time (and torch warns without it).
                check_invariants=False,
            )
            p.grad = merged.coalesce().to(p.device)

    @staticmethod
    def _value_bytes(grad: torch.Tensor, most: int) -> int:
        return most * math.prod(grad.shape[1:]) * grad.dtype.itemsize

    @classmethod
    def _padded_bytes(cls, grad: torch.Tensor, most: int) -> torch.Tensor:
        """The gradient's rows (int64) then its values, as bytes padded to ``most`` rows."""
        rows = torch.zeros(most, dtype=torch.int64)
        values = torch.zeros((most, *grad.shape[1:]), dtype=grad.dtype)
        n = grad._nnz()
        rows[:n] = grad._indices()[0].cpu()
        values[:n] = grad._values().cpu()
        value_bytes = cls._value_bytes(grad, most)
        padding = torch.zeros(_aligned(value_bytes) - value_bytes, dtype=torch.uint8)
        return torch.cat([rows.view(torch.uint8), values.reshape(-1).view(torch.uint8), padding])

    @staticmethod
    def _gradient(p: torch.nn.Parameter, most: int) -> torch.Tensor:
        """The table's gradient as the backward left it, one row per lookup, unless that is
        more than ``most`` (a table smaller than a batch's lookups): then coalesced. The copies
        of a row meet in the merged gradient."""
        if p.grad is None:  # no row of this table in the rank's batch
            return torch.sparse_coo_tensor(
                torch.empty((1, 0), dtype=torch.int64),
                torch.empty((0, *p.shape[1:]), dtype=p.dtype),
                p.shape,
                check_invariants=False,
            )
        return p.grad if p.grad._nnz() <= most else p.grad.coalesce()
