"""CASS: Cross-Architectural Self-Supervision, the reference implementation in one file.

CASS (Singh, Sizikova, Cirrone 2022, arXiv 2206.04170) trains a CNN and a vision transformer
together without labels: one augmented batch goes through both encoders, and the loss pulls
each image's two outputs together (BYOL's normalised MSE, eq. 1):

    loss = mean_over_batch( 2 - 2 * < R / max(||R||, eps), T / max(||T||, eps) > )

Gradients flow into both encoders; there is no momentum encoder, no stop-gradient and no
negative pairs. Afterwards each arm is fine-tuned on a few labels on its own.

Commands (the README has more):

    python cass.py pretrain --data digits --preset tiny          # built in, no download
    python cass.py pretrain --data brain_mri --root DIR          # the paper's settings
    python cass.py finetune --data digits --preset tiny --init runs/RUN --arm cnn --label-fraction 0.1
    python cass.py evaluate --data digits --ckpt runs/FT/best.pt --split test
    python cass.py protocol --data brain_mri --root DIR --preset tiny --seeds 3   # the paper's label-efficiency grid
    python cass.py bench --preset tiny                           # time one pretraining step
    torchrun --nproc_per_node=2 cass.py pretrain ...             # data-parallel (DDP)

Where this file deliberately differs from the authors' notebooks (see SPEC.md):
  1. Gradients are zeroed every step (the notebooks never call zero_grad).
  2. SWA is real: torch.optim.swa_utils.AveragedModel from --swa-start, BatchNorm statistics
     recomputed with update_bn before the averaged CNN is saved (the notebooks' SWA is a no-op).
  3. The cosine schedule (T_max 16, eta_min 1e-6) moves once per *epoch* by default; the
     notebooks step it per batch, so the lr cycles every 32 steps (--sched-unit step).
  4. Pretraining sees the whole training split without labels (not the 10% labelled subset).
  5. Metrics come from scikit-learn and are named for what they are (the notebooks' "F1" is
     micro recall accumulated across epochs).
  6. Class weights default to inverse frequency (the rarest class weighs most); the notebooks'
     min-max normalised counts, which up-weight the majority, are --class-weights paper.
  7. The ViT is validated and saved as itself; validation loss is averaged over the validation
     loader; no evaluation loader drops its last batch.
  8. Splits and nested, stratified label fractions are written to data_splits/ and reused.
  9. Checkpoints are dicts of state_dicts plus config (torch.load(..., weights_only=True)).
 10. Augmentation follows the paper's text: ColorJitter *or* RandomPerspective (one of the two)
     with p=0.3, then RandomAffine(10) with p=0.3, then the flips (the notebooks apply two
     RandomApply blocks that both hold a ColorJitter).

Measured on 2 CPU cores (SPEC.md, last section): from random initialisation CASS collapses
within the first epoch, both encoders emitting the same constant and the loss reaching ~0. A
falling loss proves nothing; watch `std_cnn`/`std_vit` (healthy: about 1/sqrt(out_dim)) and the
k-NN accuracy that pretrain logs every epoch.
"""
import argparse
import contextlib
import csv
import gc
import json
import math
import os
import random
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

HERE = Path(__file__).resolve().parent
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # paper B.1.2
IMAGENET_STD = (0.229, 0.224, 0.225)  # paper B.1.2
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}

# ------------------------------------------------------------------------------------------
# Settings: the paper's protocol in one place, and a tiny preset for CPUs
# ------------------------------------------------------------------------------------------

PRESETS = {
    "paper": dict(
        cnn="resnet50",  # paper 3
        vit="vit_base_patch16_384",  # paper 3
        patch_size=None,  # the timm model's own
        out_dim=1000,  # the ImageNet logits of both timm heads, paper 3
        img_size=384,  # paper B.1.2
        pretrained=True,  # ImageNet initialisation, paper 3
        batch_size=16,  # paper B.1.3
        epochs=100,  # pretraining, paper B.1.3
        lr=1e-3,  # pretraining Adam, both encoders, paper B.1.3
        ft_lr=3e-4,  # fine-tuning Adam, paper B.2.2
        ft_batch_size=16,  # fine-tuning batch, paper B.2.2 (also in the tiny preset: few labels, more steps)
        ft_epochs=50,  # fine-tuning at most, paper 4.2
        patience=5,  # early stopping on validation loss, paper 4.2
        t_max=16,  # cosine annealing, paper B.1.3
        eta_min=1e-6,  # paper B.1.3
        workers=4,
        precision="auto",
    ),
    "tiny": dict(  # CPU smoke runs: small encoders, small images, random init
        cnn="resnet18",
        vit="vit_tiny_patch16_224",
        patch_size=8,  # 64 px / 8 = 8x8 tokens
        out_dim=256,
        img_size=64,
        pretrained=False,
        batch_size=64,
        epochs=3,
        ft_epochs=15,
        workers=2,
    ),
}
HEADLINE = {"brain_mri": "f1_macro", "isic2019": "balanced_accuracy", "autoimmune": "f1_macro"}
LABEL_FRACTIONS = {1.0: "train", 0.1: "train_10pct", 0.01: "train_1pct"}  # paper 5


class UserError(Exception):
    """A mistake the user can fix: printed as one sentence, exit status 2, no traceback."""


def resolve_config(args, kind):
    """Preset values, overridden by every flag the user gave (flags default to None)."""
    preset = dict(PRESETS["paper"])
    preset.update(PRESETS[args.preset])
    cfg = {k: v for k, v in vars(args).items() if k != "func"}
    for key, value in preset.items():
        if cfg.get(key) is None:
            cfg[key] = value
    if kind == "finetune":
        cfg["lr"] = args.lr if args.lr is not None else preset["ft_lr"]
        cfg["epochs"] = args.epochs if args.epochs is not None else preset["ft_epochs"]
        cfg["batch_size"] = args.batch_size if args.batch_size is not None else preset["ft_batch_size"]
    if args.workers is None:  # the preset's workers, but never more than this machine's cores
        cfg["workers"] = min(cfg["workers"], os.cpu_count() or 1)
    if cfg.get("swa_start") is None and kind == "pretrain":
        cfg["swa_start"] = int(0.75 * cfg["epochs"])  # average the last quarter of the epochs
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()}


# ------------------------------------------------------------------------------------------
# Files: atomic writes, so that a process killed at any moment leaves the last good copy
# ------------------------------------------------------------------------------------------


def _atomic(path, write):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one


def save_checkpoint(obj, path):
    _atomic(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def append_jsonl(obj, path):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path, what="checkpoint"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{what} {path} is not a file written by cass.py ({type(e).__name__})") from None


# ------------------------------------------------------------------------------------------
# Data: one table per dataset (keys, labels, given splits), split files, image decoding
# ------------------------------------------------------------------------------------------


@dataclass
class Table:
    """What a dataset is: its image keys, labels, classes and any splits its curators fixed.

    A key is the image's path relative to `image_dir` (plus `suffix`), or "array/index" for
    datasets stored as arrays (MedMNIST .npz, the built-in digits).
    """

    name: str
    classes: list
    multilabel: bool
    labels: dict  # key -> multi-hot float32 [C]; absent for unlabelled images
    keys: list
    given: dict = field(default_factory=dict)  # split name -> keys (e.g. the curator's test set)
    image_dir: str = ""
    suffix: str = ""
    arrays: dict = None  # array name -> uint8 images [N, H, W] or [N, H, W, C]

    def path(self, key):
        return Path(self.image_dir) / f"{key}{self.suffix}"

    def strata(self, keys):
        """The class used to stratify each key: its class, or its rarest positive label."""
        if not self.multilabel:
            return [int(np.argmax(self.labels[k])) for k in keys]
        freq = np.sum([self.labels[k] for k in keys], axis=0)
        out = []
        for k in keys:
            pos = np.flatnonzero(self.labels[k])
            out.append(int(pos[np.argmin(freq[pos])]) if len(pos) else -1)
        return out


def _image_files(folder):
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _class_tree(root, rel_paths, name, layout):
    """Table of a <class>/<image> tree from paths relative to `root`."""
    classes = sorted({Path(p).parts[-2] for p in rel_paths})
    if not classes:
        raise UserError(f"no images found under {root}; --data {name} expects {layout}")
    onehot = np.eye(len(classes), dtype=np.float32)
    labels = {p: onehot[classes.index(Path(p).parts[-2])] for p in rel_paths}
    return Table(name, classes, False, labels, list(rel_paths), image_dir=str(root))


def _scan_class_folders(folder, root, name, layout):
    rel = []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        files = _image_files(sub)
        if not files:
            raise UserError(f"class folder {sub} holds no images; remove it or add images "
                            f"(--data {name} expects {layout})")
        rel += [str(f.relative_to(root)) for f in files]
    return rel


def table_brain_mri(root, listing=None):
    layout = "ROOT/Training/<class>/*.jpg and ROOT/Testing/<class>/*.jpg (the Kaggle layout)"
    root = Path(root)
    if listing is None:
        if not (root / "Training").is_dir() or not (root / "Testing").is_dir():
            raise UserError(f"{root} is not in the brain_mri layout: expected {layout}")
        listing = _scan_class_folders(root / "Training", root, "brain_mri", layout)
        listing += _scan_class_folders(root / "Testing", root, "brain_mri", layout)
    table = _class_tree(root, listing, "brain_mri", layout)
    table.given["test"] = [k for k in table.keys if k.startswith("Testing/")]  # paper 4.3
    return table


def table_folder(root):
    layout = "ROOT/<class>/<image> (one folder per class)"
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root} is not a folder; --data folder expects {layout}")
    return _class_tree(root, _scan_class_folders(root, root, "folder", layout), "folder", layout)


def _read_csv(path):
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read CSV {path}: {e}") from None
    if not rows or not rows[0]:
        raise UserError(f"CSV {path} is empty")
    return rows[0], rows[1:]


def _label_columns(path, header, rows, classes=None):
    """Labels from a `label` column (class names) or one 0/1 column per class."""
    if header[0] != "image":
        raise UserError(f"CSV {path} must start with an 'image' column; its header is {header[:5]}")
    if len(header) == 1:
        return [], False, {}
    if header[1:] == ["label"]:
        names = classes or sorted({r[1] for r in rows if len(r) > 1 and r[1] != ""})
        eye = np.eye(len(names), dtype=np.float32)
        unknown = sorted({r[1] for r in rows if r[1] not in names and r[1] != ""})
        if unknown:
            raise UserError(f"CSV {path} has labels {unknown[:5]} that are not classes of this dataset")
        return names, False, {r[0]: eye[names.index(r[1])] for r in rows if r[1] != ""}
    names = header[1:]
    labels = {}
    for i, r in enumerate(rows):
        if len(r) == len(header) and all(v == "" for v in r[1:]):
            continue  # an unlabelled image (pretraining only)
        if len(r) != len(header) or any(v not in ("0", "1", "0.0", "1.0") for v in r[1:]):
            raise UserError(f"CSV {path}, row {i + 2}: the label columns {names[:5]} must hold 0 or 1, "
                            f"got {r[1:6]}")
        labels[r[0]] = np.array([float(v) for v in r[1:]], dtype=np.float32)
    multilabel = any(v.sum() != 1 for v in labels.values())
    return names, multilabel, labels


def table_csv(root, name="csv"):
    path = Path(root)
    if not path.is_file():
        raise UserError(f"--root {path} is not a file; --data {name} expects a CSV of 'image' paths "
                        "plus a 'label' column or one 0/1 column per class")
    header, rows = _read_csv(path)
    classes, multilabel, labels = _label_columns(path, header, rows)
    return Table(name, classes, multilabel, labels, [r[0] for r in rows], image_dir=str(path.parent))


