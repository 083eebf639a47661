"""Pictures of runs (matplotlib): what a run folder or a protocol folder says, as a PNG.

    python tools/plot.py runs/brain                          # a pretraining run -> runs/brain/monitor.png
    python tools/plot.py runs/brain-cnn-10                   # a fine-tuning run -> curves.png (and confusion.png)
    python tools/plot.py runs/protocol --paper               # a protocol grid -> label_efficiency.png
    python tools/plot.py runs/eq1 runs/cass-vc --out both.png   # several runs of one kind on shared axes
    python tools/plot.py --images scans/ --window own --window 40,80 --out views.png  # images as the encoders see them

A pretraining run (cass.py pretrain or tools/dino.py) gives its epochs: the loss; each arm's output spread on the
training batches and on the validation images, with the healthy level 1/sqrt(dim); the effective rank and the
first principal component's share; the cosine between the arms; the 20-NN accuracy on features and outputs
with the raw-pixel floor and the majority-class rate. Epochs where the run said COLLAPSE are shaded red. A
fine-tuning run gives its training and validation loss and the validation headline metric per epoch with the
best epoch marked, and the test confusion matrix from metrics.json. A protocol folder (table.json) gives the
label-efficiency chart: the test headline metric against the label fraction, one line per initialisation with
the seeds' standard deviation, one panel per arm and mode; --paper adds the paper's Table 1 (CASS, DINO and
supervised, best model per method). --images shows images (files, or folders by cass.py's folder rule) as the
encoders see them: decoded (DICOM through its modality LUT and window: the file's own, or each --window in a column
of its own), resized to --img-size. Needs tools/requirements.txt.
"""
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cass  # noqa: E402

PAPER_TABLE_1 = {  # paper Table 1, best model per method, mean of 5 runs: label fraction -> CASS, DINO, supervised
    "brain_mri": {0.01: (0.4082, 0.6341, 0.3717), 0.1: (0.8925, 0.9233, 0.9022), 1.0: (0.9909, 0.9900, 0.9899)},
    "isic2019": {0.01: (0.7258, 0.5180, 0.5200), 0.1: (0.6195, 0.3646, 0.3097), 1.0: (0.6519, 0.3908, 0.3500)},
    "autoimmune": {0.1: (0.8717, 0.8445, 0.8356), 1.0: (0.8894, 0.8639, 0.8420)},
}
ARMS = ("cnn", "vit")


def read_jsonl(path):
    try:
        return [json.loads(line) for line in open(path) if line.strip()]
    except (OSError, ValueError) as e:
        raise cass.UserError(f"cannot read {path} ({type(e).__name__}): not a log.jsonl written by cass.py") from None


def kind_of(folder):
    """pretrain, finetune or protocol, from what the folder holds."""
    folder = Path(folder)
    if (folder / "table.json").is_file():
        return "protocol"
    if (folder / "log.jsonl").is_file():
        rows = read_jsonl(folder / "log.jsonl")
        if any("train_loss" in r for r in rows):
            return "finetune"
        if any("loss" in r or r.get("phase") == "init" for r in rows):
            return "pretrain"
    raise cass.UserError(f"{folder} is not a run: a pretraining or fine-tuning run folder holds log.jsonl, a protocol "
                         "folder table.json")


def series(rows, key):
    """(epochs, values) of the log lines that hold `key`."""
    points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None and r.get("phase") != "saved"]
    return [p[0] for p in points], [p[1] for p in points]


def draw(ax, rows, key, style, **kwargs):
    """One line of a log's `key` on `ax`, if the log has it (older logs lack some); returns its colour."""
    xs, ys = series(rows, key)
    return ax.plot(xs, ys, style, **kwargs)[0].get_color() if xs else kwargs.get("color")


