"""Train the S-LDM view generator on the pretraining images (Gen-SIS style); resumable, deterministic.

    python -m pipeline.sldm train --imagenet-root data/imagenet --settings '<sldm JSON>' --seed 0 \\
        --output results/sldm/model --state-dir results/sldm_state [--log-csv F --curve-png F \\
        --samples-png F --threads T --device D]

Images: the ``train`` split of the ImageNet-layout root (``list_imagenet``, sorted by image id; the
first ``max_images``), read by ``load_square`` at ``image_size``. Model, loss and CFG convention:
``pipeline.sldm.model``; conditioning encoder: ``pipeline.sldm.conditioning``; loop: ``engine``.
AdamW, linear warm-up + cosine, EMA weights saved, bf16 autocast on CUDA only (fp32 elsewhere).

Resume: ``<state-dir>/last.pth`` (model, EMA, optimizer, RNG, step, history, fingerprint) is written
atomically with its content digest every ``checkpoint_every`` steps and at the end, outside the
output folder (``pipeline.resume``: one that fails verification is not used, the previous one
is); a rerun with the same fingerprint (settings minus result-neutral keys and the sample grid,
seed, data identity, code) continues it exactly, any other state is set aside and training starts
over. The output is the ``sldm`` folder (``docs/sldm-format.md``) holding the EMA weights,
replaced atomically. Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is DDP: each rank takes
``batch_size / world`` images of every step, rank 0 writes every output.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import training
from pipeline.config import section_defaults
from pipeline.data.readers import list_imagenet
from pipeline.devices import describe_device, resolve_device, set_threads
from pipeline.imaging import ImageRejects, TooManyRejectsError, load_square
from pipeline.io import file_sha256, folder_sha256
from pipeline.records import write_record
from pipeline.resume import WeightHealth, save_resume_state
from pipeline.runtime import progress, setup_logging
from pipeline.seeding import derive_seed
from pipeline.sldm import engine
from pipeline.sldm.conditioning import build_conditioning_encoder
from pipeline.sldm.folder import save_sldm
from pipeline.sldm.model import (
    NULL_CONDITION,
    SAMPLING_KEYS,
    build_denoiser,
    build_ema,
    build_scheduler,
    load_autoencoder,
    resolve_schedule,
)

LOG = logging.getLogger("cdgmae.sldm")
LOSS_LABEL = "MSE to the ε or v target (sldm.prediction_type)"
NEUTRAL_OUTPUTS = ("samples",)  # the sample grid: a picture of the run, not part of its result


def resolve_sldm_settings(settings: dict | None) -> dict:
    """The ``sldm`` section with every schema default filled (``--settings`` may be partial), the
    noise schedule's nulls resolved for the space it denoises (``pipeline.sldm.model.resolve_schedule``)."""
    resolved = section_defaults("sldm", overrides=settings or {})
    resolved["scheduler"] = resolve_schedule(resolved["scheduler"], pixel_space=resolved["autoencoder"] == "none")
    return resolved


# ---------------------------------------------------------------------------------------------
# data


def read_image(path, size: int) -> np.ndarray:
    """``load_square`` with the file named in every error (a truncated JPEG's own message does not)."""
    try:
        return load_square(path, size)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable training image ({err})") from err


class StepBatches(Dataset):
    """Item ``k`` = this rank's share (``[rank::world]``) of the (B, S, S, 3) uint8 batch of step
    ``k``: epoch ``k // steps_per_epoch`` is a permutation of the images drawn from (seed, epoch),
    cut into whole batches (drop_last). An image that does not decode is skipped with the bad-image
    policy of every image reader (``pipeline.imaging.ImageRejects``: logged, listed in
    ``rejects_listing``, an error above ``max_reject_fraction``) for the next readable image of the
    list, so a batch stays a function of (seed, step) and of the set of bad files."""

    def __init__(
        self,
        paths: list,
        image_size: int,
        batch_size: int,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        max_reject_fraction: float | None = None,
        rejects_listing: str | os.PathLike | None = None,
    ):
        if len(paths) < batch_size:
            raise ValueError(f"sldm.batch_size {batch_size} is larger than the {len(paths)} training images")
        if batch_size % world_size:
            raise ValueError(f"sldm.batch_size {batch_size} is not a multiple of the {world_size} processes")
        self.paths, self.size, self.batch, self.seed = list(paths), image_size, batch_size, seed
        self.world_size, self.rank = world_size, rank
        self.steps_per_epoch = len(self.paths) // batch_size
        # per process: with loader workers each one enforces the fraction on the images it read
        self.rejects = ImageRejects(len(self.paths), max_reject_fraction, "S-LDM training images", rejects_listing)

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "sldm-order", epoch) % (1 << 62))
        order = torch.randperm(len(self.paths), generator=g)[i * self.batch : (i + 1) * self.batch]
        return order[self.rank :: self.world_size].numpy()

    def __len__(self) -> int:  # steps are unbounded; the sampler says which are run
        return 1 << 62

    def image(self, j: int) -> np.ndarray:
        """Image ``j``, or the next readable one after it (wrapping) when it does not decode."""
        n = len(self.paths)
        for i in (int(j + k) % n for k in range(n)):
            image = self.rejects.load(i, Path(self.paths[i]).stem, self.paths[i], read_image, self.size)
            if image is not None:
                return image
        raise TooManyRejectsError(f"S-LDM training images: none of the {n} images decodes")

    def __getitem__(self, step: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.image(j) for j in self.indices(step)]))


