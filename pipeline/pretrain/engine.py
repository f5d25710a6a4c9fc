"""The pretraining loop (MAE's ``engine_pretrain.py``): one optimizer step, one epoch, the lr schedule,
the data order, the loss history and its outputs (the DDP process group: ``pipeline.devices``).

Every step is a function of (seed, rank, step) and every sample of (seed, epoch, index): the lr is
set from the step index before the optimizer step (so step 0 runs at lr 0, not the peak), and the
torch RNG (masks, decoder dropout) is re-seeded before each step, so a resumed run continues the
very loss curve of an uninterrupted one. The setup (model, optimizer, loader, resume) is
``pipeline.pretrain.train``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from matplotlib.figure import Figure

from pipeline.io import atomic_path, write_csv_atomic
from pipeline.resume import WeightHealth
from pipeline.seeding import derive_seed

HISTORY_KEYS = ("step", "epoch", "loss", "lr", "samples_per_s")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step and the kept checkpoint."""


class DivergedLossError(NonFiniteLossError):
    """The loss exploded while staying finite (the divergence rule of ``check_loss``)."""


def check_loss(loss: float, lowest: float | None, factor: float, step: int, epoch: int, keeping: str) -> None:
    """The divergence rule of the loss: stop on a non-finite loss, or on one above ``factor`` x the
    lowest loss of the run so far (``pretrain.divergence_factor``); before the update. The weights
    have a rule too, checked after each update (``pipeline.resume.WeightHealth``: finite, no weight
    above 100 x the initial largest, no update above half the weights' norm), so the state saved at
    the last epoch end, whose every step passed both rules, is the one a retry resumes from."""
    where = f"at step {step} (epoch {epoch}); stopped without updating, keeping {keeping}"
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"non-finite training loss ({loss}) {where}")
    if lowest is not None and loss > factor * lowest:
        raise DivergedLossError(
            f"training loss {loss:.4g} > divergence_factor {factor:g} x the lowest loss so far ({lowest:.4g}) {where}"
        )


# ---------------------------------------------------------------------------------------------
# schedule and data order


def lr_at(
    step: int, steps_per_epoch: int, *, epochs: int, warmup_epochs: float, peak_lr: float, min_lr: float = 0.0
) -> float:
    """MAE's ``lr_sched.adjust_learning_rate`` at fractional epoch ``step / steps_per_epoch``:
    linear warm-up from 0, then half-cycle cosine from ``peak_lr`` to ``min_lr``."""
    e = step / steps_per_epoch
    if e < warmup_epochs:
        return peak_lr * e / warmup_epochs
    span = epochs - warmup_epochs
    progress_ = (e - warmup_epochs) / span if span > 0 else 1.0
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))


