"""CASS: Cross-Architectural Self-Supervision, the reference implementation in one file.

CASS (Singh, Sizikova, Cirrone 2022, arXiv 2206.04170) trains a CNN and a vision transformer
together without labels: one augmented batch goes through both encoders, and the loss pulls
each image's two outputs together (BYOL's normalised MSE, eq. 1):

    loss = mean_over_batch( 2 - 2 * < R / max(||R||, eps), T / max(||T||, eps) > )

Gradients flow into both encoders; there is no momentum encoder, no stop-gradient and no
negative pairs. Afterwards each arm is fine-tuned on a few labels on its own (focal loss).

    python cass.py pretrain --data digits --preset tiny     # built in, no download: minutes on a CPU
    python cass.py pretrain --data brain_mri --root DIR     # the paper's settings, on a GPU
    python cass.py finetune --init runs/RUN --arm cnn --label-fraction 0.1
    python cass.py evaluate --ckpt runs/FT/best.pt [--ckpt runs/FT2/best.pt]   # a model or an ensemble
    python cass.py predict --ckpt runs/FT/best.pt --images DIR_OR_CSV --out predictions.csv
    torchrun --nproc_per_node=4 cass.py pretrain ...        # data-parallel pretraining

Where this file differs from the authors' notebooks, deliberately: gradients are zeroed every step (they never are);
SWA is real (AveragedModel from --swa-start, once per epoch, BatchNorm statistics recomputed for the averaged CNN;
theirs does nothing); the cosine schedule moves once per epoch (they step it per batch: --sched-unit step);
pretraining sees the whole training split, not the 10% labelled subset; metrics are scikit-learn's, named for what
they are (their "F1" is micro recall accumulated across epochs); focal-loss weights are inverse frequency and weigh
each image by its class (theirs, --class-weights paper, weigh the majority most, per column: Adam cancels them); the
ViT is validated and saved as itself, and no evaluation loader drops images; splits are stratified, nested (1% in
10% in 100%) and committed; checkpoints are state_dicts (weights_only); augmentation follows the paper's text:
ColorJitter *or* RandomPerspective, then RandomAffine, then the flips (the notebooks apply two ColorJitters).

Measured on 2 CPU cores: from random initialisation the published objective collapses within the first epoch (one
constant from both encoders; the loss ~0): the epoch line's monitor says COLLAPSE, and --objective cass-vc --lr 1e-4
is the opt-in change that keeps both arms spread (README, "Learning without ImageNet weights").
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

# ==== Config: the paper's values, each with its source; the tiny preset overrides some of them ===================

PAPER = dict(
    cnn="resnet50",  # paper 3
    vit="vit_base_patch16_384",  # paper 3
    patch_size=None,  # the ViT's own
    img_size=384,  # Resize(384, 384), paper B.1.2
    out_dim=1000,  # both heads are timm's 1000-way ImageNet classifiers, paper 3
    pretrained=True,  # ImageNet initialisation, paper 3 (random initialisation: ablation C.4)
    epochs=100,  # pretraining, paper B.1.3
    batch_size=16,  # paper B.1.3 (8 and 32 in C.2)
    lr=1e-3,  # Adam, both encoders, paper B.1.3
    t_max=16, eta_min=1e-6,  # cosine annealing, paper B.1.3 (what T_max 16 does: cosine_schedule)
    ft_epochs=50,  # fine-tuning, at most, paper 4.2
    ft_batch_size=16,  # paper B.2.2
    ft_lr=3e-4,  # paper B.2.2
    patience=5,  # early stopping on the validation loss, paper 4.2
    focal_alpha=1.0, focal_gamma=2.0,  # paper 4.2, B.2.2
    workers=4,  # data-loader processes (not the paper's; at most the machine's cores)
)
TINY = dict(cnn="resnet18", vit="vit_tiny_patch16_224", patch_size=8, img_size=64, out_dim=256, pretrained=False,
            epochs=3, batch_size=64, ft_epochs=15, workers=2)  # CPU runs in minutes, random initialisation
LABEL_FRACTIONS = {1.0: "train", 0.1: "train_10pct", 0.01: "train_1pct"}  # paper 5
HEADLINE = {"brain_mri": "f1_macro", "isic2019": "balanced_accuracy", "autoimmune": "f1_macro"}  # paper 4.3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # paper B.1.2, both arms
MONITOR = dict(bank=500, queries=250, k=20)  # k-NN monitor: training images in the bank, validation queries
LOG_EVERY = 10  # steps between reads of the running statistics from the device
HERE = Path(__file__).resolve().parent  # data_splits/ is looked up beside this file

class UserError(Exception):
    """A mistake the user can fix: printed as one sentence, exit status 2, no traceback."""

# ==== Data and splits (the readers of each dataset's layout are under "Dataset layouts" below) ===================

@dataclass
class Table:
    """A dataset: image keys, labels (key -> multi-hot float32 [C]; none for unlabelled images), classes and the
    curators' splits. A key is a path under `image_dir` (plus `suffix`), or "array/index" (the built-in digits)."""
    name: str
    classes: list
    multilabel: bool
    labels: dict
    keys: list
    given: dict = field(default_factory=dict)  # split name -> keys (e.g. the curators' test set)
    image_dir: str = ""
    suffix: str = ""
    arrays: dict = None  # name -> uint8 images [N, H, W] or [N, H, W, C]
    window: list = None  # DICOM: one [centre, width] for every file (--window), else each file's own (read_dicom)
    def path(self, key):
        return Path(self.image_dir) / f"{key}{self.suffix}"
    def strata(self, keys):
        """The class that stratifies each key: its class, or its rarest positive label."""
        if not self.multilabel:
            return [int(np.argmax(self.labels[k])) for k in keys]
        freq = np.sum([self.labels[k] for k in keys], axis=0)
        return [int(p[np.argmin(freq[p])]) if len(p) else -1 for p in (np.flatnonzero(self.labels[k]) for k in keys)]

def _stratified(keys, strata, count_of_class, rng):
    """Per class, a seeded shuffle of its members and the first `count_of_class(c, n)` of them."""
    picked = set()
    for c in sorted(set(strata)):
        members = [k for k, s in zip(keys, strata) if s == c]
        picked.update(members[i] for i in rng.permutation(len(members))[:count_of_class(c, len(members))])
    return [k for k in keys if k in picked]  # the table's order

def make_splits(table, seed=0, val_fraction=0.1, test_fraction=0.1):
    """train/val/test and nested label fractions, stratified, seeded. The curators' splits are kept; else test and val
    take their fraction of each class; train_10pct 10% of train, train_1pct 1% of it, from it (each keeps one)."""
    rng = np.random.default_rng(seed)
    labelled = [k for k in table.keys if k in table.labels]
    splits = {s: list(v) for s, v in table.given.items()}
    def take(pool, frac):  # a class keeps one image for training (a single image goes to train)
        return _stratified(pool, table.strata(pool), lambda c, n: min(n - 1, max(1, round(frac * n))), rng)
    if "test" not in splits:
        splits["test"] = take(labelled, test_fraction)
    if "val" not in splits:
        pool = [k for k in labelled if k not in set(splits["test"])]
        splits["val"] = take(pool, val_fraction if table.given.get("test") else val_fraction / (1 - test_fraction))
    if "train" not in splits:
        used = set(splits["test"]) | set(splits["val"])
        splits["train"] = [k for k in table.keys if k not in used]
    train = [k for k in splits["train"] if k in table.labels]
    strata = table.strata(train)
    ten = splits["train_10pct"] = _stratified(train, strata, lambda c, n: max(1, round(0.1 * n)), rng)
    one = lambda c, n: min(n, max(1, round(0.01 * strata.count(c))))  # noqa: E731 (1% of the class in train)
    return {**splits, "train_1pct": _stratified(ten, table.strata(ten), one, rng)}

def missing_images(table, keys):
    """The keys whose image is absent (one stat per file: datasets hold 25,000); 0-byte files stop the run."""
    def size(k):  # -1: absent
        name, _, i = k.partition("/")  # the built-in digits: "array/index"
        with contextlib.suppress(OSError, LookupError, ValueError):
            return table.path(k).stat().st_size if table.arrays is None else table.arrays[name][int(i)].size
        return -1
    sizes = {k: size(k) for k in keys}
    if empty := [k for k, n in sizes.items() if n == 0]:
        raise UserError(f"{len(empty)} image file(s) are empty (first: {table.path(empty[0])}); remove or replace them")
    return [k for k, n in sizes.items() if n < 0]

def load_splits(cfg, table):
    """The run's splits (name -> keys) and their source: data_splits/<data> beside this file where it exists, `auto`
    (seed 0, from the images on disk) or a folder of split files; a resumed run, those it wrote (less images gone)."""
    committed, own = HERE / "data_splits" / table.name, Path(cfg.get("out") or "") / "splits"
    resumed = bool(cfg.get("resume")) and (own / "train.csv").is_file()
    choice = own if resumed else cfg["splits"] or ("committed" if committed.is_dir() else "auto")
    folder, splits = committed if choice == "committed" else Path(choice), dict(all=table.keys)
    if choice != "auto":
        names = [n for n in ("train", "val", "test", "train_10pct", "train_1pct") if (folder / f"{n}.csv").is_file()]
        if not {"train", "val", "test"} <= set(names):
            raise UserError(f"{folder} holds no train.csv, val.csv and test.csv; use --splits auto to compute splits")
        splits = {n: list(dict.fromkeys(r[0] for r in read_csv(folder / f"{n}.csv")[1])) for n in names}
    listed, source = sorted(set().union(*splits.values())), f"--data {table.name}" if choice == "auto" else folder
    if unlisted := len(set(table.keys) - set(listed)):
        print(f"note: {unlisted} of the {len(table.keys)} images of --data {table.name} are in none of the split "
              f"files in {folder}: the run leaves them out")
    missing = set(missing_images(table, listed))  # one stat per image
    if missing and choice != "auto" and not resumed:
        n, keys = next((n, k) for n, k in splits.items() if missing.intersection(k))
        raise UserError(f"{len(missing.intersection(keys))} of the {len(keys)} images that {folder / n}.csv lists are "
                        f"missing under {table.image_dir or 'the arrays'} (first: {min(missing.intersection(keys))}); "
                        "use --splits auto to compute splits from the images on disk")
    if len(missing) == len(listed):
        raise UserError(f"none of the {len(listed)} images that {source} lists exist (first: {table.path(listed[0])})"
                        if listed else f"{source} lists no image")
    if missing:
        print(f"note: {len(missing)} of the {len(listed)} images that {source} lists are not on disk (first: "
              f"{table.path(min(missing))}); the splits use the other {len(listed) - len(missing)}")
    if choice == "auto":
        return make_splits(replace(table, keys=[k for k in table.keys if k not in missing], given={
            s: [k for k in v if k not in missing] for s, v in table.given.items()}), seed=0), "auto"
    return {n: [k for k in v if k not in missing] for n, v in splits.items()}, cfg["splits"] if resumed else str(folder)

def image_tensor(img, size):
    """A PIL image or a uint8 array as the uint8 [3, size, size] both arms see (paper B.1.2: Resize(size, size))."""
    from PIL import Image
    img = Image.fromarray(img if isinstance(img, np.ndarray) else _rgb_uint8(img))
    img = img.resize((size, size), Image.BILINEAR).convert("RGB")  # grey: a third the work
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]

def decode_image(table, key, size):
    name, _, index = key.partition("/")
    return image_tensor(table.arrays[name][int(index)] if table.arrays is not None else
                        read_image(table.path(key), table.window, size), size)

class ImageDataset(Dataset):
    """A split's images, uint8 [3, size, size], and multi-hot targets [C]; items (index, seed) from EpochSampler. With
    `augment`, also the augment_params of the seed (whatever the workers); `skip_bad` (predict): zeros, target NaN."""
    def __init__(self, table, keys, size, augment=False, cache=None, skip_bad=False):
        self.table, self.keys, self.size, self.augment, self.cache = table, list(keys), size, augment, cache
        self.skip_bad, n = skip_bad, max(len(table.classes), 1)
        self.targets = torch.stack([torch.as_tensor(table.labels.get(k, np.zeros(n, np.float32))) for k in self.keys]) \
            if self.keys else torch.zeros(0, n)
    def __len__(self):
        return len(self.keys)
    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        try:
            img, target = self.cache[index] if self.cache is not None else \
                decode_image(self.table, self.keys[index], self.size), self.targets[index]
        except UserError:
            if not self.skip_bad:
                raise
            img, target = torch.zeros(3, self.size, self.size, dtype=torch.uint8), self.targets[index] * math.nan
        return img, target, *([torch.from_numpy(augment_params(seed, self.size))] if self.augment else [])  # + [15]

