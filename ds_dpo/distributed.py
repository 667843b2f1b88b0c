"""Rank-aware helpers that need a process group but no DeepSpeed engine."""

from __future__ import annotations

import contextlib
import os

import torch


def say(message: str) -> None:
    """Print a line once per job (global rank 0; the process itself outside a distributed run)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"ds_dpo: {message}", flush=True)


@contextlib.contextmanager
def local_main_first():
    """Local rank 0 does the work (files, tokenization caches) first; the other ranks of the node then find it
    done. Collective."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank != 0:
        torch.distributed.barrier()
    yield
    if local_rank == 0:
        torch.distributed.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective (one all-reduce of a scalar): True on every rank if ``flag`` is True on any."""
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