def table_isic2019(root, gt_csv=None):
    root = Path(root)
    gt_csv = Path(gt_csv or root / "ISIC_2019_Training_GroundTruth.csv")
    layout = "ROOT/ISIC_2019_Training_Input/ISIC_*.jpg and ROOT/ISIC_2019_Training_GroundTruth.csv"
    if not gt_csv.is_file():
        raise UserError(f"{gt_csv} does not exist; --data isic2019 expects {layout}")
    header, rows = _read_csv(gt_csv)
    if "UNK" in header:  # empty in the training set
        drop = header.index("UNK")
        header = header[:drop] + header[drop + 1:]
        rows = [r[:drop] + r[drop + 1:] for r in rows]
    classes, _, labels = _label_columns(gt_csv, header, rows)
    bad = [k for k, v in labels.items() if v.sum() != 1]
    if bad:
        raise UserError(f"{gt_csv}: {len(bad)} rows are not one-hot, e.g. {bad[:3]}")
    table = Table("isic2019", classes, False, labels, [r[0] for r in rows],
                  image_dir=str(root / "ISIC_2019_Training_Input"), suffix=".jpg")
    return table


def table_autoimmune(root):
    path = Path(root) / "labels.csv"
    if not path.is_file():
        raise UserError(f"{path} does not exist; --data autoimmune expects ROOT/labels.csv "
                        "(column 'image', then one 0/1 column per label) with the images beside it")
    table = table_csv(path, "autoimmune")
    table.multilabel = True  # the task is multi-label even where a row has one label
    return table


def table_medmnist(root):
    path = Path(root)
    try:
        npz = np.load(path)
        arrays = {s: npz[f"{s}_images"] for s in ("train", "val", "test")}
        raw = {s: np.asarray(npz[f"{s}_labels"]) for s in ("train", "val", "test")}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--root {path} is not a MedMNIST .npz with keys train_images, train_labels, "
                        f"val_images, ... ({e})") from None
    flat = {s: (y.reshape(-1) if y.ndim == 1 or y.shape[1] == 1 else y) for s, y in raw.items()}
    multilabel = flat["train"].ndim == 2
    n_cls = flat["train"].shape[1] if multilabel else int(max(y.max() for y in flat.values())) + 1
    eye = np.eye(n_cls, dtype=np.float32)
    labels, given = {}, {}
    for s, y in flat.items():
        given[s] = [f"{s}/{i}" for i in range(len(y))]
        for key, v in zip(given[s], y):
            labels[key] = v.astype(np.float32) if multilabel else eye[int(v)]
    keys = [k for s in given for k in given[s]]
    return Table("medmnist", [str(c) for c in range(n_cls)], multilabel, labels, keys, given, arrays=arrays)


def table_digits(root=None):
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    eye = np.eye(10, dtype=np.float32)
    keys = [f"digits/{i}" for i in range(len(images))]
    labels = {k: eye[y] for k, y in zip(keys, d.target)}
    return Table("digits", [str(c) for c in range(10)], False, labels, keys, arrays={"digits": images})


DATASETS = {
    "digits": table_digits, "brain_mri": table_brain_mri, "isic2019": table_isic2019,
    "autoimmune": table_autoimmune, "folder": table_folder, "csv": table_csv, "medmnist": table_medmnist,
}


def load_table(data, root):
    if data != "digits":
        if root is None:
            raise UserError(f"--data {data} needs --root (the dataset folder or file)")
        if not Path(root).exists():
            raise UserError(f"--root {root} does not exist")
    return DATASETS[data](root)


def _stratified_counts(keys, strata, count_of_class, rng):
    """Per class, a seeded shuffle of its members and how many of them to take."""
    picked = []
    for c in sorted(set(strata)):
        members = [k for k, s in zip(keys, strata) if s == c]
        order = [members[i] for i in rng.permutation(len(members))]
        picked += order[: count_of_class(c, len(members))]
    chosen = set(picked)
    return [k for k in keys if k in chosen]  # keep the table's order


def make_splits(table, seed=0, val_fraction=0.1, test_fraction=0.1):
    """train/val/test plus nested label fractions, stratified and deterministic for a seed.

    Curator splits (table.given) are kept. Otherwise test and val each take `*_fraction` of
    every class (of the whole dataset; of Training for brain_mri's val). train_10pct is 10% of
    each class of train and train_1pct is 1% of each class of train, drawn *from train_10pct*,
    so 1% is inside 10% is inside 100%. Every class keeps at least one example.
    """
    rng = np.random.default_rng(seed)
    labelled = [k for k in table.keys if k in table.labels]
    splits = {s: list(v) for s, v in table.given.items()}

    def take(pool, frac):
        return _stratified_counts(pool, table.strata(pool), lambda c, n: min(n, max(1, round(frac * n))), rng)

    if "test" not in splits:
        splits["test"] = take(labelled, test_fraction)
    if "val" not in splits:
        used = set(splits["test"])
        pool = [k for k in labelled if k not in used]
        frac = val_fraction if table.given.get("test") else val_fraction / (1 - test_fraction)
        splits["val"] = take(pool, frac)
    if "train" not in splits:
        used = set(splits["test"]) | set(splits["val"])
        splits["train"] = [k for k in table.keys if k not in used]  # unlabelled images too
    train = [k for k in splits["train"] if k in table.labels]
    strata = table.strata(train)
    per_class = {c: strata.count(c) for c in set(strata)}
    splits["train_10pct"] = _stratified_counts(train, strata, lambda c, n: max(1, round(0.1 * n)), rng)
    ten_strata = table.strata(splits["train_10pct"])
    splits["train_1pct"] = _stratified_counts(
        splits["train_10pct"], ten_strata, lambda c, n: min(n, max(1, round(0.01 * per_class[c]))), rng)
    return splits


def write_splits(table, splits, folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = ["image"] + (list(table.classes) if table.multilabel else ["label"])
    for name, keys in splits.items():
        rows = [header]
        for k in keys:
            y = table.labels.get(k)
            if y is None:
                rows.append([k] + [""] * (len(header) - 1))
            elif table.multilabel:
                rows.append([k] + [str(int(v)) for v in y])
            else:
                rows.append([k, table.classes[int(np.argmax(y))]])
        text = "".join(",".join(r) + "\n" for r in rows)
        _atomic(folder / f"{name}.csv", lambda f: f.write(text.encode()))


def read_split(table, folder, name):
    path = Path(folder) / f"{name}.csv"
    if not path.is_file():
        raise UserError(f"split file {path} does not exist; use --splits auto to compute splits from the data")
    header, rows = _read_csv(path)
    _, _, labels = _label_columns(path, header, rows, None if table.multilabel else table.classes)
    for k, y in labels.items():  # the split file's labels win (they are what was committed)
        table.labels.setdefault(k, y)
    return [r[0] for r in rows]


def check_images_exist(table, keys, where):
    """Every listed image exists and is not empty (one stat per file: datasets hold 25,000)."""
    missing, empty = [], []
    for k in keys:
        if table.arrays is not None:
            name, _, index = k.partition("/")
            if name not in table.arrays or not index.isdigit() or int(index) >= len(table.arrays[name]):
                missing.append(k)
            continue
        try:
            if table.path(k).stat().st_size == 0:
                empty.append(k)
        except OSError:
            missing.append(k)
    if missing:
        raise UserError(f"{len(missing)} of the {len(keys)} images that {where} lists are missing under "
                        f"{table.image_dir or 'the arrays'} (first: {', '.join(missing[:3])}); "
                        "use --splits auto to compute splits from the files on disk")
    if empty:
        raise UserError(f"{len(empty)} image file(s) are empty (0 bytes), first: {table.path(empty[0])}; "
                        "remove or replace them")


def resolve_splits(cfg, table, out_dir):
    """The split files to use: committed ones by default, fresh ones with --splits auto."""
    choice = cfg["splits"] or ("committed" if (HERE / "data_splits" / cfg["data"]).is_dir() else "auto")
    if choice == "committed":
        folder = HERE / "data_splits" / cfg["data"]
        if not folder.is_dir():
            raise UserError(f"no committed splits for --data {cfg['data']} in {folder}; use --splits auto")
    elif choice == "auto":
        folder = Path(out_dir) / "splits"
        if not (folder / "train.csv").is_file():
            write_splits(table, make_splits(table, cfg["split_seed"]), folder)
    else:
        folder = Path(choice)
    return folder


def load_split(table, folder, name):
    keys = read_split(table, folder, name)
    check_images_exist(table, keys, f"{Path(folder) / name}.csv")
    return keys


def _to_rgb_uint8(img):
    """Any PIL image (grey, RGB, RGBA, palette, 16-bit, float) as an [H, W, 3] uint8 array."""
    from PIL import Image

    if img.mode in ("RGB", "L"):
        arr = np.asarray(img)
    elif img.mode.startswith("I") or img.mode == "F":  # 16-bit or 32-bit single channel
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
    else:  # RGBA, LA, P, CMYK, ...: let PIL composite/convert
        arr = np.asarray(img.convert("RGB"))
    if arr.ndim == 3 and arr.dtype == np.uint16:
        arr = (arr / 257).astype(np.uint8)
    return arr


def decode_image(table, key, size):
    """One image as a [3, size, size] uint8 tensor (paper B.1.2: Resize(size, size) first)."""
    from PIL import Image

    if table.arrays is not None:
        name, index = key.split("/")
        arr = table.arrays[name][int(index)]
        if arr.dtype != np.uint8:
            arr = _to_rgb_uint8(Image.fromarray(arr))
        img = Image.fromarray(arr)
    else:
        path = table.path(key)
        try:
            with Image.open(path) as raw:
                raw.load()
                img = Image.fromarray(_to_rgb_uint8(raw))
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot decode image {path} ({e}); remove or replace this file") from None
    img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]


class ImageDataset(Dataset):
    """Images of one split, decoded at `size` and augmented on uint8 tensors.

    Items are (index, seed) pairs from EpochSampler: each image's augmentation is drawn from
    its own seed, so a run is reproducible whatever the workers, GPUs or resume point.
    Returns the augmented uint8 image [3, size, size] and the multi-hot target [C].
    """

    def __init__(self, table, keys, size, transform=None, cache=None):
        self.table, self.keys, self.size, self.transform = table, list(keys), size, transform
        self.cache = cache  # optional uint8 [N, 3, size, size], decoded once (see decode_all)
        n_cls = max(len(table.classes), 1)
        self.targets = torch.stack([torch.as_tensor(table.labels.get(k, np.zeros(n_cls, np.float32)))
                                    for k in self.keys]) if self.keys else torch.zeros(0, n_cls)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        img = self.cache[index] if self.cache is not None else decode_image(self.table, self.keys[index], self.size)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
                if seed is not None:
                    torch.manual_seed(seed)
                img = self.transform(img)
        return img, self.targets[index]


def decode_all(dataset, workers):
    """Decode and resize every image once (the cache that --cache-images reuses each epoch)."""
    # its own generator: a loader draws a seed from the global RNG, which would shift the run's
    # random numbers and make a cached run differ from an uncached one
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, shuffle=False, generator=torch.Generator())
    return torch.cat([x for x, _ in progress(loader, "decoding images")]) if len(dataset) else None


_DECODED = {}  # (dataset, root, size, keys) -> uint8 images: shared by the runs of one process


def cached_images(table, keys, cfg):
    """Under --cache-images (else None): decode_all, remembered for the life of the process, so
    that the dozens of fine-tuning runs of `protocol` decode each split once, not every epoch."""
    if not cfg["cache_images"]:
        return None
    size, workers = cfg["img_size"], cfg["workers"]
    if table.arrays is not None:  # already in memory: nothing worth remembering
        return decode_all(ImageDataset(table, keys, size), workers)
    key = (table.name, table.image_dir, size, tuple(keys))
    if key not in _DECODED:
        _DECODED[key] = decode_all(ImageDataset(table, keys, size), workers)
    return _DECODED[key]


