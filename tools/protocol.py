"""The paper's label-efficiency protocol (paper 5, Table 1): one CASS pretraining run and one DINO run (both arms,
tools/dino.py: the paper's comparator), then every arm, initialisation, mode, label fraction and seed
fine-tuned and tested; a table of the test headline metric.

    python tools/protocol.py --data brain_mri --root DIR --preset tiny --seeds 3 --out runs/brain_mri

Resumable: rerunning the command continues an interrupted pretraining run and skips finished cells. Cells
are claimed by lock files, so several processes given the same --out share one grid (one per GPU or core).
Writes table.md and table.json in --out. Calls cass.pretrain, dino.pretrain and cass.finetune in this process;
with --cache-images every run and cell reads one file of decoded images in --cache-dir. A pretraining runs only
while a cell of its initialisation is left to run, and the DINO run uses the CASS run's splits (and the cells use
those of the first), so every row sees the same images.
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cass  # noqa: E402
import dino  # noqa: E402  (imports vit_pytorch only when a DINO run starts)

GRID_FLAGS = {  # flag: (default, help, argparse options)
    "arms": (["cnn", "vit"], "encoders to fine-tune", dict(nargs="+", choices=["cnn", "vit"])),
    "inits": (["cass", "dino", "random", "random-bn", "imagenet"], "initialisations: cass (the pretraining run), dino "
              "(tools/dino.py, both arms), random, random-bn (CNN, linear mode: the BatchNorm control) and imagenet "
              "(where the weights load)", dict(nargs="+", choices=["cass", "dino", "random", "random-bn", "imagenet"])),
    "modes": (["full", "linear"], "fine-tuning modes", dict(nargs="+", choices=["full", "linear"])),
    "modes_full": (None, "modes with 100%% of the labels (default: --modes)",
                   dict(nargs="+", choices=["full", "linear"])),
    "fractions": ([0.01, 0.1, 1.0], "label fractions", dict(nargs="+", type=float, choices=[0.01, 0.1, 1.0])),
    "seeds": (5, "fine-tuning seeds per cell (paper B.1.1: 5)", dict(type=int)),
    "seeds_full": (None, "seeds with 100%% of the labels (default: --seeds)", dict(type=int)),
    "ft_epochs_grid": (None, "fine-tuning epochs at most (default: the preset's)", dict(type=int)),
    "ft_epochs_full": (None, "fine-tuning epochs at most with 100%% of the labels", dict(type=int)),
    "ft_epochs_linear": (100, "linear-probe epochs at most (a head on stored features: milliseconds each)",
                         dict(type=int)),
}
PRETRAIN_ONLY = ("out_dim", "pretrained", "objective", "vc_weight", "epochs", "lr", "sched_unit", "swa_start",
                 "compile", "sync_bn", "recipe", "prototypes")
PRETRAINED = ("cass", "dino")  # the initialisations that are a pretraining run of the grid, in --out/<init>


def build_parser():
    p = cass.Parser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    for key, (cmds, default, text, options) in cass.FLAGS.items():
        if "p" in cmds and key not in ("resume", "keep_last"):
            cass.add_flag(p, key, "pretrain", "as for cass.py pretrain: ")
    for key in ("recipe", "prototypes"):
        default, text, options = dino.DINO_FLAGS[key]
        p.add_argument(f"--{key}", default=None, help=f"the DINO runs: {text} (default: {default})", **options)
    for key, (default, text, options) in GRID_FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), default=default, help=f"{text} (default: {default})", **options)
    return p


def cells(grid, imagenet_ok):
    """Every (arm, init, mode, fraction, seed) of the grid, in the order they run."""
    for fraction in grid["fractions"]:
        full = fraction == 1.0
        for arm in grid["arms"]:
            for init in grid["inits"]:
                if (init == "random-bn" and arm != "cnn") or (init == "imagenet" and not imagenet_ok):
                    continue  # a ViT has no BatchNorm to re-estimate
                for mode in (grid["modes_full"] if full and grid["modes_full"] else grid["modes"]):
                    if init == "random-bn" and mode == "full":
                        continue  # full fine-tuning re-estimates BatchNorm statistics from its first step
                    for seed in range(grid["seeds_full"] if full and grid["seeds_full"] else grid["seeds"]):
                        yield dict(arm=arm, init=init, mode=mode, fraction=fraction, seed=seed)


def cell_folder(out, c):
    return out / "cells" / f"{c['arm']}-{c['init']}-{c['mode']}-{c['fraction']:g}-seed{c['seed']}"


def table(finished, headline):
    """mean ± std of the test headline metric per arm, init, mode and fraction, as rows and as markdown."""
    groups = {}
    for c in finished:
        groups.setdefault((c["arm"], c["init"], c["mode"], c["fraction"]), []).append(c)
    rows = []
    for (arm, init, mode, fraction), cs in sorted(groups.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][2],
                                                                                  kv[0][1])):
        values = np.array([c["test"] for c in cs])
        rows.append(dict(arm=arm, init=init, mode=mode, fraction=fraction, n=len(cs), mean=float(values.mean()),
                         std=float(values.std(ddof=1)) if len(cs) > 1 else 0.0,
                         minutes=sum(c["seconds"] for c in cs) / 60))
    lines = [f"| labels | arm | init | mode | test {headline} (mean ± std) | runs | minutes |", "| --- " * 7 + "|"]
    lines += [f"| {r['fraction']:.0%} | {r['arm']} | {r['init']} | {r['mode']} | {r['mean']:.4f} ± {r['std']:.4f} | "
              f"{r['n']} | {r['minutes']:.1f} |" for r in rows]
    return rows, "\n".join(lines) + "\n"


def imagenet_available(given):
    """Whether the imagenet cells can run: weight files for both arms, or the hub reachable."""
    if given.get("cnn_weights") and given.get("vit_weights"):
        return True, ""
    return not cass.hub_offline(), "the Hugging Face hub cannot be reached and no --cnn-weights/--vit-weights"


def result(cell):
    """A cell's metrics.json, or None: not run yet, or damaged (a full disk, a kill): then the cell is run again."""
    try:
        return cass.read_json(cell / "metrics.json")
    except (cass.UserError, OSError):
        return None


