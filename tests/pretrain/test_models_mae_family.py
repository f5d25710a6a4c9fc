"""The MAE-family methods (mae, lut, pseudo-mae): each loss on tiny hand-computed cases (masks and
folds, Eq. 1-2's normalisation, LUT's 2 - 2 cos, Sinkhorn, the cross-entropy's direction, the
nearest-patch targets), EMA teachers (no gradients, out of the optimizer, in the resumable state, out
of the released checkpoint), shapes and parameter counts, their datasets, GFLOPs per sample with the
teachers counted (fvcore against a hand count), and the MAE-family table. Tiny: vit_mini_patch8."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch
import torch.nn as nn

from pipeline.cells import CELL_KEYS, cell_path, model_path
from pipeline.pretrain import objectives as obj
from pipeline.pretrain.models_mae import build_encoder
from pipeline.pretrain.models_mae_family import (
    build_pretrain_model,
    export_state_dict,
    parameter_summary,
)
from pipeline.pretrain.strategies import STRATEGIES, build_dataset
from pipeline.pretrain.train import build_optimizer, resolve_cell, resolve_pretrain_settings, train
from tests.support import tiny_bag, write_bad_images, write_eval, write_imagenet

ARCH = "vit_mini_patch8"  # D 128, depth 4, decoder 128 x 2
SMALL_HEADS = {"lut": {"head_mlp_dim": 64}, "pseudo_mae": {"out_dim": 32, "head_hidden": 48, "head_bottleneck": 16}}


def settings(**overrides):
    base = {
        "img_size": 32,
        "batch_size": 4,
        "micro_batch": 4,
        "base_lr": 1e-3,
        "warmup_epochs": 0,
        "num_workers": 0,
        "samples_per_epoch": 8,
        **SMALL_HEADS,
    }
    return resolve_pretrain_settings({**base, **overrides})


def cell(method, mask=0.75, epochs=2):
    return resolve_cell(
        {"method": method, "arch": ARCH, "target_mask": mask, "epochs": epochs, "generator": "none", "target": "none"},
        settings(),
    )


def model_of(method, **overrides):
    torch.manual_seed(0)
    return build_pretrain_model(cell(method), settings(**overrides)).train()


# ---------------------------------------------------------------------------------------------
# masks and folds


def test_multifold_masks_partition_the_tokens_by_hand():
    noise = torch.tensor([[0.7, 0.1, 0.9, 0.3, 0.5, 0.2, 0.8, 0.4]])  # argsort: 1 5 3 7 4 0 6 2
    keep, folds = obj.multifold_masks(noise, n_keep=2, folds=3)
    assert keep.tolist() == [[1, 5]]
    assert [f.tolist() for f in folds] == [[[3, 7]], [[4, 0]], [[6, 2]]]
    every = torch.cat([keep, *folds], dim=1)[0]
    assert sorted(every.tolist()) == list(range(8))  # visible + folds partition the grid
    assert obj.mask_from_keep(keep, 8).tolist() == [[1, 0, 1, 1, 1, 0, 1, 1]]  # 1 = removed (MAE)


def test_fold_counts_and_unequal_folds():
    assert obj.default_folds(196, 49) == 3  # Pseudo MAE Appendix A: 49 visible, three folds of 49
    assert obj.default_folds(64, 16) == 3  # the demo: r = 0.75 on an 8 x 8 grid
    assert obj.default_folds(64, 6) == 10
    keep, folds = obj.multifold_masks(torch.rand(3, 10), 3, 3)
    assert [f.shape[1] for f in folds] == [3, 2, 2]  # torch.tensor_split
    for b in range(3):
        ids = torch.cat([keep[b], *[f[b] for f in folds]])
        assert sorted(ids.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="folds"):
        obj.multifold_masks(torch.rand(1, 8), 6, 3)  # 2 masked tokens, 3 folds


def test_pseudo_mae_masks_and_lut_draws_are_disjoint():
    model = model_of("pseudo-mae")
    torch.manual_seed(1)
    keep, folds = model.masks(4, 16, 0.75, "cpu")  # 32 px / 8: 16 tokens, keep 4, 3 folds of 4
    assert keep.shape == (4, 4) and [f.shape for f in folds] == [(4, 4)] * 3
    for b in range(4):
        assert sorted(torch.cat([keep[b], *[f[b] for f in folds]]).tolist()) == list(range(16))
    noise = torch.tensor([[0.7, 0.1, 0.9, 0.3, 0.5, 0.2, 0.8, 0.4]])
    (a, b), restore = obj.disjoint_draws(noise, 2)
    assert a.tolist() == [[1, 5]] and b.tolist() == [[3, 7]]  # LUT's ids_shuffle[:, :k], [:, k:2k]
    assert torch.equal(torch.argsort(restore, dim=1)[:, :2], a)
    with pytest.raises(ValueError, match="disjoint"):
        obj.disjoint_draws(noise, 5)


# ---------------------------------------------------------------------------------------------
# Eq. 1 / 2: the normalised teacher tokens and the cosine loss


def test_eq2_normalisation_by_hand():
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # mean 2.5, unbiased var 5/3 (SdAE's Tensor.var), eps 1e-6
    expected = (t - 2.5) / math.sqrt(5 / 3 + 1e-6)
    assert torch.allclose(obj.normalize_tokens(t), expected)
    assert obj.normalize_tokens(t)[0].tolist() == pytest.approx([-1.161895, -0.387298, 0.387298, 1.161895], abs=1e-6)


def test_eq1_cosine_loss_by_hand_and_its_invariances():
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # pred = the raw (uncentred) tokens: cos([1,2,3,4], [-1.5,-.5,.5,1.5]) = 5 / sqrt(150)
    assert float(obj.feature_reconstruction_loss(target.clone(), target)) == pytest.approx(
        1 - 5 / math.sqrt(150), abs=1e-6
    )
    # pred = the normalised tokens: a perfect reconstruction
    assert float(obj.feature_reconstruction_loss(obj.normalize_tokens(target), target)) == pytest.approx(0.0, abs=1e-6)
    # Eq. 2 makes the target blind to a per-token shift and scale of the teacher's features
    pred = torch.randn(5, 4)
    teacher = torch.randn(5, 4)
    a = obj.feature_reconstruction_loss(pred, teacher)
    b = obj.feature_reconstruction_loss(pred, 7.0 * teacher + 3.0)
    assert float(a) == pytest.approx(float(b), abs=1e-5)
    # the teacher side is a target: no gradient reaches it
    teacher.requires_grad_(True)
    pred.requires_grad_(True)
    obj.feature_reconstruction_loss(pred, teacher).backward()
    assert teacher.grad is None and pred.grad is not None


def test_lut_loss_by_hand():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, 0.0]])
    # 2 - 2 cos: orthogonal 2, aligned 0, opposite 4 -> mean 2
    assert float(obj.lut_loss(s, t)) == pytest.approx(2.0)
    assert float(obj.lut_loss(s[1:2], t[1:2])) == pytest.approx(0.0, abs=1e-6)
    t.requires_grad_(True)
    s.requires_grad_(True)
    obj.lut_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


# ---------------------------------------------------------------------------------------------
# Eq. 3 / 4: Sinkhorn pseudo labels, cross-entropy direction, nearest teacher patches


def test_sinkhorn_by_hand_and_its_marginals():
    # an already balanced matrix: every row keeps its softmax
    q = obj.sinkhorn_knopp(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), temperature=1.0, iterations=3)
    e = math.e
    assert q.tolist() == [pytest.approx([e / (e + 1), 1 / (e + 1)]), pytest.approx([1 / (e + 1), e / (e + 1)])]
    # all-equal logits: uniform assignments
    assert torch.allclose(obj.sinkhorn_knopp(torch.zeros(6, 3), 0.1), torch.full((6, 3), 1 / 3))
    # every row a distribution; prototypes used equally once converged
    torch.manual_seed(0)
    q = obj.sinkhorn_knopp(torch.randn(12, 4) * 0.1, temperature=0.5, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(12), atol=1e-6)
    assert torch.allclose(q.sum(dim=0), torch.full((4,), 3.0), atol=1e-3)


def test_cross_entropy_direction_teacher_to_student():
    target = torch.tensor([[1.0, 0.0]], requires_grad=True)  # the teacher's pseudo label
    logits = torch.tensor([[2.0, 0.0]], requires_grad=True)  # the student's
    loss = obj.soft_cross_entropy(target, logits, temperature=1.0)
    assert float(loss.detach()) == pytest.approx(math.log(1 + math.exp(-2)))  # -log softmax(s)[0]
    loss.backward()
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    assert logits.grad[0].tolist() == pytest.approx((p - torch.tensor([1.0, 0.0])).tolist())  # softmax - target
    assert target.grad is None  # stop-gradient on the teacher
    # the other direction is another number: H(t, s) != H(s, t)
    swapped = obj.soft_cross_entropy(torch.softmax(torch.tensor([[2.0, 0.0]]), -1), torch.tensor([[1.0, 0.0]]), 1.0)
    assert float(swapped) != pytest.approx(float(loss.detach()))
    # temperature divides the student logits: T = 0.5 doubles them
    t2 = obj.soft_cross_entropy(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), 0.5)
    assert float(t2) == pytest.approx(math.log(1 + math.exp(-2)))


def test_nearest_teacher_patch_targets_by_hand():
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    teacher = torch.tensor([[[0.0, 2.0], [3.0, 0.1], [-1.0, 0.0]]])  # (1, 3, 2), across folds
    labels = torch.eye(3)[None]  # teacher token i's label = one-hot i
    out = obj.nearest_targets(student, teacher, labels)
    assert out[0].argmax(dim=-1).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------
# EMA teachers


def test_ema_update_by_hand_without_gradients():
    student, teacher = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1)), None
    nn.init.constant_(student[0].weight, 3.0)
    teacher = obj.frozen_copy(student)
    nn.init.constant_(teacher[0].weight, 1.0)
    student[1].running_mean.fill_(2.0)
    student[1].num_batches_tracked.fill_(5)
    obj.ema_update(teacher, student, momentum=0.75)
    assert float(teacher[0].weight) == pytest.approx(0.75 * 1 + 0.25 * 3)
    assert float(teacher[1].running_mean) == pytest.approx(0.25 * 2.0)  # float buffers: EMA
    assert int(teacher[1].num_batches_tracked) == 5  # integer buffers: copied
    assert all(not p.requires_grad and p.grad is None and p.grad_fn is None for p in teacher.parameters())
    assert not teacher.training


def test_cosine_momentum_schedule():
    assert obj.cosine_schedule(0.996, 1.0, 0, 100) == pytest.approx(0.996)
    assert obj.cosine_schedule(0.996, 1.0, 50, 100) == pytest.approx(0.998)
    assert obj.cosine_schedule(0.96, 0.99, 10, 10) == pytest.approx(0.99)


@pytest.mark.parametrize("method", ["lut", "pseudo-mae"])
def test_teachers_get_no_gradient_and_stay_out_of_the_optimizer(method):
    model = model_of(method)
    teachers = [p for n, p in model.named_parameters() if n.startswith(model.teacher_prefixes)]
    assert teachers and all(not p.requires_grad for p in teachers)
    optimizer = build_optimizer(model, 1e-3, 0.05)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teachers}
    assert {id(p) for p in model.parameters() if p.requires_grad} == in_optimizer
    loss, _, _ = model(torch.randn(4, 2, 3, 32, 32), 0.75)
    loss.backward()
    assert all(p.grad is None for p in teachers)
    assert all(
        p.grad is not None
        for p in model.parameters()
        if p.requires_grad and p.dim() > 0 and p is not model.decoder_pos_embed
    )
    assert all(not m.training for prefix in model.teacher_prefixes for m in getattr(model, prefix[:-1]).modules())


def test_lut_teacher_update_per_iteration():
    model = model_of("lut")
    with torch.no_grad():
        model.encoder.cls_token.add_(1.0)  # the student moves away from its copy
    before = model.teacher["encoder"].cls_token.clone()
    model.update_teachers(step=1, steps_per_epoch=4, epochs=2)  # first update: momentum 0.996
    expected = 0.996 * before + 0.004 * model.encoder.cls_token
    assert torch.allclose(model.teacher["encoder"].cls_token, expected)


def test_pseudo_mae_teachers_update_per_iteration_and_per_epoch():
    model = model_of("pseudo-mae")
    with torch.no_grad():
        model.encoder.cls_token.add_(1.0)
    rec0, cl0 = model.teacher_rec.cls_token.clone(), model.teacher_cl["encoder"].cls_token.clone()
    model.update_teachers(step=1, steps_per_epoch=2, epochs=3)  # mid-epoch: only the labelling teacher
    assert torch.equal(model.teacher_rec.cls_token, rec0)
    cl1 = model.teacher_cl["encoder"].cls_token.clone()
    assert torch.allclose(cl1, 0.996 * cl0 + 0.004 * model.encoder.cls_token)
    model.update_teachers(step=2, steps_per_epoch=2, epochs=3)  # end of epoch 0: rec momentum 0.96
    assert torch.allclose(model.teacher_rec.cls_token, 0.96 * rec0 + 0.04 * model.encoder.cls_token)
    m = obj.cosine_schedule(0.996, 1.0, 1, 6)
    assert torch.allclose(model.teacher_cl["encoder"].cls_token, m * cl1 + (1 - m) * model.encoder.cls_token)


# ---------------------------------------------------------------------------------------------
# shapes, parameter counts, checkpoints


def _block_params(d, r=4):
    return 2 * 2 * d + 3 * d * d + 3 * d + d * d + d + d * r * d + r * d + r * d * d + d


def test_shapes_and_parameter_counts():
    D, dec, p, L = 128, 128, 8, 16
    decoder = lambda out: dec * D + dec + dec + 2 * _block_params(dec) + 2 * dec + dec * out + out  # noqa: E731
    encoder = sum(x.numel() for x in build_encoder(ARCH, 32).parameters() if x.requires_grad)
    views = torch.randn(2, 2, 3, 32, 32)
    m = model_of("mae")
    loss, pred, mask = m(views[:, :1], 0.75)
    assert pred.shape == (2, L, p * p * 3) and mask.shape == (2, L) and mask.sum(1).tolist() == [12, 12]
    assert parameter_summary(m) == {"trainable": encoder + decoder(p * p * 3), "encoder": encoder, "teachers": 0}
    m = model_of("lut")
    _, pred, mask = m(views, 0.75)
    assert pred.shape == (2, L, p * p * 3) and mask.sum(1).tolist() == [12, 12]
    H = 64
    mlp = D * H + 2 * H + H * D  # Linear, BatchNorm (weight, bias), Linear; no biases
    assert parameter_summary(m) == {
        "trainable": encoder + decoder(p * p * 3) + 2 * mlp,
        "encoder": encoder,
        "teachers": encoder + mlp,  # momentum encoder + projector
    }
    m = model_of("pseudo-mae")
    _, pred, mask = m(views, 0.75)
    assert pred.shape == (2, L, D)  # the decoder predicts tokens
    head = D * 48 + 48 + 48 * 48 + 48 + 48 * 16 + 16 + 32 * 16
    assert parameter_summary(m) == {
        "trainable": encoder + decoder(D) + 2 * head,
        "encoder": encoder,
        "teachers": 2 * encoder + 2 * head,  # reconstruction teacher; labelling teacher + its heads
    }
    with pytest.raises(ValueError, match=r"\(B, 2, 3, H, W\)"):
        m(views[:, :1], 0.75)


@pytest.mark.parametrize("method", ["lut", "pseudo-mae"])
def test_teachers_resume_with_the_state_and_stay_out_of_the_checkpoint(method, tmp_path):
    from pipeline.pretrain.checkpoints import load_encoder, mae_layout

    model = model_of(method)
    state = model.state_dict()
    assert any(k.startswith(model.teacher_prefixes) for k in state)  # in the resumable state
    exported = mae_layout(export_state_dict(model))
    assert not any(k.startswith(model.teacher_prefixes) for k in exported)
    assert "cls_token" in exported and "blocks.0.attn.qkv.weight" in exported  # MAE's layout
    torch.save({"model": exported, "arch": model.arch, "img_size": 32}, tmp_path / "ck.pth")
    encoder = load_encoder(tmp_path / "ck.pth", external=True)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.state_dict().items())
    clone = build_pretrain_model(cell(method), settings())
    clone.load_state_dict(state)  # a resume restores the teachers
    for prefix in model.teacher_prefixes:
        a, b = getattr(model, prefix[:-1]).state_dict(), getattr(clone, prefix[:-1]).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# datasets (single images of an ImageNet-layout root, as CropMAE)


@pytest.mark.parametrize("method, views", [("mae", 1), ("lut", 2), ("pseudo-mae", 2)])
def test_datasets_are_registered_and_deterministic(method, views, tmp_path):
    assert method in STRATEGIES
    root = write_imagenet(tmp_path / "imagenet", n=6)
    ds = build_dataset(cell(method), settings(), seed=3, imagenet_root=root)
    x = ds[(0, 1)]
    assert x.shape == (views, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, ds[(0, 1)])  # a function of (seed, epoch, index)
    assert not torch.equal(x, ds[(1, 1)])
    if views == 2:
        assert not torch.equal(x[0], x[1])  # two augmentations of the image


@pytest.mark.fault
def test_single_image_methods_follow_the_bad_image_policy(tmp_path):
    """CropMAE's reader's policy: an unreadable image is skipped for a seeded substitute and listed;
    above ``max_reject_fraction`` it is an error naming the listing."""

    from pipeline.data.readers import list_imagenet
    from pipeline.imaging import TooManyRejectsError
    from pipeline.pretrain.mae_family_data import SingleImageDataset

    root = write_imagenet(tmp_path / "imagenet", n=8)
    bad = write_bad_images(root / "train" / "n00000000")
    records, listing = list_imagenet(root), tmp_path / "rejects.csv"
    make = lambda fraction: SingleImageDataset(  # noqa: E731
        records,
        method="lut",
        img_size=32,
        seed=0,
        settings=settings(),
        max_reject_fraction=fraction,
        rejects_listing=listing,
    )
    data = make(0.25)
    samples = [data[(0, i)] for i in range(len(data))]
    assert all(x.shape == (2, 3, 32, 32) and torch.isfinite(x).all() for x in samples)
    assert sorted(r[2] for r in data.rejects.rows.values()) == sorted(map(str, bad))
    assert all(torch.equal(a, make(0.25)[(0, i)]) for i, a in enumerate(samples))  # seeded substitutes
    strict = make(0.1)
    with pytest.raises(TooManyRejectsError, match="lut images: 2 of 10"):
        for i in range(len(strict)):
            strict[(0, i)]


# ---------------------------------------------------------------------------------------------
# training: resume is exact with the teachers, the checkpoint loads


@pytest.mark.parametrize("method", ["lut", "pseudo-mae"])
def test_resume_with_the_teachers_continues_the_same_curve(method, tmp_path):
    """A run killed in epoch 1 resumes from its epoch-0 state, teachers included, onto the very loss
    curve and weights of an uninterrupted run; the released checkpoint holds no teacher and loads."""
    from pipeline.data.readers import list_imagenet
    from pipeline.pretrain.checkpoints import load_encoder
    from pipeline.pretrain.mae_family_data import SingleImageDataset

    class Crashing(SingleImageDataset):
        def __getitem__(self, key):
            if key[0] >= 1:
                raise RuntimeError("simulated crash")
            return super().__getitem__(key)

    images = list_imagenet(write_imagenet(tmp_path / "imagenet", n=8))
    c, s = cell(method, epochs=2), settings()
    ds = lambda cls=SingleImageDataset: cls(images, method=method, img_size=32, seed=3, settings=s)  # noqa: E731
    full = train(c, s, ds(), seed=0, output=tmp_path / "a.pth", state_dir=tmp_path / "sa")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(c, s, ds(Crashing), seed=0, output=tmp_path / "b.pth", state_dir=tmp_path / "sb")
    state = torch.load(tmp_path / "sb" / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and any(k.startswith(("teacher.", "teacher_rec.")) for k in state["model"])
    resumed = train(c, s, ds(), seed=0, output=tmp_path / "b.pth", state_dir=tmp_path / "sb")
    assert resumed["loss"] == full["loss"] and resumed["step"] == full["step"] == [0, 1, 2, 3]
    a, b = (torch.load(tmp_path / p, weights_only=True)["model"] for p in ("a.pth", "b.pth"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith(("teacher", "teacher_rec.", "teacher_cl.")) for k in a)
    assert torch.equal(load_encoder(tmp_path / "a.pth").cls_token, a["cls_token"])


# ---------------------------------------------------------------------------------------------
# GFLOPs per sample (teachers counted) and the MAE-family table


@pytest.mark.parametrize("method", ["mae", "lut", "pseudo-mae"])
def test_gflops_count_matches_the_hand_count_with_teachers(method):
    from pipeline.pretrain.method_flops import analytic_gmacs, cell_costs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = cell_costs(cell(method), settings())
    assert row["gflops"] == pytest.approx(analytic_gmacs(cell(method), settings()), rel=1e-5)
    assert row["cell"] == cell_path(cell(method))


def test_teachers_are_counted():
    """LUT = MAE's forward + the second masked view, the heads and the momentum encoder on both
    whole views; the momentum side alone costs more than MAE's whole forward here."""
    from pipeline.pretrain.method_flops import _embed, _encoder, analytic_gmacs
    from pipeline.pretrain.models_mae import resolve_arch

    s, a = settings(), resolve_arch(ARCH)
    lut, mae = analytic_gmacs(cell("lut"), s), analytic_gmacs(cell("mae"), s)
    teacher = (2 * _embed(a, 16) + 2 * _encoder(a, 17) + 2 * (2 * 128 * 64 + 2 * 64)) / 1e9
    student_extra = (_embed(a, 16) + _encoder(a, 5) + 4 * (2 * 128 * 64 + 5 * 64)) / 1e9
    assert lut == pytest.approx(mae + student_extra + teacher)
    assert teacher > mae