def plot_pretrain(axes, folder, label, colour=None):
    """One run's monitor on the seven axes (the sixth the first PC's share, on the rank panel's right; the seventh
    where each epoch's seconds went). With `colour` (several runs on one picture) the colour is the run's and
    the style tells the arm (CNN solid, ViT dashed) and, for the spread, training (circles) from validation."""
    rows = read_jsonl(Path(folder) / "log.jsonl")
    cfg = cass.read_json(Path(folder) / "args.json") if (Path(folder) / "args.json").is_file() else {}
    loss, spread, rank, cos, knn, pc1, time_ax = axes
    style = {"cnn": "-", "vit": "--"}
    passes = sorted({r["arm"] for r in rows if "arm" in r})  # tools/dino.py: one pass per arm, each its own loss
    for arm in passes or [None]:
        name = " ".join(x for x in (label if colour else cfg.get("method", "cass"), arm) if x)
        draw(loss, [r for r in rows if r.get("arm") == arm], "loss", "o" + style.get(arm, "-"), color=colour,
             label=name)
    for arm in ARMS:
        tag = f"{label} {arm}" if colour else arm
        c = draw(spread, rows, f"std_{arm}", "o" + style[arm], color=colour, label=f"{tag}, training batches")
        draw(spread, rows, f"val_std_{arm}", "s" + style[arm], color=c, mfc="none", label=f"{tag}, validation")
        c = draw(rank, rows, f"rank_{arm}", "o" + style[arm], color=colour, label=f"{tag} effective rank")
        draw(pc1, rows, f"pc1_{arm}", "x" + style[arm], color=c, alpha=0.6, label=f"{tag} first PC share (right)")
        c = draw(knn, rows, f"knn_{arm}_feat", "o" + style[arm], color=colour, label=f"{tag} features")
        draw(knn, rows, f"knn_{arm}_out", "s" + style[arm], color=c, mfc="none", label=f"{tag} outputs")
    c = draw(cos, rows, "cos_cnn_vit", "o-", color=colour, label=f"{label + ' ' if colour else ''}training batches")
    draw(cos, rows, "val_cos", "s--", color=c, mfc="none", label=f"{label + ' ' if colour else ''}validation")
    if passes and colour:  # tools/dino.py trains one arm at a time: nothing to compare, said in the legend
        cos.plot([], [], " ", label=f"{label}: one arm at a time, no cosine")
    steps = [r for r in rows if "loss" in r and "seconds" in r and "arm" not in r]  # one CASS pass per epoch
    if steps:
        epochs = [r["epoch"] for r in steps]
        waited = [r.get("data_seconds", 0) for r in steps]  # logs from before the split have none
        c = time_ax.plot(epochs, [r["seconds"] - w for r, w in zip(steps, waited)], "o-", color=colour,
                         label=f"{label + ' ' if colour else ''}training steps")[0].get_color()
        if any(waited):
            time_ax.plot(epochs, waited, "s--", color=c, mfc="none", label=f"{label + ' ' if colour else ''}waiting "
                         "for data")
        draw(time_ax, steps, "monitor_seconds", "x:", color=c, label=f"{label + ' ' if colour else ''}monitor")
    healthy = next((r["std_healthy"] for r in rows if "std_healthy" in r), None)
    labels = {line.get_label() for line in spread.lines}
    if healthy and f"healthy 1/sqrt(dim) = {healthy:.4f}" not in labels:
        spread.axhline(healthy, color="green", lw=1, label=f"healthy 1/sqrt(dim) = {healthy:.4f}")
        spread.axhline(healthy / 10, color="red", lw=1, ls=":", label="COLLAPSE below a tenth of it")
    base = next((r for r in rows if "knn_raw_pixels" in r), {})
    if base and not any(line.get_label().startswith("raw pixels") for line in knn.lines):
        knn.axhline(base["knn_raw_pixels"], color="black", ls=":", label=f"raw pixels {base['knn_raw_pixels']:.3f}")
        knn.axhline(base["majority"], color="grey", ls="-.", label=f"majority class {base['majority']:.3f}")
    dim = 1 / healthy**2 if healthy else 256
    collapsed = sorted({r["epoch"] for r in rows if "loss" in r and cass.collapse_warning(r, round(dim))})
    for e in collapsed if not colour else []:
        for ax in axes[:5]:
            ax.axvspan(e - 0.5, e + 0.5, color="red", alpha=0.08, lw=0)
    return collapsed


