"""One pretraining job (one cell, one seed) of the cross-view MAE; resumable and deterministic.

    python -m pipeline.pretrain.main_pretrain --cell '{"method": "cdgmae", ...}' --seed 0 --settings '<pretrain JSON>' \
        --bag results/views/sldm/bag.h5 --output results/pretrain/<model>/checkpoint.pth \
        --state-dir results/pretrain_state/<model> --log-csv ... --curve-png ...

Protocol (MAE / CropMAE, with the reference's bugs fixed, spec model-and-training.md §8–10):
AdamW (0.9, 0.95), weight decay on >1-D weights only (timm ``param_groups_weight_decay``),
lr = base_lr x batch / 256 with a per-iteration linear warm-up then half-cycle cosine to min_lr,
**set before each optimiser step** (so step 0 runs at lr 0, not the peak), gradient accumulation
micro_batch -> batch, shuffled sampling (the reference's single-GPU loader never shuffled),
bf16/fp16 autocast on GPU (GradScaler for fp16), fp32 on CPU, DDP under ``torchrun``.

Resume: the state (model, optimiser, scaler, history) is written atomically to
``<state-dir>/last.pth`` every ``checkpoint_every`` epochs — outside the rule's declared outputs,
so the retry of a failed or killed job resumes. Resume is exact: the data order is a function of
(seed, epoch), every augmentation a function of (seed, epoch, index) (``pipeline.pretrain.strategies``), and
the torch RNG (masks, decoder dropout) is re-seeded from (seed, rank, step) before each step — so a
resumed run continues the very loss curve of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from pipeline.config import load_settings, section_defaults
from pipeline.devices import resolve_device, set_threads
from pipeline.io import atomic_path, file_sha256, write_csv_atomic
from pipeline.pretrain.checkpoints import save_torch_atomic
from pipeline.runtime import derive_seed, progress, setup_logging

LOG = logging.getLogger("cdgmae.pretrain")

CELL_KEYS = ("method", "arch", "generator", "target", "anchors", "anchor_mask", "target_mask", "epochs")
# settings that change how a job runs, not what it computes: a resume across them is exact
INFRA_KEYS = ("num_workers", "gpus", "checkpoint_every", "seeds", "cell_defaults")
HISTORY_KEYS = ("step", "epoch", "loss", "lr", "samples_per_s")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step and the kept checkpoint."""


# ---------------------------------------------------------------------------------------------
# configuration


def resolve_settings(settings: dict | None) -> dict:
    """The ``pretrain`` section with every schema default filled (``--settings`` may be partial)."""
    return section_defaults("pretrain", overrides=settings or {})


def resolve_cell(cell: dict, settings: dict) -> dict:
    """Complete a (possibly partial) cell from ``settings["cell_defaults"]`` and check it."""
    from pipeline.pretrain.strategies import STRATEGIES, TARGET_RULES

    unknown = sorted(set(cell) - set(CELL_KEYS))
    if unknown:
        raise KeyError(f"--cell: unknown keys {unknown}; expected {list(CELL_KEYS)}")
    full = {**settings["cell_defaults"], **cell}
    full = {k: full[k] for k in CELL_KEYS}
    full["anchors"], full["epochs"] = int(full["anchors"]), int(full["epochs"])
    full["anchor_mask"], full["target_mask"] = float(full["anchor_mask"]), float(full["target_mask"])
    if full["method"] not in STRATEGIES:
        raise KeyError(f"--cell: unknown method {full['method']!r}; registered: {sorted(STRATEGIES)}")
    if full["method"] == "cdgmae" and full["target"] not in TARGET_RULES:
        raise ValueError(f"--cell: target {full['target']!r} not in {TARGET_RULES}")
    if full["method"] != "cdgmae" and full["anchors"] != 1:
        raise ValueError(f"--cell: method {full['method']} has exactly one anchor, got {full['anchors']}")
    for key in ("anchor_mask", "target_mask"):
        if not 0.0 <= full[key] < 1.0:
            raise ValueError(f"--cell: {key} must be in [0, 1), got {full[key]}")
    if full["anchors"] < 1 or full["epochs"] < 1:
        raise ValueError(f"--cell: anchors and epochs must be >= 1: {full}")
    return full


