"""The process: its place in the job (process group, device), once-per-job messages and agreement between ranks,
and the process-wide state DeepSpeed and transformers keep (op build locks, shared-memory buffers, the ZeRO-3
registration)."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import time
import warnings
from pathlib import Path

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
    return bool(max_over_ranks(float(flag), device))


def max_over_ranks(value: float, device: torch.device) -> float:
    """Collective (one all-reduce of a scalar): the largest ``value`` of any rank, on every rank."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def cache_cpu_info() -> None:
    """DeepSpeed's CPU op builders (CPU Adam for offload, Adam and the shared-memory all-reduce on CPU machines) ask
    py-cpuinfo for the CPU's features twice per op load, and each ask starts a Python subprocess (~1.2 s on 2 cores,
    per rank and op): ask once per process. The answer cannot change while the process runs."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then falls back to lscpu
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


def clear_stale_build_locks(max_age_s: float = 600) -> list[Path]:
    """Remove the ``lock`` files of DeepSpeed op builds (torch's extension directory) older than ``max_age_s``.

    Every process that loads a JIT-built op (CPU Adam, the CPU shared-memory all-reduce, ...) holds ``<op>/lock``
    while ninja checks the build, about a second when it is built, minutes when it is not. A process killed in
    that window leaves the file behind, and every later process that loads the op waits for it to go, forever and
    without a word. A build takes about 3 min on 2 cores: an older lock is stale."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:  # <op>/lock, or <python_device>/<op>/lock
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # another rank removed it, or its build finished
            continue
    for lock in removed:
        print(
            f"ds_dpo: removed a stale DeepSpeed op build lock ({lock}), left by a process killed while loading the op",
            flush=True,
        )
    return removed


def init_distributed(timeout_s: int) -> tuple[int, int, int]:
    """Initialise torch.distributed (NCCL on GPUs, gloo on CPU); return (rank, world_size, local_rank).

    ``timeout_s`` bounds every collective: a rank that dies makes the others fail after it instead of waiting forever.
    """
    clear_stale_build_locks()
    cache_cpu_info()
    alone = _one_process_without_launcher()
    release_shm_buffers()  # a killed run's, on the same address and port: a new run would map them unreset
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed 0.19 gathers and reduce-scatters through these torch entry points, which torch 2.13 marks deprecated
    # in favour of names DeepSpeed does not call yet: one FutureWarning per collective call site, in every run's
    # console. Only these two messages are silenced; any other warning still shows.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
        "deprecated",
        category=FutureWarning,
    )
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(), timeout=datetime.timedelta(seconds=timeout_s)
    )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if alone:
        say(
            "notice: started without a launcher: one process. For several GPUs or nodes: `deepspeed --num_gpus N "
            "launch/train.py ...` (docs/deepspeed.md)"
        )
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank)
    return rank, world, local_rank


def _one_process_without_launcher() -> bool:
    """Started as ``python launch/train.py`` (how Hugging Face and TRL scripts are often first run), no launcher
    has described the process group, and DeepSpeed would go looking for MPI (and fail without ``mpi4py``). Describe a
    group of one process, as ``torchrun --nproc_per_node 1`` would. MPI launchers, which DeepSpeed discovers itself,
    are left to it."""
    if "RANK" in os.environ or any(key in os.environ for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )  # fmt: skip
    return True


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def release_shm_buffers() -> None:
    """Unlink this rank's shared-memory all-reduce buffer (CPU accelerator only).

    DeepSpeed's CPU shm all-reduce creates ~70 MB per rank under /dev/shm named after the master address, port and
    global rank, and never unlinks it: every CPU run would leak it, and one left by a killed run would be mapped, with
    its old state, by the next run on the same port. Call once no rank communicates any more, and before the process
    group starts (each rank only its own buffer: the others' may already be in use)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    rank = os.environ.get("RANK", "0")
    for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        buffer.unlink(missing_ok=True)


@contextlib.contextmanager
def zero3_disabled():
    """Let transformers build an ordinary, unpartitioned model (the built-in model, an export) while a ZeRO-3 run is
    alive in this process."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if saved is not None and saved() is not None:
            hf_deepspeed.set_hf_deepspeed_config(saved())