def test_mae_family_table_rows_costs_and_reference(tmp_path):

    from pipeline import table_registry
    from pipeline.report import summary
    from pipeline.report.table import REFERENCE_ROW, build_table

    cells = [cell("mae"), cell("lut"), cell("pseudo-mae")]
    files = []
    for k, c in enumerate(cells):
        for seed, davis in ((0, 30.0 + k), (1, 32.0 + k)):
            files += write_eval(tmp_path, model_path(c, seed), davis, 10.0, 20.0)
    files += write_eval(tmp_path, "random-init/arch~vit_mini_patch8/seed~0", 20.0, 9.0, 15.0)
    costs = tmp_path / "costs.csv"
    rows = [
        {
            **{k: c[k] for k in CELL_KEYS},
            "cell": cell_path(c),
            "gflops": 0.1 * (i + 1),
            "params_m": 1.0,
            "encoder_params_m": 0.8,
            "teacher_params_m": 0.5 * i,
        }
        for i, c in enumerate(cells)
    ]
    pd.DataFrame(rows).to_csv(costs, index=False)
    table, _ = build_table("mae_family", files, "test", gflops=str(costs))
    assert list(table["method"]) == ["MAE", "LUT", "Pseudo MAE", REFERENCE_ROW]
    assert table["davis_jf_m"].tolist()[:3] == [31.0, 32.0, 33.0]
    assert table["davis_jf_m_std"].tolist()[0] == pytest.approx(math.sqrt(2))
    assert table["gflops"].tolist()[:3] == pytest.approx([0.1, 0.2, 0.3])
    assert table["teacher_params_m"].tolist()[:3] == [0.0, 0.5, 1.0]
    assert math.isnan(table["gflops"].iloc[3])  # the random-init reference
    md = summary.summary_markdown({"mae_family": table}, "test", "Data: synthetic.")
    assert "this project's extension" in md and "| GFLOPs |" in md and "31.0 ± 1.4" in md
    assert table_registry.TABLES["mae_family"].extension and "mae_family" not in table_registry.PAPER_TABLES


