"""Consistency stage: GS / LS / NPS metrics, feature encoders, pair sampling, k-NN, tables."""

import functools
import math

import numpy as np
import pytest
import torch

from pipeline.cli import run
from pipeline.consistency.feature_encoders import (
    ENCODERS,
    HogGridEncoder,
    SiftGridEncoder,
    TimmViTEncoder,
    build_feature_encoder,
)
from pipeline.consistency.knn_file import read_knn
from pipeline.consistency.neighbours import find_neighbours, nearest_neighbours
from pipeline.consistency.pair_metrics import METRICS, centre_descriptors, pair_metrics
from pipeline.consistency.pairs import (
    PairKind,
    knn_kind,
    random_kind,
    sample_generated_pairs,
    sample_knn_pairs,
    sample_random_pairs,
    sample_video_pairs,
    score_table,
)
from pipeline.io import write_npz_atomic
from tests.support import make_sldm_bag, write_bad_images

TIMM_MODEL = "vit_tiny_patch16_224"  # 5.7 M params; at 64 px it runs 16 patch tokens in ms


def random_image(seed, size=64):
    """Smooth random texture (SIFT/HOG need gradients, not i.i.d. pixel noise)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A random-init timm ViT saved as an MAE pretraining checkpoint ({"model": ...} + decoder keys),
    with a zero position embedding so the encoder is equivariant to patch permutations."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0, img_size=64)
    state = model.state_dict()
    state["pos_embed"] = torch.zeros_like(state["pos_embed"])
    state["mask_token"] = torch.zeros(1, 1, 192)  # MAE decoder leftovers must be ignored
    state["decoder_embed.weight"] = torch.zeros(128, 192)
    path = tmp_path_factory.mktemp("ckpt") / "mae.pth"
    torch.save({"model": state, "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def timm_encoder(timm_checkpoint):
    return build_feature_encoder(
        {
            "name": "timm",
            "timm_model": TIMM_MODEL,
            "checkpoint": str(timm_checkpoint),
            "image_size": 64,
            "patch_size": 16,
            "batch_size": 4,
        },
        "cpu",
    )


def batch(*images):
    return torch.from_numpy(np.stack(images))


# ---------------------------------------------------------------------------------------------
# metrics


def test_hand_computed_two_token_example():
    # view 1 patches: f1 = (1, 0), f2 = (0, 1); view 2 patches: g1 = (0, 1), g2 = (1, 1)
    # LS  = (cos(f1, g1) + cos(f2, g2)) / 2 = (0 + 1/sqrt2) / 2                 = 0.353553
    # NPS = (max(cos(f1,g1), cos(f1,g2)) + max(cos(f2,g1), cos(f2,g2))) / 2
    #     = (max(0, 1/sqrt2) + max(1, 1/sqrt2)) / 2 = (0.707107 + 1) / 2          = 0.853553
    # NPS the other way (view 2 -> view 1): (1 + 1/sqrt2) / 2 as well here, so also check a
    # case where the direction matters: g = (0,1),(0,1): V1->V2 = (0 + 1)/2, V2->V1 = (1 + 1)/2
    # GS  = cos((1, 2), (2, 1)) = 4 / 5                                             = 0.8
    pa = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    pb = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    ga, gb = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 1.0]])
    gs, ls, nps = pair_metrics(ga, gb, pa, pb)[0].tolist()
    assert gs == pytest.approx(0.8, abs=1e-6)
    assert ls == pytest.approx((0 + 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert nps == pytest.approx((1 / math.sqrt(2) + 1) / 2, abs=1e-6)
    pc = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    assert pair_metrics(ga, ga, pa, pc)[0, 2].item() == pytest.approx(0.5, abs=1e-6)
    assert pair_metrics(ga, ga, pc, pa)[0, 2].item() == pytest.approx(1.0, abs=1e-6)


def test_metrics_identical_and_permuted_tokens():
    torch.manual_seed(0)
    g, p = torch.randn(5, 8), torch.randn(5, 10, 8)
    assert torch.allclose(pair_metrics(g, g, p, p), torch.ones(5, 3), atol=1e-5)
    perm = torch.randperm(10)
    out = pair_metrics(g, g, p, p[:, perm])
    assert torch.allclose(out[:, 2], torch.ones(5), atol=1e-5)  # every patch still has its match
    assert (out[:, 1] < 0.9).all()  # same-position patches no longer agree
    # chunking does not change the result
    assert torch.allclose(pair_metrics(g, g, p, p[:, perm], chunk=2), out, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# encoders


def test_registry_names():
    assert {"timm", "cdgmae", "sift-grid", "hog-grid"} <= set(ENCODERS)
    with pytest.raises(KeyError, match="consistency.encoder.name"):
        build_feature_encoder({"name": "nope"}, "cpu")


def test_timm_identical_images_score_one(timm_encoder):
    img = random_image(1)
    feats = timm_encoder.encode(batch(img, img))
    assert feats.patch_tokens.shape == (2, 16, 192) and feats.grid == (4, 4)
    out = pair_metrics(feats.global_tokens[:1], feats.global_tokens[1:], feats.patch_tokens[:1], feats.patch_tokens[1:])
    assert torch.allclose(out, torch.ones(1, 3), atol=1e-5)


def test_timm_patch_tokens_in_spatial_order(timm_encoder):
    """With a zero position embedding the ViT is permutation-equivariant, so rolling the image by
    one patch column must roll the row-major token grid by one column, nothing else."""
    img = random_image(2)
    rolled = np.roll(img, 16, axis=1)
    feats = timm_encoder.encode(batch(img, rolled))
    grid = feats.patch_tokens.reshape(2, 4, 4, -1)
    assert torch.allclose(torch.roll(grid[0], 1, dims=1), grid[1], atol=1e-4)
    assert not torch.allclose(grid[0], grid[1], atol=1e-2)
    # LS drops, NPS stays at 1 (paper §3.2: pose change without content change)
    gs, ls, nps = pair_metrics(
        feats.global_tokens[:1], feats.global_tokens[1:], feats.patch_tokens[:1], feats.patch_tokens[1:]
    )[0].tolist()
    assert nps == pytest.approx(1.0, abs=1e-4) and gs == pytest.approx(1.0, abs=1e-4)
    assert ls < 0.95


def test_timm_checkpoint_missing_keys_fail(tmp_path):
    import timm

    state = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=0, img_size=64).state_dict()
    del state["blocks.3.attn.qkv.weight"]
    torch.save(state, tmp_path / "plain.pth")
    with pytest.raises(KeyError, match="blocks.3.attn.qkv.weight"):
        TimmViTEncoder(TIMM_MODEL, tmp_path / "plain.pth", 64)
    with pytest.raises(FileNotFoundError, match="consistency.encoder.checkpoint"):
        TimmViTEncoder(TIMM_MODEL, tmp_path / "absent.pth", 64)


def test_cdgmae_encoder_reads_our_checkpoint(tmp_path):
    from pipeline.pretrain.models_mae import build_encoder as build_vit
    from pipeline.pretrain.models_mae import resolve_arch

    torch.manual_seed(0)
    vit = build_vit("vit_mini_patch8", 32)
    torch.save(
        {
            "model": {f"encoder.{k}": v for k, v in vit.state_dict().items()},
            "img_size": 32,
            "arch": resolve_arch("vit_mini_patch8"),
        },
        tmp_path / "checkpoint.pth",
    )
    enc = build_feature_encoder(
        {"name": "cdgmae", "checkpoint": str(tmp_path / "checkpoint.pth"), "image_size": 32}, "cpu"
    )
    img = random_image(3, 32)
    feats = enc.encode(batch(img, img))
    assert feats.grid == (4, 4) and feats.patch_tokens.shape[:2] == (2, 16)
    expect = vit(
        (
            (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
            - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        )
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    )
    assert torch.allclose(feats.patch_tokens[0], expect[0, 1:], atol=1e-5)
    assert torch.allclose(feats.global_tokens[0], expect[0, 0], atol=1e-5)


@pytest.mark.parametrize("cls", [SiftGridEncoder, HogGridEncoder])
def test_descriptor_encoders(cls):
    enc = cls(64, 16)
    images = [random_image(s) for s in range(4)]
    glob, patches = centre_descriptors(*(lambda f: (f.global_tokens, f.patch_tokens))(enc.encode(batch(*images))))
    assert patches.shape[:2] == (4, 16) and enc.centre
    assert torch.allclose(glob, patches.mean(1), atol=1e-4)  # global = mean-pooled (centred) patches
    same = pair_metrics(glob[:1], glob[:1], patches[:1], patches[:1])
    assert torch.allclose(same, torch.ones(1, 3), atol=1e-5)
    other = pair_metrics(glob[:1], glob[1:2], patches[:1], patches[1:2])[0]
    assert (other < 0.9).all()  # unrelated textures are not similar once centred
    # spatial order: rolling the image by one cell rolls the interior descriptors by one column
    rolled = enc.encode(batch(images[0], np.roll(images[0], 16, axis=1))).patch_tokens.reshape(2, 4, 4, -1)
    assert torch.allclose(rolled[0, :, 1:2], rolled[1, :, 2:3], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# sampling and k-NN


def test_sampling_is_deterministic_and_valid():
    a = sample_random_pairs(10, 200, seed=3)
    assert a == sample_random_pairs(10, 200, seed=3) and a != sample_random_pairs(10, 200, seed=4)
    assert all(i != j for i, j in a) and {i for i, _ in a} == set(range(10))
    v = sample_video_pairs([30, 1, 8], (4, 48), 100, seed=0)
    assert v == sample_video_pairs([30, 1, 8], (4, 48), 100, seed=0)
    for video, start, gap in v:
        length = [30, 1, 8][video]
        assert video != 1 and 1 <= gap <= length - 1 and start + gap < length
        assert gap >= 4 or gap == length - 1
    g = sample_generated_pairs(50, 4, 20, seed=0)
    assert len({p for p, _ in g}) == 20 and all(0 <= w < 4 for _, w in g)
    assert g == sample_generated_pairs(50, 4, 20, seed=0)
    assert len(sample_generated_pairs(5, 4, 20, seed=0)) == 5  # capped at the bag size


def test_knn_never_pairs_an_image_with_itself():
    torch.manual_seed(0)
    emb = torch.randn(30, 6)
    emb[7] = emb[3]  # exact duplicates: each must be the other's nearest, never itself
    idx, sim = nearest_neighbours(emb, k=4, chunk=7)
    assert idx.shape == (30, 4) and idx.dtype == torch.int64
    assert not (idx == torch.arange(30)[:, None]).any()
    assert idx[3, 0] == 7 and idx[7, 0] == 3 and sim[3, 0] == pytest.approx(1.0, abs=1e-5)
    # brute-force check of the ranking
    n = torch.nn.functional.normalize(emb, dim=1)
    s = n @ n.T
    s.fill_diagonal_(-2)
    assert torch.equal(idx, s.topk(4, dim=1).indices)
    pairs = sample_knn_pairs(idx.numpy(), 4, 30, seed=0)
    assert all(q != nb and 1 <= r <= 4 and idx[q, r - 1] == nb for q, nb, r in pairs)
    with pytest.raises(ValueError, match="knn_k"):
        sample_knn_pairs(idx.numpy(), 5, 10, seed=0)


class ListSource:
    """In-memory stand-in for a dataset: key -> image."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def load(self, key, size):
        return self.images[key]

    def describe(self, key):
        return f"mem[{key}]"

    def image_id(self, key):
        return f"img{key}"


