"""The S-LDM folder: ``save_sldm`` writes it, ``validate_folder`` checks it on every load,
``load_sldm`` reads its components (the views stage's ``sldm`` / ``rcg`` generators sample them).

One local folder with a JSON manifest (``sldm.json``), the format documented in
``docs/sldm-format.md``: the UNet, the VAE (or none: pixel space), the training noise schedule, the
conditioning encoder (a timm ViT) and its Linear projector, and the classifier-free-guidance
convention used in training. Errors name the missing file or the mismatched key. The folder's
last file is its digest manifest (``digests.sha256``, ``pipeline.io.write_folder_digests``): every
load checks each file against it, so a flipped byte is an ``IntegrityError`` naming the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel
from safetensors.torch import load_file, save_file

from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.io import verify_folder_digests, write_folder_digests
from pipeline.sldm.conditioning import head_dims, projection_head, timm_vit
from pipeline.sldm.sampling import PREDICTION_TYPES

SLDM_MANIFEST = "sldm.json"
MANIFEST_KEYS = ("encoder", "projector", "unet", "vae", "scheduler", "conditioning")
# the noise-schedule keys the sampler must agree on with training (checked, not assumed)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
# projected_zero / zero_token: the null token of CFG training; none: never trained without the
# condition (RCG's LDM), so it is sampled unguided only
NULL_CONDITIONS = ("projected_zero", "zero_token", "none")
# the autoencoders a folder's vae/ may hold (diffusers class names, from its config.json)
AUTOENCODERS = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
HEAD_WEIGHTS = "encoder_head.safetensors"
PROJECTOR_WEIGHTS = "projector.safetensors"
LOG = logging.getLogger("cdgmae.sldm")


class SLDMFolderError(ValueError):
    """An S-LDM folder that does not match its documented format; the message names the file/key."""


def save_sldm(
    folder,
    unet,
    vae,
    scheduler,
    encoder,
    encoder_name: str,
    projector,
    encoder_kwargs: dict | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    embedding_norm: str = "none",
    null_condition: str = "projected_zero",
    p_uncond: float | None = None,
    encoder_source: str | None = None,
    training: dict | None = None,
    encoder_head=None,
    resize_antialias: bool = True,
    sampling_keys: tuple = (),
    imported: dict | None = None,
) -> Path:
    """Write an S-LDM folder in the layout :class:`SLDMGenerator` loads.

    Layout (``docs/sldm-format.md``): ``unet/``, ``vae/`` (absent for a pixel-space model, ``vae``
    None), ``scheduler/`` (diffusers ``save_pretrained``; the training noise schedule),
    ``encoder.safetensors`` (timm ViT state dict), ``projector.safetensors`` (Linear D_enc -> D_ctx)
    and ``sldm.json``: the encoder's timm name/kwargs, input size and normalization, the schedule the
    UNet was trained with, and the classifier-free-guidance convention (``null_condition``: the
    null token training used; ``p_uncond``: how often the condition was dropped, when known);
    ``encoder_source`` (``random-init``: an untrained stand-in) and ``training`` when given.
    ``projector`` None: the embedding is the token itself (``"projector": null``); ``encoder_head``:
    a ``projection_head`` MLP after the CLS embedding (``encoder_head.safetensors``);
    ``resize_antialias``: how the encoder's input is resized; ``sampling_keys``: scheduler config keys
    the sampler must keep (recorded, checked on load); ``imported``: provenance of an imported model.
    Last, ``digests.sha256``: the SHA-256 of every file (a writer that adds a file afterwards, as
    the RCG import's key map, records it again with ``pipeline.io.write_folder_digests``).
    """
    if null_condition not in NULL_CONDITIONS:
        raise ValueError(f"null_condition must be one of {NULL_CONDITIONS}, got {null_condition!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    if vae is not None:
        vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    for module, name in (
        (encoder, "encoder.safetensors"),
        (projector, PROJECTOR_WEIGHTS),
        (encoder_head, HEAD_WEIGHTS),
    ):
        if module is not None:
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, folder / name)
    manifest = {
        "format": "cdgmae-sldm",
        "version": 1,
        "encoder": {
            "timm_name": encoder_name,
            "kwargs": encoder_kwargs or {},
            "weights": "encoder.safetensors",
            "input_size": int(encoder.patch_embed.img_size[0]),
            "mean": list(mean),
            "std": list(std),
            "embedding_norm": embedding_norm,
            "resize_antialias": bool(resize_antialias),
            "head": None if encoder_head is None else {"weights": HEAD_WEIGHTS, "dims": head_dims(encoder_head)},
            **({"source": encoder_source} if encoder_source is not None else {}),
        },
        "projector": _projector_entry(projector),
        "unet": "unet",
        "vae": "vae" if vae is not None else None,
        "scheduler": {
            "folder": "scheduler",
            "training": {k: scheduler.config[k] for k in SCHEDULE_KEYS},
            **({"sampling": {k: scheduler.config[k] for k in sampling_keys}} if sampling_keys else {}),
        },
        "conditioning": {"null_condition": null_condition, "p_uncond": p_uncond},
        **({"training": training} if training is not None else {}),
        **({"imported": imported} if imported is not None else {}),
    }
    (folder / SLDM_MANIFEST).write_text(json.dumps(manifest, indent=2))
    write_folder_digests(folder)
    return folder


def _projector_entry(projector) -> dict | None:
    if projector is None:  # the embedding is the cross-attention token itself
        return None
    return {"weights": PROJECTOR_WEIGHTS, "in_features": projector.in_features, "out_features": projector.out_features}


def read_manifest(path: Path) -> dict:
    """The ``sldm.json`` of an S-LDM folder, checked to name every component."""
    manifest_path = path / SLDM_MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path}: missing S-LDM manifest (docs/sldm-format.md)")
    try:
        man = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise SLDMFolderError(f"{manifest_path}: not valid JSON ({err})") from None
    for key in MANIFEST_KEYS:
        if key not in man:
            raise SLDMFolderError(f"{manifest_path}: manifest lacks key {key!r}")
    return man


def validate_folder(path: Path) -> dict:
    """The manifest of an S-LDM folder whose every named file exists, whose autoencoder is a known
    class and whose scheduler has the noise schedule the UNet was trained with (and the sampling
    keys recorded); raises naming the missing file or mismatched key. Then every file is checked
    against the folder's ``digests.sha256`` (``pipeline.io.verify_folder_digests``): a changed, missing
    or unlisted file is an ``IntegrityError`` naming it; a folder under ``results/`` without the
    manifest is one too, an external folder without it is read with a logged note."""
    path = Path(path)
    man = _validate_layout(path)
    verify_folder_digests(path, log=LOG)
    return man


def _validate_layout(path: Path) -> dict:
    """``validate_folder``'s checks of the format (before the digests: a hand-edited folder is
    named by what it breaks)."""
    man = read_manifest(path)
    enc, pr = man["encoder"], man["projector"]
    needed = [enc["weights"], f"{man['unet']}/config.json", f"{man['scheduler']['folder']}/scheduler_config.json"]
    needed += [pr["weights"]] if pr else []
    needed += [enc["head"]["weights"]] if enc.get("head") else []
    needed += [f"{man['vae']}/config.json"] if man["vae"] else []
    for rel in needed:
        if not (path / rel).is_file():
            raise FileNotFoundError(f"{path / rel}: missing from the S-LDM folder (named in {SLDM_MANIFEST})")
    if man["vae"]:
        kind = json.loads((path / man["vae"] / "config.json").read_text()).get("_class_name")
        if kind not in AUTOENCODERS:
            raise SLDMFolderError(
                f"{path / man['vae'] / 'config.json'}: _class_name {kind!r} not in {tuple(AUTOENCODERS)}"
            )
    _check_scheduler(path, man["scheduler"])
    if man["vae"] and DDIMScheduler.load_config(path / man["scheduler"]["folder"]).get("clip_sample", True):
        # DDIM's default is True: a latent model's x0 estimate must never be clipped to [-1, 1]
        # (latents are not bounded like pixels; clipping washes the views out)
        raise SLDMFolderError(
            f"{path / man['scheduler']['folder']}: clip_sample must be false for a latent-space S-LDM "
            f"(its autoencoder is {man['vae']}/); only a pixel-space model clips x0"
        )
    if man["conditioning"].get("null_condition") not in NULL_CONDITIONS:
        raise SLDMFolderError(f"{path / SLDM_MANIFEST}: conditioning.null_condition not in {NULL_CONDITIONS}")
    return man


def _check_scheduler(path: Path, sched: dict) -> None:
    """The shipped scheduler config agrees with every recorded training (and sampling) key."""
    folder = path / sched["folder"]
    shipped = DDIMScheduler.load_config(folder)
    for part in ("training", "sampling"):
        for key, recorded in sched.get(part, {}).items():
            if shipped.get(key) != recorded:
                what = "the UNet was trained with" if part == "training" else "the sampler must use"
                raise SLDMFolderError(
                    f"{folder}: scheduler {key} = {shipped.get(key)!r}, but {what} {recorded!r} ({SLDM_MANIFEST})"
                )
    if sched["training"].get("prediction_type") not in PREDICTION_TYPES:
        raise SLDMFolderError(
            f"{path}: scheduler.training.prediction_type {sched['training'].get('prediction_type')!r} "
            f"is not sampled here (one of {PREDICTION_TYPES}; {SLDM_MANIFEST})"
        )


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class SLDMComponents:
    """The parts of a validated S-LDM folder, on the CPU in float32."""

    manifest: dict
    encoder: torch.nn.Module  # the timm ViT (then its projection head, if any)
    embed_dim: int  # the width of its embedding
    input_size: int  # the encoder's input side
    embedding_norm: str
    resize_antialias: bool
    mean: torch.Tensor  # (1, 3, 1, 1) input normalization
    std: torch.Tensor
    projector: torch.nn.Module  # Linear embedding -> token, an Identity where the folder has none
    unet: UNet2DConditionModel
    vae: torch.nn.Module | None  # None: pixel space
    scheduler: DDIMScheduler  # the training noise schedule (and recorded sampling keys)


def load_sldm(path) -> SLDMComponents:
    """The components of the S-LDM folder ``path``, validated (``validate_folder``) and checked to
    fit together (embedding -> projector -> UNet context, UNet channels -> autoencoder latents)."""
    path = Path(path)
    man = validate_folder(path)
    enc, pr = man["encoder"], man["projector"]
    vit = timm_vit(enc["timm_name"], enc.get("kwargs", {}))
    vit.load_state_dict(load_file(path / enc["weights"]), strict=True)
    embed_dim, encoder = int(vit.num_features), vit
    if enc.get("head"):
        head = projection_head(enc["head"]["dims"])
        head.load_state_dict(load_file(path / enc["head"]["weights"]), strict=True)
        embed_dim, encoder = int(enc["head"]["dims"][-1]), torch.nn.Sequential(vit, head)
    projector = torch.nn.Identity()
    if pr is not None:
        projector = torch.nn.Linear(int(pr["in_features"]), int(pr["out_features"]))
        projector.load_state_dict(load_file(path / pr["weights"]), strict=True)
    unet = UNet2DConditionModel.from_pretrained(path / man["unet"], local_files_only=True)
    vae = None
    if man["vae"]:
        kind = json.loads((path / man["vae"] / "config.json").read_text())["_class_name"]
        vae = AUTOENCODERS[kind].from_pretrained(path / man["vae"], local_files_only=True)
    parts = SLDMComponents(
        manifest=man,
        encoder=encoder,
        embed_dim=embed_dim,
        input_size=int(enc["input_size"]),
        embedding_norm=enc.get("embedding_norm", "none"),
        resize_antialias=bool(enc.get("resize_antialias", True)),
        mean=torch.tensor(enc["mean"]).view(1, 3, 1, 1),
        std=torch.tensor(enc["std"]).view(1, 3, 1, 1),
        projector=projector,
        unet=unet,
        vae=vae,
        scheduler=DDIMScheduler.from_pretrained(path / man["scheduler"]["folder"], local_files_only=True),
    )
    _check_shapes(path, parts)
    return parts


def _check_shapes(path: Path, parts: SLDMComponents) -> None:
    """The components fit together: embedding -> projector (or none) -> UNet context, UNet
    channels -> the autoencoder's latents."""
    width, token = parts.embed_dim, parts.embed_dim
    if isinstance(parts.projector, torch.nn.Linear):
        if parts.projector.in_features != width:
            raise SLDMFolderError(f"{path}: projector in_features {parts.projector.in_features} != embedding {width}")
        token = parts.projector.out_features
    unet = parts.unet.config
    if unet.cross_attention_dim != token:
        raise SLDMFolderError(
            f"{path}: conditioning token width {token} != UNet cross_attention_dim {unet.cross_attention_dim}"
        )
    channels = parts.vae.config.latent_channels if parts.vae is not None else 3
    if unet.in_channels != channels:
        raise SLDMFolderError(
            f"{path}: UNet in_channels {unet.in_channels} != {channels} "
            f"({'VAE latent channels' if parts.vae is not None else 'RGB, pixel space'})"
        )