def fingerprint(cell: dict, settings: dict, seed: int, data_signature=None) -> str:
    """What a resumable state must agree on to be continued: the cell, the training settings
    (infrastructure knobs excluded), the seed and the identity of the data (a job re-run because
    its bag of views was regenerated or its code edited starts over; a retry after a crash resumes)."""
    training = {k: v for k, v in settings.items() if k not in INFRA_KEYS}
    # the stage's own code too (the modules the rule lists as inputs): a state made by other code
    # may not even load into the current model
    here = Path(__file__).resolve().parent
    code = {m: file_sha256(here / f"{m}.py") for m in ("pretrain", "models_mae", "strategies")}
    return json.dumps(
        {"cell": cell, "settings": training, "seed": int(seed), "data": data_signature, "code": code},
        sort_keys=True,
        default=str,
    )


# ---------------------------------------------------------------------------------------------
# optimisation


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


def build_optimizer(model, lr: float, weight_decay: float):
    """AdamW (0.9, 0.95); no decay on biases and <=1-D params, frozen pos-embeds left out
    (timm's ``param_groups_weight_decay``; cls/mask tokens are 3-D and are decayed, as in MAE)."""
    import torch
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def resolve_precision(precision: str, device) -> torch.dtype | None:
    """Autocast dtype: None (fp32) on CPU; ``auto`` = bf16 where supported, else fp16."""
    import torch

    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            LOG.warning("precision %s requested on %s: running fp32", precision, device)
        return None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


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
        import torch

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
# checkpoints, log, curve


def load_state(path: Path, expected_fingerprint: str):
    """The resumable state at ``path`` if it belongs to this job, else None (with a log line)."""
    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file cannot come from atomic writes, but say so
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        LOG.warning("resumable state %s is unreadable (%s); moved to %s, starting over", path, err, bad)
        return None
    if state.get("fingerprint") != expected_fingerprint:
        LOG.warning(
            "resumable state %s belongs to another configuration, older input data or older code; starting over", path
        )
        return None
    LOG.info("resuming from %s: epoch %d, step %d", path, state["epoch"], state["step"])
    return state


def write_log_csv(history: dict, path) -> None:
    import pandas as pd

    write_csv_atomic(pd.DataFrame({k: history[k] for k in HISTORY_KEYS}), path)


