# The loader of commit 422d836 (torchvision augmentation in 2 workers), as tools/bench.py times it now:
#   git worktree add /tmp/old 422d836 && python results/cpu-side/oldpipe.py cached|decoding BRAIN_MRI_224
import sys, time, torch
sys.path.insert(0, '/tmp/old')
import cass
cfg = cass.resolve("pretrain", dict(data="brain_mri", root=sys.argv[2], splits="auto", img_size=384,
                                    batch_size=16, workers=2, cache_images=sys.argv[1] == "cached",
                                    cache_dir="/tmp/cc_old"))
table = cass.load_table(cfg["data"], cfg["root"])
keys = cass.load_splits(cfg, table)[0]["train"]
cache = cass.decode_all(table, keys, cfg)
ds = cass.ImageDataset(table, keys, 384, cass.cass_augment(), cache)
sampler = cass.EpochSampler(len(ds), 16, 0)
it = iter(torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2))
next(it); t0 = time.perf_counter(); n = 0
for _ in range(99):
    n += len(next(it)[0])
print(f"at 422d836 ({sys.argv[1]}), augmenting in 2 workers: {n / (time.perf_counter() - t0):.0f} img/s")