class EpochSampler(Sampler):
    """A seeded permutation per epoch, cut into global batches; under torchrun rank r of W takes its slice of every
    global batch, so W processes see what one sees. Yields (index, augmentation seed) pairs (DistributedSampler: no)."""
    def __init__(self, n, global_batch, seed, drop_last=True, rank=0, world=1):
        self.n, self.batch, self.seed, self.drop_last = n, global_batch, seed, drop_last
        self.rank, self.world, self.epoch = rank, world, 0
    def set_epoch(self, epoch):
        self.epoch = epoch
    def steps(self):
        return self.n // self.batch if self.drop_last else math.ceil(self.n / self.batch)
    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order, seeds, share = rng.permutation(self.n), rng.integers(0, 2**62, self.n), self.batch // self.world
        for b in range(self.steps()):
            chunk = order[b * self.batch:(b + 1) * self.batch]
            for i in chunk[self.rank * share:(self.rank + 1) * share] if self.world > 1 else chunk:
                yield int(i), int(seeds[i])
    def __len__(self):
        return self.steps() * (self.batch // self.world)

def fitted_batch(n, batch, world=1):
    """The batch for n images when each epoch drops its last partial batch: `batch`, unless that drops more than a
    tenth of them (98 at 64: 34 an epoch); then the largest that cuts them into as many full batches (98: 2 of 49)."""
    return batch if n % batch <= n / 10 else max(2 * world, n // math.ceil(n / batch) // world * world)

SMALL = 100  # a split with fewer images is said out loud: one image moves an accuracy on it by over 1%

def small_data(sizes, n=0, batch=0, asked=0):
    """The note a run's first line ends with when a split is small ({name: images}) or the batch was fitted."""
    few = ", ".join(f"{v} {k}" for k, v in sizes.items() if v < SMALL)
    return (f"\nnote: batch {batch}, not {asked}, so that each epoch sees all but {n % batch} of the {n} images"
            if batch != asked else "") + (f"\nnote: small data ({few} images, under {SMALL}): one image moves an "
                                          "accuracy on n images by 1/n; the test metric comes with a 95% bootstrap "
                                          "interval, the monitor with its standard error" if few else "")

# ==== Augmentations (paper B.1.2; the same for fine-tuning, B.2.1): drawn per image, applied to the batch ========

def augment_params(seed, size):
    """One image's draw from its own seed, in the loader: ColorJitter(0.2, 0.2, 0.2) *or* RandomPerspective(0.2) with
    p 0.3, RandomAffine(degrees=10) with p 0.3, each flip with p 0.3 (torchvision's ranges, in order). float32 [15]:
    the warp_matrix, the jitter's three factors (1: none) and their order."""
    rng, inwards, factors, order = np.random.default_rng(seed), None, np.ones(3), np.arange(3)
    if rng.random() < 0.3:
        if rng.random() < 0.5:
            factors, order = rng.uniform(0.8, 1.2, 3), rng.permutation(3)  # brightness, contrast, saturation
        else:
            inwards = rng.integers(0, int(0.2 * (size // 2)) + 1, (4, 2))  # pixels each corner moves inwards
    angle = rng.uniform(-10, 10) if rng.random() < 0.3 else 0.0
    vflip, hflip = rng.random() < 0.3, rng.random() < 0.3
    return np.concatenate([warp_matrix(size, inwards, angle, vflip, hflip).ravel(), factors, order]).astype(np.float32)

def warp_matrix(size, inwards=None, angle=0.0, vflip=False, hflip=False):
    """Output pixel -> the input point it samples, 3x3 in grid_sample's [-1, 1]: perspective (corners tl, tr, br, bl
    moved `inwards` [4, 2] px), rotation, flips, as torchvision's."""
    s, m = float(size), np.eye(3)
    if inwards is not None:  # the homography taking the moved corners back to the corners (torchvision's solve)
        start = np.array([[0, 0], [s - 1, 0], [s - 1, s - 1], [0, s - 1]])
        end = start + np.asarray(inwards) * [[1, 1], [-1, 1], [-1, -1], [1, -1]]
        a = [[x, y, 1, 0, 0, 0, -u * x, -u * y] for (x, y), (u, _) in zip(end, start)] + [
            [0, 0, 0, x, y, 1, -v * x, -v * y] for (x, y), (_, v) in zip(end, start)]
        grid = np.array([[2 / s, 0, -1], [0, 2 / s, -1], [0, 0, 1]])  # pixels (i spans [i, i + 1]) to the grid
        m = grid @ np.append(np.linalg.solve(a, np.r_[start[:, 0], start[:, 1]]), 1).reshape(3, 3) @ np.linalg.inv(grid)
    c, r = math.cos(math.radians(angle)), math.sin(math.radians(angle))  # about the centre, the grid's 0
    return m @ np.array([[c, r, 0], [-r, c, 0], [0, 0, 1]]) @ np.diag([-1 if hflip else 1, -1 if vflip else 1, 1])

def augment(x, params):
    """A uint8 batch [B, 3, S, S] on the device, augmented as its params [B, 15] (on the CPU) say; float, 0-255. Colour
    first on the images that drew it (torchvision's blends, chosen on the CPU: no sync), then one bilinear warp for all
    the geometry, black outside (torchvision resamples twice, rotating nearest). A plain image passes as it is."""
    x, grey = x.float(), lambda y: 0.2989 * y[0] + 0.587 * y[1] + 0.114 * y[2]  # [S, S], torchvision's weights
    for i in torch.nonzero(params[:, 9:12].ne(1).any(1)).flatten().tolist():
        for k in params[i, 12:].int().tolist():  # 0 brightness, 1 contrast, 2 saturation, in the drawn order
            y, f = x[i], float(params[i, 9 + k])
            x[i] = (f * y + (1 - f) * (0 if k == 0 else grey(y).mean() if k == 1 else grey(y))).clamp(0, 255)
    b, _, h, w = x.shape
    line = lambda n: torch.linspace(-1 + 1 / n, 1 - 1 / n, n, device=x.device)  # noqa: E731 (pixel centres)
    gy, gx = torch.meshgrid(line(h), line(w), indexing="ij")
    m = params.to(x.device, non_blocking=True)[:, :9].view(b, 3, 3)  # from pinned memory: no wait
    q = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(1, h * w, 3) @ m.transpose(1, 2)  # [B, H*W, 3]
    return F.grid_sample(x, (q[..., :2] / q[..., 2:]).view(b, h, w, 2), align_corners=False)

def on_device(x, params, rt):
    """A loader's batch on the training device, augmented where the loader drew `params` ([] or [[B, 15]])."""
    x = x.to(rt.device, non_blocking=True)
    return augment(x, *params) if params else x

def normalize(x):
    """uint8 [B, 3, H, W] -> float with ImageNet mean and std (paper B.1.2), for both arms. The constants go to the
    kernels as numbers: no tensor is copied from the host, so the step never waits on one (the same float32 values)."""
    x, k = x.float(), np.float32(255)
    return torch.stack([(x[:, c] - float(np.float32(m) * k)) / float(np.float32(s) * k)
                        for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))], dim=1)

# ==== Encoders: a timm CNN and a timm ViT, with heads of the same width (paper 3) ================================

def is_vit(name):
    """The one test of an encoder's kind: a ViT is built for one image size and patch size."""
    return name.startswith(("vit", "deit", "eva", "beit"))

def encoder_kwargs(name, img_size, patch_size=None):
    if not is_vit(name):
        return {}
    if patch_size and img_size % patch_size:
        raise UserError(f"--img-size {img_size} is not a multiple of the ViT patch size {patch_size}")
    return dict(img_size=img_size, **({"patch_size": patch_size} if patch_size else {}))

def create_encoder(name, num_classes, kwargs, weights=None):
    """A timm model with a `num_classes`-wide head. weights: None (random), "imagenet" (the hub, through timm), a file
    (cnn.pt / vit.pt, or a state_dict of the architecture) or a folder in timm's layout (tools/export.py, the hub)."""
    import timm
    if not timm.is_model(name):
        raise UserError(f"--{'vit' if is_vit(name) else 'cnn'} {name} is not a timm model (see timm.list_models())")
    try:
        if weights in (None, "imagenet"):
            weights and hub_offline()  # out of reach: the local cache alone, at once
            return timm.create_model(name, pretrained=weights == "imagenet", num_classes=num_classes, **kwargs)
        folder = Path(weights).is_dir()
        obj = json.load(open(Path(weights) / "config.json")) if folder else load_checkpoint(weights, "the weight file")
        found = obj.get("architecture" if folder else "model") if isinstance(obj, dict) else name
        if found != name and (folder or obj.get("format") == "cass-encoder"):
            raise UserError(f"the weight file or folder {weights} holds a {found}, not the {name} asked for; pass "
                            f"--{'vit' if is_vit(name) else 'cnn'} {found}")
        if folder:  # timm reads it (and drops a head of another width)
            return timm.create_model(f"local-dir:{weights}", pretrained=True, num_classes=num_classes, **kwargs)
        if isinstance(obj, dict) and obj.get("format") == "cass-encoder":
            return load_encoder(obj, weights, num_classes)
        return timm.create_model(name, pretrained=True, num_classes=num_classes,  # drops a head of another width
                                 pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
    except UserError:
        raise
    except Exception as e:
        if weights is None or (weights == "imagenet" and isinstance(e, RuntimeError)):
            raise
        if weights != "imagenet":
            raise UserError(f"the weights {weights} do not fit {name} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else 'unreadable'})") from None
        raise UserError(f"cannot load ImageNet weights for {name} ({type(e).__name__}: no network and no cached copy); "
                        "use --preset tiny or --no-pretrained (finetune: --init random) for random initialisation, or "
                        "--cnn-weights FILE / --vit-weights FILE for weights on disk") from None

def encoder_record(model, name, kwargs, arm, cfg, **extra):
    """An encoder checkpoint: its state_dict and what timm needs to rebuild it (weights_only-safe)."""
    model = unwrap(model)
    return dict(format="cass-encoder", model=name, num_classes=model.num_classes, kwargs=kwargs, arm=arm,
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, config=cfg, **extra)

def load_encoder(obj, path="", num_classes=None):
    """Rebuild an encoder_record(); the head is replaced when num_classes differs."""
    import timm
    if not isinstance(obj, dict) or obj.get("format") != "cass-encoder":
        raise UserError(f"{path} is not an encoder file written by cass.py (cnn.pt, vit.pt or best.pt)")
    model = timm.create_model(obj["model"], pretrained=False, num_classes=obj["num_classes"], **obj["kwargs"])
    model.load_state_dict(obj["state_dict"])
    if num_classes is not None and num_classes != obj["num_classes"]:
        model.reset_classifier(num_classes)
    return model

def unwrap(model):
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile

# ==== Losses: CASS (eq. 1), the opt-in variance and covariance terms, focal loss (paper 4.2) =====================

def cass_loss(cnn_out, vit_out, eps=1e-12):
    """eq. 1: mean over the batch of 2 - 2 cos(R, T). [B, D], [B, D] -> scalar; 0 when equal, 4 when opposite."""
    r = F.normalize(cnn_out.float(), dim=-1, eps=eps)  # R / max(||R||, eps)
    t = F.normalize(vit_out.float(), dim=-1, eps=eps)
    return (2 - 2 * (r * t).sum(dim=-1)).mean()

def variance_covariance(z, eps=1e-4):
    """VICReg's regularisers (Bardes et al. 2022) on an arm's L2-normalised outputs [B, D] times sqrt(D) (healthy: std 1
    each): a hinge on each dimension's spread (complete collapse), squared off-diagonal covariances (dimensional)."""
    d = z.shape[1]
    z = F.normalize(z.float(), dim=-1) * d**0.5
    z = z - z.mean(dim=0)
    cov = z.T @ z / (len(z) - 1)  # [D, D]
    return F.relu(1 - torch.sqrt(cov.diagonal() + eps)).mean(), (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d

OBJECTIVES = {"cass": "eq. 1 as published (the default)", "cass-vc": "eq. 1 plus variance and covariance terms on each "
              "arm's normalised outputs (opt-in: keeps a randomly initialised pair from collapsing; with --lr 1e-4)"}

def objective(cfg, r, t):
    """The pretraining loss of a step. r, t: [B, D] outputs of the CNN and the ViT."""
    loss = cass_loss(r, t)  # eq. 1, VICReg's invariance term
    if cfg["objective"] == "cass-vc":
        if dist.is_initialized() and dist.get_world_size() > 1:  # statistics of the global batch, as VICReg: every
            from torch.distributed.nn import all_gather  # process computes the same term, gradients flow to each shard
            r, t = torch.cat(all_gather(r)), torch.cat(all_gather(t))  # [B * W, D]
        (var_r, cov_r), (var_t, cov_t) = variance_covariance(r), variance_covariance(t)
        loss = loss + cfg["vc_weight"] * (var_r + var_t) + 0.04 * (cov_r + cov_t)  # VICReg's 25 : 25 : 1 at weight 1
    return loss

def focal_loss(logits, targets, alpha=1.0, gamma=2.0, class_weights=None):
    """Sigmoid focal loss (Lin et al. 2017) over multi-hot targets [B, C], mean-reduced: each class's term is
    alpha * (1 - p_t)^gamma * BCE times its class weight. gamma 0, alpha 1 and no weights: plain BCE."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")  # [B, C]
    p_t = torch.exp(-bce)  # the probability given to the true value of each class
    loss = alpha * (1 - p_t) ** gamma * bce
    return (loss * class_weights.to(loss.device) if class_weights is not None else loss).mean()

def term_weights(targets, weights, kind, multilabel):
    """Each term's weight [B, C] from the class weights [C]. A constant per column (`paper`) scales each row of a linear
    head's gradient, which Adam divides out: an image weighs its class's (multi-label: positives theirs, the rest 1)."""
    if weights is None or kind == "paper":
        return weights
    weights = weights.to(targets.device)
    return targets * weights + (1 - targets) if multilabel else (targets @ weights)[:, None].expand_as(targets)

def class_weights(counts, kind="inverse"):
    """Per-class focal-loss weights from the training split's class counts [C]. inverse (default): N / (C * count),
    rescaled to mean 1. paper: the notebooks' min-max counts in [0.2, 1], the majority 1.0 and the rarest 0.2."""
    counts = torch.as_tensor(counts, dtype=torch.float32).clamp(min=1)
    if kind == "inverse":
        w = counts.sum() / (len(counts) * counts)
        return w / w.mean()
    if kind == "paper":
        return 0.2 + 0.8 * (counts - counts.min()) / (counts.max() - counts.min()).clamp(min=1e-12)
    assert kind == "none", kind
    return None

# ==== Metrics and the collapse monitor ===========================================================================

def classification_metrics(probs, targets, multilabel, classes, interval=None):
    """scikit-learn's metrics, each named for what it is, and per class (against the rest) what clinicians report:
    sensitivity (recall), specificity, precision, F1, AUROC; quadratic-weighted kappa where the classes are grades
    (whole numbers). probs, targets: [N, C] arrays. `interval`: a metric given a 95% bootstrap interval, as AUROC."""
    from sklearn import metrics as M
    probs, targets, labels = np.asarray(probs, dtype=np.float64), np.asarray(targets), list(range(len(classes)))
    y, pred = (targets.astype(int), (probs > 0.5).astype(int)) if multilabel else (targets.argmax(1), probs.argmax(1))
    (tn, fp), (fn, tp) = M.multilabel_confusion_matrix(y, pred, labels=labels).transpose(1, 2, 0)  # [C] each
    rest = np.eye(len(classes), dtype=bool)[y] if not multilabel else y.astype(bool)  # [N, C]: a class or not
    both = (rest.sum(0) > 0) & (rest.sum(0) < len(y)) & np.isfinite(probs).all(0)  # [C]: AUROC is defined (a NaN:
    auc = [float(M.roc_auc_score(rest[:, i], probs[:, i])) if both[i] else None for i in labels]  # a diverged run)
    share = lambda a, b: float(a / (a + b)) if a + b else 0.0  # noqa: E731 (sklearn's zero_division=0)
    out = dict(per_class={c: dict(sensitivity=share(tp[i], fn[i]), specificity=share(tn[i], fp[i]), precision=share(
        tp[i], fp[i]), f1=share(2 * tp[i], fp[i] + fn[i]), auroc=auc[i], support=int(tp[i] + fn[i]))
        for i, c in enumerate(classes)}, roc_auc_ovr=None if None in auc else float(np.mean(auc)))  # macro, as sklearn
    f1 = lambda average: float(M.f1_score(y, pred, average=average, labels=labels, zero_division=0))  # noqa: E731
    if multilabel:
        present = y.sum(0) > 0
        out.update(f1_micro=f1("micro"), f1_macro=f1("macro"), f1_samples=f1("samples"), mean_average_precision=float(
            M.average_precision_score(y[:, present], probs[:, present], average="macro")) if present.any() else None)
    else:
        grades = np.array([int(c) for c in classes]) if all(c.isdigit() for c in classes) else None
        out.update(accuracy=float(M.accuracy_score(y, pred)), balanced_accuracy=float(M.balanced_accuracy_score(
            y, pred)), f1_macro=f1("macro"), f1_weighted=f1("weighted"), confusion_matrix=M.confusion_matrix(
            y, pred, labels=labels).tolist(), **({} if grades is None else dict(kappa_quadratic=float(
                M.cohen_kappa_score(grades[y], grades[pred], weights="quadratic")))))
    if interval:  # 1,000 resamples of the images, every one at once
        w = np.random.default_rng(0).multinomial(len(y), np.full(len(y), 1 / len(y)), 1000).astype(np.float64)
        chosen = np.eye(len(classes), dtype=bool)[pred] if not multilabel else pred > 0  # [N, C]
        values = resampled_metrics(probs, rest, chosen, w)
        out["ci95"] = {k: np.nanpercentile(values[k], [2.5, 97.5]).tolist() for k in (interval, "roc_auc_ovr")
                       if k in values and out.get(k) is not None}
    return out

def resampled_metrics(probs, truth, chosen, w):
    """f1_macro, balanced_accuracy and roc_auc_ovr (macro) of resamples of the images, each image weighing how often a
    resample drew it, w [R, N]; truth, chosen: [N, C] booleans (a class or not, predicted or not). Each [R]."""
    tp, fp, fn = w @ (truth & chosen), w @ (~truth & chosen), w @ (truth & ~chosen)  # [R, C] weighted counts
    with np.errstate(invalid="ignore", divide="ignore"):  # a class a resample lacks: NaN, left out of the interval
        return dict(f1_macro=np.nan_to_num(2 * tp / (2 * tp + fp + fn)).mean(1), balanced_accuracy=np.nanmean(
            tp / (tp + fn), 1), roc_auc_ovr=np.mean([weighted_auroc(probs[:, i], truth[:, i], w)
                                                     for i in range(truth.shape[1])], 0))

def weighted_auroc(score, positive, w):
    """AUROC of score [N] for positive [N] under weights w [R, N] (Mann-Whitney): the weighted share of positive and
    negative pairs the score orders right, a tie counting half. [R]; NaN where a resample lacks one of the two."""
    order = np.argsort(score, kind="stable")
    score, positive, w = score[order], positive[order], w[:, order]
    start = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])  # the first of each run of tied scores
    neg, pos = np.add.reduceat(w * ~positive, start, 1), np.add.reduceat(w * positive, start, 1)  # [R, runs]
    return (pos * (np.cumsum(neg, 1) - neg / 2)).sum(1) / (pos.sum(1) * neg.sum(1))

def output_spread(z):
    """Mean per-dimension std of the L2-normalised outputs [B, D]: ~1/sqrt(D) spread over the sphere, 0 collapsed."""
    z = F.normalize(z.float(), dim=-1)
    return z.std(dim=0).mean() if len(z) > 1 else torch.tensor(float("nan"), device=z.device)

def spectrum(z):
    """Dimensional collapse, invisible to the spread: the first principal component's share of the variance of
    the normalised outputs [N, D], and their effective rank (Roy and Vetterli 2007; D at most, 1 collapsed)."""
    z = F.normalize(z.float(), dim=-1)
    p = torch.linalg.svdvals(z - z.mean(dim=0)) ** 2 if z.isfinite().all() else torch.full((1,), math.nan)
    p = p / p.sum().clamp_min(1e-30)
    return float(p[0]), float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))

def knn_accuracy(train_x, train_y, test_x, test_y, k=20):
    """k-NN accuracy with cosine similarity, votes weighted by similarity. y: class indices."""
    train_x, test_x = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)
    top, idx = (test_x @ train_x.T).topk(min(k, len(train_x)), dim=1)  # [N_test, k]
    votes = torch.zeros(len(test_x), int(max(train_y.max(), test_y.max())) + 1)
    votes.scatter_add_(1, train_y[idx], top.clamp(min=0) + 1e-6)
    return float((votes.argmax(1) == test_y).float().mean())