class EpochSampler(Sampler):
    """A seeded permutation per epoch, cut into global batches and shared among DDP ranks.

    Rank r of W takes its slice of every global batch, so W processes see exactly the images a
    single process would see with the same global batch. `start` skips the batches already
    done when a run resumes mid-epoch. Yields (index, augmentation seed) pairs.
    """

    def __init__(self, n, global_batch, seed, shuffle=True, drop_last=True, rank=0, world=1):
        self.n, self.batch, self.seed, self.shuffle = n, global_batch, seed, shuffle
        self.drop_last, self.rank, self.world, self.epoch, self.start = drop_last, rank, world, 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start = epoch, start_step

    def steps(self):
        return self.n // self.batch if self.drop_last else math.ceil(self.n / self.batch)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**62, self.n)
        per_rank = self.batch // self.world
        for b in range(self.start, self.steps()):
            chunk = order[b * self.batch:(b + 1) * self.batch]
            mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world > 1 else chunk
            for i in mine:
                yield int(i), int(seeds[i])

    def __len__(self):
        return max(0, self.steps() - self.start) * (self.batch // self.world)


# ------------------------------------------------------------------------------------------
# Augmentations (paper B.1.2; the same ones for fine-tuning, B.2.1)
# ------------------------------------------------------------------------------------------


def cass_augment():
    """The paper's augmentation on uint8 images; normalisation happens on the device."""
    from torchvision.transforms import v2 as T

    return T.Compose([
        T.RandomApply([T.RandomChoice([T.ColorJitter(0.2, 0.2, 0.2),
                                       T.RandomPerspective(distortion_scale=0.2, p=1.0)])], p=0.3),
        T.RandomApply([T.RandomAffine(degrees=10)], p=0.3),
        T.RandomVerticalFlip(p=0.3),
        T.RandomHorizontalFlip(p=0.3),
    ])


def normalize(x, channels_last=False):
    """uint8 [B, 3, H, W] -> float, ImageNet mean/std (paper B.1.2), done on the device."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    x = (x.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ------------------------------------------------------------------------------------------
# Encoders: timm ResNet and ViT, heads of the same width
# ------------------------------------------------------------------------------------------


def is_vit(name):
    return name.startswith(("vit", "deit", "eva", "beit"))


def encoder_kwargs(name, img_size, patch_size=None):
    kwargs = {}
    if is_vit(name):
        kwargs["img_size"] = img_size
        if patch_size:
            kwargs["patch_size"] = patch_size
            if img_size % patch_size:
                raise UserError(f"--img-size {img_size} is not a multiple of the ViT patch size {patch_size}")
    return kwargs


def _hub_reachable(timeout=5.0):
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    url = urlparse(hub.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_encoder(name, num_classes, kwargs, pretrained=False, weights=None, flag="--cnn-weights"):
    """A timm model with a `num_classes`-wide head: random, ImageNet, or from a local file.

    ImageNet weights come from the Hugging Face hub through timm. Offline they come from the
    local cache or fail at once with a message, instead of timm's minute of retries.
    """
    import timm

    try:
        if weights:
            obj = load_checkpoint(weights, flag)
            if isinstance(obj, dict) and obj.get("format") == "cass-encoder":
                if obj["model"] != name:
                    raise UserError(f"{flag} {weights} holds a {obj['model']}, not the {name} asked for; "
                                    f"pass --{'vit' if is_vit(name) else 'cnn'} {obj['model']}")
                return load_encoder(obj, weights, num_classes=num_classes)
            # Any plain state_dict of this architecture (timm's own loader drops a classifier
            # whose width differs from num_classes).
            return timm.create_model(name, pretrained=True, num_classes=num_classes,
                                     pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
        if pretrained:
            import huggingface_hub.constants as hub

            if not _hub_reachable():
                hub.HF_HUB_OFFLINE = True  # use the cache only: no retry loop
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except UserError:
        raise
    except RuntimeError as e:
        if weights:
            raise UserError(f"{flag} {weights} does not fit {name} ({str(e).splitlines()[0][:200]})") from None
        raise
    except Exception as e:
        if not (pretrained or weights):
            raise
        raise UserError(f"cannot load ImageNet weights for {name} ({type(e).__name__}: no network or no "
                        f"cached copy); use --no-pretrained for random initialisation, or --cnn-weights FILE / "
                        f"--vit-weights FILE for weights on disk") from None


def encoder_record(model, name, kwargs, arm, cfg, **extra):
    """An encoder checkpoint: state_dict + what timm needs to rebuild it (weights_only-safe)."""
    sd = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return dict(format="cass-encoder", model=name, num_classes=unwrap(model).num_classes,
                kwargs=kwargs, arm=arm, state_dict=sd, config=cfg, **extra)


def load_encoder(obj, path="", num_classes=None):
    """Rebuild an encoder from encoder_record(); the head is re-sized when num_classes differs."""
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
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model


# ------------------------------------------------------------------------------------------
# Losses: CASS (eq. 1) and focal loss for fine-tuning (paper 4.2, B.2.2)
# ------------------------------------------------------------------------------------------


def cass_loss(cnn_logits, vit_logits, eps=1e-12):
    """eq. 1: mean over the batch of 2 - 2 cos(R, T). [B, D], [B, D] -> scalar; 0 when equal, 4 when opposite."""
    r = F.normalize(cnn_logits.float(), dim=-1, eps=eps)  # R / max(||R||, eps)
    t = F.normalize(vit_logits.float(), dim=-1, eps=eps)
    return (2 - 2 * (r * t).sum(dim=-1)).mean()


def focal_loss(logits, targets, alpha=1.0, gamma=2.0, class_weights=None):
    """Sigmoid focal loss (Lin et al. 2017) over multi-hot targets [B, C], mean-reduced.

    Each class's term is alpha * (1 - p_t)^gamma * BCE, times its class weight.
    With gamma 0, alpha 1 and no weights it is binary cross-entropy with logits.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")  # [B, C]
    p_t = torch.exp(-bce)  # the probability given to the true value of each class
    loss = alpha * (1 - p_t) ** gamma * bce
    if class_weights is not None:
        loss = loss * class_weights.to(loss.device)  # [C] broadcast over the batch
    return loss.mean()


def class_weights(counts, kind="inverse"):
    """Per-class weights for focal_loss from the training split's class counts [C].

    inverse (default): N / (C * count), the rarest class weighs most; the mean weight is 1.
    paper: the authors' min-max normalised class counts mapped into [0.2, 1]: the majority
        class weighs 1.0 and the rarest 0.2, which up-weights the majority (SPEC.md, bug 6).
    none: no weights.
    """
    counts = torch.as_tensor(counts, dtype=torch.float32).clamp(min=1)
    if kind == "none":
        return None
    if kind == "inverse":
        w = counts.sum() / (len(counts) * counts)
        return w / w.mean()
    if kind == "paper":
        span = (counts.max() - counts.min()).clamp(min=1e-12)
        return 0.2 + 0.8 * (counts - counts.min()) / span
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------
# Metrics and monitors
# ------------------------------------------------------------------------------------------


def classification_metrics(probs, targets, multilabel, classes):
    """scikit-learn metrics, each named for what it is. probs, targets: [N, C] arrays."""
    from sklearn import metrics as M

    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    labels = list(range(len(classes)))
    if multilabel:
        pred = (probs > 0.5).astype(int)
        y = targets.astype(int)
        per = M.f1_score(y, pred, average=None, labels=labels, zero_division=0)
        present = y.sum(0) > 0
        return dict(
            f1_micro=float(M.f1_score(y, pred, average="micro", zero_division=0)),
            f1_macro=float(M.f1_score(y, pred, average="macro", zero_division=0)),
            f1_samples=float(M.f1_score(y, pred, average="samples", zero_division=0)),
            mean_average_precision=float(M.average_precision_score(y[:, present], probs[:, present], average="macro"))
            if present.any() else None,
            per_label_f1={c: float(f) for c, f in zip(classes, per)},
        )
    y, pred = targets.argmax(1), probs.argmax(1)
    p, r, f, s = M.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    try:
        auc = float(M.roc_auc_score(y, probs, multi_class="ovr", labels=labels)) if len(labels) > 2 else \
            float(M.roc_auc_score(y, probs[:, 1]))
    except ValueError:  # a class absent from y
        auc = None
    return dict(
        accuracy=float(M.accuracy_score(y, pred)),
        balanced_accuracy=float(M.balanced_accuracy_score(y, pred)),
        f1_macro=float(M.f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
        f1_weighted=float(M.f1_score(y, pred, average="weighted", labels=labels, zero_division=0)),
        roc_auc_ovr=auc,
        per_class={c: dict(precision=float(p[i]), recall=float(r[i]), f1=float(f[i]), support=int(s[i]))
                   for i, c in enumerate(classes)},
        confusion_matrix=M.confusion_matrix(y, pred, labels=labels).tolist(),
    )


def headline_metric(data):
    """The metric the paper reports for a dataset (paper 4.3), printed first."""
    return HEADLINE.get(data, "f1_macro")


def output_spread(outputs):
    """Collapse monitor: mean per-dimension std of the L2-normalised outputs [B, D].

    About 1/sqrt(D) when the outputs spread over the sphere; 0 when every image gets the same
    vector (collapse).
    """
    z = F.normalize(outputs.float(), dim=-1)
    return float(z.std(dim=0).mean()) if len(z) > 1 else float("nan")


def knn_accuracy(train_x, train_y, test_x, test_y, k=20):
    """k-NN accuracy with cosine similarity, votes weighted by similarity. y: class indices."""
    train_x, test_x = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)
    sims = test_x @ train_x.T  # [N_test, N_train]
    k = min(k, len(train_x))
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(test_x), int(max(train_y.max(), test_y.max())) + 1)
    votes.scatter_add_(1, train_y[idx], top.clamp(min=0) + 1e-6)
    return float((votes.argmax(1) == test_y).float().mean())


