"""Time the CASS pretraining step: this file's step (cass.pretrain_epoch: autocast, channels-last CNN, one fused
Adam) against the plain step of the authors' notebook (fp32, default memory format, an unfused Adam per
encoder), on synthetic batches after warm-up. Also FLOPs per step, peak memory, the fraction of a measured
matrix-product peak, the largest batch that fits a GPU (--max-batch) and, given data, the data pipeline alone.

    python tools/bench.py --preset tiny
    python tools/bench.py --device cuda --max-batch          # the paper's encoders at 384 px
    python tools/bench.py --preset tiny --dino --data isic2019 --root DIR    # the paper's Table 2
    python tools/bench.py --decode slice.dcm slice.jpg --img-size 384       # decoding one file, DICOM or picture
    python tools/bench.py --checkpoint --device cpu                         # last.pt at the paper's encoders
    python tools/bench.py --pipeline --data brain_mri --root DIR --img-size 384 --batch-size 16 --cache-images

--dino (the paper's Table 2) also times one DINO step of each arm (tools/dino.py: vit_pytorch.Dino, same
encoders, batch, precision and device) and gives the ratio CASS / (DINO CNN + DINO ViT): DINO trains one
architecture per run, so a CNN and a ViT cost two runs where CASS costs one (the paper: 0.27 to 0.31). It then
runs one epoch of each for real on the data (`cass.py pretrain` and `tools/dino.py`, in a temporary folder),
data loading included, and gives the same ratio of epoch wall times.

The last line of the output is the same numbers as JSON.
"""
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cass  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dino  # noqa: E402  (imports vit_pytorch only with --dino)

BENCH_FLAGS = ("data", "root", "splits", "preset", "cnn", "vit", "patch_size", "img_size", "out_dim", "batch_size",
               "lr", "workers", "device", "precision", "compile", "cache_images", "cache_dir", "objective",
               "window")