class EpochSampler:
    """Shuffled, seeded, per-epoch order; plays ``DistributedSampler``'s role (rank r takes
    ``order[r::world]``) and adds the ``samples_per_epoch`` cap.

    The order of epoch e is a permutation drawn from a generator seeded with (seed, e) — several
    permutations back to back if the epoch is longer than the dataset — so a resumed run sees the
    same data as an uninterrupted one. Yields ``(epoch, index)`` keys for ``EpochDataset``.
    """

    def __init__(self, dataset_len: int, epoch_len: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if dataset_len < 1:
            raise ValueError("the training dataset is empty")
        self.dataset_len, self.epoch_len, self.seed = dataset_len, epoch_len, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch) % (1 << 62))
        reps = -(-self.epoch_len // self.dataset_len)
        perm = torch.cat([torch.randperm(self.dataset_len, generator=g) for _ in range(reps)])
        return perm[: self.epoch_len].numpy()

    def __iter__(self):
        idx = self.order(self.epoch)[self.rank :: self.num_replicas]
        return iter([(self.epoch, int(i)) for i in idx[: len(self)]])

    def __len__(self) -> int:
        return self.epoch_len // self.num_replicas


# ---------------------------------------------------------------------------------------------
# one step, one epoch


@dataclass
class Loop:
    """What every step of one job uses; built by ``pipeline.pretrain.train.train``."""

    model: torch.nn.Module  # the CrossViewMAE itself (its state dict is what is saved)
    ddp_model: torch.nn.Module  # the same model, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: contextlib.AbstractContextManager  # bf16/fp16 autocast on GPU, a null context in fp32
    device: torch.device
    cell: dict
    settings: dict
    seed: int
    accum: int  # micro-batches per optimizer step on each rank
    steps_per_epoch: int
    peak_lr: float
    world_size: int = 1
    rank: int = 0
    health: WeightHealth | None = None  # the weights' rule, checked after every update


def apply_lr(loop: Loop, step: int) -> float:
    """Set the scheduled lr of ``step`` on every param group (before the step) and return it."""
    s = loop.settings
    lr = lr_at(
        step,
        loop.steps_per_epoch,
        epochs=loop.cell["epochs"],
        warmup_epochs=s["warmup_epochs"],
        peak_lr=loop.peak_lr,
        min_lr=s["min_lr"],
    )
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    return lr


def forward_backward(loop: Loop, batches) -> float:
    """Accumulate the gradients of ``accum`` micro-batches; the mean loss over them and all ranks."""
    loss_sum = torch.zeros((), device=loop.device)
    for k in range(loop.accum):
        views = next(batches).to(loop.device, non_blocking=True)  # (B, 1 + N, 3, S, S)
        last = k == loop.accum - 1
        sync = loop.ddp_model.no_sync() if loop.world_size > 1 and not last else contextlib.nullcontext()
        with sync:
            with loop.autocast:
                loss, _, _ = loop.ddp_model(views, loop.cell["target_mask"], loop.cell["anchor_mask"])
            loop.scaler.scale(loss / loop.accum).backward()
        loss_sum += loss.detach().float()
    if loop.world_size > 1:
        dist.all_reduce(loss_sum)  # every rank sees a NaN anywhere
    return loss_sum.item() / (loop.accum * loop.world_size)


def train_one_step(
    loop: Loop, batches, step: int, epoch: int, keeping: str, lowest: float | None = None
) -> tuple[float, float]:
    """One optimizer step: (loss, lr). An unhealthy loss (``check_loss``) stops before the update,
    unhealthy weights (``loop.health``) after it, before any state holds them; ``keeping`` names the
    checkpoint a retry resumes from."""
    lr = apply_lr(loop, step)
    torch.manual_seed(derive_seed(loop.seed, "step", loop.rank, step) % (1 << 62))  # masks + dropout
    loss_value = forward_backward(loop, batches)
    check_loss(loss_value, lowest, loop.settings["divergence_factor"], step, epoch, keeping)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    if hasattr(loop.model, "update_teachers"):  # EMA teachers (lut, pseudo-mae: models_mae_family), no grad
        loop.model.update_teachers(step + 1, loop.steps_per_epoch, loop.cell["epochs"])
    if loop.health is not None:
        loop.health.check(step, keeping)
    return loss_value, lr


def train_one_epoch(loop: Loop, loader, epoch: int, step: int, history: dict, bar, keeping: str) -> int:
    """Run ``steps_per_epoch`` steps of ``epoch`` from global step ``step``, appending to ``history``;
    returns the next step."""
    loader.sampler.set_epoch(epoch)
    batches = iter(loader)
    lowest = min(history["loss"], default=None)  # the whole run's, across resumes
    for _ in range(loop.steps_per_epoch):
        t0 = time.perf_counter()
        loss_value, lr = train_one_step(loop, batches, step, epoch, keeping, lowest)
        lowest = loss_value if lowest is None else min(lowest, loss_value)
        rate = loop.settings["batch_size"] / max(time.perf_counter() - t0, 1e-9)
        for key, value in zip(HISTORY_KEYS, (step, epoch, loss_value, lr, rate)):
            history[key].append(value)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
    return step


# ---------------------------------------------------------------------------------------------
# loss history: log and curve


def new_history() -> dict:
    return {k: [] for k in HISTORY_KEYS}


def write_log_csv(history: dict, path) -> None:
    write_csv_atomic(pd.DataFrame({k: history[k] for k in HISTORY_KEYS}), path)


def plot_curve(history: dict, path, title: str) -> None:
    """Loss (left axis) and lr (right axis) against the optimizer step, PNG via Agg (a bare
    ``Figure``: no pyplot state, no GUI backend)."""
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(history["step"], history["loss"], lw=1, color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (masked patches)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(history["step"], history["lr"], lw=1, color="tab:orange", label="lr")
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
