"""The training loop's common parts, shared by pretraining (``pipeline.pretrain.engine`` / ``train``)
and S-LDM training (``pipeline.sldm.engine`` / ``train``), as MAE's ``util/`` (``misc.py``,
``lr_sched.py``) and timm's ``utils/`` + ``scheduler/`` serve their trainers: the warm-up + cosine
lr schedule, the loss rule, the loss history and its outputs (log CSV, loss curve), the DDP wrap,
the resumable state (over ``pipeline.resume``) and its fingerprint, the command line's common
options and process setup. Each engine keeps only its own step; this module imports no stage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel

from pipeline.cli import command_parser
from pipeline.config import add_runtime_flags, apply_runtime_flags, job_settings, load_settings
from pipeline.devices import distributed_context
from pipeline.io import atomic_path, write_csv_atomic
from pipeline.provenance import code_digests
from pipeline.resume import UnhealthyWeightsError, load_resume_state

# ---------------------------------------------------------------------------------------------
# what every step uses


@dataclass(kw_only=True)
class TrainingLoop:
    """The parts of a training run every step of both trainers uses; each engine's ``Loop`` adds its own."""

    model: torch.nn.Module  # the model itself (its state dict is what is saved)
    optimizer: torch.optim.Optimizer
    autocast: contextlib.AbstractContextManager  # reduced precision on GPU, a null context in fp32
    device: torch.device
    settings: dict
    seed: int
    ddp_model: torch.nn.Module | None = None  # the model to run steps with: DDP-wrapped under torchrun
    world_size: int = 1
    rank: int = 0

    @property
    def step_model(self) -> torch.nn.Module:
        """The model steps run: the DDP wrapper under torchrun, else the model itself."""
        return self.model if self.ddp_model is None else self.ddp_model


def wrap_ddp(model, device: torch.device, world_size: int, *, cudnn_benchmark: bool = False):
    """The model to run steps with: itself in one process, DDP-wrapped under torchrun (after any
    resume: DDP broadcasts rank 0's weights when it wraps). ``cudnn_benchmark``: let cuDNN pick its
    fastest kernels for fixed-shape batches (pretraining; S-LDM training leaves the default)."""
    if cudnn_benchmark and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_ranks(total: torch.Tensor, count: int, world_size: int) -> float:
    """``total`` (a sum of ``count`` losses on this rank, a tensor the caller owns: it is reduced in
    place) averaged over the losses of every rank, so every rank sees a NaN anywhere."""
    if world_size > 1:
        dist.all_reduce(total)
    return total.item() / (count * world_size)


# ---------------------------------------------------------------------------------------------
# lr schedule


