"""Write the split files of a dataset: train, val, test, train_10pct and train_1pct (make_splits of cass.py, seed 0).

From the images under --root, or, for brain_mri and isic2019, from a listing of the complete public dataset: that is
how data_splits/ beside cass.py was made, so that everyone who downloads a dataset trains and tests on the same
images. A run does not need this tool: it reads data_splits/<data>, or computes its splits (--splits auto), and
writes the ones it used in its run folder (RUN/splits, for --splits RUN/splits in a later run).

    python tools/splits.py --data folder --root DIR --out my_splits          # then: cass.py ... --splits my_splits
    python tools/splits.py --data isic2019 --listing ISIC_2019_Training_GroundTruth.csv \\
        --out data_splits/isic2019 --overwrite                                  # remakes the committed files
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cass  # noqa: E402


def listed_table(data, listing):
    """The Table of a complete public dataset from its listing, without its images."""
    if data == "brain_mri":  # Training/<class>/<file> and Testing/<class>/<file>, the curators' test set in Testing/
        paths = [line.strip() for line in open(listing) if line.strip()]
        classes = sorted({Path(p).parts[1] for p in paths})
        labels = {p: np.eye(len(classes), dtype=np.float32)[classes.index(Path(p).parts[1])] for p in paths}
        return cass.Table("brain_mri", classes, False, labels, paths,
                          given=dict(test=[p for p in paths if p.startswith("Testing/")]))
    if data == "isic2019":
        return cass.table_isic2019(Path("."), listing)
    raise cass.UserError(f"--listing serves brain_mri and isic2019, not --data {data}; drop it to use the images")


def make_split_files(data, root, out, listing=None, overwrite=False):
    """The split files of a dataset in the folder `out`; returns the splits."""
    if (Path(out) / "train.csv").exists() and not overwrite:
        raise cass.UserError(f"--out {out} holds split files; add --overwrite to replace them")
    cass.check_output(Path(out), [root] if root else [], overwrite=True, folder=True)
    table = listed_table(data, listing) if listing else cass.load_table(data, root)
    splits = cass.make_splits(table, seed=0)
    cass.write_splits(table, splits, out)
    print(f"wrote {', '.join(f'{k} {len(v)}' for k, v in splits.items())} to {out}")
    return splits


def main(argv=None):
    p = cass.Parser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    for key in ("data", "root"):
        cass.add_flag(p, key, "pretrain")
    p.add_argument("--listing", help="brain_mri: a list of Training/... and Testing/... paths; isic2019: the "
                   "ground-truth CSV, so that the split files cover the whole public dataset (default: the images "
                   "under --root)")
    p.add_argument("--out", required=True, help="the folder to write (data_splits/<data> beside cass.py holds the "
                   "committed files: name it to replace them)")
    p.add_argument("--overwrite", action="store_true", help="replace the split files in --out")
    args = p.parse_args([str(a) for a in argv] if argv is not None else None)
    return cass.run_command(lambda: make_split_files(args.data or "digits", args.root, args.out, args.listing,
                                                     args.overwrite), "interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