@torch.no_grad()
def encode(model, loader, rt):
    """Pooled backbone features and head outputs of every image, no augmentation, eval mode."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    feats, outs, ys = [], [], []
    for x, y in loader:
        x = normalize(x.to(rt.device, non_blocking=True), rt.channels_last and not is_vit_model(model))
        with rt.autocast():
            f = model.forward_head(model.forward_features(x), pre_logits=True)  # [B, F]
            o = model.get_classifier()(f)  # [B, D]
        feats.append(f.float().cpu())
        outs.append(o.float().cpu())
        ys.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(outs), torch.cat(ys)


def is_vit_model(model):
    return hasattr(unwrap(model), "patch_embed")


# ------------------------------------------------------------------------------------------
# Runtime: device, precision, DDP, decided once; the training loops do not branch on them
# ------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype = None
    channels_last: bool = False
    rank: int = 0
    world: int = 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def main(self):
        return self.rank == 0

    def scaler(self):
        # fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a no-op).
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def make_runtime(device="auto", precision="auto", channels_last=True):
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this machine has no CUDA GPU; use --device cpu or auto")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if use_cuda else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(dev, dtype, channels_last, rank, world)


def progress(iterable, desc, total=None, disable=False):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=disable or None)


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop stops after the current step and saves last.pt."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after this step", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_run_dir(out, resume, overwrite, rt):
    out = Path(out)
    if rt.main:
        exists = (out / "args.json").exists() or (out / "last.pt").exists()
        if resume and not (out / "last.pt").exists():
            raise UserError(f"--resume: {out}/last.pt does not exist, so there is nothing to resume; "
                            "drop --resume to start a new run")
        if exists and not resume and not overwrite:
            raise UserError(f"{out} already holds a run; add --resume to continue it, --overwrite to replace "
                            "it, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    return out


def default_out(kind, cfg):
    return Path("runs") / f"{kind}-{cfg['data']}-{time.strftime('%Y%m%d-%H%M%S')}"


def _ignore_sigint(_worker_id):
    # Ctrl-C reaches every process of the terminal's group: let the main process alone handle
    # it (finish the step, save last.pt) instead of workers dying under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, sampler, per_rank_batch, workers, rt):
    if getattr(dataset, "cache", None) is not None and getattr(dataset, "transform", None) is None:
        workers = 0  # decoded already and nothing to augment: workers would only add start-up and copies
    # a training loader (it has a sampler) keeps its workers between epochs: no start-up each epoch
    return DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, num_workers=workers,
                      pin_memory=rt.device.type == "cuda", worker_init_fn=_ignore_sigint if workers else None,
                      persistent_workers=bool(workers) and sampler is not None)


def restore(objects, saved, out, rt):
    """Load every state_dict of a resumed run, its RNG states and where it stopped."""
    for name, obj in objects.items():
        obj.load_state_dict(saved[name])
    set_rng_state(saved["rng"])
    if rt.main:
        trim_log(out / "log.jsonl", saved["epoch"])
        print(f"resuming {out} after epoch {saved['epoch']}" +
              (f", step {saved['acc']['step']} of the next" if saved["acc"]["step"] else ""))
    return saved["epoch"], saved["acc"]


def save_run(objects, path, **extra):
    """last.pt: every state_dict, the RNG states, the epoch and step reached, the config."""
    save_checkpoint(dict(format="cass-run", rng=rng_state(), **extra,
                         **{name: obj.state_dict() for name, obj in objects.items()}), path)


def interrupted(out, epoch, step=None):
    """Epochs count from 1, as in log.jsonl; `epoch` is the 0-based index when a step is given."""
    where = f"in epoch {epoch + 1}, after step {step}" if step is not None else f"after epoch {epoch}"
    return UserError(f"interrupted {where}; saved {out}/last.pt; continue with the same command plus "
                     f"--resume --out {out}")


def diverged(error, out, lr):
    return UserError(f"{error}; stopped without saving, so {out}/last.pt still holds the last good state; "
                     f"try a lower --lr (now {lr:g})")


def trim_log(path, epoch):
    """On resume, drop log lines written after the checkpoint (a kill between the two writes)."""
    if Path(path).exists():
        keep = [line for line in open(path) if json.loads(line)["epoch"] <= epoch]
        _atomic(path, lambda f: f.write("".join(keep).encode()))


def cosine_schedule(optimizer, cfg):
    """Cosine annealing, T_max 16, eta_min 1e-6 (paper B.1.3), stepped per epoch or step (--sched-unit)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["t_max"], eta_min=cfg["eta_min"])


def make_adam(params, lr, fused=True):
    """Adam (paper B.1.3); fused kernels on CUDA and CPU when this torch has them."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


class NonFiniteLoss(Exception):
    pass


# ------------------------------------------------------------------------------------------
# Pretraining
# ------------------------------------------------------------------------------------------


def global_mean(loss, rt, sharded=True):
    """The loss of the whole global batch (the mean over DDP processes), as a Python float.

    Every process gets the same value, so all of them stop together on a non-finite loss.
    """
    if sharded and rt.world > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= rt.world
    return float(loss)


def pretrain_step(cnn, vit, x, optimizer, scaler, rt):
    """One CASS step. x: uint8 [B, 3, H, W] on the device. Returns the loss and both outputs."""
    optimizer.zero_grad(set_to_none=True)  # the notebooks never do this (SPEC bug 1)
    with rt.autocast():
        r = cnn(normalize(x, rt.channels_last))  # [B, D] CNN logits
        t = vit(normalize(x))  # [B, D] ViT logits
        loss = cass_loss(r, t)  # eq. 1; gradients reach both encoders
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), r.detach(), t.detach()


def step_stats(r, t):
    """Collapse monitor of one step: output spread of each arm and their mean cosine, one device sync."""
    zr, zt = F.normalize(r.float(), dim=-1), F.normalize(t.float(), dim=-1)  # [B, D] each
    return torch.stack([zr.std(dim=0).mean(), zt.std(dim=0).mean(), (zr * zt).sum(dim=-1).mean()]).tolist()


def pretrain_one_epoch(cnn, vit, loader, optimizer, scaler, scheduler, rt, cfg, epoch, acc, stop):
    """Train one epoch (or the rest of one, when resuming); returns the epoch's accumulators.

    `acc` carries the running sums so that an epoch cut by Ctrl-C and resumed logs the same
    numbers as an uninterrupted one.
    """
    cnn.train()
    vit.train()
    bar = progress(loader, f"epoch {epoch}", disable=not rt.main)
    step = acc["step"]
    t0 = time.perf_counter()
    for x, _ in bar:
        x = x.to(rt.device, non_blocking=True)
        loss, r, t = pretrain_step(cnn, vit, x, optimizer, scaler, rt)
        if cfg["sched_unit"] == "step":
            scheduler.step()
        loss_value = global_mean(loss, rt)  # one sync per step; needed for the non-finite check
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"the loss became {loss_value} at epoch {epoch + 1}, step {step + 1}")
        step += 1
        acc["step"] = step
        acc["loss"] += loss_value
        acc.setdefault("loss_first", loss_value)
        acc["loss_last"] = loss_value
        std_cnn, std_vit, cos = step_stats(r, t)
        acc["std_cnn"] += std_cnn
        acc["std_vit"] += std_vit
        acc["cos"] += cos
        acc["images"] += len(x) * rt.world
        acc["seconds"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if rt.main and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_value:.4f}", std=f"{std_cnn:.4f}/{std_vit:.4f}")
        if stop.requested:
            break
    return acc


def new_accumulators():
    return dict(step=0, loss=0.0, std_cnn=0.0, std_vit=0.0, cos=0.0, images=0, seconds=0.0)


def monitor(cnn, vit, loaders, rt, k=20):
    """k-NN accuracy (outputs and pooled features) of val against train, per arm; None without labels."""
    if loaders is None:
        return {}
    out = {}
    for arm, model in (("cnn", cnn), ("vit", vit)):
        tf, to, ty = encode(model, loaders["train"], rt)
        vf, vo, vy = encode(model, loaders["val"], rt)
        out[f"knn_{arm}_out"] = knn_accuracy(to, ty.argmax(1), vo, vy.argmax(1), k)
        out[f"knn_{arm}_feat"] = knn_accuracy(tf, ty.argmax(1), vf, vy.argmax(1), k)
        out[f"val_std_{arm}"] = output_spread(vo)
    return out


def monitor_loaders(table, cfg, folder, train_keys):
    """Fixed subsets of train and val, without augmentation, for the k-NN monitor."""
    if table.multilabel or not table.labels or cfg["monitor_every"] <= 0:
        return None
    rng = np.random.default_rng(cfg["seed"])
    loaders = {}
    for split, n in (("train", cfg["monitor_size"]), ("val", cfg["monitor_size"] // 2)):
        listed = train_keys if split == "train" else load_split(table, folder, split)
        keys = [k for k in listed if k in table.labels]
        keys = [keys[i] for i in sorted(rng.permutation(len(keys))[:n])]
        cache = cached_images(table, keys, cfg)
        ds = ImageDataset(table, keys, cfg["img_size"], cache=cache)
        loaders[split] = DataLoader(ds, batch_size=256, num_workers=0 if cache is not None else cfg["workers"])
    return loaders if len(loaders["train"].dataset) and len(loaders["val"].dataset) else None


def build_pair(cfg):
    """The two encoders of CASS, heads of the same width (paper 3)."""
    cnn_kw = encoder_kwargs(cfg["cnn"], cfg["img_size"])
    vit_kw = encoder_kwargs(cfg["vit"], cfg["img_size"], cfg["patch_size"])
    cnn = create_encoder(cfg["cnn"], cfg["out_dim"], cnn_kw, cfg["pretrained"], cfg["cnn_weights"], "--cnn-weights")
    vit = create_encoder(cfg["vit"], cfg["out_dim"], vit_kw, cfg["pretrained"], cfg["vit_weights"], "--vit-weights")
    return cnn, vit, cnn_kw, vit_kw


def wrap_ddp(model, rt, sync_bn=False):
    if rt.world == 1:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def cmd_pretrain(args):
    cfg = resolve_config(args, "pretrain")
    rt = make_runtime(cfg["device"], cfg["precision"], channels_last=cfg["channels_last"])
    out = prepare_run_dir(cfg["out"] or default_out("pretrain", cfg), cfg["resume"], cfg["overwrite"], rt)
    cfg["out"] = str(out)
    resume = load_checkpoint(out / "last.pt", "last.pt") if cfg["resume"] else None
    if resume is not None:
        keep = {k: cfg[k] for k in ("resume", "device", "workers", "epochs") if args_given(args, k)}
        keep["resume"] = True
        cfg = {**resume["config"], **keep}
    if cfg["sync_bn"] and rt.device.type != "cuda":
        raise UserError("--sync-bn works on CUDA only (PyTorch's SyncBatchNorm); drop it for CPU runs")
    if cfg["batch_size"] % rt.world:
        raise UserError(f"--batch-size {cfg['batch_size']} (the global batch) must be divisible by the "
                        f"{rt.world} processes")
    seed_everything(cfg["seed"])

    # -- data: the whole training split, labels unused (paper B.1.1) -------------------------
    table = load_table(cfg["data"], cfg["root"])
    folder = resolve_splits(cfg, table, out)
    train_keys = load_split(table, folder, "train")
    if len(train_keys) < cfg["batch_size"]:
        raise UserError(f"the training split has {len(train_keys)} images, fewer than one batch "
                        f"(--batch-size {cfg['batch_size']}); lower --batch-size")
    dataset = ImageDataset(table, train_keys, cfg["img_size"], cass_augment(), cached_images(table, train_keys, cfg))
    sampler = EpochSampler(len(dataset), cfg["batch_size"], cfg["seed"], rank=rt.rank, world=rt.world)
    loader = make_loader(dataset, sampler, cfg["batch_size"] // rt.world, cfg["workers"], rt)
    mon = monitor_loaders(table, cfg, folder, train_keys) if rt.main else None

    # -- encoders, optimiser, schedule, SWA ----------------------------------------------------
    cnn, vit, cnn_kw, vit_kw = build_pair(cfg)
    cnn = cnn.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    vit = vit.to(rt.device)
    optimizer = make_adam(list(cnn.parameters()) + list(vit.parameters()), cfg["lr"])
    scheduler = cosine_schedule(optimizer, cfg)
    scaler = rt.scaler()
    swa_cnn = torch.optim.swa_utils.AveragedModel(cnn)
    swa_vit = torch.optim.swa_utils.AveragedModel(vit)
    objects = dict(cnn=cnn, vit=vit, optimizer=optimizer, scheduler=scheduler, scaler=scaler, swa_cnn=swa_cnn,
                   swa_vit=swa_vit)
    start_epoch, acc = restore(objects, resume, out, rt) if resume is not None else (0, new_accumulators())
    if cfg["grad_checkpointing"]:  # recompute activations in the backward pass: larger batches fit
        cnn.set_grad_checkpointing(True)
        vit.set_grad_checkpointing(True)
    ddp_cnn, ddp_vit = wrap_ddp(cnn, rt, cfg["sync_bn"]), wrap_ddp(vit, rt)
    if cfg["compile"]:
        ddp_cnn, ddp_vit = torch.compile(ddp_cnn), torch.compile(ddp_vit)

    if rt.main:
        write_json(cfg, out / "args.json")
        print(f"CASS pretraining: {cfg['cnn']} + {cfg['vit']}, {len(train_keys)} images, {cfg['img_size']} px, "
              f"global batch {cfg['batch_size']} on {rt.world} x {rt.device.type}"
              f"{'' if rt.amp_dtype is None else ' ' + str(rt.amp_dtype).replace('torch.', '')}; run folder {out}")
        if start_epoch == 0 and acc["step"] == 0 and mon is not None:
            m = monitor(cnn, vit, mon, rt)
            append_jsonl(dict(epoch=0, phase="init", **m), out / "log.jsonl")
            print(_format_monitor(0, m, cfg["out_dim"]))

    def checkpoint(epoch, acc):
        if rt.main:
            save_run(objects, out / "last.pt", kind="pretrain", epoch=epoch, acc=acc, config=cfg)

    # -- the loop --------------------------------------------------------------------------------
    with StopRequest() as stop:
        for epoch in range(start_epoch, cfg["epochs"]):
            sampler.set_epoch(epoch, acc["step"])
            try:
                acc = pretrain_one_epoch(ddp_cnn, ddp_vit, loader, optimizer, scaler, scheduler, rt, cfg,
                                         epoch, acc, stop)
            except NonFiniteLoss as e:
                raise diverged(e, out, cfg["lr"]) from None
            if stop.requested and acc["step"] < sampler.steps():
                checkpoint(epoch, acc)
                raise interrupted(out, epoch, acc["step"])
            if cfg["sched_unit"] == "epoch":
                scheduler.step()
            if epoch >= cfg["swa_start"]:
                swa_cnn.update_parameters(cnn)
                swa_vit.update_parameters(vit)
            steps = max(acc["step"], 1)
            record = dict(epoch=epoch + 1, loss=acc["loss"] / steps, loss_first_step=acc.get("loss_first"),
                          loss_last_step=acc.get("loss_last"), lr=optimizer.param_groups[0]["lr"],
                          std_cnn=acc["std_cnn"] / steps, std_vit=acc["std_vit"] / steps,
                          std_healthy=1 / math.sqrt(cfg["out_dim"]), cos_cnn_vit=acc["cos"] / steps,
                          seconds=acc["seconds"], images_per_s=acc["images"] / max(acc["seconds"], 1e-9),
                          swa_models=int(swa_cnn.n_averaged))
            if rt.main and mon is not None and (epoch + 1) % cfg["monitor_every"] == 0:
                t0 = time.perf_counter()
                record.update(monitor(cnn, vit, mon, rt))
                record["monitor_seconds"] = time.perf_counter() - t0
            acc = new_accumulators()
            if rt.main:
                append_jsonl(record, out / "log.jsonl")
                print(_format_epoch(record, cfg["epochs"]))
            checkpoint(epoch + 1, acc)
            if stop.requested and epoch + 1 < cfg["epochs"]:
                raise interrupted(out, epoch + 1)

    # -- the averaged encoders are the result ---------------------------------------------------
    if rt.main:
        final_cnn, final_vit = cnn, vit
        if swa_cnn.n_averaged > 0:
            bn_loader = make_loader(dataset, EpochSampler(len(dataset), cfg["batch_size"], cfg["seed"] + 1),
                                    cfg["batch_size"], cfg["workers"], rt)
            recompute_batchnorm(swa_cnn, bn_loader, rt)
            final_cnn, final_vit = swa_cnn.module, swa_vit.module
        save_checkpoint(encoder_record(final_cnn, cfg["cnn"], cnn_kw, "cnn", cfg), out / "cnn.pt")
        save_checkpoint(encoder_record(final_vit, cfg["vit"], vit_kw, "vit", cfg), out / "vit.pt")
        print(f"wrote {out}/cnn.pt and {out}/vit.pt"
              f"{f' (SWA over {int(swa_cnn.n_averaged)} epoch(s))' if swa_cnn.n_averaged else ''}")
    if rt.world > 1:
        dist.barrier()  # the other ranks wait while rank 0 writes the result
    return out


def recompute_batchnorm(swa_model, loader, rt):
    """BatchNorm statistics of the (averaged) weights, from one pass over the training images."""
    def inputs():
        for x, _ in progress(loader, "SWA BatchNorm", disable=not rt.main):
            yield normalize(x.to(rt.device), rt.channels_last)

    with rt.autocast():
        torch.optim.swa_utils.update_bn(inputs(), swa_model, device=rt.device)


def args_given(args, key):
    return getattr(args, key, None) not in (None, False)


def _format_knn(m):
    return (f"20-NN cnn out/feat {m['knn_cnn_out']:.3f}/{m['knn_cnn_feat']:.3f}"
            f"  vit out/feat {m['knn_vit_out']:.3f}/{m['knn_vit_feat']:.3f}")


def _format_epoch(r, epochs):
    line = (f"epoch {r['epoch']:3d}/{epochs}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
            f"std cnn/vit {r['std_cnn']:.4f}/{r['std_vit']:.4f} (healthy {r['std_healthy']:.4f})  "
            f"cos {r['cos_cnn_vit']:.3f}  {r['images_per_s']:.1f} img/s")
    return line + ("  " + _format_knn(r) if "knn_cnn_feat" in r else "")


def _format_monitor(epoch, m, out_dim):
    return (f"epoch {epoch:3d} (init)  val std cnn/vit {m['val_std_cnn']:.4f}/{m['val_std_vit']:.4f} "
            f"(healthy {1 / math.sqrt(out_dim):.4f})  " + _format_knn(m))


# ------------------------------------------------------------------------------------------
# Fine-tuning (paper 4.2, B.2): focal loss, Adam 3e-4, cosine, early stopping on val loss
# ------------------------------------------------------------------------------------------


class FeatureDataset(Dataset):
    """Precomputed features [N, F] and targets [N, C], indexed like ImageDataset (linear probe)."""

    def __init__(self, features, targets):
        self.features, self.targets = features, targets

    def __len__(self):
        return len(self.features)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        return self.features[index], self.targets[index]


def fold_standardisation(head, mean, std):
    """Make a linear head trained on (x - mean) / std take x itself: W' = W / std, b' = b - W' mean."""
    with torch.no_grad():
        head.weight.div_(std.to(head.weight))
        head.bias.sub_(head.weight @ mean.to(head.weight))