def training_records(root, max_images: int | None) -> list:
    """The training images: the ``train`` split sorted by image id, the first ``max_images``."""
    records = list_imagenet(root, "train")
    return records[:max_images] if max_images else records


def data_signature(records) -> str:
    """Identity of the training images: their ids and byte sizes, in order."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.image_id}\0{Path(r.path).stat().st_size}\n".encode())
    return h.hexdigest()


def job_fingerprint(settings: dict, seed: int, data: str) -> str:
    """``pipeline.training.resume_fingerprint`` of one S-LDM run: the settings (result-neutral keys
    and the sample grid excluded), the seed, the training images, the autoencoder / encoder weights."""
    inputs = {"images": data}
    if settings["autoencoder"] != "none":
        inputs["autoencoder"] = folder_sha256(settings["autoencoder"])
    if settings["encoder"]["checkpoint"] and settings["encoder"]["source"] != "random-init":
        inputs["encoder"] = file_sha256(settings["encoder"]["checkpoint"])
    result = training.result_settings("sldm", settings, NEUTRAL_OUTPUTS)
    return training.resume_fingerprint("pipeline.sldm.train", result, seed, inputs=inputs)


# ---------------------------------------------------------------------------------------------
# setup and outputs


def build_loop(settings: dict, seed: int, device: torch.device) -> engine.Loop:
    """Encoder, autoencoder, UNet + projector (seeded), EMA, AdamW and autocast of one run."""
    encoder = build_conditioning_encoder(settings["encoder"], seed).to(device)
    vae = load_autoencoder(settings["autoencoder"])
    if vae is None:
        channels, size = 3, settings["image_size"]
    else:
        vae.to(device)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if settings["image_size"] % factor:
            raise ValueError(f"sldm.image_size {settings['image_size']} is not a multiple of the VAE factor {factor}")
        channels, size = vae.config.latent_channels, settings["image_size"] // factor
    model = build_denoiser(settings, encoder.dim, channels, size, seed).to(device)
    bf16 = device.type == "cuda" and settings["precision"] != "fp32"
    return engine.Loop(
        model=model,
        ema=build_ema(model, settings["ema_decay"]),
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=settings["weight_decay"]),
        scheduler=build_scheduler(settings["scheduler"], vae is None, settings["prediction_type"]),
        vae=vae,
        encoder=encoder,
        settings=settings,
        seed=seed,
        device=device,
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext(),
    )


def write_folder(loop: engine.Loop, output, n_images: int, step: int) -> Path:
    """The ``sldm`` folder with the EMA weights, written beside ``output`` and renamed onto it."""
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ema, enc, s = loop.ema.module, loop.encoder, loop.settings
    run = {"seed": loop.seed, "steps": step, "images": n_images, "settings": s}
    save_sldm(
        tmp,
        ema.unet,
        loop.vae,
        loop.scheduler,
        enc.model,
        enc.timm_name,
        ema.projector,
        encoder_kwargs=enc.kwargs,
        mean=enc.mean,
        std=enc.std,
        embedding_norm=enc.embedding_norm,
        null_condition=NULL_CONDITION,
        p_uncond=s["p_uncond"],
        encoder_source=enc.source,
        training=run,
        # pixel space clips x0, latents do not; DDIM's timestep offsets: the sampler keeps them
        sampling_keys=SAMPLING_KEYS,
    )
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    return output


def save_state(loop: engine.Loop, step: int, history: dict, fingerprint: str, path: Path) -> None:
    save_resume_state(engine.state_payload(loop, step, history, fingerprint), path)


def write_samples(loop: engine.Loop, real: np.ndarray, samples_png, state_dir: Path, step: int) -> None:
    """The sample grid of the EMA weights at ``step``: ``samples_png`` and a numbered copy in the state dir."""
    views = engine.sample_views(loop, real)
    engine.write_sample_grid(real, views, state_dir / "samples" / f"step-{step:07d}.png")
    if samples_png:
        engine.write_sample_grid(real, views, samples_png)


# ---------------------------------------------------------------------------------------------
# training


def finish(loop: engine.Loop, history: dict, step: int, *, fingerprint, records, real, paths: dict) -> None:
    """Rank 0's outputs at the end: the state, the sample grid, the folder, the log and the curve."""
    state_dir = Path(paths["state_dir"])
    save_state(loop, step, history, fingerprint, state_dir / "last.pth")
    write_samples(loop, real, paths.get("samples_png"), state_dir, step)
    write_folder(loop, paths["output"], len(records), step)
    if paths.get("log_csv"):
        training.write_log_csv(history, paths["log_csv"])
    if paths.get("curve_png"):
        title = f"S-LDM, {len(records)} images, seed {loop.seed}"
        training.plot_curve(history, paths["curve_png"], title, loss_label=LOSS_LABEL, log_loss=True)
    LOG.info("wrote %s (%d steps, EMA weights)", paths["output"], step)


