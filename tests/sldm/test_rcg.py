"""Importing RCG's LDM-8 + MoCo v3 checkpoints as an ``sldm`` folder (``pipeline/sldm/rcg.py``).

The checkpoints are a tiny random-weight pair in RCG's exact key layout written by
``tests/rcg_fixture.py``. ``tests/fixtures/rcg_reference.npz`` holds what **RCG's own code**
(LTH14/rcg @ 0c4433c: openaimodel ``UNetModel`` with its ``LitEma`` weights, the first stage's
``Encoder`` / ``Decoder``, MoCo v3's ``VisionTransformerMoCo`` + projection MLP loaded by RCG's
``load_pretrained_moco``, its DDIM schedule) computed on that fixture (seed 0) for seeded inputs;
it was made once with ``tests/fixtures/rcg_reference_recipe.py`` (the exact commands are in its
docstring: a throwaway venv with timm 0.4.12, einops and omegaconf over this project's torch),
which also loads every fixture tensor into RCG's classes with ``strict=True``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel

from pipeline.cli import run
from pipeline.labels import views_label
from pipeline.report.summary import PAPER_GENERATOR_ROWS, summary_markdown
from pipeline.report.table import PAPER_NUMBERS
from pipeline.sldm.folder import SLDMFolderError
from pipeline.sldm.rcg import RCGImportError, convert_rcg
from pipeline.views.generators import build_generator
from tests.fixtures.rcg_reference_recipe import BIG_SEED
from tests.rcg_fixture import write_rcg_fixture
from tests.support import ROOT

REFERENCE = ROOT / "tests" / "fixtures" / "rcg_reference.npz"
SETTINGS = {"steps": 2, "eta": 1.0, "guidance_scale": 1.0, "dtype": "float32"}


@pytest.fixture(scope="module")
def rcg(tmp_path_factory):
    """The fixture checkpoints and the folder the CLI converts them into."""
    root = tmp_path_factory.mktemp("rcg")
    paths = write_rcg_fixture(root)
    folder = root / "folder"
    args = ["import-rcg", "--ldm", str(paths["ldm"]), "--encoder", str(paths["encoder"])]
    run("sldm", [*args, "--ldm-config", str(paths["config"]), "--out", str(folder)])
    return paths, folder


def _generator(folder, **settings):
    return build_generator("rcg", {**SETTINGS, **settings, "model_path": str(folder)}, image_size=32, device="cpu")


def test_every_source_key_is_mapped(rcg):
    """Each key of both checkpoints has a destination, the UNet is the EMA copy RCG samples with,
    and the folder records RCG's conditioning (standardised head output, no projector, no CFG)."""
    paths, folder = rcg
    ldm = torch.load(paths["ldm"], map_location="cpu", weights_only=False)
    moco = torch.load(paths["encoder"], map_location="cpu", weights_only=True)
    keymap = json.loads((folder / "import_keymap.json").read_text())
    assert set(keymap[str(paths["ldm"])]) == set(ldm["model"])
    assert set(keymap[str(paths["encoder"])]) == set(moco["state_dict"])
    assert set(keymap[f"{paths['ldm']} [top level]"]) == set(ldm)
    targets = keymap[str(paths["ldm"])]
    unet_keys = [k for k in ldm["model"] if k.startswith("model.diffusion_model.")]
    assert all(targets[k].startswith("unused:") for k in unet_keys)  # the training copy
    ema = "model_ema.diffusion_modelmiddle_block1transformer_blocks0attn2to_kweight"
    assert targets[ema] == "unet/:mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert (
        targets["first_stage_model.decoder.up.3.attn.2.q.weight"] == "vae/:decoder.up_blocks.0.attentions.2.to_q.weight"
    )
    assert targets["pretrained_encoder.head.7.running_var"] == "encoder_head.safetensors:7.running_var"
    man = json.loads((folder / "sldm.json").read_text())
    assert man["projector"] is None and man["conditioning"]["null_condition"] == "none"
    assert man["encoder"]["embedding_norm"] == "standardize" and man["encoder"]["resize_antialias"] is False
    assert man["encoder"]["head"]["dims"] == [48, 64, 64, 16]
    assert man["scheduler"]["training"]["beta_schedule"] == "scaled_linear"
    assert man["scheduler"]["sampling"] == {
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
        "clip_sample": False,
    }
    assert man["imported"]["ema"] == {"decay": pytest.approx(0.9999), "num_updates": 12345.0}


