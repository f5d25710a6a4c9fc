"""The S-LDM folder: ``save_sldm`` writes it, ``validate_folder`` checks it on every load.

One local folder with a JSON manifest (``sldm.json``), the format documented in
``docs/sldm-format.md``: the UNet, the VAE (or none: pixel space), the training noise schedule, the
conditioning encoder (a timm ViT) and its Linear projector, and the classifier-free-guidance
convention used in training. Errors name the missing file or the mismatched key.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DDIMScheduler
from safetensors.torch import save_file

SLDM_MANIFEST = "sldm.json"
MANIFEST_KEYS = ("encoder", "projector", "unet", "vae", "scheduler", "conditioning")
# the noise-schedule keys the sampler must agree on with training (checked, not assumed)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
NULL_CONDITIONS = ("projected_zero", "zero_token")


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
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    embedding_norm: str = "none",
    null_condition: str = "projected_zero",
    p_uncond: float | None = None,
    encoder_source: str | None = None,
    training: dict | None = None,
) -> Path:
    """Write an S-LDM folder in the layout :class:`SLDMGenerator` loads.

    Layout (``docs/sldm-format.md``): ``unet/``, ``vae/`` (absent for a pixel-space model, ``vae``
    None), ``scheduler/`` (diffusers ``save_pretrained``; the training noise schedule),
    ``encoder.safetensors`` (timm ViT state dict), ``projector.safetensors`` (Linear D_enc -> D_ctx)
    and ``sldm.json``: the encoder's timm name/kwargs, input size and normalization, the schedule the
    UNet was trained with, and the classifier-free-guidance convention (``null_condition``: the
    null token training used; ``p_uncond``: how often the condition was dropped, when known);
    ``encoder_source`` (``random-init``: an untrained stand-in) and ``training`` when given.
    """
    if null_condition not in NULL_CONDITIONS:
        raise ValueError(f"null_condition must be one of {NULL_CONDITIONS}, got {null_condition!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    if vae is not None:
        vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, folder / "encoder.safetensors")
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, folder / "projector.safetensors")
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
            **({"source": encoder_source} if encoder_source is not None else {}),
        },
        "projector": {
            "weights": "projector.safetensors",
            "in_features": projector.in_features,
            "out_features": projector.out_features,
        },
        "unet": "unet",
        "vae": "vae" if vae is not None else None,
        "scheduler": {"folder": "scheduler", "training": {k: scheduler.config[k] for k in SCHEDULE_KEYS}},
        "conditioning": {"null_condition": null_condition, "p_uncond": p_uncond},
        **({"training": training} if training is not None else {}),
    }
    (folder / SLDM_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


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
    """The manifest of an S-LDM folder whose every named file exists and whose scheduler has the
    noise schedule the UNet was trained with; raises naming the missing file or mismatched key."""
    man = read_manifest(path)
    needed = [man["encoder"]["weights"], man["projector"]["weights"], f"{man['unet']}/config.json"]
    needed += [f"{man['scheduler']['folder']}/scheduler_config.json"]
    needed += [f"{man['vae']}/config.json"] if man["vae"] else []
    for rel in needed:
        if not (path / rel).is_file():
            raise FileNotFoundError(f"{path / rel}: missing from the S-LDM folder (named in {SLDM_MANIFEST})")
    shipped = DDIMScheduler.load_config(path / man["scheduler"]["folder"])
    for key, trained in man["scheduler"]["training"].items():
        if shipped.get(key) != trained:
            raise SLDMFolderError(
                f"{path / man['scheduler']['folder']}: scheduler {key} = {shipped.get(key)!r}, but the UNet "
                f"was trained with {trained!r} ({SLDM_MANIFEST})"
            )
    if man["scheduler"]["training"].get("prediction_type") != "epsilon":
        raise SLDMFolderError(f"{path}: only epsilon-prediction UNets are sampled here ({SLDM_MANIFEST})")
    if man["conditioning"].get("null_condition") not in NULL_CONDITIONS:
        raise SLDMFolderError(f"{path / SLDM_MANIFEST}: conditioning.null_condition not in {NULL_CONDITIONS}")
    return man