def train(
    settings: dict,
    records: list,
    *,
    seed: int,
    device=None,
    world_size: int = 1,
    rank: int = 0,
    max_reject_fraction: float | None = None,
    **paths,
) -> dict:
    """Train on ``records`` (ImageNet records), resuming ``<state_dir>/last.pth`` when it is this
    run's, and write the ``sldm`` folder ``output``. ``paths``: ``output``, ``state_dir`` and the
    optional ``log_csv``, ``curve_png``, ``samples_png``. Unreadable images are skipped and listed in
    ``<state_dir>/rejects.csv`` up to ``max_reject_fraction``. Returns the history (step, loss, lr,
    images/s)."""
    s, device = settings, torch.device(resolve_device(device))
    LOG.info("rank %d device: %s", rank, describe_device(device))
    state_dir = Path(paths["state_dir"])
    loop = build_loop(s, seed, device)  # reads the encoder and autoencoder: errors name them first
    loop.world_size, loop.rank = world_size, rank
    health = WeightHealth(loop.model.parameters())  # a kept state's rule, bounds from the seeded init
    fingerprint = job_fingerprint(s, seed, data_signature(records))
    files = [r.path for r in records]
    batches = StepBatches(
        files,
        s["image_size"],
        s["batch_size"],
        derive_seed(seed, "data"),
        world_size,
        rank,
        max_reject_fraction=max_reject_fraction,
        rejects_listing=state_dir / "rejects.csv",
    )
    real = np.stack([batches.image(j) for j in range(min(s["samples"]["images"], len(files)))])
    state = training.load_state(state_dir / "last.pth", fingerprint, LOG)
    history, step = engine.resume(loop, state) if state is not None else (training.new_history(engine.HISTORY_KEYS), 0)
    health.snapshot()
    saved = {"step": step if state is not None else None}
    loop.ddp_model = training.wrap_ddp(loop.model, device, world_size)  # after the resume

    def on_step(done: int) -> None:
        # the weights' rule before any state can hold them (pipeline.resume.WeightHealth)
        kept = training.kept_state(state_dir / "last.pth", None if saved["step"] is None else f"step {saved['step']}")
        health.check(done - 1, kept)
        if rank == 0 and done % s["checkpoint_every"] == 0 and done < s["steps"]:
            save_state(loop, done, history, fingerprint, state_dir / "last.pth")
            saved["step"] = done
        if rank == 0 and s["sample_every"] and done % s["sample_every"] == 0 and done < s["steps"]:
            write_samples(loop, real, paths.get("samples_png"), state_dir, done)

    loader = DataLoader(batches, batch_size=None, sampler=range(step, s["steps"]), num_workers=s["num_workers"])
    bar = progress(total=s["steps"], initial=step, unit="step", desc=f"sldm seed {seed}", disable=rank != 0)
    step = engine.run_steps(loop, loader, history, step, bar, on_step)
    bar.close()
    if rank == 0:
        finish(loop, history, step, fingerprint=fingerprint, records=records, real=real, paths=paths)
    return history


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    ap = training.training_parser("sldm", __doc__, output_help="the sldm folder to write (docs/sldm-format.md)")
    ap.add_argument("--imagenet-root", required=True, help="ImageNet-layout root (its train split is used)")
    ap.add_argument("--samples-png", help="sample grid PNG: real images beside their generated views")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    set_threads(args.threads)
    settings = resolve_sldm_settings(training.settings_overrides(args, "sldm"))
    records = training_records(args.imagenet_root, settings["max_images"])
    LOG.info("training the S-LDM on %d images from %s, seed %d", len(records), args.imagenet_root, args.seed)
    paths = dict(output=args.output, state_dir=args.state_dir, log_csv=args.log_csv, curve_png=args.curve_png)
    paths["samples_png"] = args.samples_png
    with training.training_processes("sldm", args.device, LOG) as (world, rank, device):
        reject = args.max_reject_fraction
        train(
            settings,
            records,
            seed=args.seed,
            device=device,
            world_size=world,
            rank=rank,
            max_reject_fraction=reject,
            **paths,
        )
        if rank == 0:
            write_folder_record(args, settings, device)


def write_folder_record(args, settings: dict, device) -> None:
    """The S-LDM folder's provenance record, ``<folder>.provenance.json`` beside it
    (``pipeline.records``): the images, encoder and autoencoder it read, settings, device, precision."""
    device = torch.device(resolve_device(device))
    encoder = settings["encoder"]
    write_record(
        args.output,
        kind="sldm",
        command=("sldm", "train"),
        inputs=[
            args.imagenet_root,
            encoder["checkpoint"] if encoder["checkpoint"] and encoder["source"] != "random-init" else None,
            settings["autoencoder"] if settings["autoencoder"] != "none" else None,
        ],
        settings={"sldm": training.result_settings("sldm", settings, NEUTRAL_OUTPUTS), "seed": args.seed},
        device=device,
        precision="bf16" if device.type == "cuda" and settings["precision"] != "fp32" else "fp32",
    )