def plot_curve(history: dict, path, title: str) -> None:
    """Loss (left axis) and lr (right axis) against the optimiser step, PNG via Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
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
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# distributed


@contextlib.contextmanager
def distributed_context():
    """(world_size, rank, device): DDP process group when ``WORLD_SIZE`` > 1 (torchrun)."""
    import torch
    import torch.distributed as dist

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


# ---------------------------------------------------------------------------------------------
# training


def train(
    cell: dict,
    settings: dict,
    dataset,
    *,
    seed: int,
    output,
    state_dir,
    log_csv=None,
    curve_png=None,
    world_size: int = 1,
    rank: int = 0,
    device=None,
) -> dict:
    """Train one cell on ``dataset`` (an ``EpochDataset``) and write the final checkpoint.

    Resumes from ``<state_dir>/last.pth`` when it holds a state of the same configuration.
    Returns the history (per-step ``step, epoch, loss, lr, samples_per_s``).
    """
    import torch
    from torch.utils.data import DataLoader

    from pipeline.pretrain.models_mae import CrossViewMAE, resolve_arch

    device = torch.device(resolve_device(device))
    s, epochs = settings, cell["epochs"]
    state_path = Path(state_dir) / "last.pth"
    if s["batch_size"] % (s["micro_batch"] * world_size):
        raise ValueError(
            f"pretrain.batch_size {s['batch_size']} is not a multiple of micro_batch "
            f"{s['micro_batch']} x {world_size} GPU(s)"
        )
    accum = s["batch_size"] // (s["micro_batch"] * world_size)
    epoch_len = s["samples_per_epoch"] or len(dataset)
    steps_per_epoch = epoch_len // s["batch_size"]
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch of {epoch_len} samples (dataset {len(dataset)}, samples_per_epoch "
            f"{s['samples_per_epoch']}) is shorter than one batch of {s['batch_size']}; "
            f"raise pretrain.samples_per_epoch or lower pretrain.batch_size"
        )
    epoch_len = steps_per_epoch * s["batch_size"]  # drop_last, as the reference loader
    peak_lr = s["base_lr"] * s["batch_size"] / 256
    amp_dtype = resolve_precision(s["precision"], device)
    fp = fingerprint(cell, s, seed, dataset.signature() if hasattr(dataset, "signature") else None)

    arch = resolve_arch(cell["arch"])
    n_patches = (s["img_size"] // arch["patch_size"]) ** 2
    for key in ("target_mask", "anchor_mask"):  # fail before any data is read, naming the cell key
        if int(n_patches * (1 - cell[key])) < 1:
            raise ValueError(
                f"cell {key}={cell[key]} keeps no patch of the {n_patches} at img_size "
                f"{s['img_size']} with {cell['arch']}; raise pretrain.img_size"
            )

    torch.manual_seed(derive_seed(seed, "init") % (1 << 62))  # same init on every rank
    model = CrossViewMAE(cell["arch"], s["img_size"], norm_pix_loss=s["norm_pix_loss"]).to(device)
    optimizer = build_optimizer(model, peak_lr, s["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    history = {k: [] for k in HISTORY_KEYS}
    start_epoch = step = 0
    state = load_state(state_path, fp)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        history = {k: list(state["history"][k]) for k in HISTORY_KEYS}
        if state["config"].get("world_size") != world_size:
            LOG.warning("resuming a %s-process run with %d processes", state["config"].get("world_size"), world_size)
    if step != start_epoch * steps_per_epoch:
        raise RuntimeError(
            f"{state_path}: step {step} does not match epoch {start_epoch} x "
            f"{steps_per_epoch} steps; remove the state to start over"
        )

    ddp_model = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    sampler = EpochSampler(len(dataset), epoch_len, derive_seed(seed, "order"), world_size, rank)
    workers = s["num_workers"]
    loader = DataLoader(
        dataset,
        batch_size=s["micro_batch"],
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )

    def payload(epoch: int, with_history: bool) -> dict:
        out = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step": step,
            "arch": arch,
            "img_size": s["img_size"],
            "config": {
                "cell": cell,
                "pretrain": s,
                "seed": seed,
                "world_size": world_size,
                "steps_per_epoch": steps_per_epoch,
                "peak_lr": peak_lr,
            },
            # no RNG state is needed to resume: every draw is a function of (seed, epoch, step, index)
            "rng": {
                "seed": seed,
                "scheme": "torch reseeded per step from (seed, rank, step); data from (seed, epoch, index)",
            },
            "fingerprint": fp,
        }
        if with_history:
            out["history"] = history
        return out

    total = steps_per_epoch * epochs
    bar = progress(total=total, initial=step, unit="step", desc=f"pretrain seed {seed}", disable=rank != 0)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    saved_epoch = start_epoch if state is not None else None
    ddp_model.train()
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps_per_epoch):
            t0 = time.perf_counter()
            lr = lr_at(
                step,
                steps_per_epoch,
                epochs=epochs,
                warmup_epochs=s["warmup_epochs"],
                peak_lr=peak_lr,
                min_lr=s["min_lr"],
            )
            for group in optimizer.param_groups:  # schedule applied before the step
                group["lr"] = lr
            torch.manual_seed(derive_seed(seed, "step", rank, step) % (1 << 62))  # masks + dropout
            loss_sum = torch.zeros((), device=device)
            for k in range(accum):
                views = next(batches).to(device, non_blocking=True)  # (B, 1 + N, 3, S, S)
                sync = ddp_model.no_sync() if world_size > 1 and k < accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss, _, _ = ddp_model(views, cell["target_mask"], cell["anchor_mask"])
                    scaler.scale(loss / accum).backward()
                loss_sum += loss.detach().float()
            if world_size > 1:
                torch.distributed.all_reduce(loss_sum)  # every rank sees a NaN anywhere
            loss_value = loss_sum.item() / (accum * world_size)
            if not math.isfinite(loss_value):
                kept = (
                    f"the last good checkpoint {state_path} (epoch {saved_epoch})"
                    if saved_epoch is not None
                    else "no checkpoint yet"
                )
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss_value}) at step {step} (epoch {epoch}); "
                    f"stopped without updating, keeping {kept}"
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            rate = s["batch_size"] / max(time.perf_counter() - t0, 1e-9)
            for key, value in zip(HISTORY_KEYS, (step, epoch, loss_value, lr, rate)):
                history[key].append(value)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        done = epoch + 1
        if rank == 0 and (done % s["checkpoint_every"] == 0 or done == epochs):
            state = payload(done, with_history=True)
            save_torch_atomic(state, state_path)
            saved_epoch = done
            LOG.info("epoch %d/%d: loss %.4f, state saved to %s", done, epochs, history["loss"][-1], state_path)
    bar.close()

    if rank == 0:
        save_torch_atomic(payload(epochs, with_history=False), output)
        if log_csv:
            write_log_csv(history, log_csv)
        if curve_png:
            title = " ".join(f"{k}={cell[k]}" for k in CELL_KEYS) + f" seed={seed}"
            plot_curve(history, curve_png, title)
        LOG.info("wrote %s (%d steps)", output, step)
    return history


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.pretrain.main_pretrain", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cell",
        required=True,
        help="JSON dict of the cell (method, arch, generator, target, "
        "anchors, anchor_mask, target_mask, epochs); missing keys "
        "from pretrain.cell_defaults",
    )
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--settings", default=None, help="pretrain config section (JSON string or file)")
    ap.add_argument("--bag", help="bag of views HDF5 (method cdgmae)")
    ap.add_argument("--knn", help="neighbours file results/consistency/knn.npz (target knn)")
    ap.add_argument("--imagenet-root", help="ImageNet folder root (method cropmae)")
    ap.add_argument("--videos-root", help="frame-folder videos root (method siammae)")
    ap.add_argument("--output", required=True, help="final checkpoint .pth")
    ap.add_argument("--state-dir", required=True, help="resumable state directory (outside the outputs)")
    ap.add_argument("--log-csv", help="per-step training log CSV")
    ap.add_argument("--curve-png", help="loss-curve PNG")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    # infrastructure knobs: they change neither the data order nor the result, so the rule passes
    # them outside --settings (editing them must not re-run finished cells)
    ap.add_argument("--num-workers", type=int, default=None, help="override pretrain.num_workers")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="override pretrain.checkpoint_every")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    set_threads(args.threads)
    from pipeline.pretrain.strategies import build_dataset

    overrides = load_settings(args.settings)
    for key in ("num_workers", "checkpoint_every"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    settings = resolve_settings(overrides)
    try:
        cell = resolve_cell(json.loads(args.cell), settings)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--cell is not valid JSON: {err}")
    LOG.info("cell %s, seed %d", cell, args.seed)
    dataset = build_dataset(
        cell,
        settings,
        seed=derive_seed(args.seed, "data"),
        bag=args.bag,
        knn=args.knn,
        imagenet_root=args.imagenet_root,
        videos_root=args.videos_root,
    )
    with distributed_context() as (world, rank, device):
        if args.device and world == 1:
            import torch

            device = torch.device(args.device)
        try:
            train(
                cell,
                settings,
                dataset,
                seed=args.seed,
                output=args.output,
                state_dir=args.state_dir,
                log_csv=args.log_csv,
                curve_png=args.curve_png,
                world_size=world,
                rank=rank,
                device=device,
            )
        except NonFiniteLossError as err:
            LOG.error("%s", err)
            raise SystemExit(f"pretrain: {err}")


if __name__ == "__main__":
    main()