def test_neighbours_resume_and_tables(tmp_path):
    images = ListSource([random_image(s) for s in range(12)])
    enc = SiftGridEncoder(64, 16)
    settings = {"name": "sift-grid", "image_size": 64, "patch_size": 16}
    search = functools.partial(
        find_neighbours, enc, images, k=3, batch_size=5, num_workers=0, encoder_settings=settings, part_size=5
    )
    out = search(state_dir=tmp_path / "state")
    parts = sorted((tmp_path / "state").rglob("part-*.npy"))
    assert len(parts) == 3
    assert not (out["neighbours"] == np.arange(12)[:, None]).any()
    again = search(state_dir=tmp_path / "state")
    assert np.array_equal(out["neighbours"], again["neighbours"])
    write_npz_atomic(tmp_path / "knn.npz", out)
    nb = read_knn(tmp_path / "knn.npz", [f"img{i}" for i in range(12)])
    with pytest.raises(ValueError, match="another image list"):
        read_knn(tmp_path / "knn.npz", [f"img{i}" for i in range(11)])

    kinds = [knn_kind(images, nb, 3, 6, seed=0), random_kind(images, 6, seed=0)]
    identical = PairKind("random_images", "identical", images, [0, 1], [0, 1], [{"a_id": "img0"}, {"a_id": "img1"}])
    table, pairs = score_table(enc, kinds + [identical], batch_size=4, num_workers=0, seed=0, run_label="test")
    assert list(table["views"]) == ["K-nn images", "Random images", "identical"]
    assert list(table["n_pairs"]) == [6, 6, 2] and len(pairs) == 14
    assert table.loc[2, METRICS].tolist() == pytest.approx([1, 1, 1], abs=1e-5)
    assert (table["encoder"] == enc.name).all() and not table["is_baseline"].any()
    knn_rows = pairs[pairs.pair_kind == "knn_images"]
    assert (knn_rows.a_index != knn_rows.b_index).all() and knn_rows.neighbour_rank.between(1, 3).all()
    table2, pairs2 = score_table(enc, kinds, batch_size=3, num_workers=0, seed=0, run_label="test")
    assert np.allclose(table2[list(METRICS)], table.loc[:1, list(METRICS)], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# end to end through the CLI: tiny ImageNet folder + videos, real warp/crop bags from the views CLI


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    import cv2

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(2):
        d = root / "imagenet" / "train" / f"n0{c}"
        d.mkdir(parents=True)
        for i in range(6):
            small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            cv2.imwrite(str(d / f"img{i}.png"), cv2.resize(small, (64, 48), interpolation=cv2.INTER_CUBIC))
    for v in range(2):
        d = root / "videos" / f"vid{v}"
        d.mkdir(parents=True)
        base = cv2.resize(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), (96, 64))
        for t in range(8):
            cv2.imwrite(str(d / f"{t:05d}.png"), np.roll(base, 2 * t, axis=1)[:, :64])
    s = '{"shards": 1, "part_size": 8, "image_size": 32, "n_views": 2}'
    for g in ("warp", "crop"):
        shard = root / "views" / g / "shard-0.h5"
        run(
            "views",
            [
                "generate",
                "--root",
                str(root / "imagenet"),
                "--generator",
                g,
                "--shard",
                "0",
                "--out",
                str(shard),
                "--settings",
                s,
            ],
        )
        run("views", ["merge", "--shards", str(shard), "--out", str(root / "views" / g / "bag.h5"), "--settings", s])
    return root