def build_parser():
    p = cass.Parser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    for key in BENCH_FLAGS:
        cass.add_flag(p, key, "pretrain", "as for cass.py pretrain: ")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported) (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to fit larger batches")
    p.add_argument("--max-batch", action="store_true", help="CUDA: also find the largest batch that fits")
    p.add_argument("--decode", nargs="+", metavar="FILE", help="only time decoding each file and resizing it to "
                   "--img-size, as every reader of cass.py does (DICOM with --window, else the file's own)")
    p.add_argument("--pipeline", action="store_true", help="with --data: only the CPU side, no step: the cache's build "
                   "rate, the loader's rate and the device augmentation's cost (any settings, the paper's on a CPU)")
    p.add_argument("--checkpoint", action="store_true", help="only time writing last.pt as pretraining writes it "
                   "(both encoders, Adam's moments, SWA's averages once they exist): bytes and seconds")
    p.add_argument("--dino", action="store_true", help="also time DINO on each arm, steps and whole epochs (Table 2)")
    default, text, options = dino.DINO_FLAGS["prototypes"]
    p.add_argument("--prototypes", default=default, help=f"with --dino: {text} (default: {default})", **options)
    return p


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(step, warmup, steps, device):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_step(cfg, rt, plain, count_flops=True):
    """Median seconds of one step on a synthetic batch, its FLOPs and the peak memory (MB). plain: the notebook's
    step; otherwise one step of cass.pretrain_epoch, the step pretraining runs."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cnn, vit = cass.build_pair({**cfg, "pretrained": False, "cnn_weights": None, "vit_weights": None})
    if cfg["grad_checkpointing"]:
        cnn.set_grad_checkpointing(True)
        vit.set_grad_checkpointing(True)
    x = torch.randint(0, 256, (cfg["batch_size"], 3, cfg["img_size"], cfg["img_size"]), dtype=torch.uint8)
    if plain:
        cnn, vit, x = cnn.to(rt.device), vit.to(rt.device), x.to(rt.device)
        optimizers = [torch.optim.Adam(m.parameters(), lr=cfg["lr"], foreach=False) for m in (cnn, vit)]

        def step():
            for o in optimizers:
                o.zero_grad()
            cass.cass_loss(cnn(cass.normalize(x)), vit(cass.normalize(x))).backward()
            for o in optimizers:
                o.step()
    else:
        cnn, vit = cass.to_device(cnn, rt, cfg["cnn"]), cass.to_device(vit, rt, cfg["vit"])
        optimizer = cass.make_adam([*cnn.parameters(), *vit.parameters()], cfg["lr"])
        scheduler, scaler = cass.cosine_schedule(optimizer, cfg), rt.scaler()
        if cfg["compile"]:
            cnn, vit = torch.compile(cnn), torch.compile(vit)
        batch = [(x, None)]

        def step():
            cass.pretrain_epoch(cnn, vit, batch, optimizer, scaler, scheduler, rt, cfg, 0)

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 and not plain  # plain: PyTorch's default, fp32 matmuls
    try:
        seconds = median_seconds(step, cfg["warmup"], cfg["steps"], rt.device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    if rt.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource  # Unix only

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if not count_flops:
        return seconds, None, peak
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return seconds, counter.get_total_flops(), peak


def dino_step_seconds(cfg, rt, arm):
    """Median seconds of one DINO step on one arm (tools/dino.dino_epoch on one synthetic batch)."""
    torch.manual_seed(0)
    learner = dino.build_learner({**cfg, "pretrained": False, "cnn_weights": None, "vit_weights": None,
                                  "recipe": "vit-pytorch"}, arm, rt)  # cfg["prototypes"]: K
    optimizer = cass.make_adam(learner.student_encoder.parameters(), cfg["lr"])
    scheduler, scaler = cass.cosine_schedule(optimizer, cfg), rt.scaler()
    batch = [(torch.randint(0, 256, (cfg["batch_size"], 3, cfg["img_size"], cfg["img_size"]), dtype=torch.uint8),
              None)]
    return median_seconds(lambda: dino.dino_epoch(learner, batch, optimizer, scaler, scheduler, rt, cfg, arm),
                          cfg["warmup"], cfg["steps"], rt.device)


def epoch_seconds(cfg):
    """Wall seconds of one real epoch (data loading included, the monitor not) of CASS and of DINO on each arm,
    from the log.jsonl of `cass.py pretrain` and `tools/dino.py` runs in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        common = {**cfg, "epochs": 1, "resume": False, "keep_last": False}
        cass.pretrain({**common, "out": f"{tmp}/cass"})
        dino.pretrain({**{k: v for k, v in common.items() if k not in dino.CASS_ONLY}, "out": f"{tmp}/dino",
                       "arms": ["cnn", "vit"], "recipe": "vit-pytorch", "encoder": "student"})
        logs = [json.loads(line) for run in ("cass", "dino") for line in open(f"{tmp}/{run}/log.jsonl")]
    seconds = {r.get("arm", "cass"): r["seconds"] for r in logs if r["epoch"] == 1 and "seconds" in r}
    return seconds["cass"], seconds["cnn"], seconds["vit"]


def matmul_peak(rt):
    """FLOP/s of a large square matrix product in the step's precision: the yardstick for the step."""
    n = 8192 if rt.device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=rt.device).to(rt.amp_dtype or torch.float32) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, 2, 5, rt.device)


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


def data_images_per_s(cfg, rt):
    """Images/s the loader delivers (decode or --cache-images, each image's augmentation drawn, collation, with the
    workers), and the median seconds of cass.augment on one of its batches on the device: (rate, seconds)."""
    table = cass.load_table(cfg["data"], cfg["root"], cfg.get("window"))
    splits, _ = cass.load_splits(cfg, table)
    keys = splits["train"]
    cache = cass.decode_all(table, keys, cfg)
    dataset = cass.ImageDataset(table, keys, cfg["img_size"], True, cache)
    sampler = cass.EpochSampler(len(dataset), cfg["batch_size"], 0)
    it = iter(cass.make_loader(dataset, sampler, cfg["batch_size"], cfg["workers"], rt))  # pretraining's loader
    x, _, a = next(it)  # worker start-up is not the steady state
    t0, n = time.perf_counter(), 0
    for _ in range(min(sampler.steps(), max(cfg["steps"] * 4, 10)) - 1):
        n += len(next(it)[0])
    rate = n / (time.perf_counter() - t0)
    x = x.to(rt.device)
    return rate, median_seconds(lambda: cass.augment(x, a), 1, cfg["steps"], rt.device)