def test_converted_model_reproduces_rcgs_own_outputs(rcg):
    """UNet ε (EMA weights), the standardised MoCo representation, the VQ encoder / decoder and the
    DDIM schedule agree with what RCG's code computed on the same fixture."""
    _, folder = rcg
    ref = np.load(REFERENCE)
    gen = _generator(folder)
    with torch.no_grad():
        t = lambda name: torch.from_numpy(ref[name])  # noqa: E731
        eps = gen.unet(t("x_t"), t("t"), encoder_hidden_states=t("context")).sample
        np.testing.assert_allclose(eps.numpy(), ref["eps"], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(gen.embed(ref["images"]).numpy(), ref["rep"], atol=1e-4)
        # at RCG's 256 px input the resize to 224 downsamples: without antialiasing, as RCG does
        big = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(BIG_SEED)) * 255
        np.testing.assert_allclose(gen.embed(big.round().to(torch.uint8).numpy()).numpy(), ref["rep_256"], atol=1e-4)
        dec = gen.vae.decoder(gen.vae.post_quant_conv(t("z")))
        np.testing.assert_allclose(dec.numpy(), ref["vq_dec"], atol=1e-4)
        np.testing.assert_allclose(gen.vae.quant_conv(gen.vae.encoder(t("vq_x"))).numpy(), ref["vq_enc"], atol=1e-4)
    sched = gen.scheduler
    sched.set_timesteps(50)
    steps = sched.timesteps.flip(0)
    np.testing.assert_array_equal(steps.numpy(), ref["ddim_timesteps"])
    ratio = sched.config.num_train_timesteps // 50
    prev = [sched.alphas_cumprod[s - ratio] if s - ratio >= 0 else sched.final_alpha_cumprod for s in steps]
    np.testing.assert_allclose(sched.alphas_cumprod[steps].numpy(), ref["ddim_alphas"], rtol=1e-5)
    np.testing.assert_allclose(np.array(prev, dtype=np.float32), ref["ddim_alphas_prev"], rtol=1e-5)
    sigmas = [float(sched._get_variance(int(s), int(s) - ratio)) ** 0.5 for s in steps]
    np.testing.assert_allclose(sigmas, ref["ddim_sigmas"], rtol=1e-4)


def test_rcg_generator_makes_views_unguided_only(rcg):
    _, folder = rcg
    gen = _generator(folder)
    images = np.asarray(np.load(REFERENCE)["images"])
    views = gen.generate(images, np.array([[1, 2], [3, 4]]))
    assert views.shape == (2, 2, 32, 32, 3) and np.isfinite(views).all()
    assert not np.allclose(views[0, 0], views[0, 1])
    assert gen.describe()["sampler"]["null_condition"] == "none"
    with pytest.raises(SLDMFolderError, match="views.generators.rcg.guidance_scale"):
        _generator(folder, guidance_scale=6.0)