def run(given, grid):
    low = next((k for k in ("seeds", "seeds_full", "ft_epochs_grid", "ft_epochs_full", "ft_epochs_linear")
                if grid[k] is not None and not grid[k] >= 1), None)  # the least values, as cass.py's flags have
    if low:
        raise cass.UserError(f"--{low.replace('_', '-')} {grid[low]} cannot work: give 1 or more")
    out = Path(given.pop("out", None) or
               f"runs/protocol-{given.get('data', 'digits')}-{time.strftime('%Y%m%d-%H%M%S')}")
    cass.check_output(out, [given["root"]] if given.get("root") else [], folder=True)  # never inside the data
    out.mkdir(parents=True, exist_ok=True)
    times = {}

    # -- the pretraining runs (resumed if interrupted), where a cell of theirs is left to run --------
    ok, why = imagenet_available(given) if "imagenet" in grid["inits"] else (False, "")
    if "imagenet" in grid["inits"] and not ok:
        print(f"skipping the imagenet cells: {why}")
    todo = list(cells(grid, ok))
    runs = {init: out / ("pretrain" if init == "cass" else init) for init in PRETRAINED}  # cass: its old name
    splits = next((str(p / "splits") for p in runs.values() if (p / "splits" / "train.csv").is_file()), None)
    for init, pre in runs.items():  # the first run's splits serve the second run and every cell
        if all(result(cell_folder(out, c)) for c in todo if c["init"] == init):
            continue  # none of its cells is left (or none asked for): no pretraining needed
        arms = ("cnn", "vit") if init == "cass" else grid["arms"]  # CASS trains both; DINO one pass per arm asked
        if not all((pre / f"{arm}.pt").exists() for arm in arms):
            t0 = time.perf_counter()
            args = {**given, "out": str(pre), "resume": (pre / "last.pt").exists(), **({"splits": splits} if splits
                                                                                      else {})}
            try:
                if init == "cass":
                    cass.pretrain(cass.resolve("pretrain", {k: v for k, v in args.items() if k not in
                                                            dino.DINO_FLAGS}))
                else:
                    dino.pretrain(dino.resolve({**{k: v for k, v in args.items() if k not in dino.CASS_ONLY},
                                                "arms": list(arms)}))
            except KeyboardInterrupt:  # the advice is this command's: it resumes the run itself
                raise KeyboardInterrupt(f"interrupted in the {init} pretraining run; rerun this command to continue "
                                        "it and the grid") from None
            wall = cass.read_json(pre / "wall.json")["seconds"] if (pre / "wall.json").exists() else 0.0
            cass.write_json(dict(seconds=wall + time.perf_counter() - t0), pre / "wall.json")
        splits = splits or str(pre / "splits")
    for init, pre in runs.items():
        wall = pre / "wall.json"
        times[f"{'' if init == 'cass' else init + '_'}pretrain_minutes"] = \
            cass.read_json(wall)["seconds"] / 60 if wall.exists() else 0.0

    # -- the grid of fine-tuning runs; finished cells are not run again ----------------------------
    shared = {k: v for k, v in given.items() if k not in PRETRAIN_ONLY}
    if splits:
        shared["splits"] = splits  # every cell uses the pretraining runs' splits
    elsewhere = []
    (out / "cells").mkdir(exist_ok=True)
    for i, c in enumerate(todo):
        cell = cell_folder(out, c)
        name = cell.name
        if result(cell) is None:
            lock = cass.claim(out / "cells" / f"{name}.lock")
            if lock is None:  # another process sharing this grid runs it now
                elsewhere.append(name)
                continue
            if result(cell) is not None:  # finished by that process since the first look
                cass.release(lock)
                continue
            print(f"[{i + 1}/{len(todo)}] {name}", flush=True)
            full = c["fraction"] == 1.0 and grid["ft_epochs_full"]
            epochs = grid["ft_epochs_full"] if full else grid["ft_epochs_grid"]
            epochs = grid["ft_epochs_linear"] if c["mode"] == "linear" else epochs
            for stale in ("best.pt", "metrics.json"):  # of a run killed between the two, or a damaged result
                (cell / stale).unlink(missing_ok=True)
            cfg = cass.resolve("finetune", {**shared, "init": str(runs[c["init"]]) if c["init"] in runs else c["init"],
                                            "arm": c["arm"], "mode": c["mode"], "label_fraction": c["fraction"],
                                            "seed": c["seed"], "out": str(cell), "resume": (cell / "last.pt").exists(),
                                            **({"epochs": epochs} if epochs else {})})
            t0 = time.perf_counter()
            try:
                cass.finetune(cfg)
                cass.write_json(dict(seconds=time.perf_counter() - t0), cell / "wall.json")
            except cass.UserError as e:
                raise cass.UserError(f"cell {name}: {e} (rerunning this command resumes the grid)") from None
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"interrupted in cell {name}; rerun this command to continue the grid "
                                        "(a cell resumes from its last.pt)") from None
            finally:
                cass.release(lock)
    finished = []  # the table is made from what is on disk: the cells of every process that shares this grid
    for c in todo:
        cell = cell_folder(out, c)
        metrics = result(cell)
        if metrics is not None:
            wall = cass.read_json(cell / "wall.json") if (cell / "wall.json").exists() else {}
            finished.append(dict(c, test=metrics["test"][metrics["headline"]], seconds=wall.get("seconds", 0.0)))
    if len(finished) < len(todo):
        print(f"{len(todo) - len(finished)} cell(s) still run in another process sharing {out} (first: "
              f"{elsewhere[0] if elsewhere else '?'}); the table leaves them out: the process that finishes last "
              "writes the whole table, or rerun this command then")
    headline = cass.HEADLINE.get(given.get("data", "digits"), "f1_macro")
    rows, markdown = table(finished, headline)
    times["finetune_minutes"] = sum(c["seconds"] for c in finished) / 60
    markdown += (f"\npretraining: CASS {times['pretrain_minutes']:.1f} min, DINO {times['dino_pretrain_minutes']:.1f} "
                 f"min; {len(finished)} fine-tuning runs {times['finetune_minutes']:.1f} min; total "
                 f"{sum(times.values()):.1f} min\n")
    cass.write_json(dict(headline=headline, rows=rows, cells=finished, config=dict(given, out=str(out), **grid),
                         **times), out / "table.json")
    cass.atomic_write(out / "table.md", markdown.encode())
    print(markdown)
    return rows


def main(argv=None):
    args = vars(build_parser().parse_args([str(a) for a in argv] if argv is not None else None))
    grid = {k: args.pop(k) for k in GRID_FLAGS}
    given = {k: v for k, v in args.items() if v is not None}  # False: a given --no-...
    return cass.run_command(lambda: run(given, grid), "interrupted; rerun the same command to continue the grid")


if __name__ == "__main__":
    sys.exit(main())