def pipeline(cfg, rt):
    """The CPU side alone: images/s of building the --cache-images file (decoding every training image, where it
    does not exist yet), then of the loader with the workers, and the device augmentation's seconds per batch."""
    table = cass.load_table(cfg["data"], cfg["root"], cfg.get("window"))
    keys = cass.load_splits(cfg, table)[0]["train"]
    r = {}
    if cfg["cache_images"]:
        t0 = time.perf_counter()
        cass.decode_all(table, keys, cfg)
        r["cache_images_per_s"] = len(keys) / (time.perf_counter() - t0)  # read back at once where it existed
    r["data_images_per_s"], r["augment_seconds_per_batch"] = data_images_per_s(cfg, rt)
    print(f"{len(keys)} training images at {cfg['img_size']} px, batch {cfg['batch_size']}, {cfg['workers']} workers:"
          + (f" cache built (or read) at {r['cache_images_per_s']:.0f} img/s;" if "cache_images_per_s" in r else "")
          + f" the loader delivers {r['data_images_per_s']:.0f} img/s{' from the cache' if cfg['cache_images'] else ''}"
          f"; augmenting a batch on the {rt.device.type}: {r['augment_seconds_per_batch'] * 1e3:.1f} ms")
    return r


def decode_seconds(files, size, window, repeats=30):
    """The median seconds to read each file and resize it as cass.py does (read_image, then image_tensor)."""
    seconds = {}
    for file in files:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            cass.image_tensor(cass.read_image(file, window, size), size)
            times.append(time.perf_counter() - t0)
        seconds[str(file)] = float(np.median(times))
        print(f"{file}: {seconds[str(file)] * 1e3:.2f} ms to decode and resize to {size} px (median of {repeats})")
    return seconds


