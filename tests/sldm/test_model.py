"""The S-LDM recipe settings of issue 18: the parameterisation (ε or v) the loss targets, the folder
records and the sampler honours; the noise schedule and DDIM offsets of latent models (CompVis
LDM / RCG / LIDM) in the schema's latent default and the paper preset; bf16 as the sampling dtype
(float32 on the CPU, the DDIM update in float32 whatever the UNet's dtype)."""

import json

import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.config import load_config
from pipeline.sldm.model import build_scheduler, diffusion_loss, loss_target
from pipeline.sldm.train import resolve_sldm_settings
from tests.support import TINY_SLDM, sldm_train_args


def _preset(repo_root) -> dict:
    return load_config(repo_root / "config.yaml", repo_root / "presets" / "paper.yaml")


def _demo(repo_root) -> dict:
    return load_config(repo_root / "config.yaml")


# ---------------------------------------------------------------------------------- item 1: ε or v


def _alphas_cumprod_linear(T=1000, start=1e-4, end=0.02) -> np.ndarray:
    """ᾱ_t by hand: DDPM's linear betas, cumulative product of 1 - β."""
    return np.cumprod(1.0 - np.linspace(start, end, T, dtype=np.float64))


def test_v_prediction_loss_target_is_get_velocity_checked_by_hand():
    """v = √ᾱ_t ε − √(1−ᾱ_t) x0, from ᾱ computed by hand, on 1 x 2 tensors; ε stays the noise."""
    abar = _alphas_cumprod_linear()
    sched = build_scheduler({"num_train_timesteps": 1000}, pixel_space=True, prediction_type="v_prediction")
    x0 = torch.tensor([[1.0, 2.0], [-0.5, 0.25]])
    noise = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    t = torch.tensor([0, 999])
    v = loss_target(sched, x0, noise, t)
    by_hand = [
        [np.sqrt(abar[0]) * 0.5 - np.sqrt(1 - abar[0]) * 1.0, np.sqrt(abar[0]) * -1.0 - np.sqrt(1 - abar[0]) * 2.0],
        [np.sqrt(abar[999]) * 2.0 - np.sqrt(1 - abar[999]) * -0.5, -np.sqrt(1 - abar[999]) * 0.25],
    ]
    assert by_hand[0][0] == pytest.approx(0.48997, abs=1e-5)  # √0.9999 · 0.5 − √0.0001 · 1
    torch.testing.assert_close(v, torch.tensor(by_hand, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t))
    eps = build_scheduler({"num_train_timesteps": 1000}, pixel_space=True, prediction_type="epsilon")
    assert loss_target(eps, x0, noise, t) is noise
    with pytest.raises(ValueError, match="sldm.prediction_type must be one of"):
        build_scheduler({"num_train_timesteps": 1000}, pixel_space=True, prediction_type="sample")