def test_cli_tables_end_to_end(tiny_data, tmp_path):
    import pandas as pd

    r = tiny_data
    s = '{"encoder": {"name": "sift-grid", "image_size": 32, "patch_size": 8}, "n_pairs": 6, "knn_k": 2}'
    run(
        "consistency",
        [
            "neighbours",
            "--imagenet-root",
            str(r / "imagenet"),
            "--settings",
            s,
            "--k",
            "3",
            "--output",
            str(tmp_path / "knn.npz"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
    )
    with np.load(tmp_path / "knn.npz") as z:
        assert z["neighbours"].shape == (12, 3) and z["neighbours"].dtype == np.int64
        assert not (z["neighbours"] == np.arange(12)[:, None]).any()
        assert z["image_id"][0] == "n00/img0"
    t1 = [
        "table1",
        "--bag",
        str(r / "views/warp/bag.h5"),
        "--generator",
        "warp",
        "--knn",
        str(tmp_path / "knn.npz"),
        "--imagenet-root",
        str(r / "imagenet"),
        "--videos-root",
        str(r / "videos"),
        "--settings",
        s,
        "--seed",
        "3",
        "--run-label",
        "test",
    ]
    run("consistency", t1 + ["--output", str(tmp_path / "t1.csv"), "--pairs-output", str(tmp_path / "p1.csv")])
    run("consistency", t1 + ["--output", str(tmp_path / "t1b.csv"), "--pairs-output", str(tmp_path / "p1b.csv")])
    assert (tmp_path / "p1.csv").read_text() == (tmp_path / "p1b.csv").read_text()  # seeded
    run(
        "consistency",
        [
            "table9",
            "--bag",
            f"warp={r / 'views/warp/bag.h5'}",
            "--bag",
            f"crop={r / 'views/crop/bag.h5'}",
            "--videos-root",
            str(r / "videos"),
            "--settings",
            s,
            "--seed",
            "3",
            "--output",
            str(tmp_path / "t9.csv"),
            "--pairs-output",
            str(tmp_path / "p9.csv"),
        ],
    )
    t1, t9 = pd.read_csv(tmp_path / "t1.csv"), pd.read_csv(tmp_path / "t9.csv")
    p1 = pd.read_csv(tmp_path / "p1.csv")
    assert list(t1.pair_kind) == ["video_frames", "generated", "knn_images", "random_images"]
    assert list(t9.generator.fillna("")) == ["", "warp", "crop"]
    assert t1.is_baseline.tolist() == [False, True, False, False] and t9.is_baseline.tolist()[1:] == [True, True]
    assert not t1.views.str.contains("S-LDM|CDG-MAE").any() and t1.views[1].startswith("warp")
    # the same generator gives the same row in Tables 1 and 9 (same seed -> same pairs, same centring)
    assert np.allclose(t1.loc[1, list(METRICS)].to_numpy(float), t9.loc[1, list(METRICS)].to_numpy(float))
    assert (t1.n_pairs == 6).all() and len(p1) == 24
    assert np.isfinite(t1[list(METRICS)].to_numpy(float)).all()
    knn = p1[p1.pair_kind == "knn_images"]
    assert (knn.a_id != knn.b_id).all() and knn.neighbour_rank.between(1, 2).all()
    video = p1[p1.pair_kind == "video_frames"]
    assert (video.b_frame - video.a_frame == video.gap).all()


def test_cli_names_a_corrupt_image(tmp_path):
    d = tmp_path / "imagenet" / "train" / "n00"
    d.mkdir(parents=True)
    import cv2

    for i in range(3):
        cv2.imwrite(str(d / f"ok{i}.png"), random_image(i, 32))
    (d / "bad.png").write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="bad.png"):
        run(
            "consistency",
            [
                "neighbours",
                "--imagenet-root",
                str(tmp_path / "imagenet"),
                "--k",
                "1",
                "--settings",
                '{"encoder": {"name": "hog-grid", "image_size": 32}}',
                "--output",
                str(tmp_path / "knn.npz"),
            ],
        )
    assert not (tmp_path / "knn.npz").exists()


@pytest.mark.fault
def test_neighbour_search_skips_and_lists_unreadable_images(tmp_path):
    """The k-NN step follows the one bad-image policy: a corrupt JPEG and a zero-byte file are
    skipped and listed, never anyone's neighbour, their rows -1 (before: the first one crashed it)."""
    import pandas as pd
    from PIL import Image

    from pipeline.consistency.options import list_images
    from pipeline.imaging import TooManyRejectsError

    folder = tmp_path / "imagenet" / "train" / "n0"
    folder.mkdir(parents=True)
    for s in range(8):
        Image.fromarray(random_image(s)).save(folder / f"img{s}.png")
    bad = write_bad_images(folder)
    images = list_images(tmp_path / "imagenet")
    bad_rows = [i for i in range(len(images)) if images.describe(i) in map(str, bad)]
    enc = SiftGridEncoder(64, 16)
    settings = {"name": "sift-grid", "image_size": 64, "patch_size": 16}
    search = functools.partial(
        find_neighbours, enc, images, k=3, batch_size=4, num_workers=0, encoder_settings=settings, part_size=5
    )
    out = search(state_dir=tmp_path / "state", max_reject_fraction=0.25)
    assert (out["neighbours"][bad_rows] == -1).all()
    good = np.setdiff1d(np.arange(len(images)), bad_rows)
    assert not np.isin(out["neighbours"][good], bad_rows).any() and (out["neighbours"][good] >= 0).all()
    listing = tmp_path / "state" / "rejects.csv"
    assert sorted(pd.read_csv(listing)["path"]) == sorted(map(str, bad))
    resumed = search(state_dir=tmp_path / "state", max_reject_fraction=0.25)  # from the parts
    assert np.array_equal(resumed["neighbours"], out["neighbours"])
    with pytest.raises(TooManyRejectsError, match="2 of 10 images are unreadable"):
        search(state_dir=tmp_path / "strict", max_reject_fraction=0.1)
    assert knn_kind(images, out["neighbours"], 3, 8, seed=0).keys_a == good.tolist()  # never a query


# ---------------------------------------------------------------------------------------------
# Table 9 rows of an S-LDM: labelled as ours (or RCG's), with the sampler, encoder and model they used


def test_table9_rows_say_which_s_ldm_sampler_and_encoder_made_them(tiny_data, tmp_path):
    import pandas as pd

    from pipeline.io import folder_sha256
    from pipeline.labels import generator_row_label

    bag, folder = make_sldm_bag(tiny_data / "imagenet", tmp_path)
    s = '{"encoder": {"name": "sift-grid", "image_size": 32, "patch_size": 8}, "n_pairs": 4}'
    out = tmp_path / "t9.csv"
    run(
        "consistency",
        [
            "table9",
            "--bag",
            f"sldm={bag}",
            "--bag",
            f"warp={tiny_data / 'views/warp/bag.h5'}",
            "--settings",
            s,
            "--output",
            str(out),
            "--pairs-output",
            str(tmp_path / "p9.csv"),
        ],
    )
    t9 = pd.read_csv(out).set_index("generator")
    sldm = t9.loc["sldm"]
    assert sldm.views == "S-LDM trained here (encoder: random-init)"  # not the paper's "Diffusion (S-LDM)"
    assert (sldm.sampler, sldm.sampler_steps, sldm.sampler_eta, sldm.guidance_scale) == ("DDIMScheduler", 1, 0.5, 3)
    assert sldm.encoder_source == "random-init" and sldm.model_sha256 == folder_sha256(folder)
    warp = t9.loc["warp"]  # weights-free: a baseline, no sampler, encoder or model
    assert (
        warp.views.startswith("warp pseudo-views") and warp[["sampler", "encoder_source", "model_sha256"]].isna().all()
    )
    # RCG's imported LDM-8, under its own name or as an sldm folder, and an sldm folder given as is
    rcg = [{"manifest": {"encoder": {"source": "rcg-mocov3"}, "imported": {"from": "rcg-ldm8"}}}]
    assert generator_row_label("rcg", rcg) == generator_row_label("sldm", rcg) == "RCG S-LDM (imported)"
    given = [{"manifest": {"encoder": {"source": "timm"}}}]
    assert generator_row_label("sldm", given) == "S-LDM from a given folder (encoder: timm)"