# ---------------------------------------------------------------------------------------------
# cdgmae-lut: LUT's loss on the anchors' unmasked tokens, composed with the cross-view setting


def test_cdgmae_lut_cells_keep_their_views_and_compose_additively(repo_root):
    from pipeline.cells import canonical_cell
    from pipeline.config import load_config
    from pipeline.pretrain.models_mae import CrossViewMAE
    from pipeline.pretrain.models_mae_family import CrossViewLUT

    config = load_config(repo_root / "config.yaml")
    c = canonical_cell({"method": "cdgmae-lut", "anchors": 3, "anchor_mask": 0.25}, config)
    assert (c["anchors"], c["anchor_mask"], c["generator"]) == (
        3,
        0.25,
        config["pretrain"]["cell_defaults"]["generator"],
    )
    s = settings()
    full = resolve_cell({"method": "cdgmae-lut", "arch": ARCH, "anchors": 3, "anchor_mask": 0.25, "epochs": 1}, s)
    torch.manual_seed(0)
    model = build_pretrain_model(full, s).train()
    assert isinstance(model, CrossViewLUT) and not model.teacher.training
    torch.manual_seed(0)
    plain = CrossViewMAE(ARCH, 32).train()  # the same init: the heads are built after it
    views = torch.randn(3, 4, 3, 32, 32)
    torch.manual_seed(5)
    loss, _, _ = model(views, 0.75, 0.25)
    torch.manual_seed(5)
    reference, _, _ = plain(views, 0.75, 0.25)  # the same masks and dropout draws
    assert float(model.last_terms["mae"]) == pytest.approx(float(reference.detach()), abs=1e-6)
    assert float(loss.detach()) == pytest.approx(
        float(model.last_terms["mae"] + model.weight * model.last_terms["bc"]), abs=1e-6
    )
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not any(k.startswith("teacher.") for k in export_state_dict(model))