def epoch_split(cfg, rt):
    """A few steps of cass.pretrain_epoch through the real loader (its workers, the augmentation, --cache-images) on
    the training images: (seconds, of them the seconds the step waited for the next batch, as pretraining measures
    them, steps). A first pass over the same images starts the workers and is not counted."""
    table = cass.load_table(cfg["data"], cfg["root"], cfg.get("window"))
    keys = cass.load_splits(cfg, table)[0]["train"]
    steps = min(len(keys) // cfg["batch_size"], max(cfg["steps"] * 2, 5))
    if steps < 1:
        raise cass.UserError(f"the training split has {len(keys)} images, fewer than one batch of {cfg['batch_size']}; "
                             "lower --batch-size")
    keys = keys[:steps * cfg["batch_size"]]
    dataset = cass.ImageDataset(table, keys, cfg["img_size"], True, cass.decode_all(table, keys, cfg))
    sampler = cass.EpochSampler(len(dataset), cfg["batch_size"], 0)
    loader = cass.make_loader(dataset, sampler, cfg["batch_size"], cfg["workers"], rt)
    torch.manual_seed(0)
    pair = cass.build_pair({**cfg, "pretrained": False, "cnn_weights": None, "vit_weights": None})
    cnn, vit = (cass.to_device(m, rt, cfg[arm]) for m, arm in zip(pair, ("cnn", "vit")))
    optimizer = cass.make_adam([*cnn.parameters(), *vit.parameters()], cfg["lr"])
    scheduler, scaler = cass.cosine_schedule(optimizer, cfg), rt.scaler()
    for epoch in (0, 1):  # the first pass starts the workers
        sampler.set_epoch(epoch)
        synchronize(rt.device)
        t0 = time.perf_counter()
        r = cass.pretrain_epoch(cnn, vit, loader, optimizer, scaler, scheduler, rt, {**cfg, "epochs": 2}, epoch)
        synchronize(rt.device)
    return time.perf_counter() - t0, r["data_seconds"], steps


def checkpoint_cost(cfg, rt):
    """Bytes and seconds of cass.save_run's last.pt for these encoders, before --swa-start and after it."""
    torch.manual_seed(0)
    pair = cass.build_pair({**cfg, "pretrained": False, "cnn_weights": None, "vit_weights": None})
    cnn, vit = (cass.to_device(m, rt, cfg[arm]) for m, arm in zip(pair, ("cnn", "vit")))
    optimizer = cass.make_adam([*cnn.parameters(), *vit.parameters()], cfg["lr"])
    scheduler = cass.cosine_schedule(optimizer, cfg)
    x = torch.randint(0, 256, (2, 3, cfg["img_size"], cfg["img_size"]), dtype=torch.uint8)
    cass.pretrain_epoch(cnn, vit, [(x, None)], optimizer, rt.scaler(), scheduler, rt, {**cfg, "epochs": 1}, 0)
    swa = {f"swa_{arm}": torch.optim.swa_utils.AveragedModel(m) for arm, m in (("cnn", cnn), ("vit", vit))}
    state = dict(cnn=cnn, vit=vit, optimizer=optimizer, scheduler=scheduler, scaler=rt.scaler(), **swa)
    r = {}
    with tempfile.TemporaryDirectory() as folder:
        run = cass.Run(Path(folder))
        for when in ("before_swa", "after_swa"):
            if when == "after_swa":
                swa["swa_cnn"].update_parameters(cnn)
                swa["swa_vit"].update_parameters(vit)
            r[f"checkpoint_seconds_{when}"] = cass.save_run(run, state, 1, cfg)  # training's wait: a copy
            written = cass.wait_written(run)  # the write beside training
            r[f"checkpoint_bytes_{when}"] = written["last_pt_bytes"]
            r[f"write_seconds_{when}"] = written["last_pt_seconds"]
            print(f"last.pt {when.replace('_', ' ')}: {r[f'checkpoint_bytes_{when}'] / 1e9:.2f} GB; training waits "
                  f"{r[f'checkpoint_seconds_{when}']:.1f} s for its copy on the CPU, a thread writes it in "
                  f"{r[f'write_seconds_{when}']:.1f} s (whole, fsync'd, renamed) while the next epoch trains")
    return r


def bench(cfg):
    if cfg["checkpoint"]:
        rt = cass.make_runtime(cfg["device"], cfg["precision"])
        print(f"checkpoint: {cfg['cnn']} + {cfg['vit']}, {cfg['img_size']} px, on {rt.device.type}")
        r = checkpoint_cost(cfg, rt)
        print(json.dumps(r))
        return r
    if cfg["pipeline"]:
        if not (cfg["root"] or cfg["data"] == "digits"):
            raise cass.UserError("--pipeline times a dataset's loader: give --data and --root")
        rt = cass.make_runtime(cfg["device"], cfg["precision"])
        r = dict(data=cfg["data"], img_size=cfg["img_size"], batch_size=cfg["batch_size"], workers=cfg["workers"])
        r.update(pipeline(cfg, rt))
        print(json.dumps(r))
        return r
    if cfg["decode"]:
        r = dict(img_size=cfg["img_size"], decode_seconds=decode_seconds(cfg["decode"], cfg["img_size"],
                                                                       cfg.get("window")))
        print(json.dumps(r))
        return r
    low = next((k for k, least in (("steps", 1), ("warmup", 0)) if not cfg[k] >= least), None)  # as cass.py's flags
    if low:
        raise cass.UserError(f"--{low} {cfg[low]} cannot work: give {1 if low == 'steps' else 0} or more")
    rt = cass.make_runtime(cfg["device"], cfg["precision"])
    if cfg["max_batch"] and rt.device.type != "cuda":
        raise cass.UserError("--max-batch searches GPU memory and needs --device cuda; on a CPU it would exhaust RAM")
    if cfg["dino"] and (cfg["compile"] or cfg["grad_checkpointing"]):  # tools/dino.py takes neither: unlike steps
        raise cass.UserError("--dino compares CASS with DINO as tools/dino.py runs it, without --compile or "
                             "--grad-checkpointing; drop them for the Table 2 ratio")
    cuda = rt.device.type == "cuda"
    device = torch.cuda.get_device_name(rt.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    B = cfg["batch_size"]
    print(f"bench: {cfg['cnn']} + {cfg['vit']}, {cfg['img_size']} px, batch {B}, {device}, torch {torch.__version__}")
    plain_s, flops, _ = bench_step(cfg, rt, plain=True)
    fast_s, _, peak = bench_step(cfg, rt, plain=False)
    precision = str(rt.amp_dtype or "fp32").replace("torch.", "")
    r = dict(device=device, cnn=cfg["cnn"], vit=cfg["vit"], img_size=cfg["img_size"], batch_size=B,
             precision=precision, compile=bool(cfg["compile"]), seconds_per_step=fast_s, images_per_s=B / fast_s,
             plain_seconds_per_step=plain_s, plain_images_per_s=B / plain_s, speedup=plain_s / fast_s,
             flops_per_step=flops, achieved_flops=flops / fast_s, plain_achieved_flops=flops / plain_s,
             peak_memory_mb=peak)
    print(f"{'':48} {'s/step':>8} {'img/s':>8} {'GFLOP/s':>8}")
    for name, s in (("plain step (fp32, unfused Adam per encoder)", plain_s),
                    (f"this step ({precision}, channels-last CNN, fused Adam{', compiled' if cfg['compile'] else ''})",
                     fast_s)):
        print(f"{name:48} {s:8.3f} {B / s:8.1f} {flops / s / 1e9:8.1f}")
    print(f"speed-up {r['speedup']:.2f}x; {flops / 1e9:.1f} GFLOP per step; peak memory {peak:.0f} MB")
    r["matmul_peak_flops"] = matmul_peak(rt)
    r["fraction_of_matmul_peak"] = r["achieved_flops"] / r["matmul_peak_flops"]
    print(f"a {precision} matrix product runs at {r['matmul_peak_flops'] / 1e12:.2f} TFLOP/s here; this step reaches "
          f"{r['fraction_of_matmul_peak']:.0%} of it")
    if cfg["max_batch"]:
        r["max_batch_size"] = largest_batch(cfg, rt)
        print(f"largest batch that fits: {r['max_batch_size']} "
              f"({torch.cuda.get_device_properties(rt.device).total_memory / 2**30:.0f} GiB GPU)")
    if cfg["dino"]:
        cnn_s, vit_s = dino_step_seconds(cfg, rt, "cnn"), dino_step_seconds(cfg, rt, "vit")
        r.update(dino_cnn_seconds_per_step=cnn_s, dino_vit_seconds_per_step=vit_s,
                 cass_over_dino_step=fast_s / (cnn_s + vit_s))
        print(f"DINO step (vit_pytorch.Dino, same encoders, batch and precision): CNN {cnn_s:.3f} s, ViT {vit_s:.3f} s;"
              f" CASS / (DINO CNN + DINO ViT) = {fast_s:.3f} / {cnn_s + vit_s:.3f} = {r['cass_over_dino_step']:.2f} "
              "(the paper's Table 2: 0.273 to 0.288)")
        cass_e, cnn_e, vit_e = epoch_seconds(cfg)
        r.update(cass_epoch_seconds=cass_e, dino_cnn_epoch_seconds=cnn_e, dino_vit_epoch_seconds=vit_e,
                 cass_over_dino_epoch=cass_e / (cnn_e + vit_e))
        print(f"one epoch of {cfg['data']} with data loading: CASS {cass_e:.1f} s, DINO CNN {cnn_e:.1f} s + ViT "
              f"{vit_e:.1f} s; ratio {r['cass_over_dino_epoch']:.2f}")
    if cfg["root"] or cfg["data"] == "digits":
        r["data_images_per_s"], r["augment_seconds_per_batch"] = data_images_per_s(cfg, rt)
        seconds, waited, steps = epoch_split(cfg, rt)
        r.update(loader_steps=steps, loader_seconds=seconds, loader_wait_seconds=waited,
                 bottleneck="data" if waited > 0.1 * seconds else "step")
        print(f"data pipeline ({cfg['workers']} workers{', cached' if cfg['cache_images'] else ''}): "
              f"{r['data_images_per_s']:.1f} img/s alone; augmenting a batch on the {rt.device.type} "
              f"{r['augment_seconds_per_batch'] * 1e3:.1f} ms; {steps} steps of pretraining through it: "
              f"{seconds:.2f} s, "
              f"{waited:.2f} s ({waited / seconds:.0%}) waiting for data: the bottleneck is the {r['bottleneck']}")
    print(json.dumps(r))
    return r


def main(argv=None):
    args = vars(build_parser().parse_args([str(a) for a in argv] if argv is not None else None))
    extra = {k: args.pop(k) for k in ("steps", "warmup", "grad_checkpointing", "max_batch", "dino", "prototypes",
                                      "decode", "checkpoint", "pipeline")}
    given = {k: v for k, v in args.items() if v is not None}  # False: a given --no-...
    return cass.run_command(lambda: bench({**cass.resolve("pretrain", given), **extra}), "interrupted")


if __name__ == "__main__":
    sys.exit(main())
