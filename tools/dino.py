"""DINO for each arm: the comparator of the paper's Table 1 (label efficiency) and Table 2 (training time), on
the same data, splits, encoders, optimiser and budget as `cass.py pretrain`.

    python tools/dino.py --data digits --preset tiny                    # the CNN pass, then the ViT pass
    python tools/dino.py --data brain_mri --root DIR --arms vit         # one arm
    python cass.py finetune --init runs/DINO_RUN --arm cnn --label-fraction 0.1

The paper's DINO is Phil Wang's `vit_pytorch.Dino` (the authors' requirements pin vit-pytorch 0.35.8; its
dino.py has not changed since) around each timm encoder. DINO trains one network, so a CNN and a ViT take two
passes where CASS takes one. The authors did not publish their DINO training code, so the optimiser here is
CASS's: Adam at the preset's learning rate over the student, the cosine schedule, the same epochs and batch (no
SWA: DINO's own average is its teacher). The class departs from the DINO paper (Caron et al. 2021) in ways a
reader comparing the two should know: student temperature 0.9 (DINO: 0.1), teacher momentum 0.9 (DINO: 0.996
rising to 1), two global and two local crops all resized to the image size (no multi-crop), one random crop and
colour jitter for the whole batch (its augmentations run on the batch tensor), an average of the parameters
only, its own normalisation (it takes images in [0, 1], not the normalised tensors cass.py feeds its encoders)
and K = 65336 prototypes (`--prototypes`). `--recipe dino-paper` sets the two of these that the class takes
as arguments (student temperature 0.1, teacher momentum 0.996).

The result is the student's backbone, written as cnn.pt and vit.pt in cass.py's encoder format with a head of
the preset's width (as a CASS run has one), so `cass.py finetune --init RUN --arm cnn|vit`, evaluate, predict
and load_model take a DINO run as they take a CASS run. Each epoch logs the collapse monitor of cass.py on the
student (its pooled features, and the projection's 256-d normalised bottleneck as its outputs). Needs
tools/requirements.txt.
"""
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cass  # noqa: E402

K = 65336  # vit_pytorch.Dino's number of prototypes (num_classes_K): the default
BOTTLENECK = 256  # its projection_hidden_size: the L2-normalised layer before the last, which the monitor reads
RECIPES = {  # keyword arguments of vit_pytorch.Dino
    "vit-pytorch": {},  # the class's defaults, as the paper ran it
    "dino-paper": dict(student_temp=0.1, moving_average_decay=0.996),  # Caron et al. 2021
}
CASS_ONLY = ("objective", "vc_weight", "swa_start", "sync_bn", "compile")  # pretrain flags DINO does not take
DINO_FLAGS = {  # flag: (default, help, argparse options)
    "arms": (["cnn", "vit"], "the encoders to pretrain, one pass each, in this order",
             dict(nargs="+", choices=["cnn", "vit"])),
    "prototypes": (K, "K, the width of DINO's projection (vit_pytorch's default; the DINO paper used 65536)",
                   dict(type=int)),
    "encoder": ("student", "the backbone written to <arm>.pt: student (learner.net, what the paper's use of "
                "vit_pytorch.Dino keeps) or teacher (the moving average the DINO paper evaluates)",
                dict(choices=["student", "teacher"])),
    "recipe": ("vit-pytorch", "vit-pytorch: the class's defaults, as the paper ran it (student temperature 0.9, "
               "teacher momentum 0.9); dino-paper: the DINO paper's 0.1 and 0.996",
               dict(choices=list(RECIPES))),
}


def build_learner(cfg, arm, rt):
    """vit_pytorch.Dino around the arm's timm backbone (num_classes=0: its output is the pooled features, which
    the class projects to K). The class runs one mock batch when built, which also makes the teacher."""
    from vit_pytorch import Dino

    name = cfg[arm]
    kwargs = cass.encoder_kwargs(name, cfg["img_size"], cfg["patch_size"])
    weights = cfg[f"{arm}_weights"] or ("imagenet" if cfg["pretrained"] else None)
    backbone = cass.to_device(cass.create_encoder(name, 0, kwargs, weights), rt, name)
    buffers = {k: v.clone() for k, v in backbone.named_buffers()}  # the mock batch is a train-mode pass on noise:
    learner = Dino(backbone, image_size=cfg["img_size"], hidden_layer=-1, num_classes_K=cfg.get("prototypes", K),
                   **RECIPES[cfg["recipe"]])
    for net in (learner.student_encoder.net, learner.teacher_encoder.net):  # BatchNorm's statistics go back to
        for k, v in net.named_buffers():  # the network it started from (the ImageNet one with --pretrained)
            v.copy_(buffers[k])
    return learner