def test_cdgmae_lut_trains_on_a_bag_and_its_teacher_is_counted(tmp_path):

    from pipeline.pretrain.method_flops import _embed, _encoder, cell_costs
    from pipeline.pretrain.models_mae import resolve_arch
    from pipeline.pretrain.strategies import BagViewsDataset

    s = settings(batch_size=8, micro_batch=8, samples_per_epoch=8)
    c = resolve_cell({"method": "cdgmae-lut", "arch": ARCH, "anchors": 2, "anchor_mask": 0.25, "epochs": 1}, s)
    ds = BagViewsDataset(tiny_bag(8), img_size=32, anchors=2, target="either", seed=3)
    history = train(c, s, ds, seed=0, output=tmp_path / "ck.pth", state_dir=tmp_path / "state")
    assert len(history["loss"]) == 1 and math.isfinite(history["loss"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lut = cell_costs(c, s)["gflops"]
        base = cell_costs({**c, "method": "cdgmae"}, s)["gflops"]
    a, H, N = resolve_arch(ARCH), 64, 2
    extra = _embed(a, 16) + _encoder(a, 17) + (2 * 128 * H + 2 * H) + N * 2 * (2 * 128 * H + 5 * H)
    assert lut - base == pytest.approx(extra / 1e9, abs=2e-6)  # the teacher's whole target + the heads