class _Zero(torch.nn.Module):
    """A 'model' predicting 0 that records (x_t, t): the loss is then the mean square of the target."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x_t, t, z):
        self.seen.append((x_t.clone(), t.clone()))
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_training_loss_targets_the_parameterisation(kind):
    """From the x_t the model saw, ε = (x_t − √ᾱ x0) / √(1−ᾱ) and v follow by hand; a model
    predicting 0 has loss mean(target²)."""
    abar = torch.from_numpy(_alphas_cumprod_linear()).float()
    sched = build_scheduler({"num_train_timesteps": 1000}, pixel_space=True, prediction_type=kind)
    x0 = torch.linspace(-1, 1, 2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    model = _Zero()
    loss = diffusion_loss(model, sched, x0, torch.ones(2, 4), 0.0, torch.Generator().manual_seed(3))
    x_t, t = model.seen[0]
    a = abar[t].view(-1, 1, 1, 1)
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    target = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    assert float(loss) == pytest.approx(float((target**2).mean()), rel=1e-4)


class _Oracle(torch.nn.Module):
    """The exact ε- or v-prediction of data that is one fixed image ``x0``: one DDIM step from pure
    noise (t = 999 to alpha 1: "trailing" spacing) outputs its x0 estimate, ``x0`` when it reads the output as what it is."""

    def __init__(self, x0: torch.Tensor, sched, kind: str):
        super().__init__()
        self.x0, self.abar, self.kind = x0, sched.alphas_cumprod, kind

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x_t, t, encoder_hidden_states=None):
        a = self.abar[int(t)]
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        out = eps if self.kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.x0
        return type("Out", (), {"sample": out})()


def test_the_sampler_reads_the_unet_output_as_the_folders_prediction_type():
    from pipeline.sldm.sampling import denoise

    x0 = torch.linspace(-0.8, 0.8, 3 * 4 * 4).reshape(1, 3, 4, 4)
    cond = torch.zeros(1, 1, 2)
    for kind, read_as, lands in [("v_prediction", "v_prediction", True), ("epsilon", "epsilon", True)] + [
        ("v_prediction", "epsilon", False)
    ]:
        trailing = {"num_train_timesteps": 1000, "timestep_spacing": "trailing"}
        sched = build_scheduler(trailing, pixel_space=True, prediction_type=read_as)
        noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        out = denoise(
            _Oracle(x0, sched, kind), sched, noise, cond, None, [], steps=1, eta=0.0, guidance_scale=1.0, device="cpu"
        )
        assert (float((out - x0).abs().max()) < 1e-3) == lands, (kind, read_as)


def test_a_v_prediction_s_ldm_trains_saves_and_samples_through_the_same_code(coloured_imagenet, tmp_path):
    from pipeline.sldm.folder import SLDMFolderError, validate_folder
    from pipeline.views.generators import build_generator

    settings = {**TINY_SLDM, "steps": 3, "sample_every": 0, "prediction_type": "v_prediction"}
    cli.run("sldm", sldm_train_args(coloured_imagenet, tmp_path, settings))
    folder = tmp_path / "model"
    man = json.loads((folder / "sldm.json").read_text())
    assert man["scheduler"]["training"]["prediction_type"] == "v_prediction"
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert man["training"]["settings"]["prediction_type"] == "v_prediction"
    gen = build_generator("sldm", {"model_path": str(folder), "steps": 3, "guidance_scale": 3.0}, 16, "cpu")
    assert gen.scheduler.config.prediction_type == "v_prediction"
    assert gen.describe()["sampler"]["prediction_type"] == "v_prediction"
    views = gen.generate(np.full((1, 16, 16, 3), 128, np.uint8), np.arange(2).reshape(1, 2))
    assert views.shape == (1, 2, 16, 16, 3) and np.isfinite(views).all()
    # a parameterisation the sampler does not read is refused on load, naming it
    for name in ("scheduler/scheduler_config.json",):
        cfg = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**cfg, "prediction_type": "sample"}))
    man["scheduler"]["training"]["prediction_type"] = "sample"
    (folder / "sldm.json").write_text(json.dumps(man))
    with pytest.raises(SLDMFolderError, match="prediction_type 'sample' is not sampled here"):
        validate_folder(folder)


def test_demo_uses_v_prediction_and_the_references_keep_epsilon(repo_root):
    from pipeline.sldm.rcg import RCG_LDM8_CONFIG, KeyMap, rcg_scheduler

    assert _demo(repo_root)["sldm"]["prediction_type"] == "v_prediction"
    assert resolve_sldm_settings({})["prediction_type"] == "epsilon"  # the schema default: the references'
    assert _preset(repo_root)["sldm"]["prediction_type"] == "epsilon"  # restated over the demo's
    assert rcg_scheduler({}, RCG_LDM8_CONFIG, KeyMap(), "rcg").config.prediction_type == "epsilon"


# ---------------------------------------------------------------------------------- item 2: schedule


def test_paper_preset_uses_compvis_latent_schedule_and_ddim_offsets(repo_root):
    """scaled_linear 0.0015 -> 0.0195 (CompVis LDM's "linear", linear in sqrt(beta): RCG's LDM-8,
    LIDM) and CompVis DDIM timesteps 981 ... 1 at 50 steps, last alpha_prev = alphas_cumprod[0]."""
    from pipeline.sldm.rcg import RCG_DDIM

    sldm = resolve_sldm_settings(_preset(repo_root)["sldm"])
    sched = build_scheduler(sldm["scheduler"], pixel_space=sldm["autoencoder"] == "none")
    c = sched.config
    assert (c.beta_schedule, c.beta_start, c.beta_end, c.num_train_timesteps) == ("scaled_linear", 0.0015, 0.0195, 1000)
    assert {k: c[k] for k in RCG_DDIM} == RCG_DDIM  # the very DDIM keys the RCG import records
    compvis = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2  # make_beta_schedule
    torch.testing.assert_close(sched.betas.double(), compvis, rtol=1e-6, atol=1e-9)
    sched.set_timesteps(50)
    assert sched.timesteps[0] == 981 and sched.timesteps[-1] == 1 and len(sched.timesteps) == 50
    assert sched.final_alpha_cumprod == sched.alphas_cumprod[0]
    # the schema's latent default is the same schedule; pixel space keeps DDPM's (980 ... 0)
    latent = resolve_sldm_settings({"autoencoder": "/some/vae"})["scheduler"]
    assert {k: latent[k] for k in sldm["scheduler"]} == sldm["scheduler"]
    pixel = build_scheduler(resolve_sldm_settings({})["scheduler"], pixel_space=True)
    assert (pixel.config.beta_schedule, pixel.config.beta_start, pixel.config.beta_end) == ("linear", 0.0001, 0.02)
    pixel.set_timesteps(50)
    assert pixel.timesteps[0] == 980 and pixel.timesteps[-1] == 0


# ---------------------------------------------------------------------------------- item 3: dtype


def test_sampling_dtype_defaults_to_bf16_and_float32_on_cpu(repo_root):
    from pipeline.config import section_defaults
    from pipeline.views.diffusion import torch_dtype

    assert section_defaults("views")["generators"]["sldm"]["dtype"] == "bfloat16"
    assert _preset(repo_root)["views"]["generators"]["sldm"]["dtype"] == "bfloat16"
    assert torch_dtype("bfloat16", "cpu") == torch.float32
    assert torch_dtype("bfloat16", "cuda") == torch.bfloat16


def test_a_bf16_unet_is_sampled_with_float32_ddim_updates():
    """The UNet runs in its dtype, every DDIM update (and the latents between steps) in float32: a
    bf16 UNet's views stay close to the float32 UNet's."""
    from pipeline.sldm.sampling import sample
    from tests.support import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet(cross_attention_dim=8, channels=3, sample_size=8).eval()
    sched = build_scheduler({"num_train_timesteps": 1000}, pixel_space=True, prediction_type="v_prediction")
    seen = []
    step = sched.step
    sched.step = lambda out, t, x, **kw: seen.append((out.dtype, x.dtype)) or step(out, t, x, **kw)
    proj = torch.nn.Linear(4, 8)
    z, seeds = torch.randn(1, 4), np.array([[0, 1]])
    kw = dict(steps=4, eta=0.0, guidance_scale=3.0, null_condition="projected_zero", device="cpu")
    with torch.inference_mode():
        ref = sample(unet, None, sched, proj, z, seeds, dtype=torch.float32, **kw)
        seen.clear()
        half = sample(unet.to(torch.bfloat16), None, sched, proj, z, seeds, dtype=torch.bfloat16, **kw)
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert float((half - ref).abs().max()) < 0.05
