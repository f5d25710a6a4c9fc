"""Import RCG's public pixel generator "LDM-8" and its MoCo v3 encoder as an ``sldm`` folder.

``python -m pipeline.sldm import-rcg --ldm CKPT --encoder CKPT [--ldm-config YAML] --out FOLDER``

RCG (Li, Katabi, He 2023; github.com/LTH14/rcg, read to learn the layout, no code copied) trains a
latent-diffusion UNet (``openaimodel.UNetModel``, spatial transformers) on VQ-f8 latents, conditioned
through cross-attention on **one** token: the MoCo v3 ViT's CLS feature -> its 3-layer projection
MLP -> standardised per sample (own mean / std over the features). No projector follows (the
token *is* the representation: ``projector: null``) and the LDM is never trained with the condition
dropped, so it has no CFG null (``null_condition: none``: sampled unguided). RCG samples with the
EMA weights and its DDIM (``steps_offset 1``, ``alpha_prev`` of the last step = ``alphas_cumprod[0]``).

The LDM checkpoint is ``{"model": LatentDiffusion.state_dict(), "optimizer", "epoch", "scaler",
"args", "model_ema"}``; the MoCo one ``{"state_dict": {"module.base_encoder.*",
"module.momentum_encoder.*", "module.predictor.*"}, "epoch", "arch", "optimizer", "scaler"}``.
Every key of both is accounted for (``KeyMap``): converted, checked, recorded or dropped for a
stated reason; a key no rule claims stops the import, naming it. The folder keeps the whole map in
``import_keymap.json``. The UNet and VQ key maps are explicit: diffusers' single-file helpers skip
unknown keys silently and do not know VQ-f8's attention levels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

from pipeline.cli import command_parser
from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD
from pipeline.io import file_sha256, write_folder_digests, write_text_atomic
from pipeline.records import write_record
from pipeline.resume import UnsafeCheckpointError, safe_torch_load
from pipeline.sldm.conditioning import projection_head, timm_vit
from pipeline.sldm.folder import save_sldm
from pipeline.sldm.ldm_keys import build_unet, build_vq, unet_key, vq_key

# the values of RCG's config/ldm/cin-ldm-vq-f8-repcond.yaml this import reads (used when no
# --ldm-config is given); absent keys take LatentDiffusion's defaults (``read_ldm_config``)
RCG_LDM8_CONFIG = {
    "linear_start": 0.0015,
    "linear_end": 0.0195,
    "timesteps": 1000,
    "conditioning_key": "crossattn",
    "unet_config": {
        "target": "pixel_generator.ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 256,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4],
            "num_head_channels": 32,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": 256,
        },
    },
    "first_stage_config": {
        "target": "pixel_generator.ldm.models.autoencoder.VQModelInterface",
        "params": {
            "embed_dim": 4,
            "n_embed": 16384,
            "ddconfig": {
                "double_z": False,
                "z_channels": 4,
                "resolution": 256,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 128,
                "ch_mult": [1, 2, 2, 4],
                "num_res_blocks": 2,
                "attn_resolutions": [32],
            },
        },
    },
    "pretrained_enc_config": {"params": {"pretrained_enc_arch": "mocov3_vit_base", "pretrained_enc_withproj": True}},
}
MOCO_HEADS = {"mocov3_vit_small": 12, "mocov3_vit_base": 12, "mocov3_vit_large": 16}
TIMM_NAME = "vit_base_patch16_224"  # its size kwargs are read off the checkpoint
ENCODER_INPUT = 224  # RCG: bicubic to 224 (no antialias), ImageNet mean / std, then the ViT
# DDPM buffers LatentDiffusion registers from its betas (compared to the scheduler's where noted)
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# RCG's DDIM sampler: timesteps 1 + k * (T / steps), the last step's alpha_prev = alphas_cumprod[0]
RCG_DDIM = {"steps_offset": 1, "set_alpha_to_one": False, "timestep_spacing": "leading", "clip_sample": False}
LDM_TOP = {"optimizer", "epoch", "scaler", "args", "model_ema"}  # training state beside "model"
MOCO_TOP = {"epoch", "arch", "optimizer", "scaler"}  # beside "state_dict"


class RCGImportError(ValueError):
    """An RCG checkpoint this import cannot map; the message names the file and the key."""


class KeyMap:
    """Where every source key went: ``claim(source, key, target)``; ``check`` raises on the rest."""

    def __init__(self):
        self.targets: dict[str, dict[str, str]] = {}

    def claim(self, source: str, key: str, target: str) -> None:
        self.targets.setdefault(source, {})[key] = target

    def check(self, source: str, keys) -> None:
        left = sorted(set(keys) - set(self.targets.get(source, {})))
        if left:
            shown = ", ".join(left[:12]) + (f" ... ({len(left)} in all)" if len(left) > 12 else "")
            raise RCGImportError(f"{source}: keys no rule of the RCG import maps: {shown}")

    def groups(self) -> dict[str, dict[str, int]]:
        """Per source: the number of keys sent to each target (folder file or stated disposition)."""
        out: dict[str, dict[str, int]] = {}
        for source, mapping in self.targets.items():
            for target in mapping.values():
                group = target.split(":", 1)[0]
                out.setdefault(source, {})[group] = out.get(source, {}).get(group, 0) + 1
        return out


def load_checkpoint(path, label: str) -> dict:
    """A torch checkpoint as plain data (``weights_only``; RCG's ``args`` is an argparse Namespace)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: {path} is not a file")
    try:
        ckpt = safe_torch_load(path, (argparse.Namespace,))
    except UnsafeCheckpointError as err:
        raise RCGImportError(f"{label}: {err}") from None
    except Exception as err:  # truncated, not a torch file
        raise RCGImportError(f"{label}: {path} is not a readable torch checkpoint ({err})") from None
    if not isinstance(ckpt, dict):
        raise RCGImportError(f"{label}: {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def read_ldm_config(path=None) -> dict:
    """``model.params`` of RCG's LDM config (``path``: its YAML), checked to be the supported kind."""
    if path is None:
        params = RCG_LDM8_CONFIG
    else:
        params = (yaml.safe_load(Path(path).read_text()) or {}).get("model", {}).get("params")
        if not isinstance(params, dict):
            raise RCGImportError(f"{path}: no model.params (an RCG config/ldm/*.yaml)")
    where = path or "the built-in RCG LDM-8 config"
    unet = params["unet_config"]["params"]
    needs = {
        "parameterization": (params.get("parameterization", "eps"), "eps"),
        "beta_schedule": (params.get("beta_schedule", "linear"), "linear"),
        "conditioning_key": (params.get("conditioning_key"), "crossattn"),
        "unet_config.params.use_spatial_transformer": (unet.get("use_spatial_transformer", False), True),
        "first_stage_config.target": (params["first_stage_config"]["target"].rsplit(".", 1)[-1], "VQModelInterface"),
    }
    for key, (got, want) in needs.items():
        if got != want:
            raise RCGImportError(f"{where}: {key} = {got!r}; this import supports {want!r}")
    enc = params.get("pretrained_enc_config", {}).get("params", {})
    if enc.get("pretrained_enc_pca_path"):
        raise RCGImportError(f"{where}: pretrained_enc_pca_path is not supported")
    return params


def build_loaded(build: Callable[[], torch.nn.Module], state: dict, label: str) -> torch.nn.Module:
    """``build()`` with ``state`` loaded; a missing, left-over or misshapen key stops the import.

    The keys and shapes are checked on a build on the meta device first, so a checkpoint that does
    not fit stops before a full-size model is allocated and randomly initialised (seconds at RCG's
    size)."""
    with torch.device("meta"):
        own = build().state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or extra or shapes:
        raise RCGImportError(
            f"{label}: converted keys do not fit the diffusers model: missing {missing[:8]}, "
            f"left over {extra[:8]}, shape mismatch {sorted(shapes)[:8]}"
        )
    model = build()
    model.load_state_dict(state, strict=True)
    return model


def convert_unet(sd: dict, params: dict, keymap: KeyMap, weights: str, src: str) -> UNet2DConditionModel:
    """The UNet from ``model_ema.*`` (``weights="ema"``, what RCG samples with) or
    ``model.diffusion_model.*`` (``"train"``); the other copy is claimed as unused."""
    layers = params["unet_config"]["params"]["num_res_blocks"]
    prefix = "model.diffusion_model."
    state = {}
    for key in [k for k in sd if k.startswith(prefix)]:
        ema = "model_ema." + ("diffusion_model." + key[len(prefix) :]).replace(".", "")
        if weights == "ema" and ema not in sd:
            raise RCGImportError(f"{src}: {key} has no EMA copy {ema} (use --unet-weights train)")
        try:
            target = unet_key(key[len(prefix) :], layers)
        except (KeyError, ValueError, IndexError):
            raise RCGImportError(f"{src}: no UNet mapping for {key}") from None
        used, other = (ema, key) if weights == "ema" else (key, ema)
        state[target] = sd[used]
        keymap.claim(src, used, f"unet/:{target}")
        if other in sd:
            keymap.claim(src, other, f"unused:the {'training' if weights == 'ema' else 'EMA'} copy of {target}")
    for key in ("model_ema.decay", "model_ema.num_updates"):
        if key in sd:
            keymap.claim(src, key, "sldm.json:imported.ema")
    return build_loaded(lambda: build_unet(params), state, f"{src} (UNet)")


def convert_vq(sd: dict, params: dict, keymap: KeyMap, src: str) -> VQModel:
    """The VQ-f8 first stage (``first_stage_model.*``) as a diffusers VQModel."""
    levels = len(params["first_stage_config"]["params"]["ddconfig"]["ch_mult"])
    scale = float(sd["scale_factor"]) if "scale_factor" in sd else float(params.get("scale_factor", 1.0))
    if "scale_factor" in sd:
        keymap.claim(src, "scale_factor", "vae/:config scaling_factor")
    prefix, state = "first_stage_model.", {}
    for key in [k for k in sd if k.startswith(prefix)]:
        try:
            target = vq_key(key[len(prefix) :], levels)
        except (KeyError, ValueError, IndexError):
            raise RCGImportError(f"{src}: no VQ mapping for {key}") from None
        value = sd[key]
        # taming's attention uses 1x1 convs where diffusers' has Linear layers
        state[target] = value[:, :, 0, 0] if ".attentions." in target and value.ndim == 4 else value
        keymap.claim(src, key, f"vae/:{target}")
    return build_loaded(lambda: build_vq(params, scale), state, f"{src} (VQ first stage)")


def moco_base_encoder(ckpt: dict, keymap: KeyMap, src: str) -> dict:
    """MoCo v3's ``base_encoder`` (ViT + projection MLP) from its checkpoint; the momentum encoder
    and the predictor (training only) are claimed as dropped."""
    if "state_dict" not in ckpt:
        raise RCGImportError(f"{src}: no 'state_dict' (a MoCo v3 checkpoint such as vit-b-300ep.pth.tar)")
    for key in ckpt:
        keymap.claim(f"{src} [top level]", key, "state dict" if key == "state_dict" else "dropped:training state")
    keymap.check(f"{src} [top level]", ckpt)
    base, sd = {}, ckpt["state_dict"]
    for key in sd:
        name = key.removeprefix("module.")
        if name.startswith("base_encoder."):
            base[name[len("base_encoder.") :]] = sd[key]
            keymap.claim(src, key, f"checked:equal to pretrained_encoder.{name[len('base_encoder.') :]}")
        elif name.startswith(("momentum_encoder.", "predictor.")):
            keymap.claim(src, key, "dropped:MoCo training only (momentum encoder / predictor)")
    keymap.check(src, sd)
    return base


def split_encoder(state: dict, arch: str, src: str):
    """(timm ViT kwargs, ViT state, head dims, head state) of a MoCo v3 ``VisionTransformerMoCo``
    whose ``head`` is RCG's / MoCo's projection MLP; the ViT size is read off the shapes."""
    vit = {k: v for k, v in state.items() if not k.startswith("head.")}
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    if "cls_token" not in vit or "patch_embed.proj.weight" not in vit:
        raise RCGImportError(f"{src}: pretrained_encoder lacks cls_token / patch_embed (not a ViT)")
    if arch not in MOCO_HEADS:
        raise RCGImportError(f"{src}: pretrained_enc_arch {arch!r} not in {sorted(MOCO_HEADS)}")
    dim, patch = vit["cls_token"].shape[-1], vit["patch_embed.proj.weight"].shape[-1]
    grid = int(round((vit["pos_embed"].shape[1] - 1) ** 0.5))
    kwargs = {
        "embed_dim": int(dim),
        "depth": len({k.split(".")[1] for k in vit if k.startswith("blocks.")}),
        "num_heads": MOCO_HEADS[arch],
        "mlp_ratio": vit["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "patch_size": int(patch),
        "img_size": int(grid * patch),
    }
    linears = sorted(int(k.split(".")[0]) for k in head if k.endswith("weight") and head[k].ndim == 2)
    dims = (
        [int(head[f"{linears[0]}.weight"].shape[1])] + [int(head[f"{i}.weight"].shape[0]) for i in linears]
        if linears
        else []
    )
    return kwargs, vit, dims, head


def convert_encoder(sd: dict, moco: dict, params: dict, keymap: KeyMap, src: str):
    """The encoder RCG conditions with: the LDM checkpoint's ``pretrained_encoder.*`` (what RCG's
    evaluation loads last), checked equal, key by key, to the MoCo checkpoint's base encoder."""
    enc = params.get("pretrained_enc_config", {}).get("params", {})
    state = {k[len("pretrained_encoder.") :]: v for k, v in sd.items() if k.startswith("pretrained_encoder.")}
    if set(state) != set(moco):
        diff = sorted(set(state) ^ set(moco))[:8]
        raise RCGImportError(f"{src}: pretrained_encoder.* and the MoCo base_encoder differ in keys: {diff}")
    for key, value in state.items():
        if value.shape != moco[key].shape or not torch.equal(value, moco[key]):
            raise RCGImportError(f"{src}: pretrained_encoder.{key} differs from the --encoder checkpoint's")
    kwargs, vit_state, dims, head_state = split_encoder(state, enc.get("pretrained_enc_arch", "mocov3_vit_base"), src)
    vit = build_loaded(lambda: timm_vit(TIMM_NAME, kwargs), vit_state, f"{src} (MoCo v3 ViT)")
    with_head = bool(enc.get("pretrained_enc_withproj", False))
    head = build_loaded(lambda: projection_head(dims), head_state, f"{src} (projection head)") if with_head else None
    for key in state:
        where = "encoder_head.safetensors" if key.startswith("head.") else "encoder.safetensors"
        if key.startswith("head.") and not with_head:
            where = "dropped:pretrained_enc_withproj is false"
        keymap.claim(src, f"pretrained_encoder.{key}", f"{where}:{key.removeprefix('head.')}")
    return vit, kwargs, head, dims


def rcg_scheduler(sd: dict, params: dict, keymap: KeyMap, src: str) -> DDIMScheduler:
    """RCG's DDPM schedule as a diffusers DDIM config; LDM's ``linear`` betas are linear in
    sqrt(beta), i.e. diffusers' ``scaled_linear``. Checked against the checkpoint's buffers."""
    sched = DDIMScheduler(
        num_train_timesteps=int(params.get("timesteps", 1000)),
        beta_start=float(params.get("linear_start", 1e-4)),
        beta_end=float(params.get("linear_end", 2e-2)),
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        **RCG_DDIM,
    )
    for name in ("betas", "alphas_cumprod"):
        ours = getattr(sched, name).double()
        if name in sd and not torch.allclose(sd[name].double(), ours, rtol=1e-4, atol=1e-8):
            raise RCGImportError(f"{src}: {name} differ from the schedule of the LDM config (linear_start/end)")
    for name in SCHEDULE_BUFFERS:
        if name in sd:
            check = "checked" if name in ("betas", "alphas_cumprod") else "derived from betas"
            keymap.claim(src, name, f"scheduler/:{check}")
    return sched


def convert_rcg(ldm_path, encoder_path, out, ldm_config=None, unet_weights: str = "ema") -> dict:
    """Convert RCG's LDM-8 checkpoint and its MoCo v3 checkpoint into the ``sldm`` folder ``out``
    (written beside it and renamed onto it); returns the per-source key groups (``KeyMap.groups``)."""
    if unet_weights not in ("ema", "train"):
        raise ValueError(f"unet_weights must be 'ema' or 'train', got {unet_weights!r}")
    params = read_ldm_config(ldm_config)
    ldm, moco = load_checkpoint(ldm_path, "--ldm"), load_checkpoint(encoder_path, "--encoder")
    src, keymap = str(ldm_path), KeyMap()
    if "model" not in ldm:
        raise RCGImportError(f"{src}: no 'model' state dict (RCG's main_ldm.py checkpoint-*.pth)")
    if ldm.get("model_ema") is not None:
        raise RCGImportError(
            f"{src}: a separate 'model_ema' state dict is not supported (RCG's LDM keeps its EMA in model)"
        )
    for key in ldm:
        keymap.claim(f"{src} [top level]", key, "state dict" if key == "model" else "dropped:training state")
    keymap.check(f"{src} [top level]", ldm)
    sd = ldm["model"]
    unet = convert_unet(sd, params, keymap, unet_weights, src)
    vae = convert_vq(sd, params, keymap, src)
    vit, kwargs, head, dims = convert_encoder(
        sd, moco_base_encoder(moco, keymap, str(encoder_path)), params, keymap, src
    )
    sched = rcg_scheduler(sd, params, keymap, src)
    for key in [k for k in sd if k.startswith("cond_stage_model.")]:  # built by RCG, unused with rep_cond
        keymap.claim(src, key, "dropped:RCG's class embedder, unused when conditioning on representations")
    keymap.check(src, sd)
    if (dims[-1] if head is not None else kwargs["embed_dim"]) != unet.config.cross_attention_dim:
        raise RCGImportError(f"{src}: the representation width does not match the UNet's context_dim")
    imported = {
        "from": "rcg-ldm8",
        "ldm_checkpoint": {"path": str(ldm_path), "sha256": file_sha256(ldm_path), "epoch": ldm.get("epoch")},
        "encoder_checkpoint": {"path": str(encoder_path), "sha256": file_sha256(encoder_path)},
        "ldm_config": str(ldm_config) if ldm_config else "built-in (RCG config/ldm/cin-ldm-vq-f8-repcond.yaml)",
        "unet_weights": unet_weights,
        "ema": {k: float(sd[f"model_ema.{k}"]) for k in ("decay", "num_updates") if f"model_ema.{k}" in sd},
        "key_groups": keymap.groups(),
    }
    write_folder(out, unet, vae, sched, vit, kwargs, head, imported, keymap)
    return imported["key_groups"]


def write_folder(out, unet, vae, sched, vit, kwargs: dict, head, imported: dict, keymap: KeyMap) -> Path:
    """The converted model as an ``sldm`` folder with RCG's conditioning recorded, and its key map;
    written beside ``out`` and renamed onto it."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_sldm(
        tmp,
        unet,
        vae,
        sched,
        vit,
        TIMM_NAME,
        None,  # the standardised representation is the cross-attention token itself
        encoder_kwargs=kwargs,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        embedding_norm="standardize",
        null_condition="none",
        encoder_source="rcg-mocov3",
        encoder_head=head,
        resize_antialias=False,
        sampling_keys=tuple(RCG_DDIM),
        imported=imported,
    )
    write_text_atomic(tmp / "import_keymap.json", json.dumps(keymap.targets, indent=1, sort_keys=True))
    write_folder_digests(tmp)  # the key map joins the folder's digest manifest, written last
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    """``python -m pipeline.sldm import-rcg``: RCG's LDM-8 + MoCo v3 checkpoints -> an sldm folder."""
    ap = command_parser("sldm", "import-rcg", __doc__)
    ap.add_argument("--ldm", required=True, help="RCG's LDM checkpoint (main_ldm.py checkpoint-*.pth)")
    ap.add_argument("--encoder", required=True, help="MoCo v3 checkpoint (e.g. vit-b-300ep.pth.tar)")
    ap.add_argument("--ldm-config", default=None, help="RCG's config/ldm/*.yaml (default: the LDM-8 repcond one)")
    ap.add_argument("--unet-weights", choices=("ema", "train"), default="ema", help="EMA (what RCG samples with)")
    ap.add_argument("--out", required=True, help="the sldm folder to write")
    args = ap.parse_args(argv)
    groups = convert_rcg(args.ldm, args.encoder, args.out, args.ldm_config, args.unet_weights)
    # the folder's provenance record, <folder>.provenance.json beside it (pipeline.records)
    write_record(
        args.out,
        kind="sldm",
        command=("sldm", "import-rcg"),
        inputs=[args.ldm, args.encoder, args.ldm_config],
        settings={"unet_weights": args.unet_weights, "ldm_config": args.ldm_config},
        device="cpu",
        precision="fp32",
    )
    for source, counts in groups.items():
        print(source)
        for target, n in sorted(counts.items()):
            print(f"  {n:6d} keys -> {target}")
    print(f"wrote {args.out}")
