"""View generators: registry, baselines, and tiny random-weight diffusion models saved with
``save_pretrained`` and loaded through the same code path as real weights (local folder,
``local_files_only``). Sizes follow views-and-hdf5.md §3; 2 DDIM steps keep it fast on CPU."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.views.generators import GENERATORS, build_generator
from tests.support import ROOT, build_tiny_sd_variation, build_tiny_sldm

IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def sd_variation_dir(tmp_path_factory):
    return build_tiny_sd_variation(tmp_path_factory.mktemp("sd-variation"))


@pytest.fixture(scope="session")
def sldm_dir(tmp_path_factory):
    return build_tiny_sldm(tmp_path_factory.mktemp("sldm"))


def _images(n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _seeds(b, m, offset=0):
    return np.arange(offset, offset + b * m, dtype=np.int64).reshape(b, m) * 7919 + 1


def test_a_weights_free_view_job_never_imports_the_diffusion_libraries():
    """Every view job imports the whole registry: diffusers, transformers and timm are imported
    where a diffusion generator is built, so a warp or crop job does not spend 10 s importing them."""
    code = (
        "import sys, numpy as np; from pipeline.views.generate import build_generator; "
        "build_generator('warp', image_size=16).generate(np.zeros((1, 24, 24, 3), np.uint8), np.ones((1, 1), np.int64)); "
        "print(sorted({'diffusers', 'transformers', 'timm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_registry_names_and_baseline_flags():
    assert {"sd-variation", "sldm", "warp", "crop"} <= set(GENERATORS)
    assert GENERATORS["warp"].is_baseline and GENERATORS["crop"].is_baseline
    assert not GENERATORS["sd-variation"].is_baseline and not GENERATORS["sldm"].is_baseline
    with pytest.raises(KeyError, match="unknown view generator 'nope'"):
        build_generator("nope", {})


@pytest.mark.parametrize("name", ["warp", "crop"])
def test_baselines_are_per_view_deterministic(name):
    gen = build_generator(name, {}, image_size=IMAGE_SIZE)
    images, seeds = _images(3), _seeds(3, 2)
    out = gen.generate(images, seeds)
    assert out.shape == (3, 2, IMAGE_SIZE, IMAGE_SIZE, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    # a view depends on (image, seed) only: same seed in a different batch gives the same view
    alone = gen.generate(images[2:], seeds[2:, 1:])
    np.testing.assert_array_equal(alone[0, 0], out[2, 1])
    assert not np.array_equal(out[0, 0], out[0, 1])  # different seeds, different views


def test_warp_is_a_geometric_change_of_the_image():
    img = _images(1, size=IMAGE_SIZE)
    zero = build_generator(
        "warp", {"perspective": 0.0, "elastic_alpha": 0.0, "crop_scale": [1, 1]}, image_size=IMAGE_SIZE
    )
    np.testing.assert_allclose(zero.generate(img, _seeds(1, 1))[0, 0], img[0] / 255.0, atol=1e-6)
    warped = build_generator("warp", {}, image_size=IMAGE_SIZE).generate(img, _seeds(1, 1))[0, 0]
    assert np.abs(warped - img[0] / 255.0).mean() > 0.05


def test_crop_box_within_image_and_scale():
    from pipeline.crop_sampler import random_resized_crop_box

    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(rng, 50, 70, (0.3, 1.0), (0.75, 4 / 3))
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        assert 0.3 * 3500 * 0.9 <= h * w <= 3500


def test_diffusion_generators_need_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="model_path is not set"):
        build_generator("sd-variation", {"model_path": None})
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_generator("sldm", {"model_path": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match="sldm.json"):
        build_generator("sldm", {"model_path": str(tmp_path)})


def test_sd_variation_from_saved_folder_is_batch_invariant(sd_variation_dir):
    gen = build_generator(
        "sd-variation",
        {"model_path": str(sd_variation_dir), "steps": 2, "guidance_scale": 6.0, "dtype": "float16"},
        image_size=IMAGE_SIZE,
        device="cpu",
    )
    assert gen.native == 32  # unet sample 16 x VAE factor 2
    images, seeds = _images(2), _seeds(2, 2)
    out = gen.generate(images, seeds)
    assert out.shape == (2, 2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(out).all()
    # per-sample CPU generators: the same (image, seed) alone gives the same view, up to float
    # kernels that depend on the batch size (~1e-6 on CPU; cuBLAS likewise, diffusers #2659)
    alone = gen.generate(images[1:], seeds[1:, 1:])
    np.testing.assert_allclose(alone[0, 0], out[1, 1], atol=1e-4)
    np.testing.assert_array_equal(gen.generate(images, seeds), out)  # same batch: bit-identical
    assert not np.allclose(out[0, 0], out[0, 1])


def test_sldm_from_saved_folder(sldm_dir):
    settings = {"model_path": str(sldm_dir), "steps": 2, "guidance_scale": 6.0}
    gen = build_generator("sldm", settings, image_size=24, device="cpu")
    images, seeds = _images(2), _seeds(2, 3)
    out = gen.generate(images, seeds)
    assert out.shape == (2, 3, 24, 24, 3) and np.isfinite(out).all()
    alone = gen.generate(images[1:], seeds[1:, 2:])
    np.testing.assert_allclose(alone[0, 0], out[1, 2], atol=1e-4)
    np.testing.assert_array_equal(gen.generate(images, seeds), out)
    # the conditioning image matters, and so does the null condition of the CFG
    other = gen.generate(images[::-1].copy(), seeds)
    assert not np.allclose(other[0], out[0])
    zero = build_generator("sldm", {**settings, "null_condition": "zero_token"}, image_size=24, device="cpu").generate(
        images, seeds
    )
    assert not np.allclose(zero, out)


def test_sldm_embedding_is_the_projected_cls_token(sldm_dir):
    import torch

    gen = build_generator("sldm", {"model_path": str(sldm_dir), "steps": 1}, image_size=24, device="cpu")
    with torch.no_grad():
        z = gen.embed(_images(2))
        feats = gen.encoder.forward_features(
            torch.nn.functional.interpolate(
                torch.from_numpy(_images(2)).permute(0, 3, 1, 2).float() / 255,
                size=(32, 32),
                mode="bicubic",
                antialias=True,
            )
            .sub(gen.mean)
            .div(gen.std)
        )
    assert z.shape == (2, 48)
    torch.testing.assert_close(z, feats[:, 0])  # CLS token after the final norm


def test_sd_variation_samples_with_ddim_from_a_pndm_folder(tmp_path):
    """The public image-variation folder ships PNDM (which ignores eta); views come from DDIM built
    from the folder's own noise schedule, and the sampler actually run is described."""
    from diffusers import DDIMScheduler, PNDMScheduler

    folder = build_tiny_sd_variation(tmp_path / "sdv")
    # as the public folder: PNDM in model_index.json and in the scheduler's own config
    PNDMScheduler.from_config(DDIMScheduler.load_config(folder / "scheduler")).save_pretrained(folder / "scheduler")
    config_file = folder / "scheduler" / "scheduler_config.json"  # lambdalabs' has no clip_sample key
    config_file.write_text(
        json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "clip_sample"})
    )
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    settings = {"model_path": str(folder), "steps": 3, "guidance_scale": 6.0, "dtype": "float16"}
    gen = build_generator("sd-variation", {**settings, "eta": 0.0}, image_size=IMAGE_SIZE, device="cpu")
    assert isinstance(gen.pipe.scheduler, DDIMScheduler)
    assert gen.pipe.scheduler.config.beta_schedule == "scaled_linear"  # the folder's schedule kept
    sampler = gen.describe()["sampler"]
    assert sampler == {
        "scheduler": "DDIMScheduler",
        "scheduler_config_from": "PNDMScheduler",
        "steps": 3,
        "eta": 0.0,
        "guidance_scale": 6.0,
        "clip_sample": False,
        "dtype": "float32",
        "native_size": 32,
    }
    # latent x0 is never clipped: the public folder's config has no clip_sample key, and DDIM's
    # default (True) would cap unit-variance SD latents at +-1
    assert "clip_sample" not in PNDMScheduler.load_config(folder / "scheduler")
    assert DDIMScheduler.from_config(PNDMScheduler.load_config(folder / "scheduler")).config.clip_sample
    assert gen.pipe.scheduler.config.clip_sample is False
    images, seeds = _images(1), _seeds(1, 1)
    stochastic = build_generator("sd-variation", {**settings, "eta": 1.0}, image_size=IMAGE_SIZE, device="cpu")
    # eta now matters (PNDM would give the same views for both)
    assert not np.allclose(gen.generate(images, seeds), stochastic.generate(images, seeds))