@torch.no_grad()
def encode(models, loader, rt):
    """{name: (pooled features [N, F], head outputs [N, D], targets)} of `models`, unaugmented, in one pass."""
    models, got, ys = {a: unwrap(m) for a, m in models.items()}, {a: [] for a in models}, []
    was = {a: m.training for a, m in models.items()}
    for m in models.values():
        m.eval()
    for x, y in loader:
        x, ys = normalize(x.to(rt.device)), ys + [y]
        for a, m in models.items():
            with rt.autocast():
                f = m.forward_head(m.forward_features(x), pre_logits=True)  # [B, F]
                got[a].append((f.float().cpu(), m.get_classifier()(f).float().cpu()))  # and [B, D]
    for a, m in models.items():
        m.train(was[a])
    return {a: (torch.cat([f for f, _ in v]), torch.cat([o for _, o in v]), torch.cat(ys)) for a, v in got.items()}

def monitor_loaders(table, splits, cfg, rt):
    """Fixed images of train (the bank) and val (the queries), unaugmented, decoded once a run and held in memory
    (750 at most; each epoch's monitor then reads no file and starts no worker); None without class labels."""
    if table.multilabel or not table.labels:
        return None
    rng, loaders = np.random.default_rng(cfg["seed"]), {}
    for split, n in (("train", MONITOR["bank"]), ("val", MONITOR["queries"])):
        keys = [k for k in splits[split] if k in table.labels]
        keys = [keys[i] for i in sorted(rng.permutation(len(keys))[:n])]
        images = [decode_image(table, k, cfg["img_size"]) for k in Progress(keys, f"decoding the monitor's {split}")]
        dataset = ImageDataset(table, keys, cfg["img_size"], cache=torch.stack(images) if images else None)
        loaders[split] = make_loader(dataset, None, 256, cfg["workers"], rt)
    return loaders if all(len(v.dataset) > 1 for v in loaders.values()) else None  # a spread needs two

def monitor(arms, loaders, rt, baselines=False):
    """The collapse monitor on the validation queries for each encoder of `arms` ({arm: model}): outputs' spread, PC1
    share, effective rank, 20-NN against the bank (outputs, features), the arms' cosine; `baselines`: on raw pixels."""
    m, k, z = {}, MONITOR["k"], {}
    bank, queries = encode(arms, loaders["train"], rt), encode(arms, loaders["val"], rt)  # one pass each, both arms
    for arm in arms:
        (tf, to, ty), (vf, vo, vy) = bank[arm], queries[arm]
        ty, vy = ty.argmax(1), vy.argmax(1)
        m[f"knn_{arm}_out"], m[f"knn_{arm}_feat"] = knn_accuracy(to, ty, vo, vy, k), knn_accuracy(tf, ty, vf, vy, k)
        m[f"val_std_{arm}"] = float(output_spread(vo))
        m[f"pc1_{arm}"], m[f"rank_{arm}"] = spectrum(vo)
        z[arm] = F.normalize(vo, dim=-1)
    if len(z) == 2:
        m["val_cos"] = float((z["cnn"] * z["vit"]).sum(-1).mean())
    m["majority"] = float(vy.bincount().max() / len(vy))
    m["knn_se"] = 0.5 / math.sqrt(len(vy))  # the largest standard error of an accuracy on len(vy) queries
    if baselines:
        def pixels(loader):
            x = torch.cat([x for x, _ in loader]).float()
            return F.adaptive_avg_pool2d(x, min(x.shape[-1], 64)).flatten(1)
        m["knn_raw_pixels"] = knn_accuracy(pixels(loaders["train"]), ty, pixels(loaders["val"]), vy, k)
    return m

def collapse_warning(r, out_dim):
    """One sentence when an epoch's statistics say collapse (a warning: the run goes on), else ''. Judged on the
    training batches (std_*, cos_cnn_vit) and, where the monitor ran, on the validation images (val_std_*, val_cos)."""
    low = [a for a in ("cnn", "vit") if min(r.get(f"std_{a}", 1), r.get(f"val_std_{a}", 1)) < 0.1 / math.sqrt(out_dim)]
    said = [f"the {' and '.join(low)} outputs spread below a tenth of 1/sqrt(dim)"] if low else []
    said += ["the arms agree to a cosine above 0.99"] if max(r.get("cos_cnn_vit", 0), r.get("val_cos", 0)) > .99 else []
    return f"COLLAPSE: {'; '.join(said)}: a low loss means nothing (README, 'When a run collapses')" if said else ""

# ==== Pretraining (paper B.1): two encoders, one Adam, cosine schedule, SWA ======================================

def build_pair(cfg):
    """The two encoders of CASS with heads of the same width (paper 3): random, ImageNet or from files."""
    return [create_encoder(cfg[arm], cfg["out_dim"], encoder_kwargs(cfg[arm], cfg["img_size"], cfg["patch_size"]),
                           cfg[f"{arm}_weights"] or ("imagenet" if cfg["pretrained"] else None))
            for arm in ("cnn", "vit")]

def make_adam(params, lr):
    """Adam (paper B.1.3, B.2.2) in fused kernels (CPU and CUDA from torch 2.4)."""
    return torch.optim.Adam(params, lr=lr, fused=True)

