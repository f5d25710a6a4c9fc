"""The ``sldm`` stage: train a tiny S-LDM on a tiny ImageNet-layout folder, save it in the folder
format, load it through the views stage's ``sldm`` generator (the code path real weights use);
exact resume after SIGKILL; the classifier-free-guidance convention; the conditioning encoders; the
errors naming the bad input. Sizes keep every run to about a second on 2 CPU cores."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline import cli
from pipeline.imaging import TooManyRejectsError
from pipeline.sldm.encoders import build_conditioning_encoder
from pipeline.sldm.train import resolve_sldm_settings

TINY = {
    "image_size": 16,
    "steps": 6,
    "batch_size": 4,
    "warmup_steps": 2,
    "checkpoint_every": 2,
    "sample_every": 3,
    "unet": {
        "block_out_channels": [16, 32],
        "attention": [False, True],
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": 16,
        "norm_num_groups": 8,
    },
    "encoder": {"input_size": 16, "kwargs": {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}},
    "samples": {"images": 2, "views": 2, "ddim_steps": 2},
    "scheduler": {"num_train_timesteps": 100},
}
ENCODER_KWARGS = TINY["encoder"]["kwargs"]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """3 classes x 4 images (24 px PNGs, class-coloured noise) in the ImageNet train layout."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "train" / f"n0000000{c}"
        d.mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 100, (24, 24, 3)).astype(np.uint8)
            img[..., c] += 150
            Image.fromarray(img).save(d / f"img{i}.png")
    return root


def _args(root, out, settings, seed=0):
    return [
        "train",
        "--imagenet-root",
        str(root),
        "--settings",
        json.dumps(settings),
        "--seed",
        str(seed),
        "--output",
        str(out / "model"),
        "--state-dir",
        str(out / "state"),
        "--log-csv",
        str(out / "train_log.csv"),
        "--curve-png",
        str(out / "curve.png"),
        "--samples-png",
        str(out / "samples.png"),
        "--threads",
        "1",
        "--device",
        "cpu",
    ]


def _train(root, out, settings=TINY, seed=0):
    cli.run("sldm", _args(root, out, settings, seed))
    return out / "model"


def _weights(folder):
    return {
        **load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
        **load_file(folder / "projector.safetensors"),
    }


