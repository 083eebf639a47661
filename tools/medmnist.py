"""A MedMNIST .npz file as a dataset cass.py reads: its images as PNGs, a labels CSV and the curators' splits.

MedMNIST (Yang et al. 2023) ships each dataset as one .npz of arrays: train_images, train_labels, val_images, ...
This writes OUT/images/<split>/<index>.png, OUT/labels.csv (a label column, or one 0/1 column per label for the
multi-label sets) and OUT/splits/ (the curators' train, val and test, with the nested 10% and 1% of train that
cass.py draws), so that every command of cass.py and every tool takes it as any CSV dataset:

    python tools/medmnist.py pathmnist.npz --out pathmnist
    python cass.py pretrain --data csv --root pathmnist/labels.csv --splits pathmnist/splits --preset tiny
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cass  # noqa: E402

SPLITS = ("train", "val", "test")


def read_npz(path):
    """The arrays of each split: images uint8 [N, H, W] or [N, H, W, 3], labels [N] (class indices) or [N, K]."""
    try:
        npz = np.load(path)  # a zip of arrays; never pickles (a file that needs them is no MedMNIST file)
        images = {s: npz[f"{s}_images"] for s in SPLITS}
        raw = {s: np.asarray(npz[f"{s}_labels"]) for s in SPLITS}
    except Exception as e:
        found = f"it has no array {e}" if isinstance(e, KeyError) else "damaged, or another kind of file"
        raise cass.UserError(f"{path} is not a readable MedMNIST .npz ({found}); a MedMNIST file holds the arrays "
                             "train_images, train_labels, val_images, val_labels, test_images, test_labels") from None
    labels = {s: (y.reshape(-1) if y.ndim == 1 or y.shape[1] == 1 else y) for s, y in raw.items()}  # (N, 1) -> (N,)
    return images, labels


def convert(npz, out):
    """Write the dataset of `npz` into the folder `out`; returns the Table cass.py reads from it."""
    from PIL import Image

    out = Path(out)
    cass.check_output(out, [npz], folder=True)
    if (out / "labels.csv").exists():
        raise cass.UserError(f"--out {out} holds a converted dataset (labels.csv); choose another --out")
    images, labels = read_npz(npz)
    multilabel = labels["train"].ndim == 2
    classes = [str(c) for c in range(labels["train"].shape[1] if multilabel else
                                      int(max(y.max() for y in labels.values())) + 1)]
    rows = [["image", *(classes if multilabel else ["label"])]]
    for s in SPLITS:
        (out / "images" / s).mkdir(parents=True, exist_ok=True)
        for i, (img, y) in enumerate(zip(cass.Progress(images[s], f"writing {s}"), labels[s])):
            key = f"images/{s}/{i}.png"
            Image.fromarray(img).save(out / key)
            rows.append([key, *([str(int(v)) for v in y] if multilabel else [classes[int(y)]])])
    cass.write_csv(rows, out / "labels.csv")
    table = cass.table_csv(out / "labels.csv")
    table.multilabel = multilabel  # a multi-label set in which every image has one label is still multi-label
    table.given = {s: [f"images/{s}/{i}.png" for i in range(len(labels[s]))] for s in SPLITS}  # the curators'
    cass.write_splits(table, cass.make_splits(table, seed=0), out / "splits")
    print(f"wrote {len(rows) - 1} images of {len(classes)} {'labels' if multilabel else 'classes'} to {out}; use "
          f"--data csv --root {out / 'labels.csv'} --splits {out / 'splits'}")
    return table


def main(argv=None):
    p = cass.Parser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("npz", help="a MedMNIST .npz file")
    p.add_argument("--out", required=True, help="the folder to write (images/, labels.csv, splits/)")
    args = p.parse_args([str(a) for a in argv] if argv is not None else None)
    return cass.run_command(lambda: convert(args.npz, args.out), "interrupted; remove the --out folder and run again")


if __name__ == "__main__":
    sys.exit(main())
