"""The ``sldm`` stage: train a tiny S-LDM on a tiny ImageNet-layout folder, save it in the folder
format, load it through the views stage's ``sldm`` generator (the code path real weights use);
exact resume after SIGKILL; the classifier-free-guidance convention; the conditioning encoders; the
errors naming the bad input. Sizes keep every run to about a second on 2 CPU cores."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline import cli
from pipeline.imaging import TooManyRejectsError
from pipeline.sldm.conditioning import build_conditioning_encoder
from pipeline.sldm.train import resolve_sldm_settings
from tests.support import HANG_GUARD_S, TINY_SLDM, sldm_train_args, wait_until

ENCODER_KWARGS = TINY_SLDM["encoder"]["kwargs"]


def _train(root, out, settings=TINY_SLDM, seed=0):
    cli.run("sldm", sldm_train_args(root, out, settings, seed))
    return out / "model"


def _weights(folder):
    return {
        **load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
        **load_file(folder / "projector.safetensors"),
    }


def _images(n, size=16, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def trained(coloured_imagenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, _train(coloured_imagenet, out)


def test_train_save_load_generate_round_trip(trained):
    from pipeline.views.generators import build_generator

    out, folder = trained
    man = json.loads((folder / "sldm.json").read_text())
    assert man["vae"] is None and man["encoder"]["source"] == "random-init"
    assert man["training"]["steps"] == 6 and man["training"]["images"] == 12
    gen = build_generator("sldm", {"model_path": str(folder), "steps": 2, "guidance_scale": 3.0}, 16, "cpu")
    views = gen.generate(_images(2), np.arange(4).reshape(2, 2))
    assert views.shape == (2, 2, 16, 16, 3) and np.isfinite(views).all()
    # the folder holds the EMA weights of the resumable state, and the encoder training used
    state = torch.load(out / "state" / "last.pth", weights_only=True)
    assert state["step"] == 6 and state["history"]["step"] == list(range(6))
    ema = {k.removeprefix("module.unet."): v for k, v in state["ema"].items() if k.startswith("module.unet.")}
    for k, v in gen.unet.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0)
    assert not torch.equal(state["model"]["unet.conv_in.weight"], state["ema"]["module.unet.conv_in.weight"])
    encoder = build_conditioning_encoder(resolve_sldm_settings(TINY_SLDM)["encoder"], seed=0)
    torch.testing.assert_close(gen.embed(_images(3)), encoder.embed(_images(3)), rtol=0, atol=0)
    # outputs: log of every step, loss curve, sample grid (2 rows: real + 2 views of 16 px, 2-px gaps)
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,images_per_s" and len(log) == 7
    assert Image.open(out / "samples.png").size == (3 * 18 - 2, 2 * 18 - 2)
    assert sorted(p.name for p in (out / "state" / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert (out / "curve.png").stat().st_size > 0


def test_cfg_null_token_is_the_projected_zero_embedding(trained):
    from pipeline.sldm.model import build_denoiser, build_scheduler, diffusion_loss
    from pipeline.sldm.sampling import cfg_conditions

    _, folder = trained
    assert json.loads((folder / "sldm.json").read_text())["conditioning"] == {
        "null_condition": "projected_zero",
        "p_uncond": 0.1,
    }
    s = resolve_sldm_settings(TINY_SLDM)
    model = build_denoiser(s, 24, 3, 16, seed=0)
    seen = []
    model.projector.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].clone(), out.clone())))
    x0, z = torch.randn(8, 3, 16, 16), torch.randn(8, 24)
    for p_uncond in (1.0, 0.0):
        diffusion_loss(model, build_scheduler(s["scheduler"]), x0, z, p_uncond, torch.Generator().manual_seed(0))
    (dropped, token), (kept, _) = seen
    assert torch.equal(dropped, torch.zeros_like(z)) and torch.equal(kept, z)
    torch.testing.assert_close(token, model.projector.bias.detach().expand_as(token))  # the null = the bias
    # the sampler's null token for this convention is the same projector(0)
    cond, null = cfg_conditions(model.projector, z[:2], 3, "projected_zero", torch.float32)
    assert cond.shape == null.shape == (6, 1, 16)
    torch.testing.assert_close(null[:, 0], model.projector.bias.detach().expand(6, 16))
    # about p_uncond of the conditions are dropped
    seen.clear()
    diffusion_loss(model, build_scheduler(s["scheduler"]), x0.repeat(50, 1, 1, 1), z.repeat(50, 1), 0.1, None)
    assert 0.05 < (seen[0][0].abs().sum(1) == 0).float().mean() < 0.15


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_weights(coloured_imagenet, tmp_path):
    settings = {**TINY_SLDM, "steps": 40, "sample_every": 0}
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sldm", *sldm_train_args(coloured_imagenet, killed, settings)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "state" / "last.pth"
    wait_until(lambda: state.exists() or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < 40 and not (killed / "model").exists()  # killed mid-training
    resumed = _train(coloured_imagenet, killed, settings)
    whole = _train(coloured_imagenet, tmp_path / "whole", settings)
    a, b = _weights(resumed), _weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loss = [line.split(",")[1] for line in (killed / "train_log.csv").read_text().splitlines()]
    assert loss == [line.split(",")[1] for line in (tmp_path / "whole" / "train_log.csv").read_text().splitlines()]


def test_resume_refuses_a_state_of_other_settings(coloured_imagenet, tmp_path, capsys):
    first = _train(coloured_imagenet, tmp_path / "a", {**TINY_SLDM, "steps": 4, "sample_every": 0})
    before = _weights(first)
    other = {**TINY_SLDM, "steps": 4, "sample_every": 0, "lr": 1e-3}
    capsys.readouterr()
    _train(coloured_imagenet, tmp_path / "a", other)
    assert "belongs to other settings" in capsys.readouterr().err
    fresh = _train(coloured_imagenet, tmp_path / "b", other)
    after, expected = _weights(tmp_path / "a" / "model"), _weights(fresh)
    assert all(torch.equal(after[k], expected[k]) for k in after)  # started over, not continued
    assert not all(torch.equal(after[k], before[k]) for k in after)
    # a result-neutral key (checkpoint cadence) does not stop a resume
    _train(coloured_imagenet, tmp_path / "b", {**other, "checkpoint_every": 3})
    assert "resuming from" in (err := capsys.readouterr().err) and "at step 4" in err


def test_inputs_errors_name_the_file(coloured_imagenet, tmp_path):
    from pipeline.sldm.train import StepBatches

    with pytest.raises(Exception, match=str(tmp_path / "nowhere")):
        _train(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="sldm.autoencoder: .*vae/config.json"):
        _train(coloured_imagenet, tmp_path / "out", {**TINY_SLDM, "autoencoder": str(tmp_path / "vae")})
    enc = {**TINY_SLDM["encoder"], "source": "timm", "checkpoint": str(tmp_path / "dino.pth")}
    with pytest.raises(FileNotFoundError, match="sldm.encoder.checkpoint: checkpoint not found: .*dino.pth"):
        _train(coloured_imagenet, tmp_path / "out", {**TINY_SLDM, "encoder": enc})
    # unreadable images: skipped for the next readable one and listed (the policy of every image
    # reader), an error naming them above the allowed fraction
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    good = sorted((coloured_imagenet / "train").rglob("*.png"))[:3]
    batches = StepBatches([bad, *good], 16, 4, 0, max_reject_fraction=0.5, rejects_listing=tmp_path / "rej.csv")
    batch = batches[0]
    assert batch.shape == (4, 16, 16, 3) and len(batches.rejects) == 1
    np.testing.assert_array_equal(batches.image(0), batches.image(1))  # bad.png -> the next image
    with pytest.raises(TooManyRejectsError, match=r"bad.png: unreadable training image"):
        StepBatches([bad, *good], 16, 4, 0, max_reject_fraction=0.1, rejects_listing=tmp_path / "rej.csv")[0]
    assert "bad.png" in (tmp_path / "rej.csv").read_text()
    # an unreadable resumable state is set aside, naming it, and training starts over
    state = tmp_path / "c" / "state" / "last.pth"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"truncated")
    _train(coloured_imagenet, tmp_path / "c", {**TINY_SLDM, "steps": 2, "sample_every": 0})
    assert (state.parent / "last.pth.corrupt").read_bytes() == b"truncated"
    assert torch.load(state, weights_only=True)["step"] == 2


def test_encoders_from_checkpoints_reproduce_through_the_folder(tmp_path):
    import timm

    from pipeline.sldm.folder import save_sldm
    from pipeline.sldm.model import build_denoiser, build_scheduler
    from pipeline.views.generators import build_generator
    from pipeline.vit_checkpoints import cdgmae_vit

    # (a) a timm checkpoint (MAE-style {"model": ...} with a decoder key left over)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, **ENCODER_KWARGS)
    torch.save({"model": {**vit.state_dict(), "decoder_embed.weight": torch.zeros(1)}}, tmp_path / "t.pth")
    base = {**resolve_sldm_settings(TINY_SLDM)["encoder"], "embedding_norm": "l2"}
    enc = build_conditioning_encoder({**base, "source": "timm", "checkpoint": str(tmp_path / "t.pth")}, seed=5)
    x = _images(2)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(vit.eval()(_prep(x, enc)), dim=-1)
    torch.testing.assert_close(enc.embed(x), ref)
    # (b) one of our CDG-MAE checkpoints: the encoder under "encoder.", with its arch
    arch = {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}
    ours = cdgmae_vit(arch, 16)  # weight_init "skip": every tensor comes from the checkpoint
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    payload = {"model": {f"encoder.{k}": v for k, v in ours.state_dict().items()}, "arch": arch, "img_size": 16}
    torch.save(payload, tmp_path / "c.pth")
    cfg = {**base, "source": "cdgmae", "checkpoint": str(tmp_path / "c.pth"), "embedding_norm": "standardize"}
    enc = build_conditioning_encoder(cfg, seed=5)
    with torch.no_grad():
        z = ours.eval()(_prep(x, enc))
    torch.testing.assert_close(enc.embed(x), (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-6))
    # written into a folder, the generator rebuilds the same embeddings
    s = resolve_sldm_settings(TINY_SLDM)
    model = build_denoiser(s, 24, 3, 16, seed=0)
    folder = save_sldm(
        tmp_path / "f",
        model.unet,
        None,
        build_scheduler(s["scheduler"]),
        enc.model,
        enc.timm_name,
        model.projector,
        encoder_kwargs=enc.kwargs,
        embedding_norm=enc.embedding_norm,
    )
    gen = build_generator("sldm", {"model_path": str(folder), "steps": 1}, 16, "cpu")
    torch.testing.assert_close(gen.embed(x), enc.embed(x), rtol=0, atol=0)


def _prep(images, enc):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", antialias=True)
    return (x - torch.tensor(enc.mean).view(1, 3, 1, 1)) / torch.tensor(enc.std).view(1, 3, 1, 1)


def test_latent_space_training_with_a_local_autoencoder(coloured_imagenet, tmp_path):
    """An AutoencoderKL folder (factor 2: 16-px images, 8-px latents) is loaded, its latents are
    denoised, the folder ships it and the generator decodes through it; loader workers (a
    result-neutral key) do not change the weights."""
    from pipeline.views.generators import build_generator
    from tests.support import tiny_vae

    torch.manual_seed(0)
    tiny_vae().save_pretrained(tmp_path / "vae")
    settings = {**TINY_SLDM, "steps": 2, "sample_every": 0, "autoencoder": str(tmp_path / "vae")}
    folder = _train(coloured_imagenet, tmp_path / "a", settings)
    man = json.loads((folder / "sldm.json").read_text())
    assert man["vae"] == "vae" and (folder / "vae" / "config.json").is_file()
    gen = build_generator("sldm", {"model_path": str(folder), "steps": 2}, 16, "cpu")
    assert gen.unet.config.in_channels == 4 and gen.unet.config.sample_size == 8
    views = gen.generate(_images(1), np.arange(2).reshape(1, 2))
    assert views.shape == (1, 2, 16, 16, 3) and np.isfinite(views).all()
    workers = _train(coloured_imagenet, tmp_path / "b", {**settings, "num_workers": 1})
    a, b = _weights(folder), _weights(workers)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a latent folder whose scheduler clips x0 (recorded so, consistently) is refused on load
    from pipeline.sldm.folder import SLDMFolderError, validate_folder

    # latents: no clipping, CompVis's DDIM offsets (the schema's latent default)
    assert man["scheduler"]["sampling"] == {
        "clip_sample": False,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
    }
    assert man["scheduler"]["training"]["beta_schedule"] == "scaled_linear"
    sched = folder / man["scheduler"]["folder"] / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "clip_sample": True}))
    man["scheduler"]["sampling"]["clip_sample"] = True
    (folder / "sldm.json").write_text(json.dumps(man))
    with pytest.raises(SLDMFolderError, match="clip_sample must be false for a latent-space S-LDM"):
        validate_folder(folder)


@pytest.mark.slow
def test_ddp_under_torchrun_on_cpu(coloured_imagenet, tmp_path):
    """Two gloo processes: each takes half of every batch, rank 0 writes a folder that loads."""
    from pipeline.views.generators import build_generator

    settings = {**TINY_SLDM, "steps": 3, "sample_every": 0}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "pipeline.sldm", *sldm_train_args(coloured_imagenet, tmp_path, settings)]
    subprocess.run(
        cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=HANG_GUARD_S
    )
    state = torch.load(tmp_path / "state" / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3
    assert all(np.isfinite(state["history"]["loss"]))
    gen = build_generator("sldm", {"model_path": str(tmp_path / "model"), "steps": 1}, 16, "cpu")
    assert np.isfinite(gen.generate(_images(1), np.zeros((1, 1), np.int64))).all()


def test_head_channels_is_the_width_of_every_attention_head(repo_root):
    """``sldm.unet.head_channels`` is channels per head; diffusers' ``attention_head_dim`` (legacy
    naming: a head count) gets the per-level counts. The paper preset: 32-channel heads (RCG's
    num_head_channels), not 32 heads of 12-30 channels."""
    from diffusers.models.attention_processor import Attention

    from pipeline.config import load_config
    from pipeline.sldm.model import attention_heads, build_unet

    preset = load_config(repo_root / "config.yaml", repo_root / "presets" / "paper.yaml")["sldm"]["unet"]
    assert "attention_head_dim" not in preset and preset["head_channels"] == 32
    assert attention_heads(preset) == [6, 12, 18, 30]  # 192, 384, 576, 960 channels / 32
    small = {**resolve_sldm_settings({})["unet"], "block_out_channels": [32, 64, 96], "head_channels": 32}
    small.update(attention=[False, True, True], cross_attention_dim=16, norm_num_groups=16)
    unet = build_unet(small, in_channels=3, sample_size=16)
    attn = [m for m in unet.modules() if isinstance(m, Attention)]
    assert attn and {m.inner_dim // m.heads for m in attn} == {32}
    assert sorted({m.heads for m in attn}) == [2, 3]
    # the schema default keeps the demo's UNet: 8-channel heads at its 64-channel attention levels
    assert attention_heads(resolve_sldm_settings({})["unet"]) == [4, 8, 8]
    with pytest.raises(ValueError, match=r"head_channels 48 does not divide block_out_channels\[1\] = 64"):
        attention_heads({**small, "head_channels": 48})


def test_ema_has_rcgs_warm_up():
    """The n-th EMA update decays by min(decay, (1 + n) / (10 + n)) from the initial weights
    (CompVis LitEma, RCG); in the demo's 300 steps the step-1 weights keep a negligible share
    (0.995**299 = 22 % without the warm-up)."""
    import math
    from fractions import Fraction

    from pipeline.sldm.model import Ema, ema_decay_at

    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)  # the initial weights the average starts from
    ema = Ema(model, decay=0.995)
    seen = []
    for value in [1, 2, -3, 5]:
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update_parameters(model)
        seen.append(ema.module.weight.item())
    # by hand, d_n = (1 + n) / (10 + n) (below 0.995 for the first ~1790 updates):
    # 9/11 * 1; 3/12 * 9/11 + 9/12 * 2; 4/13 * e2 + 9/13 * -3; 5/14 * e3 + 9/14 * 5
    d = [Fraction(1 + n, 10 + n) for n in range(1, 5)]
    e1 = (1 - d[0]) * 1
    e2 = d[1] * e1 + (1 - d[1]) * 2
    e3 = d[2] * e2 + (1 - d[2]) * -3
    e4 = d[3] * e3 + (1 - d[3]) * 5
    assert [float(e) for e in (e1, e2, e3, e4)] == pytest.approx(
        [0.8181818182, 1.7045454545, -1.5524475524, 2.6598401598]
    )
    assert seen == pytest.approx([float(e) for e in (e1, e2, e3, e4)], rel=1e-12)
    assert int(ema.num_updates) == 4
    assert ema_decay_at(1, 0.995) == pytest.approx(2 / 11) and ema_decay_at(10**6, 0.995) == 0.995
    assert ema_decay_at(20, 0.5) == 0.5  # the cap
    # the state resumes with its count
    again = Ema(model, decay=0.995)
    again.load_state_dict(ema.state_dict())
    assert int(again.num_updates) == 4 and torch.equal(again.module.weight, ema.module.weight)

    # 300 steps: weights 1 after step 1, 0 after every later step -> the EMA is the step-1 share
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = Ema(model, decay=0.995)
    for step in range(1, 301):
        with torch.no_grad():
            model.weight.fill_(1.0 if step == 1 else 0.0)
        ema.update_parameters(model)
    share = (1 - ema_decay_at(1, 0.995)) * math.prod(ema_decay_at(n, 0.995) for n in range(2, 301))
    assert ema.module.weight.item() == pytest.approx(share, rel=1e-9)
    assert share < 1e-12 and 0.995**299 > 0.2  # without the warm-up: 22 %


# the reference configs the paper preset's S-LDM cites (values transcribed from the files named)
LIDM_ONLY_SSL = {  # cvlab-stonybrook/Large-Image-Diffusion configs/latent-diffusion/brca/only_ssl.yaml
    "model_channels": 192,
    "channel_mult": [1, 2, 3, 5],
    "attention_resolutions": [8, 4, 2],  # downsampling factors
    "num_heads": 1,
    "first_stage": "VQModelInterface, vq-f4, embed_dim 3, image_size 64",
    "use_ema": False,
}
RCG_LDM8 = {
    "num_head_channels": 32,
    "image_size": 32,
    "in_channels": 4,
}  # LTH14/rcg config/ldm/cin-ldm-vq-f8-repcond.yaml


def test_paper_preset_says_which_reference_each_s_ldm_size_follows(repo_root):
    """The preset is an LDM-8 of RCG's size with LIDM's channel list: LIDM's own model (VQ-f4,
    3 x 64 x 64 latents, one head, no EMA) is not what it trains, and its text says so."""
    from pipeline.config import load_config

    text = (repo_root / "presets" / "paper.yaml").read_text()
    sldm = load_config(repo_root / "config.yaml", repo_root / "presets" / "paper.yaml")["sldm"]
    unet = sldm["unet"]
    assert unet["block_out_channels"] == [LIDM_ONLY_SSL["model_channels"] * m for m in LIDM_ONLY_SSL["channel_mult"]]
    assert unet["attention"] == [2**i in LIDM_ONLY_SSL["attention_resolutions"] for i in range(4)]
    assert unet["head_channels"] == RCG_LDM8["num_head_channels"]
    assert sldm["image_size"] // 8 == RCG_LDM8["image_size"]  # f8: 4 x 32 x 32 latents, as RCG's LDM-8
    assert "Large-Image-Diffusion: a 256-px LDM in the latent" not in text  # the old, wrong provenance
    for cited in ("config/ldm/cin-ldm-vq-f8-repcond.yaml", "configs/latent-diffusion/brca/only_ssl.yaml"):
        assert cited in text
    assert "VQ-f4" in text and "one attention head and no EMA" in text


def test_the_autoencoder_encodes_in_float32_inside_the_training_autocast():
    """train_step calls to_model_space inside its bf16 autocast: the VAE's convolutions still run in
    float32 (what its comment says), and the latents come back float32."""
    from pipeline.sldm.model import to_model_space
    from tests.support import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    seen = []
    vae.encoder.conv_in.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = to_model_space(vae, x, torch.Generator().manual_seed(0))
    assert seen == [torch.float32] and z.dtype == torch.float32