class Student(nn.Module):
    """The student as cass.monitor reads an encoder: its pooled features, and as its outputs the projection's
    L2-normalised bottleneck (the K-wide logits after it carry a bias as large as their signal, so their spread
    reads as collapse even at initialisation)."""

    def __init__(self, learner):
        super().__init__()
        self.backbone, self.head = learner.net, bottleneck(learner)

    def forward_features(self, x):
        return self.backbone.forward_features(x)

    def forward_head(self, x, pre_logits=False):
        return self.backbone.forward_head(x, pre_logits=True)

    def get_classifier(self):
        return self.head


def bottleneck(learner):
    return learner.student_encoder.projector.net[:-1]  # MLP layers, then L2Norm; the Linear to K left out


def dino_epoch(learner, loader, optimizer, scaler, scheduler, rt, cfg, desc):
    """One epoch of DINO on one arm, in cass.train_epoch's steps; returns the means of the loss and of the spread of
    the student's bottleneck."""
    learner.train()
    outputs = []
    hook = bottleneck(learner)[-1].register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    # the teacher's parameters and the centre follow the student after each of its optimiser steps
    follow = optimizer.register_step_post_hook(lambda *_: learner.update_moving_average())

    def step(x, _):
        outputs.clear()
        loss = learner(x / 255)  # [0, 1]: Dino normalises by itself; local crops to the student, global to the teacher
        return loss, cass.output_spread(outputs[0])
    try:
        return cass.train_epoch(loader, step, optimizer, scaler, scheduler, cfg["sched_unit"] == "step", rt, desc,
                                ("loss", "std"))
    finally:
        hook.remove()
        follow.remove()


def run_pass(cfg, arm, loader, sampler, mon, rt, run, resume):
    """One arm's pass: epochs of dino_epoch, each followed by the monitor, a log line and last.pt; then <arm>.pt,
    the student's backbone with a fresh head of the preset's width."""
    out = run.out
    torch.manual_seed(cfg["seed"])  # each pass starts from the seed: a resumed run equals an uninterrupted one
    random.seed(cfg["seed"])  # Dino draws its RandomApply from Python's generator
    learner = build_learner(cfg, arm, rt)
    optimizer = cass.make_adam(learner.student_encoder.parameters(), cfg["lr"])  # the teacher is an average
    scheduler, scaler = cass.cosine_schedule(optimizer, cfg), rt.scaler()
    state = dict(learner=learner, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    start = 0
    if resume:  # the folder is held: claim_run_folder trimmed its log to this last.pt
        saved = cass.restore(state, out)
        start = saved["epoch"]
        random.setstate(saved["python_rng"])
    student, log = Student(learner), out / "log.jsonl"
    if start == 0 and mon is not None:
        m = cass.monitor({arm: student}, mon, rt, baselines=True)
        cass.append_jsonl(dict(arm=arm, epoch=0, phase="init", **m), log)
        print(cass.format_monitor(m, f"{arm} epoch   0 (init)"), flush=True)
    r = {}
    for epoch in range(start, cfg["epochs"]):
        sampler.set_epoch(epoch)
        t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]  # the rate this epoch trains at
        r = dino_epoch(learner, loader, optimizer, scaler, scheduler, rt, cfg,
                       f"{arm} epoch {epoch + 1}/{cfg['epochs']}")
        seconds, steps = time.perf_counter() - t0, r.pop("steps")
        r = dict(arm=arm, epoch=epoch + 1, loss=r["loss"], loss_first_step=r["loss_first_step"],
                 loss_last_step=r["loss_last_step"], **{f"std_{arm}": r["std"]},
                 lr=lr, seconds=seconds, std_healthy=1 / math.sqrt(BOTTLENECK),
                 images_per_s=steps * cfg["batch_size"] / seconds)
        if mon is not None:
            t0 = time.perf_counter()
            r.update(cass.monitor({arm: student}, mon, rt), monitor_seconds=time.perf_counter() - t0)
        cass.append_jsonl(r, log)
        print(format_epoch(r, cfg), flush=True)
        cass.save_run(run, state, epoch + 1, cfg, arm=arm, python_rng=random.getstate())
    backbone = learner.net if cfg["encoder"] == "student" else learner.teacher_encoder.net
    backbone.reset_classifier(cfg["out_dim"])  # the head a CASS arm has; fine-tuning replaces it
    kwargs = cass.encoder_kwargs(cfg[arm], cfg["img_size"], cfg["patch_size"])
    cass.atomic_write(out / f"{arm}.pt", cass.encoder_record(backbone, cfg[arm], kwargs, arm, cfg, method="dino",
                                                                     dino_encoder=cfg["encoder"]))
    warning = cass.collapse_warning(r, BOTTLENECK) if r else ""
    print(f"wrote {out}/{arm}.pt" + (f"\n{warning}" if warning else ""), flush=True)


