"""Training-sample throughput of ``pipeline.pretrain.strategies`` vs a reference-style transform pipeline.

    OMP_NUM_THREADS=1 python -m bench.bench_strategies [--size 256 --img-size 224 --samples 200]

Both sides start from decoded HxWx3 uint8 arrays (a bag of 1 real + 4 views, or one image) so the
figure is the augmentation cost alone (JPEG decoding is the views stage's, and the same for both):

- ours: uint8 tensor crop + antialiased bilinear resize per view, one stacked normalization;
- baseline (CropMAE's data code, same sampling): PIL images, ``RandomResizedCrop``-style box from the
  torch RNG, ``F.resized_crop`` on PIL per view, then per-view ``ToImage / ToDtype / Normalize``
  (torchvision.transforms.v2), stacked.

Prints samples/s and the speed-up. Memory per sample is the output tensor for both sides
((1 + N) x 3 x S x S float32, 2.4 MiB at N = 3, 224 px) plus one uint8 crop per view; torch CPU
allocations are invisible to tracemalloc, so no peak figure is printed.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import interleaved_seconds, print_table_header, print_table_row


def reference_cdgmae(images, img_size, generator):
    """One shared box and flip for target + anchors, PIL path (SiamMAE/CropMAE DoubleRRC style)."""
    import torch
    import torchvision.transforms.v2 as T2
    from PIL import Image
    from torchvision.transforms import functional as F

    from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD

    pils = [Image.fromarray(im) for im in images]
    i, j, h, w = T2.RandomResizedCrop.get_params(pils[0], scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
    flip = torch.rand(1, generator=generator).item() < 0.5
    post = T2.Compose([T2.ToImage(), T2.ToDtype(torch.float32, scale=True), T2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    out = []
    for im in pils:
        crop = F.resized_crop(im, i, j, h, w, [img_size, img_size], antialias=True)
        out.append(post(F.hflip(crop) if flip else crop))
    return torch.stack(out)


def reference_cropmae(image, img_size):
    """CropMAE GlobalToLocal on PIL: RRC global, RRC of the resized global, per-view flip + post."""
    import torch
    import torchvision.transforms.v2 as T2
    from PIL import Image

    from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD

    g = T2.RandomResizedCrop(img_size, scale=(0.1, 1.0), antialias=True)
    loc = T2.RandomResizedCrop(img_size, scale=(0.3, 0.6), antialias=True)
    post = T2.Compose(
        [
            T2.RandomHorizontalFlip(),
            T2.ToImage(),
            T2.ToDtype(torch.float32, scale=True),
            T2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    glob = g(Image.fromarray(image))
    local = loc(glob)
    return torch.stack([post(local), post(glob)])


def samples_per_second(fn, n, repeats=3):
    """Best-of-``repeats`` samples/s over ``n`` calls (the machine is shared)."""
    fn(0)  # warm-up (imports, first allocations)
    (seconds,) = interleaved_seconds({"fn": lambda: [fn(k) for k in range(n)]}, repeats).values()
    return n / min(seconds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="side of the stored images")
    ap.add_argument("--img-size", type=int, default=224, help="training crop side")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--anchors", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from pipeline.pretrain.augment import normalize, to_chw
    from pipeline.pretrain.strategies import BagViewsDataset, GlobalToLocalDataset

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)  # noqa: E731
    bag = [{"image_id": f"c/{i}", "index": i, "real": img(), "views": [img() for _ in range(4)]} for i in range(8)]
    ours_bag = BagViewsDataset(bag, img_size=args.img_size, anchors=args.anchors, target="either", seed=0)
    g2l = GlobalToLocalDataset([], img_size=args.img_size, seed=0)
    gen = torch.Generator().manual_seed(0)

    def ref_bag(k):
        item = bag[k % len(bag)]
        images = [item["real"]] + item["views"]
        return reference_cdgmae(images[: 1 + args.anchors], args.img_size, gen)

    def ours_crop(k):  # GlobalToLocalDataset.sample minus reading the file
        image = to_chw(bag[k % len(bag)]["real"])
        _, _, glob, local = g2l.crops(image, g2l.rng(0, k))
        return normalize(torch.stack([local, glob]))

    rows = [
        (f"cdgmae 1+{args.anchors} views", "reference-style (PIL, per-view post)", lambda k: ref_bag(k)),
        (f"cdgmae 1+{args.anchors} views", "strategies.BagViewsDataset", lambda k: ours_bag[(0, k % len(bag))]),
        (
            "cropmae global+local",
            "reference-style (PIL GlobalToLocal)",
            lambda k: reference_cropmae(bag[k % 8]["real"], args.img_size),
        ),
        ("cropmae global+local", "strategies.GlobalToLocalDataset", ours_crop),
    ]
    print(f"{args.size}px stored images -> {args.img_size}px crops, 1 thread, {args.samples} samples each")
    print_table_header(["strategy", "implementation", "samples/s", "speed-up"])
    base = None
    for k, (strategy, name, fn) in enumerate(rows):
        rate = samples_per_second(fn, args.samples)
        base = rate if k % 2 == 0 else base
        print_table_row([strategy, name, f"{rate:.0f}", f"{rate / base:.2f}"])


if __name__ == "__main__":
    main()