def cosine_schedule(optimizer, cfg):
    """Cosine annealing, T_max 16, eta_min 1e-6 (paper B.1.3). Torch's cosine goes on after T_max: per epoch, 1e-6 at
    epoch 16 and 1e-3 again at 32, so over 100 epochs SWA's last quarter spans a rise and a fall (the paper's, kept)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["t_max"], eta_min=cfg["eta_min"])

def train_epoch(loader, step_loss, optimizer, scaler, scheduler, per_step, rt, desc, names=("loss",)):
    """One epoch of steps, in one order: zero the gradients, step_loss(x, y) -> [loss, *statistics] under autocast (x:
    the batch augmented on the device), backward, the optimiser, the schedule (per step, or once per epoch). Returns the
    means of `names` (the loss first), the first and last step's loss, the steps and the seconds spent awaiting data."""
    sums, first, waited, ready = 0, None, 0.0, time.perf_counter()  # sums and the first loss stay on the device
    bar = Progress(loader, desc, show=rt.rank == 0)
    for step, (x, y, *a) in enumerate(bar, 1):
        waited += time.perf_counter() - ready  # the CPU side (decoding, collating) was behind the step
        x = on_device(x, a, rt)  # uint8 [B, 3, H, W] -> augmented float, 0-255
        optimizer.zero_grad(set_to_none=True)  # every step (the notebooks never zero the gradients)
        with rt.autocast():
            loss, *stats = step_loss(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if per_step or step == len(loader):  # once per epoch, or per step as the notebooks
            scheduler.step()
        with torch.no_grad():  # read back every LOG_EVERY steps: the device runs ahead of the host in between
            sums = sums + torch.stack([loss.detach(), *stats]).double()
            first = loss.detach() if first is None else first
        if step % LOG_EVERY == 0 or step == len(loader):
            mean = read_stats(sums / step, rt, f"{desc}, by step {step}")
            bar.note(" ".join(f"{n} {v:.4f}" for n, v in zip(names, mean)))
        ready = time.perf_counter()
    first, last = read_stats(torch.stack([first, loss.detach()]).double(), rt, desc)
    return dict(zip(names, mean), loss_first_step=first, loss_last_step=last, steps=step, data_seconds=waited)

def pretrain_epoch(cnn, vit, loader, optimizer, scaler, scheduler, rt, cfg, epoch):
    """One epoch of CASS; returns the means of the loss and of the step's collapse statistics (train_epoch)."""
    cnn.train()
    vit.train()
    def step(x, _):
        x = normalize(x)  # one view for both arms
        r, t = cnn(x), vit(x)  # [B, D] outputs of the CNN and of the ViT
        with torch.no_grad():
            cos = (F.normalize(r.float(), dim=-1) * F.normalize(t.float(), dim=-1)).sum(-1).mean()
            stats = output_spread(r), output_spread(t), cos
        return objective(cfg, r, t), *stats  # eq. 1: gradients reach both encoders
    return train_epoch(loader, step, optimizer, scaler, scheduler, cfg["sched_unit"] == "step", rt,
                       f"epoch {epoch + 1}/{cfg['epochs']}", ("loss", "std_cnn", "std_vit", "cos_cnn_vit"))

def pretrain(cfg):
    """CASS pretraining with a resolved config (`resolve`); returns the run folder."""
    rt = make_runtime(cfg["device"], cfg["precision"])
    out = Path(cfg["out"] or f"runs/pretrain-{cfg['data']}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_folder(out, cfg)
    if cfg["sync_bn"] and rt.device.type != "cuda":
        raise UserError("--sync-bn works on CUDA only (PyTorch's SyncBatchNorm); drop it for CPU runs")
    if cfg["batch_size"] % rt.world:
        raise UserError(f"--batch-size {cfg['batch_size']} (the global batch) does not divide by {rt.world} processes")
    torch.manual_seed(cfg["seed"])
    # -- data: the whole training split, labels unused (paper B.1.1) ---------------------------
    table = load_table(cfg["data"], cfg["root"], cfg.get("window"))  # runs from before --window have none
    splits, cfg["splits"] = load_splits(cfg, table)
    train = splits["train"]
    if len(train) < 2 * rt.world:  # BatchNorm and the spread compare images: two a process at the least
        raise UserError(f"the training split has {len(train)} image(s); pretraining needs {2 * rt.world} at the least")
    batch = fitted_batch(len(train), cfg["batch_size"], rt.world)
    dataset = ImageDataset(table, train, cfg["img_size"], True, decode_all(table, train, cfg))
    sampler = EpochSampler(len(dataset), batch, cfg["seed"], rank=rt.rank, world=rt.world)
    loader = make_loader(dataset, sampler, batch // rt.world, cfg["workers"], rt)
    mon = monitor_loaders(table, splits, cfg, rt) if rt.rank == 0 else None
    # -- encoders, optimiser, schedule, SWA ------------------------------------------------------
    cnn, vit = (to_device(m, rt, cfg[arm]) for m, arm in zip(build_pair(cfg), ("cnn", "vit")))
    optimizer = make_adam([*cnn.parameters(), *vit.parameters()], cfg["lr"])  # one Adam, both encoders
    scheduler, scaler = cosine_schedule(optimizer, cfg), rt.scaler()
    swa_cnn, swa_vit = torch.optim.swa_utils.AveragedModel(cnn), torch.optim.swa_utils.AveragedModel(vit)
    state = dict(cnn=cnn, vit=vit, optimizer=optimizer, scheduler=scheduler, scaler=scaler, swa_cnn=swa_cnn,
                 swa_vit=swa_vit)
    saved = restore(state, out) if cfg["resume"] else None
    start = saved["epoch"] if saved else 0
    train_cnn, train_vit = wrap_ddp(cnn, rt, cfg["sync_bn"]), wrap_ddp(vit, rt)
    if cfg["compile"]:
        train_cnn, train_vit = torch.compile(train_cnn), torch.compile(train_vit)
    with claim_run_folder(out, cfg, rt, splits, table, saved) as run:
        if rt.rank == 0:
            print(f"CASS pretraining ({cfg['objective']}): {cfg['cnn']} + {cfg['vit']}"
                  f"{' with patch %s' % cfg['patch_size'] if cfg['patch_size'] else ''}, {len(train)} images at "
                  f"{cfg['img_size']} px, splits {cfg['splits']}, {cfg['epochs']} epochs, global batch {batch} on "
                  f"{rt.world} x {rt.device.type} {rt.amp_dtype or 'fp32'}; run folder {out}" + small_data(dict(
                      training=len(train), **({"monitor query": len(mon["val"].dataset)} if mon else {})),
                      len(train), batch, cfg["batch_size"]))
        if start == 0 and mon is not None:
            m = monitor(dict(cnn=cnn, vit=vit), mon, rt, baselines=True)
            append_jsonl(dict(epoch=0, phase="init", **m), out / "log.jsonl")
            print(format_monitor(m, "epoch   0 (init)"))
        # -- the loop: an epoch, SWA, the monitor, one log line and last.pt -------------------------
        saving = {}  # the last epoch's last.pt: the seconds training waited for its copy
        for epoch in range(start, cfg["epochs"]):
            sampler.set_epoch(epoch)
            t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]  # the rate this epoch trains at
            r = pretrain_epoch(train_cnn, train_vit, loader, optimizer, scaler, scheduler, rt, cfg, epoch)
            seconds = time.perf_counter() - t0
            if epoch >= cfg["swa_start"]:  # SWA: the average of the weights at the end of each epoch
                swa_cnn.update_parameters(cnn)
                swa_vit.update_parameters(vit)
            r = dict(epoch=epoch + 1, **r, lr=lr, seconds=seconds,
                     std_healthy=1 / math.sqrt(cfg["out_dim"]), swa_models=int(swa_cnn.n_averaged),
                     images_per_s=r.pop("steps") * batch / seconds, **saving)
            if rt.rank == 0:
                if mon is not None:
                    t0 = time.perf_counter()
                    r.update(monitor(dict(cnn=cnn, vit=vit), mon, rt), monitor_seconds=time.perf_counter() - t0)
                r.update(wait_written(run))  # the last epoch's last.pt, written beside this one: bytes, seconds
                append_jsonl(r, out / "log.jsonl")
                print(format_epoch(r, cfg))
                saving = dict(checkpoint_seconds=save_run(run, state, epoch + 1, cfg))
        # -- the result: the averaged encoders, BatchNorm statistics recomputed for the averaged CNN ---
        t0 = time.perf_counter()
        if swa_cnn.n_averaged > 0:  # every process takes its share of the images, as in training
            bn = EpochSampler(len(dataset), batch, cfg["seed"] + 1, rank=rt.rank, world=rt.world)
            recompute_batchnorm(swa_cnn, make_loader(dataset, bn, bn.batch // bn.world, cfg["workers"], rt), rt)
            cnn, vit = swa_cnn.module, swa_vit.module
        if rt.rank == 0:
            if mon is not None and start < cfg["epochs"]:  # the verdict is about the files written, not live weights
                r = dict(epoch=cfg["epochs"], phase="saved", batchnorm_seconds=time.perf_counter() - t0,
                         **monitor(dict(cnn=cnn, vit=vit), mon, rt))
                append_jsonl(r, out / "log.jsonl")
                print(format_monitor(r, "saved encoders") + f"  BatchNorm recomputed in {r['batchnorm_seconds']:.1f} s")
            for arm, model in (("cnn", cnn), ("vit", vit)):
                kwargs = encoder_kwargs(cfg[arm], cfg["img_size"], cfg["patch_size"])
                atomic_write(out / f"{arm}.pt", encoder_record(model, cfg[arm], kwargs, arm, cfg))
            finish_run(run, cfg, f"wrote {out}/cnn.pt and {out}/vit.pt (SWA over {int(swa_cnn.n_averaged)} epoch(s))" +
                       (f"\n{collapse_warning(r, cfg['out_dim'])}" if start < cfg["epochs"] else ""))
    if rt.world > 1:
        dist.barrier()  # the other processes wait while rank 0 writes the result
    return out

@torch.no_grad()
def recompute_batchnorm(model, loader, rt):
    """BatchNorm statistics of the weights from a pass over the images (torchrun: each process's share, then mean)."""
    with rt.autocast():
        views = (normalize(on_device(x, a, rt)) for x, _, *a in Progress(loader, "BatchNorm"))  # as it trained
        torch.optim.swa_utils.update_bn(views, model, device=rt.device)
    for stat in (s for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and rt.world > 1
                 for s in (m.running_mean, m.running_var)):  # torchrun: each process took a share; their mean
        dist.all_reduce(stat.div_(rt.world))

def wrap_ddp(model, rt, sync_bn=False):
    if rt.world == 1:
        return model
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)

def format_monitor(m, head):
    arms = [a for a in ("cnn", "vit") if f"val_std_{a}" in m]
    each = lambda key, f: "/".join(format(m[key.format(a)], f) for a in arms)  # noqa: E731
    line = (f"{head}  val spread {'/'.join(arms)} {each('val_std_{}', '.4f')}  rank {each('rank_{}', '.1f')}  pc1 "
            f"{each('pc1_{}', '.2f')}" + (f"  cos {m['val_cos']:.3f}" if "val_cos" in m else "") + "  20-NN features "
            f"{each('knn_{}_feat', '.3f')}, outputs {each('knn_{}_out', '.3f')}" +
            (f" (s.e. up to {m['knn_se']:.3f})" if "knn_se" in m else ""))
    return line + f" (majority class {m['majority']:.3f}" + (f", raw pixels {m['knn_raw_pixels']:.3f})" if
                                                             "knn_raw_pixels" in m else ")")

def format_epoch(r, cfg):
    """An epoch's lines: loss, collapse statistics, where the seconds went and so which side sets the pace."""
    behind = r["data_seconds"] > r["seconds"] / 10
    line = (f"epoch {r['epoch']:3d}/{cfg['epochs']}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  spread cnn/vit "
            f"{r['std_cnn']:.4f}/{r['std_vit']:.4f} (healthy {r['std_healthy']:.4f})  cos {r['cos_cnn_vit']:.3f}  "
            f"{r['images_per_s']:.1f} img/s, {r['seconds']:.1f} s, data wait {r['data_seconds'] / r['seconds']:.0%}: " +
            ("the CPU is behind (more --workers, --cache-images)" if behind else "the step sets the pace"))
    if "last_pt_bytes" in r:  # the copy before this epoch; the write beside it
        line += (f"; last.pt {r['last_pt_bytes'] / 1e6:.0f} MB, training waited {r['checkpoint_seconds']:.1f} s, "
                 f"written in {r['last_pt_seconds']:.1f} s beside it")
    line += ("\n" + format_monitor(r, " " * 16) + f"  {r['monitor_seconds']:.1f} s") if "knn_cnn_feat" in r else ""
    return line + (f"\n  {warning}" if (warning := collapse_warning(r, cfg["out_dim"])) else "")

# ==== Fine-tuning (paper 4.2, B.2): one arm, focal loss, Adam 3e-4, cosine, early stopping =======================

def early_stopping(stop, val_loss, epoch):
    """Early stopping on the validation loss (paper 4.2): {best, best_epoch, bad (epochs since)} after an epoch."""
    return dict(best=val_loss, best_epoch=epoch, bad=0) if val_loss < stop["best"] else {**stop, "bad": stop["bad"] + 1}

def fold_standardisation(head, mean, std):
    """A linear head trained on (x - mean) / std, made to take x itself: W' = W / std, b' = b - W' mean."""
    with torch.no_grad():
        head.weight.div_(std.to(head.weight))
        head.bias.sub_(head.weight @ mean.to(head.weight))

@torch.no_grad()
def logits_of(model, loader, rt, prep):
    """Logits [N, C] and targets [N, C] of every item, in eval mode and in loader order."""
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        with rt.autocast():
            logits.append(model(prep(x.to(rt.device, non_blocking=True))).float().cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)

def probabilities(logits, multilabel):
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)

def init_encoder(cfg, num_classes):
    """The encoder to fine-tune with a fresh `num_classes` head: a CASS arm (a run folder with --arm, or its
    cnn.pt / vit.pt), imagenet, random or random-bn. Returns the model, its timm name and kwargs, and the arm."""
    init, arm = cfg["init"], cfg["arm"]
    if init in ("random", "random-bn", "imagenet"):
        arm = arm or "cnn"
        kw = encoder_kwargs(cfg[arm], cfg["img_size"], cfg["patch_size"])
        weights = (cfg[f"{arm}_weights"] or "imagenet") if init == "imagenet" else None  # a file, else the hub
        return create_encoder(cfg[arm], num_classes, kw, weights), cfg[arm], kw, arm
    path = Path(init)
    if path.is_dir():
        if not arm:
            raise UserError(f"--init {path} is a pretraining run with two arms: add --arm cnn or --arm vit")
        if not (path / f"{arm}.pt").is_file():
            raise UserError(f"--init {path} is not a finished pretraining run folder: one holds args.json, cnn.pt and "
                            "vit.pt (the last two are written when `cass.py pretrain` ends)")
        path = path / f"{arm}.pt"
    obj = load_checkpoint(path, "--init")
    model = load_encoder(obj, f"--init {path}", num_classes)  # refuses a file of another kind
    model.reset_classifier(num_classes)  # always a fresh head, even when its width is the pretraining head's
    if arm and obj["arm"] != arm:
        raise UserError(f"--init {path} holds the {obj['arm']} arm but --arm is {arm}")
    if is_vit(obj["model"]) and obj["kwargs"].get("img_size") != cfg["img_size"]:
        raise UserError(f"--init {path} is a ViT built for {obj['kwargs'].get('img_size')} px but --img-size is "
                        f"{cfg['img_size']}; drop --img-size or use {obj['kwargs'].get('img_size')}")
    return model, obj["model"], obj["kwargs"], obj["arm"]

def finetune(cfg):
    """Fine-tune one arm on a fraction of the labels with a resolved config (`resolve`); returns the run folder."""
    rt = make_runtime(cfg["device"], cfg["precision"])
    if rt.world > 1:
        raise UserError("finetune runs in one process (a few labels need no data parallelism): start it with python")
    if cfg["init"] is None:
        raise UserError("finetune needs --init: a pretraining run folder (with --arm), its cnn.pt or vit.pt, imagenet, "
                        "random or random-bn")
    split_name = LABEL_FRACTIONS[cfg["label_fraction"]]
    init = Path(cfg["init"]).name.removesuffix(".pt")  # random, ..., or the pretraining run's name
    out = Path(cfg["out"] or f"runs/finetune-{cfg['data']}-{cfg['arm'] or 'cnn'}-{init}-"
                             f"{cfg['label_fraction'] * 100:g}pct-{cfg['mode']}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_run_folder(out, cfg)
    torch.manual_seed(cfg["seed"])
    # -- data -------------------------------------------------------------------------------------
    table = load_table(cfg["data"], cfg["root"], cfg.get("window"))
    if len(table.classes) < 2:
        raise UserError(f"--data {cfg['data']} at {cfg['root']} has {len(table.classes)} class(es) with labels; "
                        "fine-tuning needs at least two")
    splits, cfg["splits"] = load_splits(cfg, table)
    keys = {s: [k for k in splits[f] if k in table.labels] for s, f in (("train", split_name), ("val", "val"),
                                                                       ("test", "test"))}
    for s, k in keys.items():  # a class without a training image cannot be learned
        absent = [c for c, n in zip(table.classes, np.sum([table.labels[x] for x in k], axis=0)) if n == 0] if k else []
        if not k or s == "train" and absent:
            raise UserError(f"the {split_name if s == 'train' else s} split ({cfg['splits']}) has no labelled image" + (
                f" of {', '.join(absent[:10])}: the model cannot learn them; add images of them, or leave them out of "
                "the data" if k else "s"))
    size = cfg["img_size"]
    cached = {s: decode_all(table, k, cfg) for s, k in keys.items()}
    train_ds = ImageDataset(table, keys["train"], size, True, cached["train"])  # paper B.2.1
    eval_ds = {s: ImageDataset(table, keys[s], size, cache=cached[s]) for s in ("val", "test")}
    w = class_weights(train_ds.targets.sum(0), cfg["class_weights"])
    weights = lambda y: term_weights(y, w, cfg["class_weights"], table.multilabel)  # noqa: E731
    # -- model ------------------------------------------------------------------------------------
    n, whole = len(table.classes), cfg["resume"] and cfg["mode"] == "full"  # resumed in full mode: last.pt holds
    last = load_checkpoint(out / "last.pt", "last.pt") if whole else {}  # every weight, so --init is not read again
    model, name, kw, cfg["arm"] = (create_encoder(last["model"], n, last["kwargs"]), last["model"], last["kwargs"],
                                   cfg["arm"]) if "model" in last else init_encoder(cfg, n)
    model = to_device(model, rt, name)
    if cfg["init"] == "random-bn" and not last:
        # The control for CASS's CNN: a random CNN whose BatchNorm statistics are re-estimated on the unlabelled
        # training images. A gain over it is learned; a gain over `random` alone may be recalibration.
        everything = ImageDataset(table, splits["train"], size, cache=decode_all(table, splits["train"], cfg))
        shuffled = EpochSampler(len(everything), cfg["batch_size"], cfg["seed"], drop_last=False)  # never class-sorted
        recompute_batchnorm(model, make_loader(everything, shuffled, cfg["batch_size"], cfg["workers"], rt), rt)
    eval_loader = {s: make_loader(d, None, cfg["batch_size"], cfg["workers"], rt) for s, d in eval_ds.items()}
    trainable, prep, workers = model, normalize, cfg["workers"]
    if cfg["mode"] == "linear":
        # Linear evaluation (paper 4.2): the frozen encoder's features, computed once without augmentation and
        # standardised with the training features' statistics (a collapsed encoder's features vary by 1e-3, and
        # one learning rate must suit every encoder); the standardisation is folded into the head at the end.
        plain = ImageDataset(table, keys["train"], size, cache=cached["train"])
        feats = {s: encode(dict(m=model), make_loader(d, None, cfg["batch_size"], cfg["workers"], rt), rt)["m"]
                 for s, d in (("train", plain), *eval_ds.items())}
        mean, std = feats["train"][0].mean(0), feats["train"][0].std(0).nan_to_num(1.0).clamp_min(1e-5)
        train_ds = ImageDataset(table, keys["train"], size, cache=(feats["train"][0] - mean) / std)  # [N, F]
        eval_loader = {s: DataLoader(ImageDataset(table, keys[s], size, cache=(feats[s][0] - mean) / std),
                                     batch_size=256) for s in eval_ds}
        trainable, prep, workers = model.get_classifier(), (lambda x: x), 0
    full = cfg["mode"] == "full"  # drops each epoch's last partial batch (BatchNorm cannot take one image)
    batch = fitted_batch(len(train_ds), cfg["batch_size"]) if full else min(cfg["batch_size"], len(train_ds))
    sampler = EpochSampler(len(train_ds), batch, cfg["seed"], drop_last=full and len(train_ds) > batch)
    train_loader = make_loader(train_ds, sampler, batch, workers, rt)
    optimizer = make_adam(trainable.parameters(), cfg["lr"])
    scheduler, scaler = cosine_schedule(optimizer, cfg), rt.scaler()
    state = dict(trainable=trainable, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    saved = restore(state, out) if cfg["resume"] else None
    start, best, stop = (saved["epoch"], saved["best"], saved["early_stopping"]) if saved else \
        (0, clone(trainable), dict(best=math.inf, best_epoch=-1, bad=0))
    def step(x, y):  # focal loss on the logits [B, C] (paper B.2.2); linear mode's features are not augmented
        y = y.to(rt.device, non_blocking=True)
        return [focal_loss(trainable(prep(x)), y, cfg["focal_alpha"], cfg["focal_gamma"], weights(y))]
    headline = HEADLINE.get(cfg["data"], "f1_macro")
    with claim_run_folder(out, cfg, rt, splits, table, saved) as run:
        patch = f" with patch {kw['patch_size']}" if kw.get("patch_size") else ""
        print(f"fine-tuning {name}{patch} ({cfg['arm']} arm, init {cfg['init']}, {cfg['mode']}) on {len(train_ds)} "
              f"labelled images ({split_name}) at {size} px, {len(table.classes)} classes, at most {cfg['epochs']} "
              f"epochs, splits {cfg['splits']}; run folder {out}" + small_data(dict(
                  training=len(train_ds), validation=len(eval_ds["val"]), test=len(eval_ds["test"])), len(train_ds),
                  batch, cfg["batch_size"] if full else batch))
        for epoch in range(start, cfg["epochs"]):
            if stop["bad"] >= cfg["patience"]:
                break
            sampler.set_epoch(epoch)
            t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]  # the rate this epoch trains at
            trainable.train()
            loss = train_epoch(train_loader, step, optimizer, scaler, scheduler, False, rt,
                               f"epoch {epoch + 1}/{cfg['epochs']}")["loss"]
            seconds = time.perf_counter() - t0
            logits, targets = logits_of(trainable, eval_loader["val"], rt, prep)
            val_loss = float(focal_loss(logits, targets, cfg["focal_alpha"], cfg["focal_gamma"], weights(targets)))
            val = classification_metrics(probabilities(logits, table.multilabel).numpy(), targets.numpy(),
                                         table.multilabel, table.classes)[headline]
            stop = early_stopping(stop, val_loss, epoch + 1)
            best = clone(trainable) if stop["best_epoch"] == epoch + 1 else best
            speed = len(sampler) / seconds
            append_jsonl(dict(epoch=epoch + 1, train_loss=loss, val_loss=val_loss, **{f"val_{headline}": val},
                              lr=lr, seconds=seconds, images_per_s=speed,
                              best_epoch=stop["best_epoch"]), out / "log.jsonl")
            print(f"epoch {epoch + 1:3d}/{cfg['epochs']}  train loss {loss:.4f}  val loss {val_loss:.4f}  val "
                  f"{headline} {val:.4f}  {speed:.1f} img/s{'  *best' if stop['best_epoch'] == epoch + 1 else ''}")
            save_run(run, state, epoch + 1, cfg, best=best, early_stopping=stop, model=name, kwargs=kw)
        # -- the best epoch's weights, evaluated as `evaluate` will ---------------------------------
        trainable.load_state_dict(best)
        if cfg["mode"] == "linear":
            fold_standardisation(trainable, mean, std)
        results = dict(best_epoch=stop["best_epoch"], headline=headline)
        for s in ("val", "test"):
            logits, targets = logits_of(model, make_loader(eval_ds[s], None, cfg["batch_size"], cfg["workers"], rt), rt,
                                        normalize)
            results[s] = classification_metrics(probabilities(logits, table.multilabel).numpy(), targets.numpy(),
                                                table.multilabel, table.classes, headline if s == "test" else None)
        atomic_write(out / "best.pt", encoder_record(model, name, kw, cfg["arm"], cfg, classes=list(table.classes),
                                                     multilabel=table.multilabel, data=cfg["data"], img_size=size,
                                                     headline=headline, best_epoch=stop["best_epoch"]))
        write_json(results, out / "metrics.json")
        lo, hi = results["test"]["ci95"].get(headline, (math.nan, math.nan))
        finish_run(run, cfg, f"best epoch {stop['best_epoch']}: val {headline} {results['val'][headline]:.4f}, test "
                             f"{headline} {results['test'][headline]:.4f} (95% CI {lo:.4f} to {hi:.4f}); wrote "
                             f"{out}/best.pt and metrics.json")
    return out

def clone(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

# ==== Evaluation, prediction, and a fine-tuned model in Python ===================================================

def load_finetuned(path, what="--ckpt"):
    """A fine-tuned checkpoint, from its best.pt or its run folder: (the file's path, its contents)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise UserError(f"{what} {path} is a folder without best.pt: give a fine-tuned best.pt or the folder of a "
                            "finished `cass.py finetune` run")
        path = path / "best.pt"
    obj = load_checkpoint(path, what)
    if not isinstance(obj, dict) or obj.get("format") != "cass-encoder" or "classes" not in obj:
        raise UserError(f"{what} {path} is not a fine-tuned checkpoint written by cass.py finetune (best.pt)")
    return path, obj

def load_model(path, device="cpu"):
    """A fine-tuned best.pt (or its run folder) as a timm model in eval mode, with its preprocessing: a PIL image or an
    image file (DICOM: with the run's --window) to the [1, 3, S, S] tensor it was trained on; and its class names."""
    path, obj = load_finetuned(path, "checkpoint")
    model, window = load_encoder(obj, path).to(device).eval(), obj["config"].get("window")
    read = lambda img: read_image(img, window, obj["img_size"]) if isinstance(img, (str, Path)) else img  # noqa: E731
    return model, lambda img: normalize(image_tensor(read(img), obj["img_size"])[None]).to(device), obj["classes"]

def ensemble_probabilities(ckpts, table, keys, rt, workers, skip_bad=False):
    """The mean probability of fine-tuned models over the images `keys` (an ensemble of one or more)."""
    probs = 0
    for path, obj in ckpts:  # each model sees the images as it was trained on them: its size, its DICOM window
        model = to_device(load_encoder(obj, path), rt, obj["model"])
        ds = ImageDataset(replace(table, window=obj["config"].get("window")), keys, obj["img_size"], skip_bad=skip_bad)
        loader = make_loader(ds, None, obj["config"]["batch_size"], workers, rt)
        logits, targets = logits_of(model, loader, rt, normalize)
        probs = probs + probabilities(logits, table.multilabel) / len(ckpts)
    return probs, targets

def evaluate(cfg):
    """Metrics of one fine-tuned checkpoint, or of the ensemble of several, on a split."""
    rt = make_runtime(cfg["device"], "auto")
    ckpts = [load_finetuned(p) for p in cfg["ckpt"]]
    if cfg["out"]:
        check_output(Path(cfg["out"]), [p for p, _ in ckpts], cfg["overwrite"])
    first = ckpts[0][1]["config"]
    data = cfg["data"] or first["data"]
    same = data == first["data"]  # the checkpoint's own dataset: its root and splits are the defaults
    table = load_table(data, cfg["root"] or (first["root"] if same else None))
    for path, obj in ckpts:
        a, b = list(obj["classes"]), list(table.classes)
        if a != b or obj["multilabel"] != table.multilabel:
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise UserError(f"--ckpt {path} was made for {len(a)} classes but --data {data} has {len(b)}; they first "
                            f"differ at class {i}: {a[i] if i < len(a) else '(none)'} against "
                            f"{b[i] if i < len(b) else '(none)'}" + ("" if a != b else " (one is multi-label)"))
    splits, _ = load_splits(dict(splits=cfg["splits"] or (first["splits"] if same else None)), table)
    keys, headline = [k for k in splits[cfg["split"]] if k in table.labels], HEADLINE.get(data, "f1_macro")
    probs, targets = ensemble_probabilities(ckpts, table, keys, rt, cfg["workers"])
    metrics = classification_metrics(probs.numpy(), targets.numpy(), table.multilabel, table.classes, headline)
    result = dict(ckpts=[str(p) for p, _ in ckpts], split=cfg["split"], data=data, headline=headline, **metrics)
    if cfg["out"]:
        write_json(result, cfg["out"])  # saved before anything else can fail
    print(f"{'ensemble of ' + str(len(ckpts)) if len(ckpts) > 1 else ckpts[0][0]} on the {cfg['split']} split "
          f"({len(keys)} images)\n{format_metrics(metrics, headline)}")
    return result

def format_metrics(m, headline):
    """The metrics as a table: the headline first, 95% intervals beside, each class against the rest below."""
    ci = lambda k: f"   95% CI {m['ci95'][k][0]:.4f} to {m['ci95'][k][1]:.4f}" if k in m.get("ci95", {}) else ""  # noqa
    lines = [f"  {k:<24} {v:.4f}{ci(k)}{'   (headline)' if k == headline else ''}" for k, v in sorted(
        m.items(), key=lambda kv: kv[0] != headline) if isinstance(v, float)]
    auroc = lambda v: f"{v:.3f}" if v is not None else "n/a"  # noqa: E731 (a class without positives or negatives)
    return "\n".join(lines + [f"  {c:<24} sensitivity {v['sensitivity']:.3f}  specificity {v['specificity']:.3f}  "
                               f"precision {v['precision']:.3f}  f1 {v['f1']:.3f}  AUROC {auroc(v['auroc'])}  n "
                               f"{v['support']}" for c, v in m["per_class"].items()])

def predict(cfg):
    """Per-class probabilities and the predicted label of new images (a folder, by image_files, an image, or a CSV
    with an `image` column) as evaluation sees them, in a CSV; those that do not decode are named at the end. An image
    with a known class (in a folder named after one, or a CSV's labels) gets it in a `label` column beside."""
    rt = make_runtime(cfg["device"], "auto")
    ckpts = [load_finetuned(p) for p in cfg["ckpt"]]
    source, out = Path(cfg["images"]), Path(cfg["out"] or "predictions.csv")
    check_output(out, [source, *(p for p, _ in ckpts)], cfg["overwrite"])
    classes, multilabel = ckpts[0][1]["classes"], ckpts[0][1]["multilabel"]
    if any(list(o["classes"]) != list(classes) for _, o in ckpts):
        raise UserError("the --ckpt files were made for different classes; an ensemble needs the same ones")
    if source.is_dir() or source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:  # a folder, or one image
        folder = source if source.is_dir() else source.parent
        keys = [str(p.relative_to(folder)) for p in image_files(source)] if source.is_dir() else [source.name]
        table = Table("predict", classes, multilabel, {}, keys, image_dir=str(folder))
        known = {k: next((p for p in reversed(Path(k).parts[:-1]) if p in classes), "") for k in keys}
    elif source.is_file():
        listed = table_csv(source, "predict")
        table = replace(listed, classes=classes, multilabel=multilabel, labels={})
        known = {k: ";".join(c for c, v in zip(listed.classes, y) if v) for k, y in listed.labels.items()}
    else:
        raise UserError(f"--images {source} is neither a folder of images, an image nor a CSV file")
    if not table.keys:
        raise UserError(f"--images {source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    probs, targets = ensemble_probabilities(ckpts, table, table.keys, rt, cfg["workers"], skip_bad=True)
    failed = targets.isnan().any(1).tolist()  # images that did not decode
    labelled = [k for k in table.keys if known.get(k)]  # the right answer beside the prediction
    bad, rows = [str(table.path(k)) for k, f in zip(table.keys, failed) if f], [["image", *classes, "predicted"] + (
        ["label"] if labelled else [])]
    for key, p, f in zip(table.keys, probs.tolist(), failed):
        label = ";".join(c for c, v in zip(classes, p) if v > 0.5) if multilabel else classes[int(np.argmax(p))]
        rows += [] if f else [[str(table.path(key)), *(f"{v:.6f}" for v in p), label] + ([known.get(key, "")] if
                                                                                         labelled else [])]
    write_csv(rows, out)
    scored = [r[-1] == r[-2] for r in rows[1:] if labelled and r[-1]]
    print(f"wrote the predictions for {len(rows) - 1} images to {out}" + (
        f"; {sum(scored)} of the {len(scored)} with a label predicted right" if labelled else ""))
    if bad:
        raise UserError(f"{len(bad)} of the {len(table.keys)} images cannot be read and have no prediction in {out}: "
                        f"{', '.join(bad)}; remove or replace them")
    return out

# ==== Dataset layouts: each reader returns a Table ===============================================================

DICOM_SUFFIXES = {".dcm", ".dicom"}  # read with pydicom, installed only where they are read
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp", *DICOM_SUFFIXES}
ISIC_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]

def _rgb_uint8(img):
    """Any PIL image (grey, RGB, RGBA, palette, 16-bit, float) as a uint8 array [H, W] or [H, W, 3]."""
    if not (img.mode.startswith("I") or img.mode == "F"):  # RGBA, LA, P, CMYK, ...: PIL composites and converts
        return np.asarray(img if img.mode in ("RGB", "L") else img.convert("RGB"))
    arr = np.asarray(img).astype(np.float64)  # 16- or 32-bit single channel
    return np.clip(arr / (65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)) * 255, 0, 255).astype(
        np.uint8)

def read_image(path, window=None, size=None):
    """An image file as a PIL image: DICOM by read_dicom (`window`), pictures by Pillow; a JPEG bound for `size` px at
    the least of 1/2, 1/4, 1/8 scale still >= size (Pillow's draft: 2.2x faster, under a level off once resized)."""
    from PIL import Image
    try:
        if Path(path).suffix.lower() in DICOM_SUFFIXES:
            return read_dicom(path, window)
        with Image.open(path) as img:  # its file closed on the way out, a multi-frame one too
            if size and img.format == "JPEG":
                img.draft(img.mode, (size, size))
            img.load()
        return img
    except UserError:
        raise
    except Exception as e:  # OSError, Pillow's DecompressionBombError, pydicom's errors: a file to remove or replace
        what = " ".join(str(e).split())  # pydicom without the decoder of a file's compression names the plugins
        fix = "pip install -r requirements-dicom.txt" if "missing dependencies" in what else "remove or replace it"
        raise UserError(f"cannot decode image {path} ({type(e).__name__}: {what[:300]}); {fix}") from None

def read_dicom(path, window=None):
    """A DICOM image as a radiologist's viewer shows it, grey or RGB, 8 bits: the stored values through the modality
    LUT (rescale slope and intercept: CT in Hounsfield units), then a linear window, centre -/+ width / 2 (`window`,
    else the file's first; with only a VOI LUT, that; else the 0.5th-99.5th percentiles: no metal artefact sets the
    contrast), then MONOCHROME1 inverted (its black is dense). Colour comes as RGB; a cine loop is refused."""
    from PIL import Image
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    except ImportError:
        raise UserError(f"{path} is DICOM: reading it needs pydicom (pip install -r requirements-dicom.txt)") from None
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    if "PixelData" not in ds or frames > 1:
        raise UserError(f"{path} is a DICOM file without an image; remove it" if "PixelData" not in ds else f"{path} "
                        f"holds {frames} frames (a cine loop or a volume); export its frames as single-frame files")
    arr, kind = ds.pixel_array, ds.get("PhotometricInterpretation", "MONOCHROME2")  # YBR comes as RGB
    arr = apply_color_lut(arr, ds) if kind == "PALETTE COLOR" else arr  # palette: [H, W, 3]
    if arr.ndim == 3:  # colour: full range, to 8 bits
        top = 255 if arr.dtype == np.uint8 else 2 ** (16 if kind == "PALETTE COLOR" else int(ds.BitsStored)) - 1
        return Image.fromarray(np.clip(np.round(arr * (255 / top)), 0, 255).astype(np.uint8))
    x, window = apply_modality_lut(arr, ds).astype(np.float64), window or (
        [float(np.ravel(ds[t].value)[0]) for t in ("WindowCenter", "WindowWidth")] if "WindowWidth" in ds else None)
    if window:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    elif "VOILUTSequence" in ds:  # the LUT maps to 0 .. 2^bits - 1
        x, lo, hi = apply_voi_lut(x, ds).astype(np.float64), 0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    else:
        lo, hi = np.percentile(x, (0.5, 99.5))
    y = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * 255  # [H, W]
    return Image.fromarray(np.round(255 - y if kind == "MONOCHROME1" else y).astype(np.uint8))

def holds_image(path):
    """False for a DICOM file without pixel data (a structured report, a presentation state), from its header."""
    with contextlib.suppress(Exception):  # without pydicom, or damaged: named when it is decoded
        import pydicom
        return "Rows" in pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows"])
    return True

def write_splits(table, splits, folder):
    """One CSV per split: the image keys and, for a reader, their labels (runs take labels from the data)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    header = ["image"] + (list(table.classes) if table.multilabel else ["label"])
    cells = lambda y: [""] * (len(header) - 1) if y is None else [str(int(v)) for v in y] if table.multilabel \
        else [table.classes[int(np.argmax(y))]]  # noqa: E731
    for name, keys in splits.items():
        write_csv([header] + [[k, *cells(table.labels.get(k))] for k in keys], Path(folder) / f"{name}.csv")

def write_csv(rows, path):
    """Rows with the csv module's quoting (a file name may hold a comma), written atomically."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    atomic_write(path, text.getvalue().encode("utf-8", "surrogateescape"))  # names in any bytes a disk allows

def image_files(folder):
    """The one rule for a folder of images, in every reader and in predict: its image files at any depth, sorted, but
    names that start with a dot and DICOM files without an image (named); a link to nowhere stays, to be named."""
    files = distinct([p for p in sorted(Path(folder).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and (
        p.is_file() or not p.exists()) and not any(part.startswith(".") for part in p.relative_to(folder).parts)])
    other = {p for p in files if p.suffix.lower() in DICOM_SUFFIXES and not holds_image(p)}
    if other:  # as a file that is no image
        print(f"note: {len(other)} DICOM file(s) under {folder} hold no image (a report?), left out: {min(other)}, ...")
    return [p for p in files if p not in other]

def distinct(paths, root=""):
    """`paths` (under `root`), of which no two may be one file: a link to another image, or to another class's
    folder, would make one image two (in two classes, or a test image also a training image)."""
    seen = {}
    for p in paths:
        if (first := seen.setdefault((Path(root) / p).resolve(), p)) != p:
            raise UserError(f"{Path(root) / first} and {Path(root) / p} are one file (through a link); remove the link")
    return paths

def _class_folders(root, folders, name, layout):
    """A Table of <class>/<images> trees: paths relative to `root`, the class from the folder under `folders`."""
    rel = []
    for folder in folders:
        for sub in sorted(p for p in Path(folder).iterdir() if not p.name.startswith(".")):
            files = image_files(sub) if sub.is_dir() else []
            if not files and (sub.is_dir() or sub.suffix.lower() in IMAGE_SUFFIXES):  # said, never dropped
                raise UserError(f"{sub} is " + ("a class folder without images; add images or remove it" if sub.is_dir()
                                else "an image outside the class folders: move it into its class's folder") +
                                f" (--data {name} expects {layout})")
            rel += [str(f.relative_to(root)) for f in files]
    depth = len(Path(folders[0]).relative_to(root).parts)  # the class of a path: its folder this deep under root
    classes = sorted({Path(p).parts[depth] for p in rel})
    if not classes:
        raise UserError(f"no images found under {root}; --data {name} expects {layout}")
    eye = np.eye(len(classes), dtype=np.float32)
    labels = {p: eye[classes.index(Path(p).parts[depth])] for p in rel}
    return Table(name, classes, False, labels, distinct(rel, root), image_dir=str(root))

def table_brain_mri(root):
    layout = "ROOT/Training/<class>/*.jpg and ROOT/Testing/<class>/*.jpg (the Kaggle layout)"
    root = Path(root)
    if not ((root / "Training").is_dir() and (root / "Testing").is_dir()):
        raise UserError(f"{root} is not in the brain_mri layout: expected {layout}")
    table = _class_folders(root, [root / "Training", root / "Testing"], "brain_mri", layout)
    table.given["test"] = [k for k in table.keys if k.startswith("Testing/")]  # the curators' split, paper 4.3
    return table

def table_folder(root):
    layout = "ROOT/<class>/<images> (one folder per class; images in its subfolders count)"
    if not Path(root).is_dir():
        raise UserError(f"--root {root} is not a folder; --data folder expects {layout}")
    return _class_folders(Path(root), [Path(root)], "folder", layout)

def read_csv(path):
    """A CSV as (header, rows, the line of each row), as spreadsheets export them: a byte-order mark, blank lines,
    spaces around cells and `Image` or `Label` spelled in capitals are accepted."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            lines = [(n, [c.strip() for c in r]) for n, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read CSV {path} ({type(e).__name__}: {e}); it should be UTF-8 text") from None
    if not lines:
        raise UserError(f"CSV {path} is empty")
    header = [h.lower() if h.lower() in ("image", "label") else h for h in lines[0][1]]
    return header, [r for _, r in lines[1:]], [n for n, _ in lines[1:]]

def _csv_labels(path, header, rows, lines):
    """Labels from a `label` column or a 0/1 column per class; empty cells: unlabelled; two for one image: refused."""
    if header[0] != "image":
        raise UserError(f"CSV {path} must start with an 'image' column; its header is {','.join(header[:5])}")
    first = {}  # image -> its first row
    for i, r in enumerate(rows):
        if rows[first.setdefault(r[0], i)][1:] != r[1:]:
            raise UserError(f"CSV {path} lists {r[0]} twice with different labels (lines {lines[first[r[0]]]} and "
                            f"{lines[i]}); keep the right one")
    if header[1:] == ["label"]:
        names = sorted({r[1] for r in rows if len(r) > 1 and r[1] != ""})
        eye = np.eye(len(names), dtype=np.float32)
        return names, False, {r[0]: eye[names.index(r[1])] for r in rows if len(r) > 1 and r[1] != ""}
    labels = {}
    for n, r in zip(lines, rows):
        if len(r) == len(header) and all(v == "" for v in r[1:]):
            continue  # an unlabelled image (pretraining only)
        if len(r) != len(header) or any(v not in ("0", "1", "0.0", "1.0") for v in r[1:]):
            raise UserError(f"CSV {path}, line {n}: the {len(header) - 1} label columns ({','.join(header[1:6])}) must "
                            f"each hold 0 or 1, found {len(r) - 1} cell(s): {','.join(r[1:6]) or 'none'}")
        labels[r[0]] = np.array([float(v) for v in r[1:]], dtype=np.float32)
    return header[1:], any(v.sum() != 1 for v in labels.values()), labels

def table_csv(root, name="csv"):
    path = Path(root)
    if not path.is_file():
        raise UserError(f"--root {path} is not a file; --data {name} expects a CSV of 'image' paths (relative to the "
                        "CSV, or absolute) plus a 'label' column or one 0/1 column per class")
    header, rows, lines = read_csv(path)
    classes, multilabel, labels = _csv_labels(path, header, rows, lines)
    return Table(name, classes, multilabel, labels, list(dict.fromkeys(r[0] for r in rows)), image_dir=str(path.parent))

def table_isic2019(root, gt_csv=None):
    gt_csv = Path(gt_csv or Path(root) / "ISIC_2019_Training_GroundTruth.csv")
    if not gt_csv.is_file():
        raise UserError(f"{gt_csv} does not exist; --data isic2019 expects ROOT/ISIC_2019_Training_Input/ISIC_*.jpg "
                        "and ROOT/ISIC_2019_Training_GroundTruth.csv")
    t = table_csv(gt_csv, "isic2019")  # a column per class, and UNK (empty in the training set; may be left out)
    bad = [k for k, v in t.labels.items() if v[:8].sum() != 1] if t.classes[:8] == ISIC_CLASSES else []
    if t.classes[:8] != ISIC_CLASSES or bad:
        raise UserError(f"{gt_csv} is not the ISIC 2019 ground truth, image,{','.join(ISIC_CLASSES)},UNK with one "
                        "class a row: " + (f"{len(bad)} rows are not one-hot, e.g. {', '.join(bad[:3])}" if bad else
                                     f"its columns are image,{','.join(t.classes[:9])}"))
    return replace(t, classes=ISIC_CLASSES, labels={k: v[:8] for k, v in t.labels.items()}, suffix=".jpg",
                   image_dir=str(Path(root) / "ISIC_2019_Training_Input"))

def table_digits(root=None):
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download
    d = load_digits()
    keys = [f"digits/{i}" for i in range(len(d.images))]
    images = np.round(d.images * (255 / 16)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    return Table("digits", [str(c) for c in range(10)], False,
                 {k: np.eye(10, dtype=np.float32)[y] for k, y in zip(keys, d.target)}, keys, arrays={"digits": images})

DATASETS = dict(digits=table_digits, brain_mri=table_brain_mri, isic2019=table_isic2019, folder=table_folder,
                csv=table_csv,  # autoimmune: ROOT/labels.csv, always multi-label; MedMNIST: tools/medmnist.py
                autoimmune=lambda root: replace(table_csv(Path(root) / "labels.csv", "autoimmune"), multilabel=True))

def load_table(data, root, window=None):
    if data != "digits" and root is None:
        raise UserError(f"--data {data} needs --root (the dataset folder or file)")
    if root is not None and not Path(root).exists():
        raise UserError(f"--root {root} does not exist")
    return replace(DATASETS[data](root), window=window)

# ==== Run machinery: device and precision, files, claimed run folders, resuming, progress ========================

@dataclass
class Runtime:
    """Device, autocast precision and torchrun's processes, decided once: the loops do not branch on them."""
    device: torch.device
    amp_dtype: torch.dtype = None  # None: fp32
    rank: int = 0
    world: int = 1
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
    def scaler(self):  # fp16 needs loss scaling; with bf16 or fp32 the scaler does nothing
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

def make_runtime(device="auto", precision="auto"):
    """torchrun sets RANK and WORLD_SIZE: data-parallel training is detected here and nowhere else."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this machine has no CUDA GPU; use --device cpu or auto")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if precision == "auto":  # bf16 hardware from compute capability 8.0; is_bf16_supported() counts emulation (7.x)
        precision = ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16") if cuda else "fp32"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Runtime(device, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision], rank, world)

def to_device(model, rt, name):
    """The model on the device; a CNN in channels-last memory (the fast layout for convolutions on GPUs)."""
    return model.to(rt.device, memory_format=torch.contiguous_format if is_vit(name) else torch.channels_last)

def _ignore_signals(_worker):  # Ctrl-C and a scheduler's SIGTERM reach every process of the group: the main process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # handles them and says what happened; a worker ends quietly
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

def make_loader(dataset, sampler, batch, workers, rt):
    if getattr(dataset, "cache", None) is not None and not getattr(dataset, "augment", False):
        workers = 0  # decoded already and nothing to draw: workers would only add start-up and copies
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=rt.device.type == "cuda", worker_init_fn=_ignore_signals if workers else None,
                      persistent_workers=bool(workers) and sampler is not None)  # training: no start-up per epoch

def decode_all(table, keys, cfg):
    """--cache-images: the images decoded once, uint8 [N, 3, size, size], in a file under --cache-dir that later runs
    and tools memory-map (larger than RAM works), named by a hash of what it is made of: changed files decode anew."""
    if not cfg["cache_images"] or not keys:
        return None
    size, stamps = cfg["img_size"], [] if table.arrays is not None else [
        [(s := table.path(k).stat()).st_size, s.st_mtime_ns] for k in keys]  # one stat a file
    made_of = [table.name, str(Path(table.image_dir).resolve()), table.suffix, size, table.window, keys, stamps,
               "jpeg-draft"]  # how they were decoded: a cache from before is not taken for one of today's
    path = Path(cfg.get("cache_dir", "~/.cache/cass")).expanduser()  # a run from before --cache-dir: the default
    path /= f"{table.name}-{size}px-{hashlib.sha256(json.dumps(made_of).encode()).hexdigest()[:20]}.npy"
    if not path.is_file():  # two runs building one cache write a file each, and the last rename wins
        path.parent.mkdir(parents=True, exist_ok=True)
        loader = DataLoader(ImageDataset(table, keys, size), batch_size=64, num_workers=cfg["workers"],  # a generator
                            generator=torch.Generator(), worker_init_fn=_ignore_signals)  # of its own: the run's stays
        tmp, done = path.with_name(f".{path.name}.tmp{os.getpid()}"), 0
        try:
            images = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(keys), 3, size, size))
            for x, _ in Progress(loader, f"decoding {len(keys)} images into {path}"):
                images[done:(done := done + len(x))] = x.numpy()
            images.flush()
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write pages: the file is never changed

def hub_offline(timeout=5.0):
    """Whether the Hugging Face hub is out of reach (or HF_HUB_OFFLINE is set). Offline, timm's download retries for a
    minute: this process then takes the hub's local cache alone (HF_HUB_OFFLINE), and fails at once without it."""
    import huggingface_hub.constants as hub
    url = urlparse(hub.ENDPOINT)
    with contextlib.suppress(OSError):
        return bool(hub.HF_HUB_OFFLINE or socket.create_connection((url.hostname, url.port or 443), timeout).close())
    hub.HF_HUB_OFFLINE = True
    return True

def read_stats(values, rt, where):
    """Values averaged on the device, read back (one sync; the mean over torchrun's processes). The first is a
    loss: a non-finite one stops every process, and last.pt keeps the last finished epoch."""
    if rt.world > 1:
        dist.all_reduce(values := values.clone())
        values /= rt.world
    values = values.tolist()
    if not math.isfinite(values[0]):
        raise diverged(f"{where} (loss {values[0]})")
    return values

def atomic_write(path, data):
    """bytes, or an object for torch.save, via a temporary file and a rename: any failure leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name[:40]}.tmp{os.getpid()}")  # short, for any legal name; claim_run_folder
    try:  # removes one that a killed process left
        with open(tmp, "wb") as f:
            f.write(data) if isinstance(data, bytes) else torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            why, last = getattr(e, "strerror", None) or "the write did not complete", path.parent / "last.pt"
            raise UserError(f"cannot write {path} ({why}); free space or choose another --out" + (
                f" ({last} holds the finished epochs, to resume from)" if last.is_file() else "")) from None
        raise

def write_json(obj, path):
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())

def read_json(path):
    try:
        return json.load(open(path))
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON): its run cannot be used; run it again (another --out)") from None

def append_jsonl(obj, path):
    """A line of a run's log, strict JSON: a value that is not finite means the run diverged, and it stops there."""
    if bad := next((k for k, v in obj.items() if isinstance(v, float) and not math.isfinite(v)), None):
        raise diverged(f"epoch {obj.get('epoch')} ({bad} {obj[bad]})")
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")

def diverged(where):
    return UserError(f"the run diverged in {where} and stopped; start it again with a lower --lr (another --out)")

def load_checkpoint(path, what="checkpoint", advice="give a file that cass.py wrote"):
    if not Path(path).is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{what} {path} is damaged or was not written by cass.py ({type(e).__name__}); {advice}") \
            from None

def claim(lock):
    """Take `lock`, an OS lock on a file (fcntl.flock: dropped when its process dies, so it cannot wedge, whatever the
    file holds, its owner's pid for messages): the open file, for release(), or None while another holds it."""
    import fcntl
    while True:
        f = open(lock, "a+b", buffering=0)  # unbuffered: closing it writes nothing, on a full disk too
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return f.close()
        with contextlib.suppress(OSError):  # not the file its holder removed as we opened it: ours
            if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                break
        f.close()
    with contextlib.suppress(OSError):  # the pid is only for messages: a full disk does not stop the lock
        f.truncate(0)
        f.write(str(os.getpid()).encode())
    return f

def release(lock):
    Path(lock.name).unlink(missing_ok=True)
    lock.close()

@dataclass
class Run:
    """A run folder while this process writes it: the lock that holds it, and the pending write of last.pt."""
    out: Path
    lock: object = None  # claim()'s open file; None on torchrun's other processes
    writing: object = None  # the Future of the last save_run
    writer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1), repr=False)

def check_run_folder(out, cfg):
    """Before any work: a writable folder outside the data; --resume needs last.pt; a run is never written over."""
    check_output(out, [cfg["root"]] if cfg["root"] else [], folder=True)
    finished = any((out / f).exists() for f in ("cnn.pt", "vit.pt", "best.pt", "metrics.json"))
    if cfg["resume"] and not (out / "last.pt").is_file():
        raise UserError(f"--resume: {out} holds a finished run, whose last.pt went when it ended; to train longer, "
                        "start a new run with another --out (and --keep-last, to resume that one later)" if finished
                        else f"--resume: {out} holds no last.pt, so there is nothing to resume; drop --resume")
    if not cfg["resume"] and (finished or (out / "last.pt").exists()):
        raise UserError(f"{out} already holds a run; choose another --out" + ("" if finished else " (or continue this "
                        "one with --resume)"))

def check_output(path, inputs=(), overwrite=False, folder=False):
    """Before any work: `path` (a file or a run folder) is writable, no input, and (without --overwrite) no result."""
    where = next(p for p in (path, *path.parents) if p.is_dir())  # the folder it is made in, or itself
    why = ("is one of this command's inputs, or inside one" if any(Path(p).resolve() in (path.resolve(),
           *path.resolve().parents) for p in inputs) else
           "is a file, not a folder" if folder and path.is_file() else "is a folder" if not folder and path.is_dir()
           else f"is in {path.parent}, which does not exist" if not folder and not path.parent.is_dir() else
           f"is in {where}, which cannot be written" if not os.access(where, os.W_OK) else
           "exists (add --overwrite to replace it)" if not folder and path.exists() and not overwrite else "")
    if why:
        raise UserError(f"--out {path} {why}; give another --out")

@contextlib.contextmanager
def claim_run_folder(out, cfg, rt, splits, table, saved=None):
    """The run folder, made once the checks have passed and held by a lock file while the run lasts (nothing in it is
    touched before); it gets the run's splits and args.json. `saved`: what restore() read from last.pt. Yields a Run."""
    run = Run(out)
    if rt.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        run.lock = claim(out / "run.lock")
        if run.lock is None:
            pid = (out / "run.lock").read_text(errors="replace").strip() or "unknown"  # empty: written on a full disk
            raise UserError(f"{out} is in use by another running process (pid {pid}); wait for it or choose another "
                            "--out")
    try:
        if rt.rank == 0:
            check_run_folder(out, cfg)  # again, held: a run that ended since the first check is never written over
            for tmp in (*out.glob(".*.tmp*"), *out.glob("splits/.*.tmp*")):  # a killed process's half-written files
                tmp.unlink()
            log = out / "log.jsonl"  # a kill between a log line and last.pt leaves lines too many; a new run: none
            if log.exists():
                atomic_write(log, "".join(open(log).readlines()[:saved["log_lines"] if saved else 0]).encode())
            if saved:
                print(f"resuming {out} after epoch {saved['epoch']}")
            else:
                write_splits(table, splits, out / "splits")
            write_json(cfg, out / "args.json")
        yield run
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (run_command): say what the folder holds, last.pt whole
        wait_written(run)
        raise KeyboardInterrupt("interrupted; " + (f"{out}/last.pt holds the finished epochs: continue with the same "
                                "command plus --resume" if (out / "last.pt").is_file() else "no epoch had finished: "
                                "run the same command again")) from None
    finally:
        try:
            wait_written(run)  # last.pt whole before another run can take the folder
        finally:
            run.lock and release(run.lock)

def save_run(run, state, epoch, cfg, **extra):
    """last.pt after every epoch (state_dicts, SWA's once it averages; random state, config, log length). Training waits
    for a CPU copy (returns its seconds); a thread writes it while the next epoch trains (wait_written awaits it)."""
    wait_written(run)
    log, t0 = run.out / "log.jsonl", time.perf_counter()
    obj = cpu_copy(dict(format="cass-run", epoch=epoch, config=cfg, rng=torch.get_rng_state(), **extra,
                        log_lines=sum(1 for _ in open(log)) if log.exists() else 0,
                        **{k: v.state_dict() for k, v in state.items() if getattr(v, "n_averaged", 1)}))
    run.writing = run.writer.submit(lambda t=time.perf_counter(): atomic_write(run.out / "last.pt", obj) or dict(
        last_pt_bytes=(run.out / "last.pt").stat().st_size, last_pt_seconds=time.perf_counter() - t))
    return time.perf_counter() - t0

def wait_written(run):
    """Waits for the write of last.pt and raises its error; returns its bytes and seconds ({}: none pending)."""
    result = run.writing.result() if run.writing else {}  # interrupted here (a second signal): awaited again later
    run.writing = None
    return result

def cpu_copy(obj):
    """A copy of nested state on the CPU (tensors cloned: training goes on changing the originals)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    return {k: cpu_copy(v) for k, v in obj.items()} if isinstance(obj, dict) else type(obj)(map(cpu_copy, obj)) \
        if isinstance(obj, (list, tuple)) else obj

def restore(state, out):
    """An interrupted run's state from last.pt, read without touching the folder; returns what last.pt holds."""
    saved = load_checkpoint(out / "last.pt", "last.pt", "it cannot be resumed: start the run again with another --out")
    for name in (n for n in state if n in saved or not hasattr(state[n], "n_averaged")):  # SWA before --swa-start:
        state[name].load_state_dict(saved[name])  # not in last.pt (a copy of saved weights), it starts afresh
    torch.set_rng_state(saved["rng"])
    return saved

def finish_run(run, cfg, message):
    """last.pt only serves resuming (268 MB at the tiny preset, ~2 GB at the paper's): it goes unless --keep-last."""
    wait_written(run)
    if not cfg["keep_last"]:
        (run.out / "last.pt").unlink(missing_ok=True)
    print(message.rstrip())

class Progress:
    """tqdm on a terminal; elsewhere (nohup, a log file) a plain line every 30 s, so no epoch is silent."""
    def __init__(self, iterable, desc, show=True):
        self.iterable, self.desc, self.show, self.text, self.bar = iterable, desc, show, "", None
    def __iter__(self):
        if self.show and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(self.iterable, desc=self.desc, leave=False, dynamic_ncols=True)
            yield from self.bar
            return
        t0 = last = time.monotonic()
        for i, item in enumerate(self.iterable, 1):
            yield item
            if self.show and time.monotonic() - last > 30:
                last = time.monotonic()
                print(f"  {self.desc}: step {i}/{len(self.iterable)}, {last - t0:.0f} s  {self.text}", flush=True)
    def note(self, text):
        self.text = text
        self.bar is not None and self.bar.set_postfix_str(text, refresh=False)

# ==== Command line: every flag once, its default from the config above ===========================================

PRESET = "the preset's"  # a flag whose default comes from PAPER / TINY

def window_flag(text):  # --window CENTER,WIDTH -> [centre, width]
    with contextlib.suppress(ValueError):
        if (w := [float(v) for v in text.split(",")]) and len(w) == 2 and math.isfinite(w[0]) and 0 < w[1] < math.inf:
            return w
    raise argparse.ArgumentTypeError(f"{text} is not CENTER,WIDTH with a width above 0 (e.g. 40,80)")
DATA = "dataset: digits (built in), brain_mri, isic2019, autoimmune, folder, csv"
SPLITS = ("committed (data_splits/<data> beside cass.py), auto (stratified, from the images on disk) or a folder of "
          "split files (default: committed where data_splits/<data> exists, else auto")
FLAGS = {  # flag: (commands: p pretrain, f finetune, e evaluate, x predict; default; help, or per command
    # {letter: help, "": the others'}; argparse options). A help that states its default is shown as it is.
    "data": ("pfe", "digits", {"": DATA, "e": DATA + " (default: the checkpoint's)"}, dict(choices=list(DATASETS))),
    "root": ("pfe", None, {"": "the dataset's folder (the .csv file for csv)", "e": "the dataset's folder (default: "
             "the checkpoint's)"}, {}),
    "splits": ("pfe", None, {"": SPLITS + ")", "e": SPLITS + "; for the checkpoint's own dataset: its run's)"}, {}),
    "preset": ("pf", "paper", {"": "paper: resnet50 + ViT-B/16 at 384 px from ImageNet weights (a GPU and the Hugging "
               "Face hub); tiny: small encoders at 64 px from random weights, for a CPU. A flag overrides its preset",
               "f": "paper or tiny"}, dict(choices=["paper", "tiny"])),
    "cnn": ("pf", PRESET, "timm CNN", {}),
    "vit": ("pf", PRESET, "timm ViT", {}),
    "patch_size": ("pf", PRESET, "ViT patch size (paper: the model's own, 16)", {}),
    "img_size": ("pf", PRESET, "image side in pixels", {}),
    "out_dim": ("p", PRESET, "width of both heads, the outputs the loss compares", {}),
    "pretrained": ("p", PRESET, "start from ImageNet weights (from the Hugging Face hub, downloaded on first use)",
                   dict(action=argparse.BooleanOptionalAction)),
    "cnn_weights": ("pf", None, {"": "ImageNet weights of the CNN from this file, not the hub (a state_dict of the "
                    "architecture, or a cnn.pt)", "f": "with --init imagenet: the CNN's weights from this file"}, {}),
    "vit_weights": ("pf", None, "the same for the ViT (default: none)", {}),
    "objective": ("p", "cass", "; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()), dict(choices=list(OBJECTIVES))),
    "vc_weight": ("p", 4.0, "cass-vc: weight of the variance terms against eq. 1 (covariance: 0.04); 4 kept both "
                  "arms spread in the README's runs, 1 (VICReg's ratio) just under half of healthy", {}),
    "init": ("f", None, "a pretraining run folder (with --arm), its cnn.pt or vit.pt, imagenet, random, or random-bn "
             "(random with BatchNorm statistics re-estimated on the training images: the control) (default: none; "
             "one is needed)", {}),
    "arm": ("f", None, "cnn or vit: the encoder to fine-tune (needed with a run folder; default for baselines: cnn)",
            dict(choices=["cnn", "vit"])),
    "label_fraction": ("f", 1.0, "share of the training labels (paper 5): the split train.csv, train_10pct.csv or "
                       "train_1pct.csv", dict(type=float, choices=list(LABEL_FRACTIONS))),
    "mode": ("f", "full", "full: train everything (paper B.2); linear: a head on the frozen encoder's standardised "
             "features (paper 4.2)", dict(choices=["full", "linear"])),
    "class_weights": ("f", "inverse", "focal-loss class weights: inverse frequency, paper (the notebooks' min-max "
                      "counts: the majority weighs most) or none", dict(choices=["inverse", "paper", "none"])),
    "epochs": ("pf", PRESET, {"": "epochs", "f": "epochs at most (early stopping on the validation loss)"}, {}),
    "batch_size": ("pf", PRESET, {"": "global batch, split over torchrun's processes", "f": "batch size"}, {}),
    "lr": ("pf", PRESET, "Adam learning rate", {}),
    "sched_unit": ("p", "epoch", "the cosine schedule moves once per epoch, or per step as the notebooks do",
                   dict(choices=["epoch", "step"])),
    "swa_start": ("p", None, "first epoch (from 0) that SWA averages (default: the last quarter of --epochs; with the "
                  "paper's T_max 16, epochs 75-99 span rates from 1e-6 at epoch 80 to 1e-3 at 96)", dict(type=int)),
    "seed": ("pf", 0, "fixes initialisation, data order and augmentation (the splits have their own seed, 0)", {}),
    "workers": ("pfex", PRESET, "data-loader processes (at most this machine's cores)", {}),
    "device": ("pfex", "auto", "auto: CUDA where there is one", dict(choices=["auto", "cpu", "cuda"])),
    "precision": ("pf", "auto", "auto: bf16 autocast on CUDA from compute capability 8.0, fp16 with loss scaling "
                  "below it, fp32 on a CPU", dict(choices=["auto", "fp32", "bf16", "fp16"])),
    "compile": ("p", False, "torch.compile both encoders (GPU: faster after a minute of compiling)", {}),
    "sync_bn": ("p", False, "under torchrun on CUDA: BatchNorm statistics over the global batch", {}),
    "window": ("pf", None, "DICOM: one window for every file, in the modality's units (CT, Hounsfield: brain 40,80, "
               "lung --window=-600,1500, bone 400,1800) (default: each file's own)", dict(type=window_flag,
                                                                                          metavar="CENTER,WIDTH")),
    "cache_images": ("pf", False, "decode and resize each image once, into a file in --cache-dir that runs share", {}),
    "cache_dir": ("pf", "~/.cache/cass", "where --cache-images keeps the decoded images (a file a dataset, size)", {}),
    "out": ("pfex", None, {"": "the run folder (default: a new one under runs/)", "e": "a JSON file for the metrics "
            "(default: none, printed only)", "x": "the CSV to write (default: predictions.csv)"}, {}),
    "overwrite": ("ex", False, "replace --out where it exists", {}),
    "resume": ("pf", False, "continue the run in --out from its last.pt (its own settings; --epochs, --device, "
               "--workers may change)", {}),
    "keep_last": ("pf", False, "keep last.pt when the run ends, to --resume it later with more --epochs", {}),
    "ckpt": ("ex", None, "a fine-tuned best.pt or its run folder; repeat it for an ensemble (the mean probability)",
             dict(action="append", required=True)),
    "split": ("e", "test", "the split to evaluate", dict(choices=["test", "val"])),
    "images": ("x", None, "a folder of images (searched recursively), an image, or a CSV with an 'image' column",
               dict(required=True)),
}
COMMANDS = dict(pretrain=("p", pretrain, "CASS pretraining of a CNN and a ViT together, without labels"),
                finetune=("f", finetune, "fine-tune one arm on a fraction of the labels (or a baseline)"),
                evaluate=("e", evaluate, "metrics of a fine-tuned checkpoint, or of an ensemble"),
                predict=("x", predict, "class probabilities of new images from fine-tuned checkpoints"))
RESUMABLE = ("epochs", "device", "workers", "keep_last", "resume", "out")  # may differ on --resume (its data may not)
INHERITED = ("preset", "img_size", "patch_size", "window", "data", "root", "splits")  # finetune's from --init
LEAST = dict(epochs=1, batch_size=2, img_size=16, patch_size=1, out_dim=2, workers=0, swa_start=0, seed=0, vc_weight=0,
             lr=1e-12)  # the least value of each that can work

def resolve(command, given, kind=None):
    """A run's config: the flags given (a dict, unset ones left out), then for finetune what the --init run used, then
    the preset's, then the defaults above. A resumed run takes its args.json, not another `kind`'s (tools/dino.py)."""
    if low := next((k for k, v in LEAST.items() if k in given and not v <= given[k] < math.inf), None):  # NaN too
        raise UserError(f"--{low.replace('_', '-')} {given[low]} cannot work: give a number from {LEAST[low]:g} up")
    if given.get("resume") and command in ("pretrain", "finetune"):
        saved = Path(given.get("out") or "") / "args.json"
        if not given.get("out") or not saved.is_file():
            raise UserError(f"--resume: {saved} does not exist, so there is nothing to resume; give the --out of an "
                            "earlier run, or drop --resume")
        cfg = read_json(saved)
        if cfg.get("command") != (kind or command):
            raise UserError(f"--resume: {given['out']} holds a {cfg.get('command')} run, not a {kind or command} one; "
                            "resume it with the command that started it")
        norm = lambda k, v: str(Path(v).resolve()) if k == "root" and v else v  # noqa: E731 (one path, two spellings)
        flag = next((k for k, v in given.items() if k not in RESUMABLE and norm(k, cfg.get(k)) != norm(k, v)), None)
        if flag:
            raise UserError(f"--resume continues {given['out']} with its own settings, but --{flag.replace('_', '-')} "
                            f"{given[flag]} differs from its {cfg.get(flag)}: drop the flag")
        return {**cfg, **{k: given[k] for k in RESUMABLE if k in given}}
    base = init_config(given.get("init")) if command == "finetune" else {}
    if given.get("data", base.get("data")) != base.get("data"):
        base = {k: v for k, v in base.items() if k not in ("data", "root", "splits")}  # another dataset
    preset = given.get("preset") or base.get("preset") or "paper"
    values = {**PAPER, **(TINY if preset == "tiny" else {})}
    if command == "finetune":
        values.update(epochs=values["ft_epochs"], batch_size=values["ft_batch_size"], lr=values["ft_lr"])
    letter = COMMANDS[command][0]
    cfg = {k: v[1] for k, v in FLAGS.items() if letter in v[0]}
    cfg.update({k: v for k, v in values.items() if k in cfg or letter in "pf"})
    cfg.update({**base, **given, "command": command})
    if command == "evaluate" and "data" not in given:
        cfg["data"] = None  # the checkpoint's
    if "workers" in cfg and "workers" not in given:
        cfg["workers"] = min(cfg["workers"], os.cpu_count() or 1)
    if command == "pretrain" and cfg["swa_start"] is None:
        cfg["swa_start"] = int(0.75 * cfg["epochs"])  # SWA over the last quarter of the epochs
    return cfg

def init_config(init):
    """What finetune takes from an --init run folder or encoder file: preset, image and patch size, data, splits."""
    path = Path(init or "")
    if init in (None, "random", "random-bn", "imagenet") or not path.exists():
        return {}
    folder = path if path.is_dir() else path.parent
    cfg = read_json(folder / "args.json") if (folder / "args.json").is_file() else \
        load_checkpoint(path, "--init").get("config", {}) if path.is_file() else {}
    base = {k: cfg[k] for k in INHERITED if k in cfg and cfg[k] is not None}
    return {**base, "splits": str(folder / "splits")} if (folder / "splits" / "train.csv").is_file() else base

def flag_help(key, command):
    """A flag's help for one command, ending with its default (unless required, or stated in the text): a preset's, the
    paper's value and the tiny one; finetune takes the INHERITED ones from the --init run first."""
    cmds, default, text, options = FLAGS[key]
    text = text.get(COMMANDS[command][0], text[""]) if isinstance(text, dict) else text
    ft = "ft_" + key if command == "finetune" and key in ("epochs", "batch_size", "lr") else key
    if default == PRESET:  # the paper's value, and the tiny preset's where the command has --preset
        default = f"paper: {PAPER[ft]}; tiny: {TINY.get(ft, PAPER[ft])}" if command in ("pretrain", "finetune") else \
            PAPER[key]
    default = "none" if default is None else default
    text = text if options.get("required") or "(default: " in text else f"{text} (default: {default})"
    return text.replace("(default: ", "(default: the --init run's, else ") if command == "finetune" and key in \
        INHERITED else text

def add_flag(parser, key, command, prefix=""):
    """A flag of FLAGS on a parser, cass.py's or a tool's. Where FLAGS gives no argparse options they follow from the
    default: False, a switch; a number (or the preset's number), its type."""
    _, default, _, options = FLAGS[key]
    number = PAPER.get(key) or 0 if default == PRESET else default
    kind = dict(action="store_true") if default is False else dict(type=type(number)) if type(number) in (int, float) \
        else {}
    parser.add_argument("--" + key.replace("_", "-"), default=None, help=prefix + flag_help(key, command),
                        **(options or kind))

def build_parser():
    examples = "\n".join(line for line in __doc__.splitlines() if line.startswith("    python"))
    parser = Parser(prog="cass.py", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=f"examples:\n{examples}\n\nThe default --preset paper wants a GPU and the ImageNet weights "
                    "(from the Hugging Face hub); --preset tiny runs on a CPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (letter, _, text) in COMMANDS.items():
        p = sub.add_parser(command, help=text, description=text, allow_abbrev=False)  # --epoch is no --epochs
        for key in (k for k, v in FLAGS.items() if letter in v[0]):
            add_flag(p, key, command)
    return parser

def given_flags(args):
    """The flags a user gave (argparse's default is None for every flag: False is a given --no-...)."""
    return {k: v for k, v in vars(args).items() if v is not None and k != "command"}

def run_command(work, interrupted="interrupted; a run folder that holds a last.pt continues with the same command "
                "plus --resume"):
    """work() as a command (cass.py's and the tools'): a UserError or a file the system refuses is one sentence and
    exit 2; Ctrl-C exits 130 and SIGTERM 143, as shells expect, saying what to do."""
    signals = []  # the one that stopped the run; a KeyboardInterrupt: the loops save and say how to resume
    old = signal.signal(signal.SIGTERM, lambda n, frame: signals.append(n) or signal.default_int_handler(n, frame))
    for stream in (sys.stdout, sys.stderr):  # line by line, and any name a disk allows can be printed
        getattr(stream, "reconfigure", lambda **_: None)(line_buffering=True, errors="backslashreplace")
    try:
        work()
    except BrokenPipeError:  # the reader of the output went (`| head -1`): the command ends quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (UserError, OSError) as e:
        # a message from a DataLoader worker arrives wrapped in its traceback: keep the sentence
        message = str(e).strip().rsplit("UserError: ", 1)[-1] if isinstance(e, UserError) else \
            f"cannot use {e.filename or 'a file'} ({e.strerror or e}); check the path"
        print(f"error: {interrupted if signals else message}", file=sys.stderr)  # a signal may surface as an error
        return 128 + signals[-1] if signals else 2  # (torch.save's writer reports it as a failed write)
    except KeyboardInterrupt as e:
        print(f"error: {str(e) or interrupted}", file=sys.stderr)
        return 128 + (signals[-1] if signals else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence and exit status 2, as every other mistake, not the usage text
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

def main(argv=None):
    args = build_parser().parse_args([str(a) for a in argv] if argv is not None else None)
    return run_command(lambda: COMMANDS[args.command][1](resolve(args.command, given_flags(args))), *(
        () if args.command in ("pretrain", "finetune") else ("interrupted; nothing was written",)))

if __name__ == "__main__":
    sys.exit(main())