def _images(n, size=16, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def trained(imagenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, _train(imagenet, out)


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
    encoder = build_conditioning_encoder(resolve_sldm_settings(TINY)["encoder"], seed=0)
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
    s = resolve_sldm_settings(TINY)
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


def test_resume_after_sigkill_gives_the_uninterrupted_weights(imagenet, tmp_path):
    settings = {**TINY, "steps": 40, "sample_every": 0}
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sldm", *_args(imagenet, killed, settings)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = killed / "state" / "last.pth"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < 40 and not (killed / "model").exists()  # killed mid-training
    resumed = _train(imagenet, killed, settings)
    whole = _train(imagenet, tmp_path / "whole", settings)
    a, b = _weights(resumed), _weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loss = [line.split(",")[1] for line in (killed / "train_log.csv").read_text().splitlines()]
    assert loss == [line.split(",")[1] for line in (tmp_path / "whole" / "train_log.csv").read_text().splitlines()]


def test_resume_refuses_a_state_of_other_settings(imagenet, tmp_path, capsys):
    first = _train(imagenet, tmp_path / "a", {**TINY, "steps": 4, "sample_every": 0})
    before = _weights(first)
    other = {**TINY, "steps": 4, "sample_every": 0, "lr": 1e-3}
    capsys.readouterr()
    _train(imagenet, tmp_path / "a", other)
    assert "belongs to other settings" in capsys.readouterr().err
    fresh = _train(imagenet, tmp_path / "b", other)
    after, expected = _weights(tmp_path / "a" / "model"), _weights(fresh)
    assert all(torch.equal(after[k], expected[k]) for k in after)  # started over, not continued
    assert not all(torch.equal(after[k], before[k]) for k in after)
    # a result-neutral key (checkpoint cadence) does not stop a resume
    _train(imagenet, tmp_path / "b", {**other, "checkpoint_every": 3})
    assert "resuming from" in (err := capsys.readouterr().err) and "at step 4" in err


def test_inputs_errors_name_the_file(imagenet, tmp_path):
    from pipeline.sldm.train import StepBatches

    with pytest.raises(Exception, match=str(tmp_path / "nowhere")):
        _train(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="sldm.autoencoder: .*vae/config.json"):
        _train(imagenet, tmp_path / "out", {**TINY, "autoencoder": str(tmp_path / "vae")})
    enc = {**TINY["encoder"], "source": "timm", "checkpoint": str(tmp_path / "dino.pth")}
    with pytest.raises(FileNotFoundError, match="sldm.encoder.checkpoint: checkpoint not found: .*dino.pth"):
        _train(imagenet, tmp_path / "out", {**TINY, "encoder": enc})
    # unreadable images: skipped for the next readable one and listed (the policy of every image
    # reader), an error naming them above the allowed fraction
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    good = sorted((imagenet / "train").rglob("*.png"))[:3]
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
    _train(imagenet, tmp_path / "c", {**TINY, "steps": 2, "sample_every": 0})
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
    base = {**resolve_sldm_settings(TINY)["encoder"], "embedding_norm": "l2"}
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
    s = resolve_sldm_settings(TINY)
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


def test_latent_space_training_with_a_local_autoencoder(imagenet, tmp_path):
    """An AutoencoderKL folder (factor 2: 16-px images, 8-px latents) is loaded, its latents are
    denoised, the folder ships it and the generator decodes through it; loader workers (a
    result-neutral key) do not change the weights."""
    from test_generators import _tiny_vae

    from pipeline.views.generators import build_generator

    torch.manual_seed(0)
    _tiny_vae().save_pretrained(tmp_path / "vae")
    settings = {**TINY, "steps": 2, "sample_every": 0, "autoencoder": str(tmp_path / "vae")}
    folder = _train(imagenet, tmp_path / "a", settings)
    man = json.loads((folder / "sldm.json").read_text())
    assert man["vae"] == "vae" and (folder / "vae" / "config.json").is_file()
    gen = build_generator("sldm", {"model_path": str(folder), "steps": 2}, 16, "cpu")
    assert gen.unet.config.in_channels == 4 and gen.unet.config.sample_size == 8
    views = gen.generate(_images(1), np.arange(2).reshape(1, 2))
    assert views.shape == (1, 2, 16, 16, 3) and np.isfinite(views).all()
    workers = _train(imagenet, tmp_path / "b", {**settings, "num_workers": 1})
    a, b = _weights(folder), _weights(workers)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a latent folder whose scheduler clips x0 (recorded so, consistently) is refused on load
    from pipeline.sldm.folder import SLDMFolderError, validate_folder

    assert man["scheduler"]["sampling"] == {"clip_sample": False}
    sched = folder / man["scheduler"]["folder"] / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "clip_sample": True}))
    man["scheduler"]["sampling"]["clip_sample"] = True
    (folder / "sldm.json").write_text(json.dumps(man))
    with pytest.raises(SLDMFolderError, match="clip_sample must be false for a latent-space S-LDM"):
        validate_folder(folder)


@pytest.mark.slow
def test_ddp_under_torchrun_on_cpu(imagenet, tmp_path):
    """Two gloo processes: each takes half of every batch, rank 0 writes a folder that loads."""
    from pipeline.views.generators import build_generator

    settings = {**TINY, "steps": 3, "sample_every": 0}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "pipeline.sldm", *_args(imagenet, tmp_path, settings)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)
    state = torch.load(tmp_path / "state" / "last.pth", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3
    assert all(np.isfinite(state["history"]["loss"]))
    gen = build_generator("sldm", {"model_path": str(tmp_path / "model"), "steps": 1}, 16, "cpu")
    assert np.isfinite(gen.generate(_images(1), np.zeros((1, 1), np.int64))).all()