def test_import_refuses_unmapped_or_mismatched_keys(rcg, tmp_path):
    paths, _ = rcg
    ldm = torch.load(paths["ldm"], map_location="cpu", weights_only=False)
    ldm["model"]["model.diffusion_model.extra_block.weight"] = torch.zeros(1)
    ldm["model"]["model_ema.diffusion_modelextra_blockweight"] = torch.zeros(1)
    torch.save(ldm, tmp_path / "extra.pth")
    with pytest.raises(RCGImportError, match="model.diffusion_model.extra_block.weight"):
        convert_rcg(tmp_path / "extra.pth", paths["encoder"], tmp_path / "out", paths["config"])
    del (
        ldm["model"]["model.diffusion_model.extra_block.weight"],
        ldm["model"]["model_ema.diffusion_modelextra_blockweight"],
    )
    ldm["model"]["first_stage_model.loss.logvar"] = torch.zeros(1)
    torch.save(ldm, tmp_path / "vq.pth")
    with pytest.raises(RCGImportError, match="first_stage_model.loss.logvar"):
        convert_rcg(tmp_path / "vq.pth", paths["encoder"], tmp_path / "out", paths["config"])
    del ldm["model"]["first_stage_model.loss.logvar"]
    ldm["model"]["logvar"] = torch.zeros(1000)  # a buffer no rule claims (learn_logvar)
    torch.save(ldm, tmp_path / "leftover.pth")
    with pytest.raises(RCGImportError, match="keys no rule of the RCG import maps: logvar"):
        convert_rcg(tmp_path / "leftover.pth", paths["encoder"], tmp_path / "out", paths["config"])
    moco = torch.load(paths["encoder"], map_location="cpu", weights_only=True)
    moco["state_dict"]["module.base_encoder.norm.bias"] += 1.0
    torch.save(moco, tmp_path / "other_moco.pth")
    with pytest.raises(RCGImportError, match="pretrained_encoder.norm.bias differs"):
        convert_rcg(paths["ldm"], tmp_path / "other_moco.pth", tmp_path / "out", paths["config"])
    config = yaml.safe_load(paths["config"].read_text())
    config["model"]["params"]["linear_end"] = 0.012
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RCGImportError, match="betas differ"):
        convert_rcg(paths["ldm"], paths["encoder"], tmp_path / "out", tmp_path / "other.yaml")
    assert not (tmp_path / "out").exists()


def test_training_weights_on_request_and_shapes_checked_against_the_config(rcg, tmp_path):
    paths, _ = rcg
    ldm = torch.load(paths["ldm"], map_location="cpu", weights_only=False)["model"]
    convert_rcg(paths["ldm"], paths["encoder"], tmp_path / "train", paths["config"], unet_weights="train")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "train" / "unet")
    key = "model.diffusion_model.output_blocks.5.2.conv.weight"  # level 1's upsampler, after its attention
    torch.testing.assert_close(unet.state_dict()["up_blocks.1.upsamplers.0.conv.weight"], ldm[key])
    # the built-in config is RCG's full-size LDM-8: the tiny checkpoint does not fit it
    with pytest.raises(RCGImportError, match="do not fit the diffusers model"):
        convert_rcg(paths["ldm"], paths["encoder"], tmp_path / "full", None)


def test_loading_names_the_wrong_scheduler_or_missing_file(rcg, tmp_path):
    _, folder = rcg
    copy = shutil.copytree(folder, tmp_path / "sampling")
    sched = DDIMScheduler.from_config({**DDIMScheduler.load_config(copy / "scheduler"), "steps_offset": 0})
    sched.save_pretrained(copy / "scheduler")
    with pytest.raises(SLDMFolderError, match="steps_offset = 0, but the sampler must use 1"):
        _generator(copy)
    copy = shutil.copytree(folder, tmp_path / "betas")
    sched = DDIMScheduler.from_config({**DDIMScheduler.load_config(copy / "scheduler"), "beta_end": 0.012})
    sched.save_pretrained(copy / "scheduler")
    with pytest.raises(SLDMFolderError, match="beta_end = 0.012, but the UNet was trained with 0.0195"):
        _generator(copy)
    copy = shutil.copytree(folder, tmp_path / "head")
    (copy / "encoder_head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="encoder_head.safetensors"):
        _generator(copy)
    copy = shutil.copytree(folder, tmp_path / "vae")
    config = json.loads((copy / "vae" / "config.json").read_text())
    (copy / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(SLDMFolderError, match="'AutoencoderTiny' not in"):
        _generator(copy)


def test_rcg_rows_stand_beside_the_papers_rcg_values():
    paper = yaml.safe_load(PAPER_NUMBERS.read_text())
    assert all(PAPER_GENERATOR_ROWS["rcg"] in paper[table] for table in ("table9", "table10"))
    row = {
        "views": views_label("rcg"),
        "generator": "rcg",
        "global_sim": 0.9,
        "local_sim": 0.3,
        "nearest_patch_sim": 0.7,
    }
    summary = summary_markdown({"table9": pd.DataFrame([row])}, "test", "")
    assert "| 0.951 / 0.299 / 0.735 |" in summary  # the paper's RCG S-LDM row
