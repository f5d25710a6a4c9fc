"""The pretraining loop (MAE's ``engine_pretrain.py``): one optimizer step, one epoch, the data order
(the lr schedule, the loss rule, the history and its outputs: ``pipeline.training``; the DDP process
group: ``pipeline.devices``).

Every step is a function of (seed, rank, step) and every sample of (seed, epoch, index): the lr is
set from the step index before the optimizer step (so step 0 runs at lr 0, not the peak), and the
torch RNG (masks, decoder dropout) is re-seeded before each step, so a resumed run continues the
very loss curve of an uninterrupted one. The setup (model, optimizer, loader, resume) is
``pipeline.pretrain.train``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.resume import WeightHealth
from pipeline.seeding import derive_seed
from pipeline.training import DivergedLossError as DivergedLossError  # re-exported: what a step raises
from pipeline.training import NonFiniteLossError as NonFiniteLossError
from pipeline.training import (
    StepTimer,
    TrainingLoop,
    check_loss,
    loader_batches,
    lr_at,
    mean_over_ranks,
    record_step,
    set_lr,
)

HISTORY_KEYS = ("step", "epoch", "loss", "lr", "samples_per_s")


# ---------------------------------------------------------------------------------------------
# data order


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


@dataclass(kw_only=True)
class Loop(TrainingLoop):
    """What every step of one job uses (``model``: the CrossViewMAE, or the MAE family's model, whose
    state dict is saved; ``ddp_model``: the same, DDP-wrapped under torchrun); built by
    ``pipeline.pretrain.train.train``."""

    scaler: torch.amp.GradScaler
    cell: dict
    accum: int  # micro-batches per optimizer step on each rank
    steps_per_epoch: int
    peak_lr: float
    health: WeightHealth | None = None  # the weights' rule, checked after every update


def apply_lr(loop: Loop, step: int) -> float:
    """Set the scheduled lr of ``step`` on every param group (before the step) and return it: the
    schedule in epochs, at the fractional epoch of ``step``."""
    s = loop.settings
    lr = lr_at(
        step,
        loop.steps_per_epoch,
        warmup=s["warmup_epochs"],
        total=loop.cell["epochs"],
        peak_lr=loop.peak_lr,
        min_lr=s["min_lr"],
    )
    set_lr(loop.optimizer, lr)
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
                loss, _, _ = loop.step_model(views, loop.cell["target_mask"], loop.cell["anchor_mask"])
            loop.scaler.scale(loss / loop.accum).backward()
        loss_sum += loss.detach().float()
    return mean_over_ranks(loss_sum, loop.accum, loop.world_size)


def train_one_step(
    loop: Loop, batches, step: int, epoch: int, keeping: str, lowest: float | None = None
) -> tuple[float, float]:
    """One optimizer step: (loss, lr). An unhealthy loss (``check_loss``) stops before the update,
    unhealthy weights (``loop.health``) after it, before any state holds them; ``keeping`` names the
    checkpoint a retry resumes from."""
    lr = apply_lr(loop, step)
    torch.manual_seed(derive_seed(loop.seed, "step", loop.rank, step) % (1 << 62))  # masks + dropout
    loss_value = forward_backward(loop, batches)
    check_loss(loss_value, step, keeping=keeping, epoch=epoch, lowest=lowest, factor=loop.settings["divergence_factor"])
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
    lowest = min(history["loss"], default=None)  # the whole run's, across resumes
    with loader_batches(loader) as batches:
        for _ in range(loop.steps_per_epoch):
            timer = StepTimer()
            loss_value, lr = train_one_step(loop, batches, step, epoch, keeping, lowest)
            lowest = loss_value if lowest is None else min(lowest, loss_value)
            rate = timer.rate(loop.settings["batch_size"])
            record_step(history, bar, step=step, epoch=epoch, loss=loss_value, lr=lr, samples_per_s=rate)
            step += 1
    return step