def test_sldm_folder_validation_names_the_problem(tmp_path):
    from diffusers import DDIMScheduler

    from pipeline.sldm.folder import SLDMFolderError

    settings = {"steps": 1}
    folder = build_tiny_sldm(tmp_path / "missing")
    (folder / "projector.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="projector.safetensors"):
        build_generator("sldm", {**settings, "model_path": str(folder)}, image_size=24, device="cpu")
    # a scheduler other than the one the UNet was trained with is refused, naming the key
    folder = build_tiny_sldm(tmp_path / "scheduler")
    wrong = DDIMScheduler.from_config({**DDIMScheduler.load_config(folder / "scheduler"), "beta_schedule": "linear"})
    wrong.save_pretrained(folder / "scheduler")
    with pytest.raises(
        SLDMFolderError, match="beta_schedule = 'linear', but the UNet was trained with 'scaled_linear'"
    ):
        build_generator("sldm", {**settings, "model_path": str(folder)}, image_size=24, device="cpu")
    folder = build_tiny_sldm(tmp_path / "manifest")
    manifest = json.loads((folder / "sldm.json").read_text())
    del manifest["conditioning"]
    (folder / "sldm.json").write_text(json.dumps(manifest))
    with pytest.raises(SLDMFolderError, match="lacks key 'conditioning'"):
        build_generator("sldm", {**settings, "model_path": str(folder)}, image_size=24, device="cpu")


def test_sldm_uses_the_cfg_null_convention_recorded_in_training(tmp_path, sldm_dir):
    folder = build_tiny_sldm(tmp_path / "zero", null_condition="zero_token", p_uncond=0.1)
    assert json.loads((folder / "sldm.json").read_text())["conditioning"] == {
        "null_condition": "zero_token",
        "p_uncond": 0.1,
    }
    settings = {"steps": 2, "guidance_scale": 6.0}
    recorded = build_generator("sldm", {**settings, "model_path": str(folder)}, image_size=24, device="cpu")
    assert recorded.null_condition == "zero_token" and recorded.describe()["sampler"]["null_condition"] == "zero_token"
    # same weights (seed 0) saved with the other convention, asked for zero_token explicitly: same views
    explicit = build_generator(
        "sldm", {**settings, "model_path": str(sldm_dir), "null_condition": "zero_token"}, image_size=24, device="cpu"
    )
    images, seeds = _images(1), _seeds(1, 2)
    np.testing.assert_array_equal(recorded.generate(images, seeds), explicit.generate(images, seeds))


def test_sldm_in_pixel_space(tmp_path):
    folder = build_tiny_sldm(tmp_path / "pixel", pixel_space=True)
    assert json.loads((folder / "sldm.json").read_text())["vae"] is None and not (folder / "vae").exists()
    gen = build_generator("sldm", {"model_path": str(folder), "steps": 2}, image_size=24, device="cpu")
    out = gen.generate(_images(2), _seeds(2, 2))
    assert out.shape == (2, 2, 24, 24, 3) and np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