def format_epoch(r, cfg):
    arm = r["arm"]
    line = (f"{arm} epoch {r['epoch']:3d}/{cfg['epochs']}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  spread "
            f"{r[f'std_{arm}']:.4f} (healthy {r['std_healthy']:.4f})  {r['images_per_s']:.1f} img/s")
    line += ("\n" + cass.format_monitor(r, " " * 16)) if f"knn_{arm}_feat" in r else ""
    warning = cass.collapse_warning(r, BOTTLENECK)
    return line + (f"\n  {warning}" if warning else "")


def pretrain(cfg):
    """DINO on each arm of cfg["arms"], one pass after the other, into one run folder; returns the folder."""
    rt = cass.make_runtime(cfg["device"], cfg["precision"])
    if rt.world > 1:
        raise cass.UserError("tools/dino.py runs in one process: start it with python, not torchrun")
    out = Path(cfg["out"] or f"runs/dino-{cfg['data']}-{time.strftime('%Y%m%d-%H%M%S')}")
    cass.check_run_folder(out, cfg)

    # -- data: the whole training split, labels unused, as cass.pretrain; Dino augments each batch itself ------
    table = cass.load_table(cfg["data"], cfg["root"], cfg.get("window"))
    splits, cfg["splits"] = cass.load_splits(cfg, table)
    train = splits["train"]
    if len(train) < cfg["batch_size"]:
        raise cass.UserError(f"the training split has {len(train)} images, fewer than one batch (--batch-size "
                             f"{cfg['batch_size']}); lower --batch-size")
    dataset = cass.ImageDataset(table, train, cfg["img_size"], None, cass.decode_all(table, train, cfg))
    sampler = cass.EpochSampler(len(dataset), cfg["batch_size"], cfg["seed"])
    loader = cass.make_loader(dataset, sampler, cfg["batch_size"], cfg["workers"], rt)
    mon = cass.monitor_loaders(table, splits, cfg, rt)
    saved = cass.restore({}, out) if cfg["resume"] else None  # read only: the folder is not held yet
    saved_arm = saved["arm"] if saved else None

    with cass.claim_run_folder(out, cfg, rt, splits, table, saved) as run:  # trims the log to this last.pt
        print(f"DINO pretraining ({cfg['recipe']}): {' then '.join(cfg[a] for a in cfg['arms'])}, {len(train)} images "
              f"at {cfg['img_size']} px, splits {cfg['splits']}, {cfg['epochs']} epochs each, batch "
              f"{cfg['batch_size']} on {rt.device.type} {str(rt.amp_dtype or 'fp32').replace('torch.', '')}; run "
              f"folder {out}", flush=True)
        for arm in cfg["arms"]:
            if (out / f"{arm}.pt").is_file():  # a pass that finished before the run was interrupted
                continue
            run_pass(cfg, arm, loader, sampler, mon, rt, run, resume=arm == saved_arm)
        cass.finish_run(run, cfg, f"wrote {', '.join(f'{out}/{a}.pt' for a in cfg['arms'])}")
    return out


def resolve(given):
    """The run's config: cass.py pretrain's (flags, preset, defaults; a resumed run's own args.json), less the
    flags only CASS has, plus the arms and the recipe."""
    if given.get("prototypes") is not None and not given["prototypes"] >= 1:  # a least value, as cass.py's flags
        raise cass.UserError(f"--prototypes {given['prototypes']} cannot work: give 1 or more")
    defaults = {} if given.get("resume") else {k: v[0] for k, v in DINO_FLAGS.items()}  # a resumed run has its own
    cfg = cass.resolve("pretrain", {**defaults, **given}, kind="dino")
    return {k: v for k, v in cfg.items() if k not in CASS_ONLY} | dict(command="dino", method="dino")


def build_parser():
    p = cass.Parser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                epilog="Flags not listed here are cass.py pretrain's, with its defaults.")
    for key, (cmds, default, text, options) in cass.FLAGS.items():
        if "p" in cmds and key not in CASS_ONLY:
            cass.add_flag(p, key, "pretrain")
    for key, (default, text, options) in DINO_FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), default=None, help=f"{text} (default: {default})", **options)
    return p


def main(argv=None):
    args = build_parser().parse_args([str(a) for a in argv] if argv is not None else None)
    return cass.run_command(lambda: pretrain(resolve(cass.given_flags(args))))


if __name__ == "__main__":
    sys.exit(main())