def whole_epochs(ax):
    """Epochs are whole: integer ticks, and half an epoch of room either side of the first and last."""
    from matplotlib.ticker import MaxNLocator

    xs = [float(x) for line in ax.lines for x in line.get_xdata()]
    if xs:
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def encoders(folder):
    """The encoders a run trained, as they ran: the ViT's patch and the image size included."""
    cfg = cass.read_json(Path(folder) / "args.json") if (Path(folder) / "args.json").is_file() else {}
    if not cfg.get("cnn"):
        return "encoders unknown"
    patch = f", patch {cfg['patch_size']}" if cfg.get("patch_size") else ""
    return f"{cfg['cnn']} + {cfg['vit']}{patch}, {cfg.get('img_size')} px"


def figure_pretrain(folders, labels):
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(16, 9))
    axes = (*grid.flat[:5], grid.flat[2].twinx(), grid.flat[5])  # the first PC's share on the rank panel's right
    colours = [f"C{i}" for i in range(len(folders))] if len(folders) > 1 else [None]
    said = {label: plot_pretrain(axes, f, label, c) for f, label, c in zip(folders, labels, colours)}
    titles = ("loss", "spread of the normalised outputs (log)", "effective rank (left), first PC share (right)",
              "cosine between the arms", "20-NN accuracy on the validation images", None,
              "seconds of each epoch: where they went")
    for ax, title in zip(axes, titles):
        if title is None:  # the twin axis: the rank panel's title and ticks serve it
            continue
        ax.set_title(title)
        ax.set_xlabel("epoch (0: initialisation)")
        whole_epochs(ax)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6 if len(folders) > 1 else 7, loc="best", framealpha=0.6)
    if not axes[3].lines:
        axes[3].text(0.5, 0.5, "one arm at a time: no cosine", ha="center", transform=axes[3].transAxes)
    axes[5].set_ylim(0, 1)
    if axes[5].lines:
        axes[5].legend(fontsize=6, loc="upper right")
    if any(line.get_ydata().size and min(line.get_ydata()) > 0 for line in axes[1].lines):
        axes[1].set_yscale("log")
    if not axes[6].lines:
        axes[6].text(0.5, 0.5, "no epoch times in these logs", ha="center", transform=axes[6].transAxes)
    collapsed = "; ".join(f"{k}: from epoch {v[0]}" for k, v in said.items() if v)
    fig.suptitle(f"{', '.join(f'{label} ({encoders(f)})' for f, label in zip(folders, labels))}" +
                 (f"  COLLAPSE ({collapsed}, shaded)" if collapsed else "  no collapse said"),
                 color="red" if collapsed else "black", fontsize=10)
    return fig


def figure_finetune(folders, labels):
    import matplotlib.pyplot as plt

    fig, (loss, metric) = plt.subplots(1, 2, figsize=(13, 5))
    for folder, label in zip(folders, labels):
        rows = read_jsonl(Path(folder) / "log.jsonl")
        key = next((k for k in rows[0] if k.startswith("val_") and k != "val_loss"), None) if rows else None
        line = loss.plot(*series(rows, "train_loss"), "o-", label=f"{label} training")
        loss.plot(*series(rows, "val_loss"), "s--", color=line[0].get_color(), label=f"{label} validation")
        if key:
            metric.plot(*series(rows, key), "o-", color=line[0].get_color(), label=label)
            metric.set_ylabel(key.replace("_", " "))
        best = rows[-1].get("best_epoch") if rows else None
        if best:
            for ax in (loss, metric):
                ax.axvline(best, color=line[0].get_color(), ls=":", lw=1)
            metric.annotate(f"best epoch {best}", (best, metric.get_ylim()[0]), rotation=90, fontsize=8, va="bottom")
    for ax, title in ((loss, "focal loss"), (metric, "validation headline metric (best epoch dotted)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        whole_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.6)
    return fig


def figure_confusion(folder):
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = cass.read_json(Path(folder) / "metrics.json")
    test = metrics.get("test", {})
    if "confusion_matrix" not in test:
        return None  # multi-label runs have none
    m, classes = np.array(test["confusion_matrix"]), list(test["per_class"])
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 3, 1.0 * len(classes) + 2.5))
    shares = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test, {metrics.get('headline', '')} {test.get(metrics.get('headline'), float('nan')):.4f}")
    fig.tight_layout()
    return fig


