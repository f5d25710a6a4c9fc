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


def check_leased_cuda() -> None:
    """Fail when the GPU lease gave this job K devices (``CDGMAE_REQUIRE_CUDA=K``, set by
    ``pipeline.lease`` unless CPU runs are allowed) and torch sees fewer CUDA devices: a GPU job
    never trains on the CPU silently (a CPU-only torch, devices hidden by a cgroup)."""
    need = os.environ.get("CDGMAE_REQUIRE_CUDA", "").strip()
    if not need or need == "0":
        return
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen < int(need):
        raise RuntimeError(
            f"this job was leased {need} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}) but torch {torch.__version__} sees {seen} "
            "CUDA device(s); not running on the CPU (config allow_cpu: true allows it)"
        )


def resolve_device(device: str | None = None) -> str:
    """The requested torch device, else ``cuda`` when one is visible, else ``cpu`` (an error where
    the GPU lease requires CUDA: ``check_leased_cuda``)."""
    if device:
        return device
    check_leased_cuda()
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device(device) -> str:
    """One line for a job's log: the device, its name and memory, the visible devices."""
    device = torch.device(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(index)
        return f"{device} ({p.name}, {p.total_memory / 2**30:.1f} GiB; CUDA_VISIBLE_DEVICES={visible})"
    return f"{device} ({torch.get_num_threads()} threads; CUDA_VISIBLE_DEVICES={visible})"


@contextlib.contextmanager
def distributed_context():
    """(world_size, rank, device): DDP process group when ``WORLD_SIZE`` > 1 (torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_leased_cuda()
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
