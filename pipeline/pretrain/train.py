"""One pretraining job (one cell, one seed) of the cross-view MAE; resumable and deterministic.

    python -m pipeline.pretrain train --cell '{"method": "cdgmae", ...}' --seed 0 --settings '<pretrain JSON>' \
        --bag results/views/sldm/bag.h5 --output results/pretrain/<model>/checkpoint.pth \
        --state-dir results/pretrain_state/<model> --log-csv ... --curve-png ...

Protocol (MAE / CropMAE, with the reference's bugs fixed, spec model-and-training.md §8–10):
AdamW (0.9, 0.95), weight decay on >1-D weights only (timm ``param_groups_weight_decay``),
lr = base_lr x batch / 256 with a per-iteration linear warm-up then half-cycle cosine to min_lr,
**set before each optimizer step** (so step 0 runs at lr 0, not the peak), gradient accumulation
micro_batch -> batch, shuffled sampling (the reference's single-GPU loader never shuffled),
bf16/fp16 autocast on GPU (GradScaler for fp16), fp32 on CPU, DDP under ``torchrun``.

This module is the setup (settings, cell, model, optimizer, loader, resume, checkpoints); the loop
is ``pipeline.pretrain.engine``.

Resume: the state (model, optimizer, scaler, history) is written atomically to
``<state-dir>/last.pth`` every ``checkpoint_every`` epochs and at the end, with its content digest
(``pipeline.resume``: a state that fails verification is not used, the previous one is) — outside
the rule's declared outputs, so the retry of a failed or killed job resumes, and a job re-run after
a broken input is restored redoes no finished epoch. Resume is exact: the data order is a function of
(seed, epoch), every augmentation a function of (seed, epoch, index) (``pipeline.pretrain.strategies``), and
the torch RNG (masks, decoder dropout) is re-seeded from (seed, rank, step) before each step — so a
resumed run continues the very loss curve of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader

from pipeline import training
from pipeline.cells import CELL_KEYS, VIEW_METHODS, complete_cell
from pipeline.config import section_defaults
from pipeline.devices import describe_device, resolve_device, set_threads
from pipeline.pretrain.checkpoints import mae_layout
from pipeline.pretrain.engine import HISTORY_KEYS, EpochSampler, Loop, train_one_epoch
from pipeline.pretrain.models_mae import resolve_arch
from pipeline.pretrain.models_mae_family import build_pretrain_model, export_state_dict
from pipeline.pretrain.strategies import STRATEGIES, TARGET_RULES, build_dataset
from pipeline.records import write_record
from pipeline.resume import WeightHealth, save_resume_state, save_torch_file
from pipeline.runtime import progress, setup_logging
from pipeline.seeding import derive_seed

LOG = logging.getLogger("cdgmae.pretrain")


# ---------------------------------------------------------------------------------------------
# configuration


def resolve_pretrain_settings(settings: dict | None) -> dict:
    """The ``pretrain`` section with every schema default filled (``--settings`` may be partial)."""
    return section_defaults("pretrain", overrides=settings or {})


def resolve_cell(cell: dict, settings: dict) -> dict:
    """Complete a (possibly partial) cell from ``settings["cell_defaults"]`` and check it."""
    full = complete_cell(cell, settings["cell_defaults"], what="--cell")
    if full["method"] not in STRATEGIES:
        raise KeyError(f"--cell: unknown method {full['method']!r}; registered: {sorted(STRATEGIES)}")
    if full["method"] in VIEW_METHODS and full["target"] not in TARGET_RULES:
        raise ValueError(f"--cell: target {full['target']!r} not in {TARGET_RULES}")
    if full["method"] not in VIEW_METHODS and full["anchors"] != 1:
        raise ValueError(f"--cell: method {full['method']} has exactly one anchor, got {full['anchors']}")
    for key in ("anchor_mask", "target_mask"):
        if not 0.0 <= full[key] < 1.0:
            raise ValueError(f"--cell: {key} must be in [0, 1), got {full[key]}")
    if full["anchors"] < 1 or full["epochs"] < 1:
        raise ValueError(f"--cell: anchors and epochs must be >= 1: {full}")
    return full


def job_fingerprint(cell: dict, settings: dict, seed: int, data_signature=None) -> str:
    """``pipeline.training.resume_fingerprint`` of one pretraining job: its cell, the training
    settings, the seed and the identity of the data (a job re-run because its bag of views was
    regenerated or its code edited starts over; a retry after a crash resumes)."""
    # ``seeds`` and ``cell_defaults`` describe the whole grid of jobs (x-selects: no job's setting),
    # and this job's own share of them (its seed, its completed cell) is fingerprinted, so adding a
    # seed or changing another cell's defaults does not restart it
    result = training.result_settings("pretrain", settings)
    return training.resume_fingerprint("pipeline.pretrain.train", result, seed, cell=cell, data=data_signature)


def batch_plan(settings: dict, dataset_len: int, world_size: int) -> tuple[int, int]:
    """(micro-batches per step on each rank, optimizer steps per epoch); clear errors otherwise."""
    s = settings
    if s["batch_size"] % (s["micro_batch"] * world_size):
        raise ValueError(
            f"pretrain.batch_size {s['batch_size']} is not a multiple of micro_batch "
            f"{s['micro_batch']} x {world_size} GPU(s)"
        )
    epoch_len = s["samples_per_epoch"] or dataset_len
    steps_per_epoch = epoch_len // s["batch_size"]
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch of {epoch_len} samples (dataset {dataset_len}, samples_per_epoch "
            f"{s['samples_per_epoch']}) is shorter than one batch of {s['batch_size']}; "
            f"raise pretrain.samples_per_epoch or lower pretrain.batch_size"
        )
    return s["batch_size"] // (s["micro_batch"] * world_size), steps_per_epoch


def check_masks(cell: dict, settings: dict) -> None:
    """Fail before any data is read when a mask ratio keeps no patch, naming the cell key."""
    n_patches = (settings["img_size"] // resolve_arch(cell["arch"])["patch_size"]) ** 2
    for key in ("target_mask", "anchor_mask"):
        if int(n_patches * (1 - cell[key])) < 1:
            raise ValueError(
                f"cell {key}={cell[key]} keeps no patch of the {n_patches} at img_size "
                f"{settings['img_size']} with {cell['arch']}; raise pretrain.img_size"
            )


# ---------------------------------------------------------------------------------------------
# model, optimizer, precision, loader


def build_optimizer(model, lr: float, weight_decay: float):
    """AdamW (0.9, 0.95); no decay on biases and <=1-D params, frozen pos-embeds left out
    (timm's ``param_groups_weight_decay``; cls/mask tokens are 3-D and are decayed, as in MAE)."""
    groups = param_groups_weight_decay(model, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def resolve_precision(precision: str, device) -> torch.dtype | None:
    """Autocast dtype: None (fp32) on CPU; ``auto`` = bf16 where supported, else fp16."""
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            LOG.warning("precision %s requested on %s: running fp32", precision, device)
        return None
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def build_model(cell: dict, settings: dict, seed: int, device, peak_lr: float, amp_dtype):
    """(model, optimizer, scaler), the model initialized from the seed alone (same on every rank)."""
    torch.manual_seed(derive_seed(seed, "init") % (1 << 62))
    # CrossViewMAE, or the MAE family's model for mae / lut / pseudo-mae (pipeline.pretrain.models_mae_family)
    model = build_pretrain_model(cell, settings).to(device)
    optimizer = build_optimizer(model, peak_lr, settings["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return model, optimizer, scaler


def build_loader(dataset, settings: dict, device, *, steps_per_epoch: int, seed: int, world_size: int, rank: int):
    """Micro-batches of ``dataset`` in the ``EpochSampler`` order of ``seed``; an epoch is a whole
    number of batches (drop_last, as the reference loader)."""
    epoch_len = steps_per_epoch * settings["batch_size"]
    sampler = EpochSampler(len(dataset), epoch_len, derive_seed(seed, "order"), world_size, rank)
    workers = settings["num_workers"]
    return DataLoader(
        dataset,
        batch_size=settings["micro_batch"],
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )


# ---------------------------------------------------------------------------------------------
# resumable state and checkpoints


def resume_at_epoch(state, loop: Loop, path) -> tuple[dict, int, int]:
    """(history, epoch, step) to continue from: the state's (loaded into the loop's model, optimizer
    and scaler: an epoch end), or empty / 0 / 0 without one."""
    if state is None:
        return training.new_history(HISTORY_KEYS), 0, 0
    parts = {"model": loop.model, "optimizer": loop.optimizer, "scaler": loop.scaler}
    saved_world = state["config"].get("world_size")
    history, step = training.restore(
        state, parts, HISTORY_KEYS, world_size=loop.world_size, saved_world_size=saved_world, log=LOG
    )
    epoch = int(state["epoch"])
    if step != epoch * loop.steps_per_epoch:
        raise RuntimeError(
            f"{path}: step {step} does not match epoch {epoch} x {loop.steps_per_epoch} steps; "
            "remove the state to start over"
        )
    return history, epoch, step


def checkpoint_payload(loop: Loop, epoch: int, step: int, fp: str, history: dict | None = None) -> dict:
    """Checkpoint payload (docs/architecture.md); the resumable state also carries ``history``."""
    return training.payload(
        {"model": loop.model, "optimizer": loop.optimizer, "scaler": loop.scaler},
        epoch=epoch,
        step=step,
        arch=resolve_arch(loop.cell["arch"]),
        img_size=loop.settings["img_size"],
        config={
            "cell": loop.cell,
            "pretrain": loop.settings,
            "seed": loop.seed,
            "world_size": loop.world_size,
            "steps_per_epoch": loop.steps_per_epoch,
            "peak_lr": loop.peak_lr,
        },
        # no RNG state is needed to resume: every draw is a function of (seed, epoch, step, index)
        rng={
            "seed": loop.seed,
            "scheme": "torch reseeded per step from (seed, rank, step); data from (seed, epoch, index)",
        },
        fingerprint=fp,
        history=history,
    )


# ---------------------------------------------------------------------------------------------
# training


def run_epochs(
    loop: Loop, loader, history: dict, start_epoch: int, step: int, *, resumed: bool, state_path, fp, rejects=None
) -> int:
    """Epochs ``start_epoch..epochs-1`` (MAE's main loop), saving the state every ``checkpoint_every``;
    ``rejects`` (the dataset's ``ImageRejects``): its listing is written after every epoch that
    skipped an image, whichever process (loader worker) skipped it."""
    epochs = loop.cell["epochs"]
    total = loop.steps_per_epoch * epochs
    bar = progress(total=total, initial=step, unit="step", desc=f"pretrain seed {loop.seed}", disable=loop.rank != 0)
    saved_epoch = start_epoch if resumed else None
    loop.ddp_model.train()
    for epoch in range(start_epoch, epochs):
        keeping = training.kept_state(state_path, None if saved_epoch is None else f"epoch {saved_epoch}")
        step = train_one_epoch(loop, loader, epoch, step, history, bar, keeping)
        done = epoch + 1
        if loop.rank == 0 and rejects is not None and rejects.listing and (n := rejects.write_listing()):
            LOG.warning("%d unreadable images skipped so far; listed in %s", n, rejects.listing)
        if loop.rank == 0 and (done % loop.settings["checkpoint_every"] == 0 or done == epochs):
            save_resume_state(checkpoint_payload(loop, done, step, fp, history), state_path)
            saved_epoch = done
            LOG.info("epoch %d/%d: loss %.4f, state saved to %s", done, epochs, history["loss"][-1], state_path)
    bar.close()
    return step


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
    inputs=(),
) -> dict:
    """Train one cell on ``dataset`` (an ``EpochDataset``) and write the final checkpoint, with its
    provenance record (``pipeline.records``; ``inputs``: the bag / knn / dataset roots read).

    Resumes from ``<state_dir>/last.pth`` when it holds a state of the same configuration.
    Returns the history (per-step ``step, epoch, loss, lr, samples_per_s``).
    """
    device = torch.device(resolve_device(device))
    LOG.info("rank %d device: %s", rank, describe_device(device))
    s, state_path = settings, Path(state_dir) / "last.pth"
    accum, steps_per_epoch = batch_plan(s, len(dataset), world_size)
    peak_lr = s["base_lr"] * s["batch_size"] / 256
    amp_dtype = resolve_precision(s["precision"], device)
    data = dataset.signature(Path(state_dir) / "data_digests.json") if hasattr(dataset, "signature") else None
    fp = job_fingerprint(cell, s, seed, data)
    check_masks(cell, s)
    model, optimizer, scaler = build_model(cell, s, seed, device, peak_lr, amp_dtype)
    health = WeightHealth(model.parameters())  # bounds from the seeded initial weights
    state = training.load_state(state_path, fp, LOG)
    rejects = getattr(dataset, "rejects", None)  # the bad-image policy of an image root (cropmae, siammae)
    if rejects is not None and state is None and rank == 0:
        rejects.reset()  # starting over: the job's reject journal too (before any loader worker)
    loop = Loop(
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        autocast=torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext(),
        device=device,
        cell=cell,
        settings=s,
        seed=seed,
        accum=accum,
        steps_per_epoch=steps_per_epoch,
        peak_lr=peak_lr,
        world_size=world_size,
        rank=rank,
        health=health,
    )
    history, start_epoch, step = resume_at_epoch(state, loop, state_path)
    health.snapshot()
    loop.ddp_model = training.wrap_ddp(model, device, world_size, cudnn_benchmark=True)  # after the resume
    loader = build_loader(
        dataset, s, device, steps_per_epoch=steps_per_epoch, seed=seed, world_size=world_size, rank=rank
    )
    step = run_epochs(
        loop,
        loader,
        history,
        start_epoch,
        step,
        resumed=state is not None,
        state_path=state_path,
        fp=fp,
        rejects=rejects,
    )
    if rank == 0:
        final = checkpoint_payload(loop, cell["epochs"], step, fp)
        # the released checkpoint in MAE's key layout (reference loaders read it); last.pth keeps ours
        final["model"] = mae_layout(export_state_dict(loop.model))  # EMA teachers stay in last.pth only
        save_torch_file(final, output)
        write_outputs(history, cell, seed, log_csv, curve_png)
        result = training.result_settings("pretrain", s)
        write_record(
            output,
            kind="checkpoint",
            command=("pretrain", "train"),
            inputs=inputs,
            settings={"cell": cell, "seed": seed, "pretrain": result},
            device=device,
            precision={None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
        )
        LOG.info("wrote %s (%d steps)", output, step)
    return history


def write_outputs(history: dict, cell: dict, seed: int, log_csv=None, curve_png=None) -> None:
    if log_csv:
        training.write_log_csv(history, log_csv)
    if curve_png:
        title = " ".join(f"{k}={cell[k]}" for k in CELL_KEYS) + f" seed={seed}"
        training.plot_curve(history, curve_png, title, loss_label="training loss (masked patches)")


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    ap = training.training_parser("pretrain", __doc__, output_help="final checkpoint .pth")
    ap.add_argument(
        "--cell",
        required=True,
        help="JSON dict of the cell (method, arch, generator, target, "
        "anchors, anchor_mask, target_mask, epochs); missing keys "
        "from pretrain.cell_defaults",
    )
    ap.add_argument("--bag", help="bag of views HDF5 (method cdgmae)")
    ap.add_argument("--knn", help="neighbours file results/consistency/knn.npz (target knn)")
    ap.add_argument("--imagenet-root", help="ImageNet folder root (method cropmae)")
    ap.add_argument("--videos-root", help="frame-folder videos root (method siammae)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    set_threads(args.threads)
    settings = resolve_pretrain_settings(training.settings_overrides(args, "pretrain"))
    try:
        cell = resolve_cell(json.loads(args.cell), settings)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--cell is not valid JSON: {err}") from err
    LOG.info("cell %s, seed %d", cell, args.seed)
    sources = dict(bag=args.bag, knn=args.knn, imagenet_root=args.imagenet_root, videos_root=args.videos_root)
    sources.update(max_reject_fraction=args.max_reject_fraction, rejects_listing=Path(args.state_dir) / "rejects.csv")
    dataset = build_dataset(cell, settings, seed=derive_seed(args.seed, "data"), **sources)
    outputs = dict(output=args.output, state_dir=args.state_dir, log_csv=args.log_csv, curve_png=args.curve_png)
    outputs["inputs"] = [args.bag, args.knn, args.imagenet_root, args.videos_root]
    with training.training_processes("pretrain", args.device, LOG) as (world, rank, device):
        train(cell, settings, dataset, seed=args.seed, world_size=world, rank=rank, device=device, **outputs)