def read_table(folder):
    table = cass.read_json(Path(folder) / "table.json")
    needed = {"arm", "init", "mode", "fraction", "mean", "std", "n"}
    if not isinstance(table, dict) or not table.get("rows") or not all(needed <= set(r) for r in table["rows"]):
        raise cass.UserError(f"{folder}/table.json is not a table written by tools/protocol.py (rows of "
                             f"{', '.join(sorted(needed))})")
    return table


def figure_protocol(folders, labels, paper=False):
    import matplotlib.pyplot as plt

    tables = [read_table(f) for f in folders]
    data = tables[0].get("config", {}).get("data")
    if paper and data not in PAPER_TABLE_1:
        print(f"note: the paper has no label-efficiency table for --data {data} (it has {', '.join(PAPER_TABLE_1)}): "
              "--paper adds nothing to this chart")
    panels = sorted({(r["arm"], r["mode"]) for t in tables for r in t["rows"]})
    series_keys = [(label, init) for t, label in zip(tables, labels) for init in sorted({r["init"] for r in t["rows"]})]
    colour = {key: f"C{i % 10}" for i, key in enumerate(series_keys)}  # one colour per line in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False, sharey=True)
    for ax, (arm, mode) in zip(axes[0], panels):
        drawn = set()  # grids that share cells (a control copied into a later grid) draw them once
        for table, label in zip(tables, labels):
            for init in sorted({r["init"] for r in table["rows"]}):
                rows = sorted((r for r in table["rows"] if (r["arm"], r["mode"], r["init"]) == (arm, mode, init)),
                              key=lambda r: r["fraction"])
                same = (init, tuple((r["fraction"], r["mean"]) for r in rows))
                if rows and same not in drawn:
                    drawn.add(same)
                    ax.errorbar([r["fraction"] for r in rows], [r["mean"] for r in rows], [r["std"] for r in rows],
                                marker="o", capsize=3, color=colour[label, init],
                                label=f"{label + ': ' if len(tables) > 1 else ''}{init}")
        for i, name in enumerate(("CASS", "DINO", "supervised")) if paper and data in PAPER_TABLE_1 else []:
            points = sorted(PAPER_TABLE_1[data].items())
            ax.plot([f for f, _ in points], [v[i] for _, v in points], ls=":", marker="xv+"[i], color="grey",
                    label=f"paper: {name} (ImageNet-initialised resnet50 / ViT-B at 384 px)" if i == 0 else
                    f"paper: {name}")
        ax.set_xscale("log")
        ax.set_xticks([0.01, 0.1, 1.0], ["1%", "10%", "100%"])
        ax.set_title(f"{arm}, {mode}")
        ax.set_xlabel("labelled share of the training split")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test {tables[0].get('headline', '')} (mean ± std over seeds)")
    seen = {}  # one legend for every panel, below them: in a panel it covers points
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    rows = -(-len(seen) // 4)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(4, len(seen)), fontsize=7)
    fig.tight_layout(rect=(0, min(0.45, 0.05 * rows + 0.02), 1, 1))
    return fig


def figure_views(images, size, windows):
    """Each image as cass.py feeds it to the encoders (read_image, then image_tensor): a row per image, a column per
    window (None: the file's own)."""
    import matplotlib.pyplot as plt

    files = [f for src in images for f in (cass.image_files(src) if Path(src).is_dir() else [Path(src)])]
    if not files:
        raise cass.UserError(f"--images {' '.join(map(str, images))} holds no images")
    fig, axes = plt.subplots(len(files), len(windows), figsize=(2.7 * len(windows), 3.1 * len(files)), squeeze=False)
    for row, file in zip(axes, files):
        for ax, window in zip(row, windows):
            view = cass.image_tensor(cass.read_image(file, window, size), size)  # uint8 [3, S, S]
            ax.imshow(view.permute(1, 2, 0).numpy())
            ax.set_axis_off()
            ax.set_title(f"{file.name}\n" + ("its own window" if window is None else f"window {window[0]:g},"
                                                                                     f"{window[1]:g}"), fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, out):
    """The PNG written as cass.py writes its files: whole, then renamed (a kill or a full disk leaves the old one)."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    cass.atomic_write(out, png.getvalue())
    print(f"wrote {out}")


def plot(folders, out=None, paper=False, images=None, size=224, windows=None):
    """The pictures of one kind of folder, or of --images; returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    if images or not folders:
        if folders or not images or not out or Path(out).suffix.lower() != ".png":
            raise cass.UserError("give run folders, or --images with --out FILE.png (not both)")
        cass.check_output(Path(out), images, overwrite=True)
        save(figure_views(images, size, windows or [None]), Path(out))
        return [Path(out)]
    kinds = {kind_of(f) for f in folders}
    if len(kinds) > 1:
        raise cass.UserError(f"the folders are of different kinds ({', '.join(sorted(kinds))}): plot one kind at once")
    kind = kinds.pop()
    if len(folders) > 1 and not out:
        raise cass.UserError("several folders go on one picture: name it with --out FILE.png")
    if out and Path(out).suffix.lower() != ".png":  # never a file of the run (an encoder, a log) replaced by a PNG
        raise cass.UserError(f"--out {out} does not end in .png: plot writes a PNG; give --out FILE.png")
    if out:
        cass.check_output(Path(out), overwrite=True)  # its folder exists and is writable; it is no folder
    labels = [Path(f).resolve().name for f in folders]
    if len(set(labels)) < len(labels):  # e.g. several protocols' pretrain/ folders: name their parents too
        labels = [f"{Path(f).resolve().parent.name}/{Path(f).resolve().name}" for f in folders]
    first = Path(folders[0])
    name = {"pretrain": "monitor.png", "finetune": "curves.png", "protocol": "label_efficiency.png"}[kind]
    figure = dict(pretrain=figure_pretrain, finetune=figure_finetune)[kind] if kind != "protocol" else \
        (lambda f, l: figure_protocol(f, l, paper))
    written = [Path(out or first / name)]
    save(figure(folders, labels), written[0])
    if kind == "finetune" and len(folders) == 1 and (first / "metrics.json").is_file():
        fig = figure_confusion(first)
        if fig is not None:
            written.append(Path(out).with_name(Path(out).stem + "-confusion.png") if out else first / "confusion.png")
            save(fig, written[-1])
    return written


def main(argv=None):
    p = cass.Parser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", help="run folders (pretraining or fine-tuning) or protocol folders, one kind")
    p.add_argument("--out", help="the PNG to write (default: monitor.png, curves.png or label_efficiency.png in the "
                   "folder; needed for several folders)")
    p.add_argument("--paper", action="store_true", help="protocol: draw the paper's Table 1 beside the results")
    p.add_argument("--images", nargs="+", help="images or folders of images to show as the encoders see them")
    p.add_argument("--img-size", type=int, default=224, help="--images: the side they are resized to (default: 224)")
    p.add_argument("--window", action="append", type=lambda text: None if text == "own" else cass.window_flag(text),
                   metavar="CENTER,WIDTH", help="--images: a DICOM window, or own (the file's), one column each; "
                   "repeat it (default: own)")
    args = p.parse_args([str(a) for a in argv] if argv is not None else None)
    return cass.run_command(lambda: plot(args.folders, args.out, args.paper, args.images, args.img_size, args.window),
                            "interrupted")


if __name__ == "__main__":
    sys.exit(main())