def lr_at(
    step: int, steps_per_unit: int = 1, *, warmup: float, total: float, peak_lr: float, min_lr: float = 0.0
) -> float:
    """MAE's ``lr_sched.adjust_learning_rate`` at ``step / steps_per_unit`` units: linear warm-up from 0
    over ``warmup`` units, then half-cycle cosine from ``peak_lr`` to ``min_lr`` at ``total`` units.
    Units are epochs for pretraining (fractional: ``steps_per_unit`` = steps per epoch, as MAE's
    per-iteration schedule), steps for the S-LDM (``steps_per_unit`` = 1). Set before each optimizer
    step, so step 0 runs at lr 0, not the peak."""
    e = step / steps_per_unit
    if e < warmup:
        return peak_lr * e / warmup
    span = total - warmup
    progress_ = (e - warmup) / span if span > 0 else 1.0
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` on every param group (the scheduled lr of the coming step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------
# the loss rule


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step and the kept state."""


class DivergedLossError(NonFiniteLossError):
    """The loss exploded while staying finite (the divergence rule of ``check_loss``)."""


def check_loss(
    loss: float,
    step: int,
    *,
    keeping: str | None = None,
    epoch: int | None = None,
    lowest: float | None = None,
    factor: float | None = None,
) -> None:
    """The divergence rule of the loss, before the update: stop on a non-finite loss, or (with
    ``factor``, ``pretrain.divergence_factor``) on one above ``factor`` x the lowest loss of the run so
    far. The weights have a rule too, checked after each update (``pipeline.resume.WeightHealth``),
    so the state saved last, whose every step passed both rules, is the one a retry resumes from
    (``keeping`` names it, ``kept_state``)."""
    where = f"at step {step}" + (f" (epoch {epoch})" if epoch is not None else "") + "; stopped without updating"
    if keeping is not None:
        where += f", keeping {keeping}"
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"non-finite training loss ({loss}) {where}")
    if factor is not None and lowest is not None and loss > factor * lowest:
        raise DivergedLossError(
            f"training loss {loss:.4g} > divergence_factor {factor:g} x the lowest loss so far ({lowest:.4g}) {where}"
        )


def kept_state(path, saved_at: str | None) -> str:
    """What a stopped run keeps, for its error message: the state at ``path`` saved at ``saved_at``
    (``"epoch 2"``, ``"step 4"``), or nothing yet."""
    return "no checkpoint yet" if saved_at is None else f"the last good checkpoint {path} ({saved_at})"


@contextlib.contextmanager
def loader_batches(loader):
    """``iter(loader)``, whose loader workers are shut down when an error leaves the block.

    Why: the error keeps the iterator alive in its traceback's frames; freed later by the cyclic
    garbage collector, after its queues' feeder threads were finalised, a ``DataLoader`` iterator
    waits 5 s per worker for workers that never hear the shutdown (a caller that handles the error
    and goes on, such as a test, paid 10 s per error with two workers). A block left normally keeps
    the iterator: persistent workers serve the next epoch.
    """
    batches = iter(loader)
    try:
        yield batches
    except BaseException:
        shutdown = getattr(batches, "_shutdown_workers", None)  # a multi-process iterator's own clean-up
        if shutdown is not None:
            shutdown()
        raise


# ---------------------------------------------------------------------------------------------
# loss history: per-step record, log and curve


def new_history(keys) -> dict:
    """An empty history with one list per key, in the log's column order."""
    return {k: [] for k in keys}


class StepTimer:
    """The throughput of one step: ``rate(n)`` = ``n`` samples over the seconds since it was made."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def rate(self, n: int) -> float:
        return n / max(time.perf_counter() - self.t0, 1e-9)


def record_step(history: dict, bar, **values) -> None:
    """Append one step's ``values`` (every key of ``history``) and show them on the progress ``bar``."""
    for key in history:
        history[key].append(values[key])
    bar.update(1)
    shown = {k: v for k, v in values.items() if k not in ("step", "epoch")}
    bar.set_postfix(
        {k: f"{v:.4f}" if k == "loss" else f"{v:.2e}" if k == "lr" else f"{v:.1f}" for k, v in shown.items()}
    )


def write_log_csv(history: dict, path) -> None:
    """The per-step log: one column per history key, one row per step."""
    write_csv_atomic(pd.DataFrame(history), path)


def plot_curve(history: dict, path, title: str, *, loss_label: str, log_loss: bool = False) -> None:
    """Loss (left axis, log scale if ``log_loss``) and lr (right axis) against the optimizer step,
    PNG via Agg (a bare ``Figure``: no pyplot state, no GUI backend)."""
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(history["step"], history["loss"], lw=1, color="tab:blue", label="loss")
    if log_loss:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(loss_label, color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(history["step"], history["lr"], lw=1, color="tab:orange", label="lr")
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title, fontsize=8)
    # fixed margins that fit both axes' labels: tight_layout measured every text first, 40 % of a
    # tiny S-LDM training's time
    fig.subplots_adjust(left=0.1, right=0.87, bottom=0.12, top=0.92)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


# ---------------------------------------------------------------------------------------------
# resumable state and its fingerprint


def result_settings(section: str, settings: dict, also_neutral=()) -> dict:
    """The settings of the ``section``'s train jobs (``pipeline.config.settings_keys``: no
    result-neutral key, no list of what runs) without ``also_neutral``: what a resumed state and a
    provenance record must agree on."""
    return {k: v for k, v in job_settings(settings, section, command="train").items() if k not in also_neutral}


def resume_fingerprint(entry: str, settings: dict, seed: int, **identity) -> str:
    """What a resumable state must agree on to be continued: the (result) ``settings``, the seed,
    the ``identity`` of the job's data and inputs, and the code of the ``entry`` module (a state made
    by other code may not even load into the current model): a job re-run because its inputs were
    regenerated or its code edited starts over, a retry after a crash resumes."""
    return json.dumps(
        {**identity, "settings": settings, "seed": int(seed), "code": code_digests(entry)},
        sort_keys=True,
        default=str,
    )


def payload(parts: dict, *, fingerprint: str, history: dict | None = None, **fields) -> dict:
    """A checkpoint or resumable state: the state dict of each of ``parts`` (model, optimizer, ...),
    then ``fields`` in order, the fingerprint, and the ``history`` of a resumable state."""
    out = {name: part.state_dict() for name, part in parts.items()}
    out.update(fields)
    out["fingerprint"] = fingerprint
    if history is not None:
        out["history"] = history
    return out


def load_state(path, fingerprint: str, log: logging.Logger) -> dict | None:
    """The resumable state at ``path`` (or its intact previous one) if it belongs to this job, else
    None (``pipeline.resume.load_resume_state``, every fallback logged)."""
    state = load_resume_state(path, fingerprint, log)
    if state is not None and "epoch" in state:  # pretraining resumes at an epoch end
        log.info("resuming from %s: epoch %d, step %d", state["resumed_from"], state["epoch"], state["step"])
    elif state is not None:
        log.info("resuming from %s at step %d", state["resumed_from"], state["step"])
    return state


def restore(state: dict, parts: dict, history_keys, *, world_size: int, saved_world_size, log) -> tuple[dict, int]:
    """(history, step) of a resumable ``state``, its state dicts loaded into ``parts``; a state of
    another number of processes (``saved_world_size``) is resumed with a warning."""
    for name, part in parts.items():
        part.load_state_dict(state[name])
    if saved_world_size != world_size:
        log.warning("resuming a %s-process run with %d processes", saved_world_size, world_size)
    return {k: list(state["history"][k]) for k in history_keys}, int(state["step"])


# ---------------------------------------------------------------------------------------------
# command line


def training_parser(stage: str, doc: str, output_help: str) -> argparse.ArgumentParser:
    """The parser of ``python -m pipeline.<stage> train`` with the options every trainer has; the
    result-neutral keys of the ``stage`` section are flags of their own (``add_runtime_flags``: the
    workflow passes them as resources, outside ``--settings``, so editing them re-runs no finished job)."""
    ap = command_parser(stage, "train", doc)
    ap.add_argument("--settings", default=None, help=f"{stage} config section (JSON string or file; partial)")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--output", required=True, help=output_help)
    ap.add_argument("--state-dir", required=True, help="resumable state directory (outside the outputs)")
    ap.add_argument("--log-csv", help="per-step training log CSV")
    ap.add_argument("--curve-png", help="loss-curve PNG")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument(
        "--max-reject-fraction",
        type=float,
        default=None,
        help="unreadable training images (or video frames) allowed before failing (default: the schema's "
        "views.max_reject_fraction); they are skipped, logged and listed in <state-dir>/rejects.csv",
    )
    add_runtime_flags(ap, stage)
    return ap


def settings_overrides(args, stage: str) -> dict:
    """``--settings`` with the runtime flags given on the command line over it."""
    return apply_runtime_flags(args, stage, load_settings(args.settings))


@contextlib.contextmanager
def training_processes(stage: str, device_arg: str | None, log: logging.Logger):
    """(world size, rank, device) of this process: its share of the DDP process group under
    torchrun, else one process on ``device_arg`` (or the default device). A run the loss or weights
    rule stopped exits with its message, not a traceback."""
    with distributed_context() as (world, rank, device):
        if device_arg and world == 1:
            device = device_arg
        try:
            yield world, rank, device
        except (NonFiniteLossError, UnhealthyWeightsError) as err:
            log.error("%s", err)
            raise SystemExit(f"{stage}: {err}") from err
