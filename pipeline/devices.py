"""Torch process setup: the device, intra-op threads, the DDP process group (infrastructure; global
seeding is ``pipeline.seeding``)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def set_threads(threads: int | None) -> None:
    """Bound intra-op threads to what the Snakemake job was given, and to the CPUs this process may
    run on (a job given more threads than cores would only oversubscribe them)."""
    if threads:
        torch.set_num_threads(max(1, min(int(threads), len(os.sched_getaffinity(0)))))


def resolve_device(device: str | None = None) -> str:
    """The requested torch device, else ``cuda`` when one is visible, else ``cpu``."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def distributed_context():
    """(world_size, rank, device): DDP process group when ``WORLD_SIZE`` > 1 (torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    try:
        yield world, rank, device
        dist.barrier()  # only under DDP (the reference barriers unconditionally and crashes)
    finally:
        dist.destroy_process_group()