class EarlyStopping:
    """Stop when the validation loss has not improved for `patience` epochs (paper 4.2)."""

    def __init__(self, patience):
        self.patience, self.best, self.best_epoch, self.bad = patience, math.inf, -1, 0

    def step(self, val_loss, epoch):
        """Record one epoch; True when it is the best so far."""
        if val_loss < self.best:
            self.best, self.best_epoch, self.bad = val_loss, epoch, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self):
        return self.bad >= self.patience

    def state_dict(self):
        return dict(best=self.best, best_epoch=self.best_epoch, bad=self.bad)

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.bad = state["best"], state["best_epoch"], state["bad"]


def supervised_step(model, x, y, optimizer, scaler, weights, rt, prep):
    """One fine-tuning step: zero grads, forward under autocast, focal loss, backward, step."""
    optimizer.zero_grad(set_to_none=True)
    with rt.autocast():
        logits = model(prep(x))  # [B, C]
        loss = focal_loss(logits, y, alpha=1.0, gamma=2.0, class_weights=weights)  # paper B.2.2
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_one_epoch(model, loader, optimizer, scaler, weights, rt, prep, acc, stop, epoch=0):
    """One (or the rest of one) fine-tuning epoch; returns the running accumulators."""
    model.train()
    sharded = isinstance(model, nn.parallel.DistributedDataParallel)
    t0 = time.perf_counter()
    for x, y in progress(loader, f"epoch {epoch}", disable=not rt.main):
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        loss = global_mean(supervised_step(model, x, y, optimizer, scaler, weights, rt, prep), rt, sharded)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {loss} at epoch {epoch + 1}, step {acc['step'] + 1}")
        acc["step"] += 1
        acc["loss"] += loss
        acc["images"] += len(x) * (rt.world if sharded else 1)
        acc["seconds"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        if stop.requested:
            break
    return acc


@torch.no_grad()
def predict(model, loader, rt, prep):
    """Logits [N, C] and targets [N, C] of every item, in eval mode and loader order."""
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        with rt.autocast():
            logits.append(model(prep(x.to(rt.device, non_blocking=True))).float().cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def probabilities(logits, multilabel):
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)


def evaluate(model, loader, rt, prep, weights, multilabel, classes):
    """Focal loss (averaged over the *validation* loader, SPEC bug 7) and all metrics."""
    logits, targets = predict(model, loader, rt, prep)
    loss = float(focal_loss(logits, targets, class_weights=weights))
    return dict(loss=loss, **classification_metrics(probabilities(logits, multilabel).numpy(), targets.numpy(),
                                                    multilabel, classes))


def image_prep(rt, model):
    cl = rt.channels_last and not is_vit_model(model)
    return lambda x: normalize(x, cl)


def init_encoder(cfg, num_classes):
    """The encoder to fine-tune: a CASS arm (run folder or cnn.pt/vit.pt), `imagenet` or `random`.

    Returns the model with a fresh `num_classes` head, its timm name and kwargs, and the arm.
    """
    init, arm = cfg["init"], cfg["arm"] or "cnn"
    if init in ("random", "random-bn", "imagenet"):
        name = cfg["cnn"] if arm == "cnn" else cfg["vit"]
        kw = encoder_kwargs(name, cfg["img_size"], cfg["patch_size"] if arm == "vit" else None)
        return create_encoder(name, num_classes, kw, pretrained=init == "imagenet"), name, kw, arm
    path = Path(init)
    if path.is_dir():
        path = path / f"{arm}.pt"
    obj = load_checkpoint(path, "--init")
    if not isinstance(obj, dict) or obj.get("format") != "cass-encoder":
        raise UserError(f"--init {path} is not an encoder file written by cass.py pretrain (cnn.pt or vit.pt)")
    if cfg["arm"] and obj["arm"] != cfg["arm"]:
        raise UserError(f"--init {path} holds the {obj['arm']} arm but --arm is {cfg['arm']}")
    if is_vit(obj["model"]) and obj["kwargs"].get("img_size") != cfg["img_size"]:
        raise UserError(f"--init {path} is a ViT built for {obj['kwargs'].get('img_size')} px but --img-size is "
                        f"{cfg['img_size']}; use --img-size {obj['kwargs'].get('img_size')}")
    return load_encoder(obj, path, num_classes), obj["model"], obj["kwargs"], obj["arm"]


def check_fraction(fraction):
    if not 0 < fraction <= 1:
        raise UserError(f"--label-fraction {fraction} is outside (0, 1]; use 1.0, 0.1 or 0.01")
    if fraction not in LABEL_FRACTIONS:
        raise UserError(f"--label-fraction {fraction} has no split file; use 1.0, 0.1 or 0.01 (train.csv, "
                        "train_10pct.csv, train_1pct.csv)")
    return LABEL_FRACTIONS[fraction]


def cmd_finetune(args):
    cfg = resolve_config(args, "finetune")
    split_name = check_fraction(cfg["label_fraction"])
    if cfg["init"] is None:
        raise UserError("finetune needs --init: a pretrain run folder, cnn.pt / vit.pt, imagenet, random or random-bn")
    rt = make_runtime(cfg["device"], cfg["precision"], channels_last=cfg["channels_last"])
    out = prepare_run_dir(cfg["out"] or default_out("finetune", cfg), cfg["resume"], cfg["overwrite"], rt)
    cfg["out"] = str(out)
    resume = load_checkpoint(out / "last.pt", "last.pt") if cfg["resume"] else None
    if resume is not None:
        keep = {k: cfg[k] for k in ("device", "workers", "epochs") if args_given(args, k)}
        cfg = {**resume["config"], **keep, "resume": True}
    seed_everything(cfg["seed"])

    # -- data -------------------------------------------------------------------------------------
    table = load_table(cfg["data"], cfg["root"])
    if len(table.classes) < 2:
        raise UserError(f"--data {cfg['data']} at {cfg['root']} has {len(table.classes)} class(es) with labels; "
                        "fine-tuning needs at least two")
    folder = resolve_splits(cfg, table, out)
    cfg["split_dir"] = str(folder)
    keys = {s: [k for k in load_split(table, folder, f) if k in table.labels]
            for s, f in (("train", split_name), ("val", "val"), ("test", "test"))}
    for s, k in keys.items():
        if not k:
            raise UserError(f"the {s} split in {folder} has no labelled images")
    size = cfg["img_size"]
    train_ds = ImageDataset(table, keys["train"], size, cass_augment(),  # paper B.2.1: same augmentations
                            cached_images(table, keys["train"], cfg))
    eval_ds = {s: ImageDataset(table, keys[s], size, cache=cached_images(table, keys[s], cfg)) for s in ("val", "test")}
    counts = train_ds.targets.sum(0)
    weights = class_weights(counts, cfg["class_weights"])
    if weights is not None:
        weights = weights.to(rt.device)

    # -- model ------------------------------------------------------------------------------------
    model, name, kw, arm = init_encoder(cfg, len(table.classes))
    cfg["arm"] = arm
    model = model.to(rt.device, memory_format=torch.channels_last if rt.channels_last and arm == "cnn"
                     else torch.contiguous_format)
    prep = image_prep(rt, model)
    if cfg["init"] == "random-bn":
        # The control for CASS's CNN (SPEC.md, last section): a random CNN whose BatchNorm
        # statistics are merely re-estimated on the training images, labels unused. Any gain of
        # CASS over this is learned; a gain over plain `random` may be recalibration alone.
        all_keys = load_split(table, folder, "train")
        all_train = ImageDataset(table, all_keys, size, cache=cached_images(table, all_keys, cfg))
        recompute_batchnorm(model, make_loader(all_train, None, cfg["batch_size"], cfg["workers"], rt), rt)
    batch = min(cfg["batch_size"], len(train_ds))
    eval_loader = {s: make_loader(d, None, cfg["batch_size"], cfg["workers"], rt) for s, d in eval_ds.items()}
    if cfg["mode"] == "linear":
        # Linear evaluation (paper 4.2): the encoder is frozen, so its features are computed once
        # (no augmentation) and only the head trains on them.
        t0 = time.perf_counter()
        plain_train = ImageDataset(table, keys["train"], size, cache=train_ds.cache)  # no augmentation
        feats = {s: encode(model, make_loader(d, None, cfg["batch_size"], cfg["workers"], rt), rt)
                 for s, d in (("train", plain_train), *eval_ds.items())}
        if rt.main:
            print(f"features of the frozen encoder computed in {time.perf_counter() - t0:.1f} s")
        # Standardised with the training features' statistics, so that one learning rate suits
        # any encoder (a collapsed one's features vary by 1e-3); folded into the head at the end.
        mean, std = feats["train"][0].mean(0), feats["train"][0].std(0).nan_to_num(1.0).clamp_min(1e-5)
        trainable = model.get_classifier()
        train_ds = FeatureDataset((feats["train"][0] - mean) / std, feats["train"][2])
        eval_loader = {s: DataLoader(FeatureDataset((feats[s][0] - mean) / std, feats[s][2]), batch_size=256)
                       for s in eval_ds}
        train_prep = lambda x: x  # noqa: E731
        workers = 0
    else:
        trainable, train_prep, workers = model, prep, cfg["workers"]
    # Full fine-tuning is data-parallel under torchrun; the linear probe (a head on precomputed
    # features) is cheap and runs whole on every process, which keeps the processes identical.
    world = rt.world if cfg["mode"] == "full" else 1
    batch = max(world, batch - batch % world)  # each process takes an equal slice of a global batch
    sampler = EpochSampler(len(train_ds), batch, cfg["seed"], drop_last=cfg["mode"] == "full" and len(train_ds) > batch,
                           rank=rt.rank if world > 1 else 0, world=world)
    train_loader = make_loader(train_ds, sampler, batch // world, workers, rt)
    train_model = wrap_ddp(trainable, rt) if world > 1 else trainable
    optimizer = make_adam(trainable.parameters(), cfg["lr"])
    scheduler = cosine_schedule(optimizer, cfg)
    scaler = rt.scaler()
    stopper = EarlyStopping(cfg["patience"])
    best_state = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
    objects = dict(trainable=trainable, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                   early_stopping=stopper)
    start_epoch, acc = restore(objects, resume, out, rt) if resume is not None else (0, new_accumulators())
    if resume is not None:
        best_state = resume["best"]
    headline = headline_metric(cfg["data"])
    if rt.main:
        write_json(cfg, out / "args.json")
        print(f"fine-tuning {name} ({arm} arm, init {cfg['init']}, {cfg['mode']}) on {len(train_ds)} labelled "
              f"images ({split_name}), {len(table.classes)} classes; run folder {out}")

    def checkpoint(epoch, acc):
        if rt.main:
            save_run(objects, out / "last.pt", kind="finetune", epoch=epoch, acc=acc, config=cfg, best=best_state)

    with StopRequest() as stop:
        for epoch in range(start_epoch, cfg["epochs"]):
            if stopper.should_stop:
                break
            sampler.set_epoch(epoch, acc["step"])
            try:
                acc = train_one_epoch(train_model, train_loader, optimizer, scaler, weights, rt, train_prep, acc,
                                      stop, epoch)
            except NonFiniteLoss as e:
                raise diverged(e, out, cfg["lr"]) from None
            if stop.requested and acc["step"] < sampler.steps():
                checkpoint(epoch, acc)
                raise interrupted(out, epoch, acc["step"])
            scheduler.step()  # per epoch, as in pretraining
            val = evaluate(trainable, eval_loader["val"], rt, train_prep, weights, table.multilabel, table.classes)
            if stopper.step(val["loss"], epoch + 1):
                best_state = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
            steps = max(acc["step"], 1)
            record = dict(epoch=epoch + 1, train_loss=acc["loss"] / steps, val_loss=val["loss"],
                          **{f"val_{headline}": val[headline]}, lr=optimizer.param_groups[0]["lr"],
                          seconds=acc["seconds"], images_per_s=acc["images"] / max(acc["seconds"], 1e-9),
                          best_epoch=stopper.best_epoch)
            acc = new_accumulators()
            if rt.main:
                append_jsonl(record, out / "log.jsonl")
                print(f"epoch {record['epoch']:3d}/{cfg['epochs']}  train loss {record['train_loss']:.4f}  "
                      f"val loss {val['loss']:.4f}  val {headline} {val[headline]:.4f}  "
                      f"{record['images_per_s']:.1f} img/s{'  *best' if stopper.best_epoch == epoch + 1 else ''}")
            checkpoint(epoch + 1, acc)
            if stop.requested and epoch + 1 < cfg["epochs"]:
                raise interrupted(out, epoch + 1)

    # -- the best epoch's weights, evaluated as `evaluate` will -----------------------------------
    trainable.load_state_dict(best_state)
    if cfg["mode"] == "linear":
        fold_standardisation(trainable, mean, std)
    record = encoder_record(model, name, kw, arm, cfg, classes=list(table.classes), multilabel=table.multilabel,
                            data=cfg["data"], img_size=size, headline=headline, best_epoch=stopper.best_epoch)
    results = dict(best_epoch=stopper.best_epoch, headline=headline)
    for s in ("val", "test"):
        logits, targets = predict(model, make_loader(eval_ds[s], None, cfg["batch_size"], cfg["workers"], rt),
                                  rt, prep)
        results[s] = classification_metrics(probabilities(logits, table.multilabel).numpy(), targets.numpy(),
                                            table.multilabel, table.classes)
    if rt.main:
        save_checkpoint(record, out / "best.pt")
        write_json(results, out / "metrics.json")
        print(f"best epoch {stopper.best_epoch}: val {headline} {results['val'][headline]:.4f}, "
              f"test {headline} {results['test'][headline]:.4f}; wrote {out}/best.pt and metrics.json")
    return out


# ------------------------------------------------------------------------------------------
# Evaluation of one checkpoint or an ensemble
# ------------------------------------------------------------------------------------------


def cmd_evaluate(args):
    rt = make_runtime(args.device or "auto", args.precision or "auto", channels_last=True)
    ckpts = []
    for path in args.ckpt:
        obj = load_checkpoint(path, "--ckpt")
        if not isinstance(obj, dict) or obj.get("format") != "cass-encoder" or "classes" not in obj:
            raise UserError(f"--ckpt {path} is not a fine-tuned checkpoint written by cass.py finetune (best.pt)")
        ckpts.append((path, obj))
    first = ckpts[0][1]
    data = args.data or first["data"]
    root = args.root or first["config"]["root"]
    table = load_table(data, root)
    for path, obj in ckpts:
        if list(obj["classes"]) != list(table.classes) or obj["multilabel"] != table.multilabel:
            raise UserError(f"--ckpt {path} was made for {len(obj['classes'])} classes {obj['classes'][:5]}, "
                            f"but --data {data} has {len(table.classes)} {table.classes[:5]}")
    saved = first["config"].get("split_dir")
    if args.splits is None and saved and Path(saved).is_dir():
        folder = Path(saved)  # the split files the checkpoint was fine-tuned with
    else:
        split_cfg = dict(data=data, splits=args.splits, split_seed=first["config"]["split_seed"])
        # fresh `auto` splits go to a new folder, never into a run folder made for other data
        folder = resolve_splits(split_cfg, table, tempfile.mkdtemp(prefix="cass-evaluate-"))
    keys = [k for k in load_split(table, folder, args.split) if k in table.labels]
    probs = 0
    for path, obj in ckpts:
        model = load_encoder(obj, path).to(rt.device)
        loader = make_loader(ImageDataset(table, keys, obj["img_size"]), None, obj["config"]["batch_size"],
                             args.workers if args.workers is not None else 2, rt)
        logits, targets = predict(model, loader, rt, image_prep(rt, model))
        probs = probs + probabilities(logits, table.multilabel) / len(ckpts)  # ensemble: mean probability
    metrics = classification_metrics(probs.numpy(), targets.numpy(), table.multilabel, table.classes)
    headline = headline_metric(data)
    print(f"{'ensemble of ' + str(len(ckpts)) if len(ckpts) > 1 else ckpts[0][0]} on the {args.split} split "
          f"({len(keys)} images)")
    print(f"  {headline:<24} {metrics[headline]:.4f}   (headline)")
    for k, v in metrics.items():
        if isinstance(v, float) and k != headline:
            print(f"  {k:<24} {v:.4f}")
    per = metrics.get("per_class") or metrics.get("per_label_f1")
    for c, v in per.items():
        print(f"  {c:<24} " + (f"precision {v['precision']:.3f}  recall {v['recall']:.3f}  f1 {v['f1']:.3f}  "
                                f"n {v['support']}" if isinstance(v, dict) else f"f1 {v:.3f}"))
    result = dict(ckpts=[str(p) for p, _ in ckpts], split=args.split, data=data, headline=headline, **metrics)
    if args.out:
        write_json(result, args.out)
    return result


def cmd_splits(args):
    """Write the split files for a dataset, from its files on disk or a complete listing."""
    if args.data == "brain_mri" and args.listing:
        table = table_brain_mri(Path("."), [line.strip() for line in open(args.listing) if line.strip()])
    elif args.data == "isic2019" and args.listing:
        table = table_isic2019(Path("."), args.listing)
    else:
        table = load_table(args.data, args.root)
    out = Path(args.out or HERE / "data_splits" / args.data)
    splits = make_splits(table, args.split_seed)
    write_splits(table, splits, out)
    print(f"wrote {', '.join(f'{k} {len(v)}' for k, v in splits.items())} to {out}")


# ------------------------------------------------------------------------------------------
# The label-efficiency protocol (paper 5, Table 1): pretrain once, fine-tune the grid, table
# ------------------------------------------------------------------------------------------

PASS_THROUGH = ("preset", "img_size", "patch_size", "batch_size", "workers", "device", "precision", "cnn", "vit",
                "split_seed", "cache_images", "channels_last")


def _flags(cfg, args, keys):
    """The flags the user gave for `keys`, as command-line words for a sub-command."""
    words = []
    for key in keys:
        value = getattr(args, key, None)
        if value is None or value is False or (key == "channels_last" and value is True):
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else (["--no-channels-last"] if key == "channels_last" else [flag, str(value)])
    return words


def claim(lock):
    """Create `lock` holding this process's id, unless a live process holds it: None then.
    Lets several `protocol` processes (one per GPU, say) share one grid without clashing."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)  # raises if no such process
                if pid != os.getpid():
                    return None
            except (ValueError, ProcessLookupError, FileNotFoundError):
                pass  # left by a process that died: take it over
            except PermissionError:
                return None  # alive, another user's
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def protocol_cells(cfg, imagenet_ok):
    """Every (arm, init, mode, fraction, seed) of the grid, in the order they run."""
    inits = [i for i in cfg["inits"] if i != "imagenet" or imagenet_ok]
    for fraction in cfg["fractions"]:
        for arm in cfg["arms"]:
            for init in inits:
                if init == "random-bn" and arm != "cnn":
                    continue  # ViTs have no BatchNorm to re-estimate
                modes = cfg["modes_full"] if fraction == 1.0 and cfg.get("modes_full") else cfg["modes"]
                for mode in modes:
                    if init == "random-bn" and mode == "full":
                        continue  # full fine-tuning re-estimates BatchNorm statistics from its first step
                    seeds = cfg["seeds_full"] if fraction == 1.0 and cfg.get("seeds_full") else cfg["seeds"]
                    for seed in range(seeds):
                        yield dict(arm=arm, init=init, mode=mode, fraction=fraction, seed=seed)


def protocol_table(cells, headline):
    """mean ± std of the test headline metric per arm, init, mode and fraction."""
    groups = {}
    for c in cells:
        groups.setdefault((c["arm"], c["init"], c["mode"], c["fraction"]), []).append(c)
    rows = []
    for (arm, init, mode, fraction), cs in sorted(groups.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][2], kv[0][1])):
        values = np.array([c["test"] for c in cs])
        rows.append(dict(arm=arm, init=init, mode=mode, fraction=fraction, n=len(cs), mean=float(values.mean()),
                         std=float(values.std(ddof=1)) if len(cs) > 1 else 0.0,
                         minutes=sum(c["seconds"] for c in cs) / 60))
    lines = [f"| labels | arm | init | mode | test {headline} (mean ± std) | runs | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['fraction']:.0%} | {r['arm']} | {r['init']} | {r['mode']} | {r['mean']:.4f} ± {r['std']:.4f} | "
              f"{r['n']} | {r['minutes']:.1f} |" for r in rows]
    return rows, "\n".join(lines) + "\n"


def cmd_protocol(args):
    cfg = resolve_config(args, "pretrain")
    out = Path(cfg["out"] or default_out("protocol", cfg))
    out.mkdir(parents=True, exist_ok=True)
    data = ["--data", cfg["data"]] + (["--root", str(cfg["root"])] if cfg["root"] else [])
    shared = data + _flags(cfg, args, PASS_THROUGH)  # what every sub-run gets
    times = {}

    # -- one CASS pretraining run (resumed if it was interrupted) ------------------------------
    pre = out / "pretrain"
    if not (pre / "cnn.pt").exists():
        words = ["pretrain", *shared, "--out", str(pre), "--seed", str(cfg["seed"])]
        words += _flags(cfg, args, ("splits", "epochs", "out_dim", "swa_start", "lr"))
        words += ["--resume"] if (pre / "last.pt").exists() else (["--overwrite"] if pre.exists() else [])
        t0 = time.perf_counter()
        cmd_pretrain(parse_args(words))
        write_json(dict(seconds=time.perf_counter() - t0), pre / "wall.json")  # this session's part
    if (pre / "wall.json").exists():
        times["pretrain_minutes"] = json.load(open(pre / "wall.json"))["seconds"] / 60
    else:  # finished before wall.json existed: its epochs and monitor, from the log
        log = [json.loads(line) for line in open(pre / "log.jsonl")]
        times["pretrain_minutes"] = sum(r.get("seconds", 0) + r.get("monitor_seconds", 0) for r in log) / 60
    # every cell uses the splits the pretraining run used
    splits = ["--splits", str(pre / "splits")] if (pre / "splits").is_dir() else _flags(cfg, args, ("splits",))
    imagenet_ok = "imagenet" in cfg["inits"] and _hub_reachable()

    # -- the grid of fine-tuning runs; finished cells are not rerun -----------------------------
    finished, elsewhere = [], []
    cells = list(protocol_cells(cfg, imagenet_ok))
    (out / "cells").mkdir(exist_ok=True)
    for i, c in enumerate(cells):
        name = f"{c['arm']}-{c['init']}-{c['mode']}-{c['fraction']:g}-seed{c['seed']}"
        cell = out / "cells" / name
        if not (cell / "metrics.json").exists():
            lock = claim(out / "cells" / f"{name}.lock")
            if lock is None:  # another process sharing this grid runs it now
                elsewhere.append(name)
                continue
            print(f"[{i + 1}/{len(cells)}] {name}", flush=True)
            init = str(pre) if c["init"] == "cass" else c["init"]
            words = ["finetune", *shared, *splits, "--init", init, "--arm", c["arm"], "--mode", c["mode"],
                     "--label-fraction", str(c["fraction"]), "--seed", str(c["seed"]), "--out", str(cell)]
            epochs = cfg["ft_epochs_full"] if c["fraction"] == 1.0 and cfg["ft_epochs_full"] else cfg["ft_epochs_grid"]
            epochs = cfg["ft_epochs_linear"] if c["mode"] == "linear" else epochs
            words += ["--epochs", str(epochs)] if epochs else []
            words += ["--resume"] if (cell / "last.pt").exists() else (["--overwrite"] if cell.exists() else [])
            t0 = time.perf_counter()
            try:
                cmd_finetune(parse_args(words))
                write_json(dict(seconds=time.perf_counter() - t0), cell / "wall.json")
            except UserError as e:
                raise UserError(f"cell {name}: {e} (rerunning this protocol command resumes the grid)") from None
            finally:
                lock.unlink(missing_ok=True)
        metrics = json.load(open(cell / "metrics.json"))
        seconds = json.load(open(cell / "wall.json"))["seconds"] if (cell / "wall.json").exists() else 0.0
        finished.append(dict(c, test=metrics["test"][metrics["headline"]], seconds=seconds))
    if elsewhere:
        print(f"{len(elsewhere)} cell(s) ran in another process sharing {out} (first: {elsewhere[0]}); the table "
              "below leaves them out: rerun this command when they finish for the whole table")
    headline = headline_metric(cfg["data"])
    rows, markdown = protocol_table(finished, headline)
    times["finetune_minutes"] = sum(c["seconds"] for c in finished) / 60
    markdown += (f"\npretraining {times['pretrain_minutes']:.1f} min; {len(finished)} fine-tuning runs "
                 f"{times['finetune_minutes']:.1f} min; total {sum(times.values()):.1f} min\n")
    write_json(dict(headline=headline, rows=rows, cells=finished, config=cfg, **times), out / "table.json")
    _atomic(out / "table.md", lambda f: f.write(markdown.encode()))
    print(markdown)
    return rows


# ------------------------------------------------------------------------------------------
# Benchmark of the pretraining step (and the data pipeline)
# ------------------------------------------------------------------------------------------


def _time_steps(step, warmup, steps, device):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_step(cfg, rt, plain, count_flops=True):
    """Median seconds of one CASS step on a synthetic batch, and its FLOPs.

    plain: what the authors' notebook runs (fp32, default memory format, one unfused Adam per
    encoder); otherwise this file's step (autocast, channels-last CNN, fused Adam, --compile).
    """
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cnn, vit, _, _ = build_pair({**cfg, "pretrained": False, "cnn_weights": None, "vit_weights": None})
    run = Runtime(rt.device) if plain else rt
    cnn = cnn.to(rt.device, memory_format=torch.channels_last if run.channels_last else torch.contiguous_format)
    vit = vit.to(rt.device)
    if plain:
        opts = [torch.optim.Adam(m.parameters(), lr=cfg["lr"], foreach=False) for m in (cnn, vit)]
    else:
        opts = [make_adam(list(cnn.parameters()) + list(vit.parameters()), cfg["lr"])]
        if cfg["compile"]:
            cnn, vit = torch.compile(cnn), torch.compile(vit)
    if cfg["grad_checkpointing"]:
        for m in (cnn, vit):
            unwrap(m).set_grad_checkpointing(True)
    x = torch.randint(0, 256, (cfg["batch_size"], 3, cfg["img_size"], cfg["img_size"]), dtype=torch.uint8,
                      device=rt.device)
    scaler = run.scaler()

    def step():
        for o in opts:
            o.zero_grad(set_to_none=True)
        with run.autocast():
            loss = cass_loss(cnn(normalize(x, run.channels_last)), vit(normalize(x)))
        scaler.scale(loss).backward()
        for o in opts:
            scaler.step(o)
        scaler.update()

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 and not plain  # plain: PyTorch's default, fp32 matmuls
    try:
        seconds = _time_steps(step, cfg["warmup"], cfg["steps"], rt.device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if rt.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource  # Unix only, so not imported at the top: the file stays importable anywhere

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if not count_flops:
        return seconds, None, peak
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return seconds, counter.get_total_flops(), peak


def matmul_peak(rt):
    """FLOP/s of a large square matrix product in the step's precision: the yardstick for the step."""
    n = 8192 if rt.device.type == "cuda" else 2048
    dtype = rt.amp_dtype or torch.float32
    a, b = (torch.randn(n, n, device=rt.device).to(dtype) for _ in range(2))
    seconds = _time_steps(lambda: a @ b, 2, 5, rt.device)
    return 2 * n**3 / seconds


def largest_batch(cfg, rt, limit=4096):
    """The largest batch whose step fits in GPU memory: doubling from --batch-size, then bisection."""
    def fits(batch):
        try:
            bench_step({**cfg, "batch_size": batch, "warmup": 1, "steps": 1}, rt, plain=False, count_flops=False)
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False
        gc.collect()  # the failed step's tensors, then the allocator's cache
        torch.cuda.empty_cache()
        print(f"  batch {batch}: {'fits' if ok else 'out of memory'}", flush=True)
        return ok

    lo, hi = 0, cfg["batch_size"]
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def bench_data(cfg):
    """Images/s of the data pipeline alone: decode, resize, augment, collate, with the workers."""
    table = load_table(cfg["data"], cfg["root"])
    folder = resolve_splits(cfg, table, tempfile.mkdtemp(prefix="cass-bench-"))  # `auto`: fresh, never reused
    keys = load_split(table, folder, "train")
    ds = ImageDataset(table, keys, cfg["img_size"], cass_augment())
    if cfg["cache_images"]:
        ds.cache = decode_all(ImageDataset(table, keys, cfg["img_size"]), cfg["workers"])
    sampler = EpochSampler(len(ds), cfg["batch_size"], 0)
    loader = DataLoader(ds, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["workers"])
    n_batches = min(sampler.steps(), max(cfg["steps"] * 4, 10))
    it = iter(loader)
    next(it)  # worker start-up is not the steady state
    t0 = time.perf_counter()
    n = 0
    for _ in range(n_batches - 1):
        n += len(next(it)[0])
    return n / (time.perf_counter() - t0)


def cmd_bench(args):
    cfg = resolve_config(args, "pretrain")
    rt = make_runtime(cfg["device"], cfg["precision"], channels_last=cfg["channels_last"])
    if cfg["max_batch"] and rt.device.type != "cuda":
        raise UserError("--max-batch searches GPU memory and needs --device cuda; on a CPU it would exhaust RAM")
    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"bench: {cfg['cnn']} + {cfg['vit']}, {cfg['img_size']} px, batch {cfg['batch_size']}, {device_name}, "
          f"torch {torch.__version__}")
    plain_s, flops, _ = bench_step(cfg, rt, plain=True)
    fast_s, _, peak = bench_step(cfg, rt, plain=False)
    B = cfg["batch_size"]
    result = dict(device=device_name, cnn=cfg["cnn"], vit=cfg["vit"], img_size=cfg["img_size"], batch_size=B,
                  precision=str(rt.amp_dtype or "fp32").replace("torch.", ""), channels_last=rt.channels_last,
                  compile=bool(cfg["compile"]), seconds_per_step=fast_s, images_per_s=B / fast_s,
                  plain_seconds_per_step=plain_s, plain_images_per_s=B / plain_s, speedup=plain_s / fast_s,
                  flops_per_step=flops, achieved_flops=flops / fast_s, plain_achieved_flops=flops / plain_s,
                  peak_memory_mb=peak)
    rows = [("plain step (fp32, unfused Adam)", plain_s, B / plain_s, flops / plain_s),
            (f"this step ({result['precision']}{', channels-last' if rt.channels_last else ''}, fused Adam"
             f"{', compiled' if cfg['compile'] else ''})", fast_s, B / fast_s, flops / fast_s)]
    print(f"{'':48} {'s/step':>8} {'img/s':>8} {'GFLOP/s':>8}")
    for name, s, ips, fl in rows:
        print(f"{name:48} {s:8.3f} {ips:8.1f} {fl / 1e9:8.1f}")
    print(f"speed-up {result['speedup']:.2f}x; {flops / 1e9:.1f} GFLOP per step; peak memory {peak:.0f} MB")
    peak_flops = matmul_peak(rt)
    result.update(matmul_peak_flops=peak_flops, fraction_of_matmul_peak=result["achieved_flops"] / peak_flops)
    print(f"a {result['precision']} matrix product runs at {peak_flops / 1e12:.2f} TFLOP/s here; this step reaches "
          f"{result['fraction_of_matmul_peak']:.0%} of it")
    if cfg["max_batch"]:
        result["max_batch_size"] = largest_batch(cfg, rt)
        print(f"largest batch that fits: {result['max_batch_size']} "
              f"({torch.cuda.get_device_properties(rt.device).total_memory / 2**30:.0f} GiB GPU)")
    if cfg["root"] or cfg["data"] == "digits":
        data_ips = bench_data(cfg)
        result["data_images_per_s"] = data_ips
        result["bottleneck"] = "data" if data_ips < result["images_per_s"] else "step"
        print(f"data pipeline ({cfg['workers']} workers{', cached' if cfg['cache_images'] else ''}): "
              f"{data_ips:.1f} img/s; the bottleneck is the {result['bottleneck']}")
    print(json.dumps(result))
    return result


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def add_common(p, kind):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", choices=list(DATASETS),
                   help="dataset layout: digits (built in), brain_mri, isic2019, autoimmune, folder, csv, medmnist")
    g.add_argument("--root", help="dataset folder (a .csv file for csv, a .npz file for medmnist)")
    g.add_argument("--splits", help="committed (data_splits/<data>, the default where it exists), auto (computed "
                                    "from the files on disk, written to the run folder) or a folder of split files")
    g.add_argument("--split-seed", type=int, default=0, help="seed of --splits auto (fixed, so seeds vary training only)")
    g.add_argument("--cache-images", action="store_true",
                   help="decode and resize every image once and keep them in memory (faster epochs)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="paper: the paper's settings (default); tiny: resnet18 + vit_tiny at 64 px, random init, "
                        "for CPUs. Explicit flags override the preset")
    g.add_argument("--cnn", help="timm CNN (paper: resnet50)")
    g.add_argument("--vit", help="timm ViT (paper: vit_base_patch16_384)")
    g.add_argument("--patch-size", type=int, help="ViT patch size (default: the model's own)")
    g.add_argument("--img-size", type=int, help="image side in pixels (paper: 384)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="ImageNet initialisation (paper: yes); --no-pretrained for random init")
    g.add_argument("--cnn-weights", help="initialise the CNN from this weight file (a state_dict or a cnn.pt)")
    g.add_argument("--vit-weights", help="initialise the ViT from this weight file (a state_dict or a vit.pt)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="epochs (paper: 100 for pretraining, at most 50 for fine-tuning)")
    g.add_argument("--batch-size", type=int,
                   help="global batch, split over DDP processes (paper: 16)")
    g.add_argument("--lr", type=float, help="Adam learning rate (paper: 1e-3 pretraining, 3e-4 fine-tuning)")
    g.add_argument("--t-max", type=int, help="cosine annealing period T_max (paper: 16)")
    g.add_argument("--eta-min", type=float, help="cosine annealing floor (paper: 1e-6)")
    g.add_argument("--seed", type=int, default=0, help="fixes initialisation, augmentation and data order")
    g.add_argument("--workers", type=int, help="data loader processes")
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto: bf16 on CUDA (fp16 + GradScaler where bf16 is missing), fp32 on CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format for the CNN")
    g.add_argument("--compile", action="store_true", help="torch.compile both encoders")
    if kind != "bench":
        g = p.add_argument_group("run folder")
        g.add_argument("--out", help="run folder (default: a new folder under runs/)")
        g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
        g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds one")


def build_parser():
    parser = argparse.ArgumentParser(prog="cass.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="CASS self-supervised pretraining of a CNN and a ViT together")
    add_common(p, "pretrain")
    p.add_argument("--out-dim", type=int, help="width of both heads (paper: 1000, the ImageNet logits)")
    p.add_argument("--swa-start", type=int,
                   help="epoch from which SWA averages the weights once per epoch (default: 75%% of --epochs)")
    p.add_argument("--sched-unit", default="epoch", choices=["epoch", "step"],
                   help="the cosine schedule moves once per epoch (default) or per step (as the notebooks do)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm for the CNN under DDP")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass, to fit larger batches")
    p.add_argument("--monitor-every", type=int, default=1,
                   help="k-NN and collapse monitor every N epochs (0: off); needs labels")
    p.add_argument("--monitor-size", type=int, default=500, help="training images in the k-NN monitor's bank")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune one arm on a fraction of the labels (or a baseline)")
    add_common(p, "finetune")
    p.add_argument("--init", help="a pretrain run folder, its cnn.pt / vit.pt, imagenet, random, or random-bn "
                                  "(random with BatchNorm statistics re-estimated on the training images: the "
                                  "control that tells learning from recalibration)")
    p.add_argument("--arm", choices=["cnn", "vit"], help="which encoder to fine-tune (from the file when one is given)")
    p.add_argument("--label-fraction", type=float, default=1.0, help="1.0, 0.1 or 0.01 of the training labels")
    p.add_argument("--mode", default="full", choices=["full", "linear"],
                   help="full: train everything (paper B.2); linear: frozen encoder, train the head (paper 4.2)")
    p.add_argument("--class-weights", default="inverse", choices=["inverse", "paper", "none"],
                   help="focal loss class weights: inverse frequency, or the authors' min-max normalised counts")
    p.add_argument("--patience", type=int, help="early stopping patience on validation loss (paper: 5)")
    p.set_defaults(func=cmd_finetune, sched_unit="epoch")

    p = sub.add_parser("evaluate", help="metrics of one fine-tuned checkpoint, or of an ensemble")
    p.add_argument("--ckpt", action="append", required=True, help="a best.pt; repeat for an ensemble")
    p.add_argument("--data", choices=list(DATASETS), help="default: the checkpoint's")
    p.add_argument("--root", help="default: the checkpoint's")
    p.add_argument("--splits", help="default: the split files the checkpoint was trained with")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--workers", type=int)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("protocol", help="the paper's label-efficiency grid: pretrain once, fine-tune every cell, "
                                         "write a table (resumable)")
    add_common(p, "protocol")
    p.add_argument("--out-dim", type=int, help="width of both heads")
    p.add_argument("--swa-start", type=int, help="as for pretrain")
    p.add_argument("--arms", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit"])
    p.add_argument("--inits", nargs="+", default=["cass", "random", "random-bn", "imagenet"],
                   choices=["cass", "random", "random-bn", "imagenet"],
                   help="imagenet runs only where the weights can be loaded; random-bn only for the CNN")
    p.add_argument("--modes", nargs="+", default=["full", "linear"], choices=["full", "linear"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds per cell (paper B.1.1: 5)")
    p.add_argument("--seeds-full", type=int, help="seeds with 100%% of the labels (default: --seeds)")
    p.add_argument("--modes-full", nargs="+", choices=["full", "linear"],
                   help="modes with 100%% of the labels (default: --modes)")
    p.add_argument("--ft-epochs-grid", type=int, help="fine-tuning epochs at most (default: the preset's)")
    p.add_argument("--ft-epochs-full", type=int, help="fine-tuning epochs at most with 100%% of the labels")
    p.add_argument("--ft-epochs-linear", type=int, default=100,
                   help="linear-probe epochs at most (a head on stored features: an epoch costs milliseconds)")
    p.set_defaults(func=cmd_protocol, sched_unit="epoch", monitor_every=1, monitor_size=500, sync_bn=False)

    p = sub.add_parser("bench", help="time the pretraining step against the plain one (and the data pipeline)")
    add_common(p, "bench")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to fit larger batches")
    p.add_argument("--out-dim", type=int, help="width of both heads")
    p.add_argument("--max-batch", action="store_true", help="CUDA: also find the largest batch that fits")
    p.set_defaults(func=cmd_bench, out=None, sched_unit="epoch")

    p = sub.add_parser("splits", help="write split files (data_splits/<data>) from the data or a full listing")
    p.add_argument("--data", required=True, choices=list(DATASETS))
    p.add_argument("--root")
    p.add_argument("--listing", help="brain_mri: a list of Training/... and Testing/... paths; "
                                     "isic2019: the full ground-truth CSV")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", help="default: data_splits/<data> beside cass.py")
    p.set_defaults(func=cmd_splits)
    return parser


def parse_args(argv):
    """The parsed command line; flags another sub-command has are None, so every cfg has every key."""
    args = build_parser().parse_args([str(a) for a in argv] if argv is not None else None)
    for key in ("swa_start", "monitor_every", "monitor_size", "patience", "sync_bn", "grad_checkpointing",
                "label_fraction", "init", "arm", "mode", "class_weights", "out_dim"):
        if not hasattr(args, key):
            setattr(args, key, None)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        # A message from a DataLoader worker arrives wrapped in its traceback: keep the sentence.
        message = str(e).strip().splitlines()[-1].removeprefix("cass.UserError: ").removeprefix("UserError: ")
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the training loops (they stop cleanly at the next step)
        print("error: interrupted; last.pt and finished results are kept: rerun the same command with --resume "
              "(protocol: the same command) to continue", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
