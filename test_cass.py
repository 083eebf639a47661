"""Tests of cass.py: each name states a property of the method or of the program.

Fixtures are tiny images written into tmp_path; runs use small encoders at 32 px on the CPU.
Tests on the real images in ../shared/data skip when that folder is absent. The tools have
their own tests (test_tools.py).
"""
import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cass

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared" / "data"
TINY = ["--preset", "tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "8", "--workers", "0",
        "--device", "cpu"]
PRETRAIN = ["pretrain", *TINY, "--out-dim", "16"]
FINETUNE = ["finetune", *TINY, "--epochs", "2"]


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


def class_image(c, i, size=24, mode="RGB"):
    """An image whose colour and stripes depend on the class, with a little noise."""
    rng = np.random.default_rng(100 * c + i)
    arr = np.zeros((size, size, 3), np.float64)
    arr[..., c % 3] = 180
    arr[:, :: (c + 2)] += 60
    arr += rng.normal(0, 15, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.convert(mode)


def write_folder(root, classes=("a", "b", "c"), n=8, ext="png"):
    root = Path(root)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            class_image(c, i).save(root / name / f"{name}_{i}.{ext}")
    return root


def write_brain_mri(root, n_train=8, n_test=3):
    for split, n in (("Training", n_train), ("Testing", n_test)):
        write_folder(Path(root) / split, ("glioma", "meningioma", "notumor", "pituitary"), n, "jpg")
    return Path(root)


def write_isic(root, n=4):
    root = Path(root)
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    (root / "ISIC_2019_Training_Input").mkdir(parents=True)
    rows = [["image", *classes, "UNK"]]
    for c in range(len(classes)):
        for i in range(n):
            name = f"ISIC_{c:03d}{i:04d}"
            class_image(c, i).save(root / "ISIC_2019_Training_Input" / f"{name}.jpg")
            rows.append([name] + ["1" if j == c else "0" for j in range(len(classes))] + ["0"])
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", rows)
    return root


def write_autoimmune(root, n=20):
    root = Path(root)
    root.mkdir(parents=True)
    labels = ["TFH-1", "TFH-217", "TFH-Like", "B cells", "others"]
    rows = [["image", *labels]]
    for i in range(n):
        y = [(i + j) % 3 == 0 for j in range(len(labels))]  # several labels per image
        class_image(i % 3, i).save(root / f"tile_{i}.tif")
        rows.append([f"tile_{i}.tif"] + [str(int(v)) for v in y])
    write_csv(root / "labels.csv", rows)
    return root


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def run(args, timeout=1800, env=None):
    """cass.py as a user runs it: a subprocess, its exit status and its output."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, str(HERE / "cass.py"), *args], capture_output=True, text=True,
                       timeout=timeout, env=full_env, cwd=HERE)
    return p.returncode, p.stdout + p.stderr


def cli(args, capsys):
    """cass.main in this process (no interpreter start-up): exit status and what it printed."""
    capsys.readouterr()
    try:
        code = cass.main([str(a) for a in args])
    except SystemExit as e:  # a flag argparse refuses
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def small_pair(out_dim=16, cnn="resnet18"):
    torch.manual_seed(0)
    cfg = dict(cnn=cnn, vit="vit_tiny_patch16_224", img_size=32, patch_size=8, out_dim=out_dim,
               pretrained=False, cnn_weights=None, vit_weights=None)
    return cass.build_pair(cfg)


CPU = cass.Runtime(torch.device("cpu"))
STEP_CFG = dict(objective="cass", vc_weight=1.0, sched_unit="epoch", epochs=1, t_max=16, eta_min=1e-6)


def pretrain_steps(cnn, vit, batches, lr=1e-3, **cfg):
    """cass.pretrain_epoch over the given uint8 batches; returns its record and the optimiser and schedule."""
    cfg = {**STEP_CFG, **cfg}
    optimizer = cass.make_adam([*cnn.parameters(), *vit.parameters()], lr)
    scheduler = cass.cosine_schedule(optimizer, cfg)
    loader = [(x, None) for x in batches]
    record = cass.pretrain_epoch(cnn, vit, loader, optimizer, CPU.scaler(), scheduler, CPU, cfg, 0)
    return record, optimizer, scheduler


def read_log(path):
    return [json.loads(line) for line in open(path)]


# ------------------------------------------------------------------------------------------
# the CASS loss (eq. 1) and the opt-in terms
# ------------------------------------------------------------------------------------------


def test_loss_is_symmetric():
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.allclose(cass.cass_loss(a, b), cass.cass_loss(b, a))


def test_loss_is_zero_for_identical_and_four_for_opposite_outputs():
    a = torch.randn(6, 10)
    assert cass.cass_loss(a, a).item() == pytest.approx(0, abs=1e-6)
    assert cass.cass_loss(a, 3 * a).item() == pytest.approx(0, abs=1e-6)  # scale does not matter
    assert cass.cass_loss(a, -a).item() == pytest.approx(4, abs=1e-6)


def test_loss_is_mean_of_two_minus_two_cosine():
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    expected = (2 - 2 * F.cosine_similarity(a, b, dim=1)).mean()
    assert cass.cass_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_sends_gradients_into_both_encoders():
    cnn, vit = small_pair()
    x = cass.normalize(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    cass.cass_loss(cnn(x), vit(x)).backward()
    for model in (cnn, vit):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_the_default_objective_is_eq_1_and_the_opt_in_one_penalises_constant_and_correlated_outputs():
    torch.manual_seed(0)
    r, t = torch.randn(64, 32), torch.randn(64, 32)
    assert cass.objective(dict(objective="cass"), r, t) == cass.cass_loss(r, t)
    healthy_var, healthy_cov = cass.variance_covariance(torch.randn(4096, 32))
    assert healthy_var < 0.05 and healthy_cov < 0.1  # spread over the sphere: nothing to penalise
    constant_var, _ = cass.variance_covariance(torch.ones(64, 32) + 1e-4 * torch.randn(64, 32))
    assert constant_var > 0.9  # complete collapse
    one_signal = torch.randn(64, 1) * torch.randn(1, 32) + 0.01 * torch.randn(64, 32)  # one direction
    assert cass.variance_covariance(one_signal)[1] > 10 * healthy_cov  # dimensional collapse
    assert cass.objective(dict(objective="cass-vc", vc_weight=1.0), r, t) > cass.cass_loss(r, t)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_both_encoders_emit_outputs_of_the_same_shape(preset):
    p = {**cass.PAPER, **(cass.TINY if preset == "tiny" else {}), "pretrained": False, "cnn_weights": None,
         "vit_weights": None}
    cnn, vit = cass.build_pair(p)
    x = torch.zeros(1, 3, p["img_size"], p["img_size"])
    with torch.no_grad():
        assert cnn.eval()(x).shape == vit.eval()(x).shape == (1, p["out_dim"])


def test_one_batch_overfits():
    """The optimiser plumbing of the pretraining step: the loss of one repeated batch falls (here, as from any
    random initialisation, by collapse: this test shows that the step trains, not that CASS learns)."""
    cnn, vit = small_pair()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    record, _, _ = pretrain_steps(cnn, vit, [x] * 30)
    assert record["loss_first_step"] > 0.5 and record["loss_last_step"] < 0.05 and record["steps"] == 30


def test_gradients_are_zeroed_every_step():
    """Two steps on one batch leave the gradients of one step (the notebooks accumulate them): lr 0 keeps the
    weights, so a step that forgot zero_grad would leave twice the gradient."""
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grads = []
    for steps in (1, 2):
        cnn, vit = small_pair(cnn="convnext_atto")  # LayerNorm: the gradient does not depend on BatchNorm state
        pretrain_steps(cnn, vit, [x] * steps, lr=0.0)
        grads.append([p.grad.clone() for p in (*cnn.parameters(), *vit.parameters())])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(*grads))


def test_schedule_is_the_papers_cosine_moving_per_epoch_or_per_step():
    cnn, vit = small_pair()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    _, opt, sched = pretrain_steps(cnn, vit, [x] * 3)
    assert sched.last_epoch == 1  # once per epoch by default
    assert (sched.T_max, sched.eta_min) == (16, 1e-6)  # paper B.1.3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi / 16)) / 2)
    _, opt, sched = pretrain_steps(*small_pair(), [x] * 3, sched_unit="step")
    assert sched.last_epoch == 3  # the notebooks: every step
    lrs = []
    for _ in range(32):  # after T_max the rate rises again: back at 1e-3 after 32 steps
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert min(lrs) == pytest.approx(1e-6) and lrs[-4] == pytest.approx(1e-3, rel=1e-3)


def test_collapse_monitor_reports_spread_and_near_zero_when_outputs_are_constant():
    torch.manual_seed(0)
    assert float(cass.output_spread(torch.randn(4096, 64))) == pytest.approx(1 / 8, rel=0.05)  # 1/sqrt(64)
    assert float(cass.output_spread(torch.ones(100, 64) + 1e-4 * torch.randn(100, 64))) < 1e-3


def test_spectrum_tells_dimensional_collapse_from_a_spread_representation():
    torch.manual_seed(0)
    pc1, rank = cass.spectrum(torch.randn(500, 64))
    assert pc1 < 0.1 and rank > 40
    pc1, rank = cass.spectrum(torch.randn(500, 1) * torch.randn(1, 64) + 0.01 * torch.randn(500, 64) + 3)
    assert pc1 > 0.9 and rank < 2


def test_collapse_is_judged_on_the_validation_monitor_too():
    r = dict(std_cnn=0.05, std_vit=0.05, cos_cnn_vit=0.3, val_std_cnn=0.05, val_std_vit=0.0017, val_cos=0.4)
    assert "the vit outputs spread below" in cass.collapse_warning(r, 256)
    assert "cosine above 0.99" in cass.collapse_warning({**r, "val_std_vit": 0.05, "val_cos": 0.995}, 256)
    assert cass.collapse_warning({**r, "val_std_vit": 0.05}, 256) == ""
    assert "the cnn outputs" in cass.collapse_warning(dict(std_cnn=0.001), 256)  # one arm (tools/dino.py)


def test_an_interrupted_run_points_to_resume_only_when_last_pt_holds_finished_epochs(tmp_path):
    def interrupt(resume):  # Ctrl-C inside the held run folder
        cfg, table = dict(root=None, resume=resume), cass.Table("t", ["a", "b"], False, {}, [])
        with pytest.raises(KeyboardInterrupt) as e, cass.claim_run_folder(tmp_path / "r", cfg, CPU, {}, table):
            raise KeyboardInterrupt
        return str(e.value)
    assert "--resume" not in interrupt(False) and "no epoch had finished" in interrupt(False)
    (tmp_path / "r" / "last.pt").write_bytes(b"")
    assert "continue with the same command plus --resume" in interrupt(True)


def test_collapse_is_said_on_the_epoch_line():
    r = dict(epoch=1, loss=0.0006, lr=1e-3, std_cnn=0.001, std_vit=0.05, std_healthy=0.0625, cos_cnn_vit=0.999,
             images_per_s=10.0, seconds=10.0, data_seconds=0.5)
    line = cass.format_epoch(r, dict(epochs=3, out_dim=256))
    assert "COLLAPSE" in line and "cnn outputs spread" in line and "cosine above 0.99" in line and "README" in line
    assert "COLLAPSE" not in cass.format_epoch({**r, "std_cnn": 0.05, "cos_cnn_vit": 0.3}, dict(epochs=3, out_dim=256))


def test_normalize_copies_no_tensor_from_the_host_and_keeps_the_float32_values(monkeypatch):
    x = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8)
    mean = torch.tensor(cass.IMAGENET_MEAN).view(1, 3, 1, 1) * 255  # the constants as a tensor, as before
    expected = (x.float() - mean) / (torch.tensor(cass.IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def host_copy(*args, **kwargs):  # on CUDA, a blocking copy from pageable memory in every step
        raise AssertionError("normalize built a tensor from host memory")

    monkeypatch.setattr(torch, "tensor", host_copy)
    monkeypatch.setattr(torch, "as_tensor", host_copy)
    assert torch.equal(cass.normalize(x), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronisations: needs a GPU")
def test_a_pretraining_step_synchronises_only_to_read_its_statistics():
    import warnings
    cnn, vit = (m.cuda() for m in small_pair())
    rt = cass.Runtime(torch.device("cuda"))
    optimizer = cass.make_adam([*cnn.parameters(), *vit.parameters()], 1e-3)
    params = torch.from_numpy(np.stack([cass.augment_params(i, 32) for i in range(8)]))  # augmented on the device
    batches = [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8).pin_memory(), None, params.pin_memory())] * 20
    cfg = {**STEP_CFG, "epochs": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            cass.pretrain_epoch(cnn, vit, batches, optimizer, rt.scaler(), cass.cosine_schedule(optimizer, cfg), rt, cfg,
                                0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 20 // cass.LOG_EVERY + 2, [str(w.message) for w in syncs]  # the reads of the statistics


def test_the_epoch_line_and_the_log_say_how_long_the_step_waited_for_the_cpu_side(tmp_path, monkeypatch, capsys):
    r = dict(epoch=1, loss=0.5, lr=1e-3, std_cnn=0.05, std_vit=0.05, std_healthy=0.0625, cos_cnn_vit=0.3,
             images_per_s=10.0, seconds=10.0, data_seconds=6.0)
    assert "data wait 60%: the CPU is behind (more --workers" in cass.format_epoch(r, dict(epochs=3, out_dim=256))
    assert "CPU is behind" not in cass.format_epoch({**r, "data_seconds": 0.5}, dict(epochs=3, out_dim=256))
    root = write_folder(tmp_path / "data", n=8)
    real = cass.decode_image
    monkeypatch.setattr(cass, "decode_image", lambda *a: time.sleep(0.05) or real(*a))  # a slow disk, a slow decoder
    code, out = cli([*PRETRAIN, "--data", "folder", "--root", root, "--splits", "auto", "--epochs", "1", "--out",
                     tmp_path / "r"], capsys)
    assert code == 0 and "the CPU is behind" in out, out
    line = [x for x in read_log(tmp_path / "r" / "log.jsonl") if x.get("epoch") == 1 and "loss" in x][0]
    assert 0.05 * 8 * 2 <= line["data_seconds"] <= line["seconds"] and line["monitor_seconds"] > 0
    code, out = cli([*PRETRAIN, "--data", "folder", "--root", root, "--splits", "auto", "--epochs", "2", "--out",
                     tmp_path / "r2"], capsys)
    second = [x for x in read_log(tmp_path / "r2" / "log.jsonl") if x.get("epoch") == 2 and "loss" in x][0]
    assert second["last_pt_bytes"] > 1e6 and second["last_pt_seconds"] > 0 and second["checkpoint_seconds"] > 0
    assert "training waited" in out and "BatchNorm recomputed in" in out, out


def test_last_pt_is_written_beside_training_from_a_copy_taken_when_it_was_saved(tmp_path, monkeypatch):
    model, out, go, real = torch.nn.Linear(3, 2), tmp_path / "run", __import__("threading").Event(), torch.save
    out.mkdir()
    monkeypatch.setattr(cass.torch, "save", lambda obj, f: go.wait(30) and real(obj, f))  # a slow disk
    before = model.weight.detach().clone()
    run = cass.Run(out)
    assert cass.save_run(run, dict(model=model), 1, {}) < 5  # training goes on before the write ends
    with torch.no_grad():
        model.weight += 1  # the next epoch changes the weights while last.pt is written
    assert not (out / "last.pt").exists()
    go.set()
    written = cass.wait_written(run)
    assert written["last_pt_bytes"] == (out / "last.pt").stat().st_size and cass.wait_written(run) == {}
    assert torch.equal(torch.load(out / "last.pt")["model"]["weight"], before)


def test_a_failed_background_write_stops_the_run_at_the_next_save_and_keeps_the_last_pt_before(tmp_path, monkeypatch):
    model, out, real = torch.nn.Linear(3, 2), tmp_path / "run", torch.save
    out.mkdir()
    run = cass.Run(out)
    cass.save_run(run, dict(model=model), 1, {})
    cass.wait_written(run)
    def full(obj, f):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(cass.torch, "save", full)
    cass.save_run(run, dict(model=model), 2, {})
    with pytest.raises(cass.UserError, match="cannot write .*last.pt"):
        cass.save_run(run, dict(model=model), 3, {})
    monkeypatch.setattr(cass.torch, "save", real)
    assert torch.load(out / "last.pt")["epoch"] == 1 and not list(out.glob(".*tmp*"))


def test_encoding_several_models_reads_each_batch_once_and_gives_what_each_alone_gives():
    cnn, vit = small_pair()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    reads = []
    loader = type("Loader", (), {"__iter__": lambda self: (reads.append(1) or b for b in [(x[:4], x[:4, 0, 0]),
                                                                                        (x[4:], x[4:, 0, 0])])})()
    both = cass.encode(dict(cnn=cnn, vit=vit), loader, CPU)
    assert len(reads) == 2 and cnn.training and vit.training  # one pass; training mode restored
    for arm, model in (("cnn", cnn), ("vit", vit)):
        alone = cass.encode({arm: model}, loader, CPU)[arm]
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(both[arm], alone))


def test_the_monitor_decodes_its_images_once_a_run_not_once_an_epoch(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", n=8)
    calls, real = [], cass.decode_image
    monkeypatch.setattr(cass, "decode_image", lambda table, key, size: calls.append(key) or real(table, key, size))
    assert cass.main([*PRETRAIN, "--data", "folder", "--root", root, "--splits", "auto", "--epochs", "3", "--out",
                      tmp_path / "r"]) == 0
    val = [r[0] for r in cass.read_csv(tmp_path / "r" / "splits" / "val.csv")[1]]  # read by the monitor alone
    assert val and all(calls.count(k) == 1 for k in val)  # 5 monitors (init, 3 epochs, saved), one decode
    train = [r[0] for r in cass.read_csv(tmp_path / "r" / "splits" / "train.csv")[1]]
    assert max(calls.count(k) for k in train) >= 3  # training images: decoded each epoch (no --cache-images)


def test_knn_accuracy_finds_separated_classes():
    torch.manual_seed(0)
    centres = torch.randn(3, 8) * 5
    y = torch.arange(60) % 3
    x = centres[y] + 0.1 * torch.randn(60, 8)
    assert cass.knn_accuracy(x[:45], y[:45], x[45:], y[45:], k=5) == 1.0


# ------------------------------------------------------------------------------------------
# SWA
# ------------------------------------------------------------------------------------------


def test_swa_weights_differ_from_last_weights_and_batchnorm_is_recomputed():
    cnn, vit = small_pair()
    optimizer = cass.make_adam([*cnn.parameters(), *vit.parameters()], 1e-3)
    scheduler = cass.cosine_schedule(optimizer, STEP_CFG)
    swa = torch.optim.swa_utils.AveragedModel(cnn)
    torch.manual_seed(1)
    batches = [torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8) for _ in range(3)]
    for x in batches:  # three "epochs", averaged after each
        cass.pretrain_epoch(cnn, vit, [(x, None)], optimizer, CPU.scaler(), scheduler, CPU, STEP_CFG, 0)
        swa.update_parameters(cnn)
    stale = swa.module.bn1.running_mean.clone()
    cass.recompute_batchnorm(swa, [(x, None) for x in batches], CPU)
    last = dict(cnn.named_parameters())
    assert any(not torch.allclose(p, last[n]) for n, p in swa.module.named_parameters())
    seen = []  # recomputed: bn1's running mean is the mean of its input under the averaged weights
    handle = swa.module.bn1.register_forward_hook(lambda m, i, o: seen.append(i[0].mean(dim=(0, 2, 3))))
    swa.module.eval()
    with torch.no_grad():
        for x in batches:
            swa.module(cass.normalize(x))
    handle.remove()
    assert torch.allclose(swa.module.bn1.running_mean, torch.stack(seen).mean(0), atol=1e-4)
    assert not torch.allclose(swa.module.bn1.running_mean, stale)


# ------------------------------------------------------------------------------------------
# data layouts, images, splits
# ------------------------------------------------------------------------------------------


def _labelled_multi_csv(tmp_path):
    write_folder(tmp_path / "imgs", ("x",), 12)
    rows = [["image", "p", "q", "r"]] + [[f"imgs/x/x_{i}.png", str(i % 2), str((i // 2) % 2), "1"] for i in range(12)]
    write_csv(tmp_path / "multi.csv", rows)
    return tmp_path / "multi.csv"


LAYOUTS = {
    "folder": lambda t: ("folder", write_folder(t / "f"), 3, False),
    "brain_mri": lambda t: ("brain_mri", write_brain_mri(t / "b"), 4, False),
    "isic2019": lambda t: ("isic2019", write_isic(t / "i"), 8, False),
    "autoimmune": lambda t: ("autoimmune", write_autoimmune(t / "a"), 5, True),
    "csv_multilabel": lambda t: ("csv", _labelled_multi_csv(t), 3, True),
    "digits": lambda t: ("digits", None, 10, False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_data_layout_loads_and_yields_three_channel_images(layout, tmp_path):
    data, root, n_classes, multilabel = LAYOUTS[layout](tmp_path)
    table = cass.load_table(data, root)
    assert len(table.classes) == n_classes and table.multilabel == multilabel
    splits = cass.make_splits(table, seed=0)
    assert splits["train"] and splits["val"] and splits["test"]
    ds = cass.ImageDataset(table, splits["train"][:3], 32, augment=True)
    x, y, a = ds[(0, 123)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y.shape == (n_classes,) and a.shape == (15,)


def test_csv_without_labels_is_usable_for_pretraining(tmp_path):
    write_folder(tmp_path / "imgs", ("x",), 10)
    write_csv(tmp_path / "u.csv", [["image"]] + [[f"imgs/x/x_{i}.png"] for i in range(10)])
    table = cass.load_table("csv", tmp_path / "u.csv")
    assert len(cass.make_splits(table)["train"]) == 10 and not table.labels
    code, out = run([*PRETRAIN, "--data", "csv", "--root", str(tmp_path / "u.csv"), "--epochs", "1",
                     "--out", str(tmp_path / "run")])
    assert code == 0, out
    assert (tmp_path / "run" / "cnn.pt").exists()


def test_auto_splits_leave_out_listed_images_that_are_not_on_disk_and_say_how_many(tmp_path, capsys):
    write_folder(tmp_path / "imgs", ("x", "y"), 10)
    rows = [[f"imgs/{c}/{c}_{i}.png", c] for c in "xy" for i in range(10)]
    rows += [[f"imgs/x/gone_{i}.png", "x"] for i in range(5)]
    write_csv(tmp_path / "x.csv", [["image", "label"]] + rows)
    code, out = cli([*PRETRAIN, "--data", "csv", "--root", tmp_path / "x.csv", "--epochs", "1", "--out",
                     tmp_path / "run"], capsys)
    assert code == 0, out
    assert "5 of the 25 images" in out and "the splits use the other 20" in out
    assert sum(len(cass.read_csv(tmp_path / "run" / "splits" / f"{s}.csv")[1]) for s in ("train", "val", "test")) == 20


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16"])
def test_grey_rgb_rgba_and_16_bit_images_become_rgb_uint8(mode, tmp_path):
    if mode == "I;16":
        img = Image.fromarray((np.arange(20 * 20).reshape(20, 20) * 150).astype(np.uint16))
    else:
        img = class_image(1, 0, 20, mode)
    for c in ("c", "d"):
        (tmp_path / "k" / c).mkdir(parents=True)
        img.save(tmp_path / "k" / c / "a.png")
    x = cass.decode_image(cass.load_table("folder", tmp_path / "k"), "c/a.png", 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    if mode == "I;16":
        assert x.max() > 200  # scaled from 16 bits, not clipped to a few grey levels


def test_splits_are_nested_stratified_and_identical_for_the_same_seed():
    table = cass.load_table("digits", None)
    a, b, c = cass.make_splits(table, 0), cass.make_splits(table, 0), cass.make_splits(table, 1)
    assert a == b and a != c
    assert set(a["train_1pct"]) <= set(a["train_10pct"]) <= set(a["train"])
    assert not (set(a["train"]) & set(a["val"])) and not (set(a["train"]) & set(a["test"]))
    assert not (set(a["val"]) & set(a["test"]))
    for name, frac in (("train_10pct", 0.1), ("train_1pct", 0.01), ("val", 0.1), ("test", 0.1)):
        strata = table.strata(a[name])
        base = table.strata(a["train"] if name.startswith("train_") else table.keys)
        for cls in range(10):
            assert strata.count(cls) >= 1  # every class keeps an example
            assert abs(strata.count(cls) - max(1, round(frac * base.count(cls)))) <= 1


def test_committed_splits_are_used_by_default_and_match_the_generator():
    table = cass.load_table("digits", None)
    splits, source = cass.load_splits(dict(splits=None), table)
    assert source == str(HERE / "data_splits" / "digits") and splits == cass.make_splits(table, 0)


def test_brain_mri_test_split_is_the_curators_testing_folder(tmp_path):
    splits = cass.make_splits(cass.load_table("brain_mri", write_brain_mri(tmp_path / "b")))
    assert all(k.startswith("Testing/") for k in splits["test"]) and len(splits["test"]) == 12
    assert all(k.startswith("Training/") for k in splits["train"] + splits["val"])


def test_a_vendored_copy_without_data_splits_computes_and_records_its_splits(tmp_path):
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "cass.py").write_text((HERE / "cass.py").read_text())
    p = subprocess.run([sys.executable, "cass.py", *PRETRAIN, "--epochs", "1", "--batch-size", "64", "--out", "run"],
                       capture_output=True, text=True, cwd=tmp_path / "vendor")  # no time limit: a busy machine is slow
    assert p.returncode == 0, p.stderr
    assert "splits auto" in p.stdout
    assert json.load(open(tmp_path / "vendor" / "run" / "args.json"))["splits"] == "auto"
    assert (tmp_path / "vendor" / "run" / "splits" / "train.csv").is_file()


# ------------------------------------------------------------------------------------------
# encoders and weight files
# ------------------------------------------------------------------------------------------


def test_local_weight_file_initialises_the_encoder(tmp_path):
    import timm

    torch.manual_seed(3)
    source = timm.create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = cass.create_encoder("resnet18", 16, {}, weights=tmp_path / "resnet18.pth")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 16  # the 1000-way head is dropped for a 16-wide one


def test_imagenet_weights_from_a_file_serve_the_imagenet_baseline_of_finetune(tmp_path):
    import timm

    torch.manual_seed(4)
    source = timm.create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet-resnet18.pth")
    root = write_folder(tmp_path / "d", n=8)
    assert cass.main([*FINETUNE, "--data", "folder", "--root", root, "--init", "imagenet", "--arm", "cnn", "--epochs",
                      "1", "--mode", "linear", "--cnn-weights", tmp_path / "imagenet-resnet18.pth", "--out",
                      tmp_path / "f"]) == 0
    assert torch.equal(_state(tmp_path / "f" / "best.pt")["conv1.weight"], source.conv1.weight)


def test_imagenet_weights_without_network_fail_with_one_sentence(tmp_path):
    # a closed local port stands in for the hub, so the test never depends on the network
    code, out = run([*PRETRAIN, "--pretrained", "--epochs", "1", "--out", str(tmp_path / "r")],
                    env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    assert code == 2  # how long that takes depends on the machine's load: a test checks behaviour, not speed
    assert "--preset tiny" in out and "--no-pretrained" in out and "--cnn-weights" in out and "Traceback" not in out
    assert not (tmp_path / "r").exists()  # no folder for a run that never started


def test_an_encoder_file_of_another_architecture_is_refused_and_a_matching_one_loads(tmp_path):
    import timm

    model = timm.create_model("resnet18", num_classes=16)
    torch.save(cass.encoder_record(model, "resnet18", {}, "cnn", {}), tmp_path / "cnn.pt")
    with pytest.raises(cass.UserError, match="holds a resnet18"):
        cass.create_encoder("resnet34", 16, {}, weights=tmp_path / "cnn.pt")
    same = cass.create_encoder("resnet18", 16, {}, weights=tmp_path / "cnn.pt")
    assert torch.equal(same.conv1.weight, model.conv1.weight)


# ------------------------------------------------------------------------------------------
# pretrain end to end, config
# ------------------------------------------------------------------------------------------


def test_pretrain_writes_every_output_and_encoders_rebuild_with_timm(tmp_path):
    import timm

    root = write_folder(tmp_path / "data", n=8)
    code, out = run([*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "2", "--swa-start", "1",
                     "--out", str(tmp_path / "run")])
    assert code == 0, out
    run_dir = tmp_path / "run"
    for name in ("args.json", "log.jsonl", "cnn.pt", "vit.pt", "splits/train.csv"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "last.pt").exists() and not (run_dir / "run.lock").exists()  # only for resuming
    log = read_log(run_dir / "log.jsonl")
    assert log[0]["phase"] == "init" and {"majority", "knn_raw_pixels", "rank_cnn", "pc1_vit"} <= set(log[0])
    assert [r["epoch"] for r in log[1:-1]] == [1, 2] and log[1]["lr"] == 1e-3  # the rate epoch 1 trained at
    assert log[-1]["phase"] == "saved" and "val_std_cnn" in log[-1]  # the monitor of cnn.pt and vit.pt themselves
    for key in ("loss", "lr", "seconds", "images_per_s", "std_cnn", "std_vit", "knn_cnn_feat", "rank_cnn", "rank_vit",
                "pc1_cnn", "val_cos", "cos_cnn_vit"):
        assert key in log[1], key
    assert "epoch   2/2" in out and "majority class" in out and "raw pixels" in out and "s.e. up to" in out
    queries = len(open(run_dir / "splits" / "val.csv").read().split()) - 1
    assert log[0]["knn_se"] == pytest.approx(0.5 / math.sqrt(queries))
    args = json.load(open(run_dir / "args.json"))
    assert args["command"] == "pretrain" and args["splits"] == "auto" and args["t_max"] == 16
    ck = torch.load(run_dir / "cnn.pt", weights_only=True)  # the README's three lines
    model = timm.create_model(ck["model"], num_classes=ck["num_classes"], **ck["kwargs"])
    model.load_state_dict(ck["state_dict"])
    assert ck["model"] == "resnet18" and model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 16)
    assert torch.load(run_dir / "vit.pt", weights_only=True)["kwargs"] == {"img_size": 32, "patch_size": 8}


def test_tiny_preset_overrides_paper_defaults_and_flags_override_the_preset():
    cfg = cass.resolve("pretrain", {"preset": "tiny", "img_size": 48})
    assert cfg["cnn"] == "resnet18" and cfg["img_size"] == 48 and cfg["pretrained"] is False
    paper = cass.resolve("pretrain", {})
    assert (paper["cnn"], paper["vit"], paper["img_size"], paper["batch_size"], paper["epochs"], paper["lr"]) == \
        ("resnet50", "vit_base_patch16_384", 384, 16, 100, 1e-3)
    assert paper["swa_start"] == 75 and paper["objective"] == "cass"
    ft = cass.resolve("finetune", {"preset": "tiny"})
    assert (ft["lr"], ft["epochs"], ft["batch_size"], ft["patience"]) == (3e-4, 15, 16, 5)


def test_every_flag_of_every_command_has_help_and_shows_its_default():
    import argparse

    parser = cass.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(cass.COMMANDS)
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help and (action.required or "(default: " in action.help), (name, action.dest)
    text = " ".join(commands["finetune"].format_help().split())
    assert "(default: paper: 0.0003; tiny: 0.0003)" in text and "(default: paper: 50; tiny: 15)" in text
    assert "(default: paper: resnet50; tiny: resnet18)" in " ".join(commands["pretrain"].format_help().split())


def test_a_given_boolean_flag_overrides_either_preset_in_both_directions():
    parser = cass.build_parser()
    for key, (cmds, default, text, options) in cass.FLAGS.items():
        action = options.get("action")
        if action not in ("store_true", argparse.BooleanOptionalAction):
            continue
        flag = "--" + key.replace("_", "-")
        for command in (c for c, (letter, _, _) in cass.COMMANDS.items() if letter in cmds and c in ("pretrain",
                                                                                                     "finetune")):
            for preset in ("paper", "tiny"):
                cases = [([flag], True)] + ([([flag.replace("--", "--no-")], False)] if action != "store_true" else [])
                for extra, expected in cases:
                    args = [command, "--preset", preset, *extra] + (["--out", "x"] if key == "resume" else [])
                    given = cass.given_flags(parser.parse_args(args))
                    assert given[key] is expected, (command, preset, extra)
                    if key != "resume":  # resume reads the run's own args.json
                        assert cass.resolve(command, given)[key] is expected, (command, preset, extra)


def test_help_shows_the_first_commands_and_each_command_only_its_own_text():
    import argparse

    parser = cass.build_parser()
    top = parser.format_help()
    assert "examples:" in top and "pretrain --data digits --preset tiny" in top and "wants a GPU" in top
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    pretrain, finetune = (" ".join(commands[c].format_help().split()) for c in ("pretrain", "finetune"))
    assert "default: None" not in pretrain + finetune and "evaluate" not in pretrain
    assert "torchrun" not in finetune and "one is needed" in finetune and "(default: the --init run's, else digits)" in finetune


@pytest.mark.skipif(not (SHARED / "brain_mri_224").is_dir(), reason="../shared/data is absent")
def test_committed_brain_mri_splits_name_the_missing_files_on_the_partial_copy(tmp_path):
    code, out = run([*PRETRAIN, "--data", "brain_mri", "--root", str(SHARED / "brain_mri_224"), "--epochs", "1",
                     "--out", str(tmp_path / "r")])
    assert code == 2 and "4 of the 5140 images" in out and "--splits auto" in out


def test_an_isic_csv_without_the_diagnosis_columns_names_the_columns_it_expected(tmp_path, capsys):
    root = write_isic(tmp_path / "i")
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", [["image", "foo"], ["ISIC_0000000", "1"]])
    code, out = cli([*PRETRAIN, "--data", "isic2019", "--root", root, "--splits", "auto", "--out", tmp_path / "r"],
                    capsys)
    assert code == 2 and "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC" in out, out


def test_isic_auto_splits_use_the_rows_whose_images_are_on_disk(tmp_path, capsys):
    root = write_isic(tmp_path / "i", n=6)
    header, rows, _ = cass.read_csv(root / "ISIC_2019_Training_GroundTruth.csv")
    extra = [[f"ISIC_9{i:06d}"] + r[1:] for i, r in enumerate(rows * 3)]  # rows of the full CSV, images absent
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", [header] + rows + extra)
    code, out = cli([*PRETRAIN, "--data", "isic2019", "--root", root, "--splits", "auto", "--epochs", "1", "--out",
                     tmp_path / "r"], capsys)
    assert code == 0, out
    assert f"{len(extra)} of the {len(rows) + len(extra)} images" in out and "use --splits auto" not in out


# ------------------------------------------------------------------------------------------
# fine-tuning: focal loss, class weights, metrics, early stopping
# ------------------------------------------------------------------------------------------


def test_focal_loss_is_bce_when_gamma_is_zero():
    logits, targets = torch.randn(6, 4), (torch.rand(6, 4) > 0.5).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    assert cass.focal_loss(logits, targets, alpha=1.0, gamma=0.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_loss_matches_the_formula_with_gamma_two_and_weights():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([0.5, 2.0])
    total = 0.0
    for i in range(2):
        for c in range(2):
            p = 1 / (1 + np.exp(-logits[i, c].item()))
            p_t = p if targets[i, c] == 1 else 1 - p
            total += w[c].item() * (1 - p_t) ** 2 * -np.log(p_t)
    assert cass.focal_loss(logits, targets, 1.0, 2.0, w).item() == pytest.approx(total / 4, rel=1e-5)


def test_inverse_weights_favour_the_rarest_class_and_paper_weights_the_majority():
    counts = [100, 10, 50]
    inv, paper = cass.class_weights(counts, "inverse"), cass.class_weights(counts, "paper")
    assert inv.argmax() == 1 and inv.argmin() == 0
    assert paper.argmax() == 0 and paper.argmin() == 1
    assert paper[0].item() == pytest.approx(1.0) and paper[1].item() == pytest.approx(0.2)
    assert cass.class_weights(counts, "none") is None


def _train_linear_head(x, y, kind, steps=300):
    """A linear head trained with Adam on features x [N, F] and labels y [N] under the focal loss."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    targets = F.one_hot(y, 2).float()
    w = cass.class_weights(targets.sum(0), kind)
    for _ in range(steps):
        opt.zero_grad()
        cass.focal_loss(head(x), targets, 1.0, 2.0, cass.term_weights(targets, w, kind, False)).backward()
        opt.step()
    return head


def test_inverse_class_weights_raise_the_minority_recall_of_a_linear_head_under_adam():
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(180), torch.ones(20)]).long()  # 9 : 1
    x = torch.randn(200, 4, generator=gen) + y[:, None] * 1.0  # overlapping classes
    heads = {k: _train_linear_head(x, y, k) for k in ("none", "inverse", "paper")}
    recall = {k: (h(x).argmax(1)[y == 1] == 1).float().mean().item() for k, h in heads.items()}
    assert recall["inverse"] >= recall["none"] + 0.15, recall  # here 0.8 against 0.6
    # the notebooks' per-column weights: Adam divides a constant per row out, the head is (almost) unweighted
    for a, b in zip(heads["paper"].parameters(), heads["none"].parameters()):
        assert torch.allclose(a, b, atol=1e-4)


def test_term_weights_weigh_each_image_by_its_class_or_each_positive_term_by_its_class():
    w = torch.tensor([0.5, 2.0])
    single = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(cass.term_weights(single, w, "inverse", False), torch.tensor([[0.5, 0.5], [2.0, 2.0]]))
    multi = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert torch.equal(cass.term_weights(multi, w, "inverse", True), torch.tensor([[0.5, 2.0], [1.0, 1.0]]))
    assert torch.equal(cass.term_weights(single, w, "paper", False), w) and cass.term_weights(single, None, "none",
                                                                                              False) is None


def test_multiclass_metrics_equal_scikit_learn():
    from sklearn import metrics as M

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 40)
    y = rng.integers(0, 3, 40)
    got = cass.classification_metrics(probs, np.eye(3)[y], False, ["a", "b", "c"])
    pred = probs.argmax(1)
    assert got["accuracy"] == pytest.approx(M.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(M.balanced_accuracy_score(y, pred))
    assert got["f1_macro"] == pytest.approx(M.f1_score(y, pred, average="macro"))
    assert got["f1_weighted"] == pytest.approx(M.f1_score(y, pred, average="weighted"))
    assert got["roc_auc_ovr"] == pytest.approx(M.roc_auc_score(y, probs, multi_class="ovr"))
    assert got["confusion_matrix"] == M.confusion_matrix(y, pred).tolist()
    b = got["per_class"]["b"]  # class b against the rest, as clinicians report it
    assert b["sensitivity"] == pytest.approx(M.recall_score(y, pred, average=None)[1])
    assert b["specificity"] == pytest.approx(M.recall_score(y != 1, pred != 1))  # the recall of "not b"
    assert b["auroc"] == pytest.approx(M.roc_auc_score(y == 1, probs[:, 1])) and "kappa_quadratic" not in got


def test_multilabel_metrics_equal_scikit_learn():
    from sklearn import metrics as M

    rng = np.random.default_rng(1)
    probs = rng.random((30, 4))
    y = (rng.random((30, 4)) > 0.5).astype(int)
    y[0] = 1  # no sample without labels, so f1_samples is defined for all
    got = cass.classification_metrics(probs, y, True, list("pqrs"))
    pred = (probs > 0.5).astype(int)
    assert got["f1_micro"] == pytest.approx(M.f1_score(y, pred, average="micro"))
    assert got["f1_macro"] == pytest.approx(M.f1_score(y, pred, average="macro"))
    assert got["f1_samples"] == pytest.approx(M.f1_score(y, pred, average="samples"))
    assert got["mean_average_precision"] == pytest.approx(M.average_precision_score(y, probs, average="macro"))
    assert got["per_class"]["r"]["f1"] == pytest.approx(M.f1_score(y[:, 2], pred[:, 2]))
    assert got["per_class"]["r"]["specificity"] == pytest.approx(M.recall_score(1 - y[:, 2], 1 - pred[:, 2]))
    assert got["roc_auc_ovr"] == pytest.approx(M.roc_auc_score(y, probs, average="macro"))


def test_graded_classes_get_the_quadratic_weighted_kappa_of_their_grades():
    from sklearn import metrics as M

    rng = np.random.default_rng(2)
    probs, y = rng.dirichlet(np.ones(5), 60), rng.integers(0, 5, 60)
    got = cass.classification_metrics(probs, np.eye(5)[y], False, ["0", "1", "2", "3", "4"])  # RetinaMNIST's grades
    assert got["kappa_quadratic"] == pytest.approx(M.cohen_kappa_score(y, probs.argmax(1), weights="quadratic"))


@pytest.mark.parametrize("multilabel", [False, True])
def test_resampled_metrics_equal_scikit_learn_on_the_resample_written_out(multilabel):
    # each image weighs how often a resample drew it: the metrics must be those of the images repeated that often
    rng = np.random.default_rng(3)
    probs = np.round(rng.dirichlet(np.ones(4), 80), 1)  # rounded: tied scores, which AUROC counts as half
    y = (rng.random((80, 4)) > 0.5) if multilabel else np.eye(4, dtype=bool)[rng.integers(0, 4, 80)]
    chosen = probs > 0.5 if multilabel else np.eye(4, dtype=bool)[probs.argmax(1)]
    w = rng.integers(0, 3, (1, 80)).astype(float)
    got = cass.resampled_metrics(probs, y, chosen, w)
    drawn = np.repeat(np.arange(80), w[0].astype(int))
    want = cass.classification_metrics(probs[drawn], y[drawn].astype(float), multilabel, list("abcd"))
    for key in ("f1_macro", "roc_auc_ovr") + (() if multilabel else ("balanced_accuracy",)):
        assert got[key][0] == pytest.approx(want[key]), key


def test_the_headline_gets_a_bootstrap_interval_that_holds_it_and_narrows_with_more_images():
    rng = np.random.default_rng(4)
    width = {}
    for n in (40, 1000):
        y = rng.integers(0, 3, n)
        probs = np.eye(3)[np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))] * 0.6 + 0.4 * rng.dirichlet(
            np.ones(3), n)
        got = cass.classification_metrics(probs, np.eye(3)[y], False, list("abc"), interval="f1_macro")
        (lo, hi), (alo, ahi) = got["ci95"]["f1_macro"], got["ci95"]["roc_auc_ovr"]
        assert lo < got["f1_macro"] < hi and alo < got["roc_auc_ovr"] < ahi
        width[n] = hi - lo
    assert width[1000] < width[40] / 3  # about sqrt(25) = 5 times narrower


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    stop, stopped_at = dict(best=math.inf, best_epoch=-1, bad=0), None
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.71, 0.6], start=1):
        stop = cass.early_stopping(stop, loss, epoch)
        if stop["bad"] >= 2:  # patience 2
            stopped_at = epoch
            break
    assert stopped_at == 6 and stop["best_epoch"] == 4 and stop["best"] == 0.7


def test_one_batch_fine_tune_overfits():
    cnn, _ = small_pair()
    cnn.reset_classifier(3)
    opt = cass.make_adam(cnn.parameters(), 3e-3)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    y = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])]
    step = lambda x, y: [cass.focal_loss(cnn(cass.normalize(x)), y)]  # noqa: E731 (finetune's step, unweighted)
    sched = cass.cosine_schedule(opt, dict(t_max=16, eta_min=1e-6))
    assert cass.train_epoch([(x, y)] * 40, step, opt, CPU.scaler(), sched, False, CPU, "overfit")["loss"] < 0.05
    cnn.eval()
    assert (cnn(cass.normalize(x)).argmax(1) == y.argmax(1)).all()


def test_linear_mode_leaves_the_encoder_unchanged_while_the_head_learns(tmp_path):
    root = write_folder(tmp_path / "data", n=10)
    cass.main([*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "1", "--out", str(tmp_path / "p")])
    assert cass.main([*FINETUNE, "--init", str(tmp_path / "p"), "--arm", "cnn", "--mode", "linear", "--epochs", "5",
                      "--lr", "1e-2", "--out", str(tmp_path / "f")]) == 0
    before, after = _state(tmp_path / "p" / "cnn.pt"), _state(tmp_path / "f" / "best.pt")
    for k, v in before.items():
        if not k.startswith("fc."):
            assert torch.equal(v, after[k]), k
    log = read_log(tmp_path / "f" / "log.jsonl")
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert cass.main(["evaluate", "--ckpt", str(tmp_path / "f" / "best.pt"), "--device", "cpu", "--workers", "0",
                      "--out", str(tmp_path / "e.json")]) == 0
    written = json.load(open(tmp_path / "f" / "metrics.json"))["test"]
    assert json.load(open(tmp_path / "e.json"))["confusion_matrix"] == written["confusion_matrix"]


def test_a_head_trained_on_standardised_features_folds_into_one_on_raw_features():
    torch.manual_seed(0)
    x = torch.randn(32, 6) * torch.tensor([1e-3, 1, 5, 0.1, 2, 1e-2]) + 3
    mean, std = x.mean(0), x.std(0)
    head = torch.nn.Linear(6, 4)
    expected = head((x - mean) / std)
    cass.fold_standardisation(head, mean, std)
    assert torch.allclose(head(x), expected, atol=1e-3)  # float32 cancellation: W/1e-3 times 3


def test_evaluate_reproduces_finetune_and_an_ensemble_of_two_runs(tmp_path):
    root = write_folder(tmp_path / "data", n=10)
    common = ["--data", "folder", "--root", str(root), "--splits", "auto"]
    assert cass.main([*FINETUNE, *common, "--init", "random", "--arm", "cnn", "--out", str(tmp_path / "c")]) == 0
    assert cass.main([*FINETUNE, *common, "--init", "random", "--arm", "vit", "--out", str(tmp_path / "v")]) == 0
    assert cass.main(["evaluate", "--ckpt", str(tmp_path / "c" / "best.pt"), "--device", "cpu", "--workers", "0",
                      "--out", str(tmp_path / "e.json")]) == 0
    written, again = json.load(open(tmp_path / "c" / "metrics.json"))["test"], json.load(open(tmp_path / "e.json"))
    for key in ("accuracy", "f1_macro", "balanced_accuracy", "confusion_matrix"):
        assert again[key] == written[key]
    assert again["roc_auc_ovr"] == pytest.approx(written["roc_auc_ovr"], abs=1e-6)
    assert cass.main(["evaluate", "--ckpt", str(tmp_path / "c" / "best.pt"), "--ckpt", str(tmp_path / "v"),
                      "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "ens.json")]) == 0  # a run folder
    ens = json.load(open(tmp_path / "ens.json"))
    assert len(ens["ckpts"]) == 2 and 0 <= ens["f1_macro"] <= 1 and ens["ckpts"][1] == str(tmp_path / "v" / "best.pt")
    code, out = run(["evaluate", "--ckpt", str(root), "--device", "cpu"])
    assert code == 2 and "is a folder without best.pt" in out and "Traceback" not in out


def test_multilabel_fine_tune_on_tiff_tiles(tmp_path):
    root = write_autoimmune(tmp_path / "a", n=30)
    assert cass.main([*FINETUNE, "--data", "autoimmune", "--root", str(root), "--init", "random", "--arm", "cnn",
                      "--epochs", "1", "--out", str(tmp_path / "f")]) == 0
    metrics = json.load(open(tmp_path / "f" / "metrics.json"))
    assert metrics["headline"] == "f1_macro" and "f1_samples" in metrics["test"]


def test_pretrain_then_finetune_at_ten_percent_then_evaluate_as_a_user_would(tmp_path):
    """finetune takes the --init run's dataset, preset, image size and splits: none is repeated."""
    root = write_folder(tmp_path / "data", n=30)  # 10% of the 24 training images per class
    code, out = run([*PRETRAIN, "--data", "folder", "--root", str(root), "--splits", "auto", "--epochs", "1",
                     "--out", str(tmp_path / "p")])
    assert code == 0, out
    code, out = run(["finetune", "--init", str(tmp_path / "p"), "--arm", "vit", "--label-fraction", "0.1", "--epochs",
                     "2", "--workers", "0", "--out", str(tmp_path / "f")])
    assert code == 0, out
    first = out.splitlines()[0]
    assert "train_10pct" in first and "at 32 px" in first and "at most 2 epochs" in first and "p/splits" in first
    code, out = run(["evaluate", "--ckpt", str(tmp_path / "f" / "best.pt"), "--device", "cpu"])
    assert code == 0 and "f1_macro" in out and "95% CI" in out and "specificity" in out, out


def test_predict_writes_class_probabilities_and_labels_of_new_images_as_evaluation_sees_them(tmp_path):
    root = write_folder(tmp_path / "data", n=10)
    assert cass.main([*FINETUNE, "--data", "folder", "--root", root, "--splits", "auto", "--init", "random", "--arm",
                      "cnn", "--epochs", "1", "--out", tmp_path / "f"]) == 0
    new = write_folder(tmp_path / "new", ("x",), 4)  # unseen images in any layout
    assert cass.main(["predict", "--ckpt", tmp_path / "f" / "best.pt", "--images", new, "--out", tmp_path / "p.csv",
                      "--device", "cpu", "--workers", "0"]) == 0
    header, rows, _ = cass.read_csv(tmp_path / "p.csv")
    assert header == ["image", "a", "b", "c", "predicted"] and len(rows) == 4
    model, preprocess, classes = cass.load_model(tmp_path / "f" / "best.pt")  # the same model from Python
    for r in rows:
        probs = np.array([float(v) for v in r[1:4]])
        assert probs.sum() == pytest.approx(1, abs=1e-4) and r[4] == classes[int(probs.argmax())]
        with torch.no_grad(), Image.open(r[0]) as img:
            expected = torch.softmax(model(preprocess(img)), dim=1)[0].numpy()
        assert np.allclose(probs, expected, atol=1e-5)
    write_csv(tmp_path / "list.csv", [["image"]] + [[r[0]] for r in rows])  # absolute paths in a CSV
    assert cass.main(["predict", "--ckpt", tmp_path / "f" / "best.pt", "--images", tmp_path / "list.csv", "--out",
                      tmp_path / "q.csv", "--device", "cpu", "--workers", "0"]) == 0
    assert cass.read_csv(tmp_path / "q.csv")[1] == rows
    assert cass.main(["predict", "--ckpt", tmp_path / "f", "--images", rows[0][0], "--out", tmp_path / "one.csv",
                      "--device", "cpu", "--workers", "0"]) == 0  # one image
    assert cass.read_csv(tmp_path / "one.csv")[1] == rows[:1]


def test_predict_puts_the_known_class_beside_the_prediction_for_images_in_class_folders_or_a_labelled_csv(tmp_path):
    root = write_folder(tmp_path / "data", n=10)
    assert cass.main([*FINETUNE, "--data", "folder", "--root", root, "--splits", "auto", "--init", "random", "--arm",
                      "cnn", "--epochs", "1", "--out", tmp_path / "f"]) == 0
    code, out = run(["predict", "--ckpt", tmp_path / "f", "--images", root, "--out", tmp_path / "p.csv", "--device",
                     "cpu", "--workers", "0"])
    header, rows, _ = cass.read_csv(tmp_path / "p.csv")
    assert code == 0 and header == ["image", "a", "b", "c", "predicted", "label"] and len(rows) == 30
    assert all(r[5] == Path(r[0]).parent.name for r in rows)  # the class folder each image sits in
    right = sum(r[4] == r[5] for r in rows)
    assert f"; {right} of the 30 with a label predicted right" in out, out
    write_csv(tmp_path / "l.csv", [["image", "label"]] + [[r[0], r[5]] for r in rows[:5]])  # a CSV with its labels
    assert cass.main(["predict", "--ckpt", tmp_path / "f", "--images", tmp_path / "l.csv", "--out", tmp_path / "q.csv",
                      "--device", "cpu", "--workers", "0"]) == 0
    assert cass.read_csv(tmp_path / "q.csv")[1] == rows[:5]


def test_a_small_dataset_is_said_on_the_first_line_and_its_batch_fitted_so_that_no_third_is_dropped(tmp_path):
    assert cass.fitted_batch(98, 64) == 49 and cass.fitted_batch(40, 64) == 40  # 34 of 98 dropped each epoch, else
    assert cass.fitted_batch(1439, 64) == 64 and cass.fitted_batch(5140, 16) == 16  # digits, the paper's brain MRI
    assert cass.fitted_batch(98, 64, world=4) % 4 == 0
    root = write_folder(tmp_path / "data", n=8)  # 18 training images, 3 validation, 3 test
    code, out = run([*PRETRAIN, "--data", "folder", "--root", str(root), "--splits", "auto", "--epochs", "1",
                     "--batch-size", "16", "--out", str(tmp_path / "p")])
    assert code == 0, out
    head = out[out.index("CASS pretraining"):].splitlines()
    assert "global batch 9 on" in head[0] and head[1].startswith("note: batch 9, not 16")
    assert "small data (18 training, 3 monitor query images, under 100)" in head[2], head
    code, out = run(["finetune", "--init", str(tmp_path / "p"), "--arm", "cnn", "--epochs", "1", "--workers", "0",
                     "--out", str(tmp_path / "f")])
    assert code == 0 and "small data (18 training, 3 validation, 3 test images" in out, out
    test = json.load(open(tmp_path / "f" / "metrics.json"))["test"]
    lo, hi = test["ci95"]["f1_macro"]
    assert lo <= test["f1_macro"] <= hi and f"(95% CI {lo:.4f} to {hi:.4f})" in out


# ------------------------------------------------------------------------------------------
# DICOM: the intensities a radiologist sees, in every reader (pydicom's own scanner files)
# ------------------------------------------------------------------------------------------


def dicom(name):
    """A real file that pydicom's wheel ships (CT_small, MR_small and its encodings, colour captures, ...)."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    return Path(get_testdata_file(name))


def write_dicoms(root, classes=("a", "b"), n=8, **tags):
    """Class folders of single-frame MR slices: MR_small's header, a class-dependent pattern in its 16-bit values."""
    import pydicom
    ds = pydicom.dcmread(dicom("MR_small.dcm"))
    base = ds.pixel_array.astype(np.int32)
    for c, name in enumerate(classes):
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = base.copy()
            arr[:, c::3] += 400 + 20 * i  # stripes whose phase is the class
            ds.PixelData = np.clip(arr, 0, 4095).astype(np.int16).tobytes()
            for tag, value in tags.items():
                setattr(ds, tag, value)
            ds.save_as(Path(root) / name / f"{name}_{i}.dcm")
    return Path(root)


def _window(x, lo, hi):
    return np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255)


def test_ct_is_read_in_hounsfield_units_through_the_modality_lut_then_windowed():
    import pydicom
    from pydicom.pixels import apply_modality_lut
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds)  # pydicom's own: stored * slope + intercept (-1024)
    assert float(ds.RescaleIntercept) == -1024 and hu.min() < -800  # the stored values are all above 0
    for window in ([40, 400], [-600, 1500]):  # soft tissue, lung
        got = np.asarray(cass.read_dicom(dicom("CT_small.dcm"), window)).astype(float)
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
        assert np.abs(got - _window(hu, lo, hi)).max() <= 1
        assert np.abs(got - _window(ds.pixel_array, lo, hi)).mean() > 50  # stored values, unrescaled: another image


def test_the_files_own_window_then_robust_percentiles_set_the_contrast_and_monochrome1_is_inverted(tmp_path):
    import pydicom
    ds = pydicom.dcmread(dicom("MR_small.dcm"))  # window 600 / 1600 in the file
    x = ds.pixel_array.astype(float)
    assert np.abs(np.asarray(cass.read_dicom(dicom("MR_small.dcm"))) - _window(x, -200, 1400)).max() <= 1
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "plain.dcm")
    lo, hi = np.percentile(x, (0.5, 99.5))
    plain = np.asarray(cass.read_dicom(tmp_path / "plain.dcm")).astype(float)
    assert np.abs(plain - _window(x, lo, hi)).max() <= 1
    arr = ds.pixel_array.copy()
    arr[0, 0] = 30000  # one metal artefact: min-max would halve the contrast of every other pixel
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "metal.dcm")
    metal = np.asarray(cass.read_dicom(tmp_path / "metal.dcm")).astype(float)
    assert np.abs(metal - plain)[1:].max() <= 3  # the 99.5th percentile moves by one rank
    assert np.abs(_window(arr, arr.min(), arr.max()) - plain)[1:].mean() > 30  # what min-max would have given
    ds.PhotometricInterpretation = "MONOCHROME1"  # a radiograph's convention: black is dense
    ds.save_as(tmp_path / "mono1.dcm")
    assert (np.asarray(cass.read_dicom(tmp_path / "mono1.dcm")).astype(int) == 255 - metal).all()
    assert (np.asarray(cass.read_dicom(tmp_path / "mono1.dcm", [600, 1600])).astype(int) ==
            255 - np.asarray(cass.read_dicom(dicom("MR_small.dcm"))).astype(int)).sum() > 4000  # --window honoured


def test_every_compressed_encoding_decodes_to_the_same_image_and_colour_becomes_rgb():
    plain = np.asarray(cass.read_dicom(dicom("MR_small.dcm")))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        assert (np.asarray(cass.read_dicom(dicom(name))) == plain).all(), name  # lossless: identical
    for name in ("SC_rgb_jpeg.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm", "SC_ybr_full_422_uncompressed.dcm",
                 "examples_palette.dcm"):
        img = cass.read_dicom(dicom(name))
        assert img.mode == "RGB" and np.ptp(np.asarray(img)) > 100, name
    a, b = (np.asarray(cass.read_dicom(dicom(n))).astype(int) for n in ("SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm"))
    assert np.abs(a - b).max() <= 1  # 16-bit colour: the same picture in 8 bits
    table = cass.Table("t", [], False, {}, ["CT_small.dcm"], image_dir=str(dicom("CT_small.dcm").parent))
    assert cass.decode_image(table, "CT_small.dcm", 32).shape == (3, 32, 32)  # what every reader's dataset yields


def test_dicom_files_that_hold_no_single_image_are_named(tmp_path, monkeypatch, capsys):
    import pydicom
    from pydicom.pixels import get_decoder
    sentences = {}
    for name in ("MR_truncated.dcm", "SC_rgb_rle_2frame.dcm", "test-SR.dcm"):
        with pytest.raises(cass.UserError) as e:
            cass.read_image(dicom(name))
        sentences[name] = str(e.value)
    assert "cannot decode image" in sentences["MR_truncated.dcm"] and "remove or replace" in sentences[
        "MR_truncated.dcm"]
    assert "2 frames" in sentences["SC_rgb_rle_2frame.dcm"] and "without an image" in sentences["test-SR.dcm"]
    assert all(s.count("\n") == 0 for s in sentences.values())
    decoder = get_decoder(pydicom.uid.RLELossless)  # a decoder plugin not installed
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(cass.UserError, match="missing dependencies.*pip install -r requirements-dicom.txt"):
        cass.read_image(dicom("MR_small_RLE.dcm"))
    monkeypatch.undo()
    mr = dicom("MR_small.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # pydicom not installed
    with pytest.raises(cass.UserError, match="needs pydicom .pip install -r requirements-dicom.txt"):
        cass.read_image(mr)
    monkeypatch.undo()
    root = write_dicoms(tmp_path / "data", n=8)
    (root / "a" / "report.dcm").write_bytes(dicom("test-SR.dcm").read_bytes())  # a structured report among slices
    capsys.readouterr()
    table = cass.load_table("folder", root)
    assert len(table.keys) == 16 and "report.dcm" in capsys.readouterr().out  # named, then left out
    (root / "b" / "cine.dcm").write_bytes(dicom("SC_rgb_rle_2frame.dcm").read_bytes())
    code, text = cli([*PRETRAIN, "--data", "folder", "--root", root, "--splits", "auto", "--out", tmp_path / "r"],
                     capsys)
    assert code == 2 and "cine.dcm holds 2 frames" in text and "Traceback" not in text, text
    (root / "b" / "cine.dcm").write_bytes(dicom("MR_truncated.dcm").read_bytes())  # cut short, as a full disk leaves it
    code, text = cli([*PRETRAIN, "--data", "folder", "--root", root, "--splits", "auto", "--out", tmp_path / "r"],
                     capsys)
    assert code == 2 and "cannot decode image" in text and "cine.dcm" in text and "Traceback" not in text, text


def test_a_folder_of_dicoms_goes_through_every_command_with_the_window_it_was_trained_on(tmp_path):
    root = write_dicoms(tmp_path / "data", n=10)
    code, out = run([*PRETRAIN, "--data", "folder", "--root", str(root), "--splits", "auto", "--epochs", "1",
                     "--window", "1000,1200", "--out", str(tmp_path / "p")])
    assert code == 0, out
    code, out = run(["finetune", "--init", str(tmp_path / "p"), "--arm", "cnn", "--epochs", "1", "--workers", "0",
                     "--device", "cpu", "--out", str(tmp_path / "f")])
    assert code == 0, out
    assert json.loads((tmp_path / "f" / "args.json").read_text())["window"] == [1000.0, 1200.0]  # inherited
    code, out = run(["evaluate", "--ckpt", str(tmp_path / "f"), "--device", "cpu"])
    assert code == 0 and "f1_macro" in out, out
    code, out = run(["predict", "--ckpt", str(tmp_path / "f"), "--images", str(root), "--out", str(tmp_path / "p.csv"),
                     "--device", "cpu", "--workers", "0"])
    assert code == 0, out
    rows = cass.read_csv(tmp_path / "p.csv")[1]
    model, preprocess, classes = cass.load_model(tmp_path / "f")
    with torch.no_grad():
        probs = torch.softmax(model(preprocess(rows[0][0])), dim=1)[0].numpy()  # a path: read with the window
    assert np.allclose([float(v) for v in rows[0][1:3]], probs, atol=1e-5)
    windowed = cass.image_tensor(cass.read_dicom(rows[0][0], [1000, 1200]), 32)
    own = cass.image_tensor(cass.read_dicom(rows[0][0]), 32)
    assert (cass.decode_image(cass.load_table("folder", root, [1000, 1200]), str(Path(rows[0][0]).relative_to(root)),
                              32) == windowed).all() and not (windowed == own).all()
    write_csv(tmp_path / "list.csv", [["image", "label"]] + [[r[0], Path(r[0]).parent.name] for r in rows])
    listed = cass.load_table("csv", tmp_path / "list.csv", [1000, 1200])  # a CSV of DICOM paths reads the same
    assert len(listed.keys) == 20 and (cass.decode_image(listed, rows[0][0], 32) == windowed).all()


# ------------------------------------------------------------------------------------------
# interrupted runs: resume, kill -9, Ctrl-C, claimed run folders
# ------------------------------------------------------------------------------------------


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _epoch_losses(path):
    return [r["loss"] for r in read_log(path) if "loss" in r]


def test_two_epochs_equal_one_epoch_plus_resume_and_same_seed_runs_are_identical(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    common = [*PRETRAIN, "--data", "folder", "--root", str(root), "--splits", "auto", "--swa-start", "1"]
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "b")]) == 0
    assert cass.main([*common, "--epochs", "1", "--keep-last", "--out", str(tmp_path / "c")]) == 0
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "c"), "--resume"]) == 0
    assert _epoch_losses(tmp_path / "a" / "log.jsonl") == _epoch_losses(tmp_path / "b" / "log.jsonl")
    assert _epoch_losses(tmp_path / "a" / "log.jsonl") == _epoch_losses(tmp_path / "c" / "log.jsonl")
    for arm in ("cnn.pt", "vit.pt"):
        a, c = _state(tmp_path / "a" / arm), _state(tmp_path / "c" / arm)
        assert all(torch.equal(a[k], c[k]) for k in a), arm


def test_last_pt_holds_no_swa_copies_before_swa_start(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    sizes = {}
    for start in (0, 5):  # averaging from the first epoch; not yet averaging after the only one
        out = tmp_path / f"swa{start}"
        assert cass.main([*PRETRAIN, "--data", "folder", "--root", root, "--splits", "auto", "--epochs", "1",
                          "--swa-start", start, "--keep-last", "--out", out]) == 0
        saved = torch.load(out / "last.pt", weights_only=True)
        assert ("swa_cnn" in saved and "swa_vit" in saved) == (start == 0)
        sizes[start] = (out / "last.pt").stat().st_size
    encoders = (tmp_path / "swa5" / "cnn.pt").stat().st_size + (tmp_path / "swa5" / "vit.pt").stat().st_size
    assert sizes[0] - sizes[5] > 0.9 * encoders  # the two copies SWA held


def test_finetune_resume_gives_the_same_weights(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    common = [*FINETUNE, "--data", "folder", "--root", str(root), "--splits", "auto", "--init", "random"]
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert cass.main([*common, "--epochs", "1", "--keep-last", "--out", str(tmp_path / "c")]) == 0
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "c"), "--resume"]) == 0
    a, c = _state(tmp_path / "a" / "best.pt"), _state(tmp_path / "c" / "best.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert [r["val_loss"] for r in read_log(tmp_path / "a" / "log.jsonl")] == \
        [r["val_loss"] for r in read_log(tmp_path / "c" / "log.jsonl")]


def test_a_full_fine_tuning_resumes_from_last_pt_alone_when_its_init_run_is_gone(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    assert cass.main([*PRETRAIN, "--data", "folder", "--root", root, "--splits", "auto", "--epochs", "1", "--out",
                      tmp_path / "pre"]) == 0
    common = [*FINETUNE, "--init", tmp_path / "pre", "--arm", "vit"]
    assert cass.main([*common, "--epochs", "2", "--out", tmp_path / "a"]) == 0
    assert cass.main([*common, "--epochs", "1", "--keep-last", "--out", tmp_path / "c"]) == 0
    (tmp_path / "pre").rename(tmp_path / "moved")  # the pretraining run, moved or deleted since
    assert cass.main(["finetune", "--resume", "--out", tmp_path / "c", "--epochs", "2", "--workers", "0"]) == 0
    a, c = _state(tmp_path / "a" / "best.pt"), _state(tmp_path / "c" / "best.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_a_flag_that_would_change_the_run(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=8)
    common = [*PRETRAIN, "--data", "folder", "--root", str(root), "--out", tmp_path / "r"]
    assert cass.main([*common, "--epochs", "1", "--keep-last"]) == 0
    code, out = cli([*common, "--epochs", "2", "--resume", "--lr", "0.1"], capsys)
    assert code == 2 and "--lr 0.1 differs" in out, out


def _start(args):
    # a shell's background job starts with SIGINT ignored, which Python then keeps: give the run Ctrl-C back
    return subprocess.Popen([sys.executable, str(HERE / "cass.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=HERE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    out = tmp_path / "run"
    args = [*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "30", "--out", str(out)]
    proc = _start(args)
    _wait_for(lambda: (out / "last.pt").exists(), proc)
    proc.kill()
    proc.wait()
    ck = torch.load(out / "last.pt", weights_only=True)  # intact whatever moment the kill came
    assert ck["epoch"] >= 1
    code, text = run([*args, "--resume", "--epochs", str(ck["epoch"] + 1)])  # the dead run's lock is taken over
    assert code == 0, text
    epochs = [r["epoch"] for r in read_log(out / "log.jsonl") if r.get("phase") != "saved"]
    assert epochs == list(range(0, ck["epoch"] + 2))  # none twice
    assert (out / "cnn.pt").exists()


def test_ctrl_c_and_sigterm_stop_the_run_keep_the_finished_epochs_and_say_how_to_resume(tmp_path):
    import select

    root = write_folder(tmp_path / "data", n=8)
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):  # what shells expect
        out = tmp_path / f"run{int(sig)}"
        args = [*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "30", "--out", str(out)]
        proc = _start(args)
        assert select.select([proc.stdout], [], [], 120)[0], "the header did not come while the run went on"
        assert proc.stdout.readline().startswith("CASS pretraining") and proc.poll() is None  # line by line, piped
        _wait_for(lambda: (out / "last.pt").exists() and len(read_log(out / "log.jsonl")) >= 2, proc)
        proc.send_signal(sig)
        text = proc.communicate(timeout=600)[0]
        assert proc.returncode == status, text
        assert "--resume" in text and "Traceback" not in text
        ck = torch.load(out / "last.pt", weights_only=True)
        code, text = run([*args, "--resume", "--epochs", str(ck["epoch"] + 1)])
        assert code == 0, text


def test_an_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=8)
    args = [*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "1", "--out", str(tmp_path / "r")]
    assert cass.main(args) == 0
    before = (tmp_path / "r" / "cnn.pt").read_bytes()
    code, text = cli(args, capsys)
    assert code == 2 and "already holds a run" in text
    assert (tmp_path / "r" / "cnn.pt").read_bytes() == before


def hold(lock):
    """A live process that holds `lock` as cass.claim does (an operating-system lock), until it is killed."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); fcntl.flock(fd, "
            "fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=8)
    (tmp_path / "r").mkdir()
    other = hold(tmp_path / "r" / "run.lock")
    try:
        code, text = cli([*PRETRAIN, "--data", "folder", "--root", root, "--epochs", "1", "--out", tmp_path / "r"],
                         capsys)
    finally:
        other.kill()
        other.wait()
    assert code == 2 and f"in use by another running process (pid {other.pid})" in text, text
    assert not (tmp_path / "r" / "args.json").exists()


def test_progress_without_a_terminal_prints_a_plain_line_inside_the_epoch(capsys, monkeypatch):
    clock = iter(range(0, 1000, 20))
    monkeypatch.setattr(cass.time, "monotonic", lambda: next(clock))
    bar = cass.Progress(list(range(5)), "epoch 1/3")
    for i in bar:
        bar.note(f"loss {i}")
    out = capsys.readouterr().out
    assert "epoch 1/3: step 2/5" in out and "loss 1" in out


# ------------------------------------------------------------------------------------------
# bad input: one sentence naming the culprit, exit status 2, no traceback, no empty run folder
# ------------------------------------------------------------------------------------------


def _bad_folder_empty_class(t):
    root = write_folder(t / "d")
    (root / "empty").mkdir()
    return ["--data", "folder", "--root", str(root)], "empty"


def _bad_csv_columns(t):
    write_csv(t / "x.csv", [["path", "label"], ["a.png", "1"]])
    return ["--data", "csv", "--root", str(t / "x.csv")], "'image' column"


def _bad_csv_labels(t):
    write_folder(t / "imgs", ("x",), 4)
    write_csv(t / "x.csv", [["image", "p", "q"]] + [[f"imgs/x/x_{i}.png", "2", "0"] for i in range(4)])
    return ["--data", "csv", "--root", str(t / "x.csv")], "must each hold 0 or 1"


def _bad_csv_no_images(t):
    write_csv(t / "x.csv", [["image"]] + [[f"imgs/gone_{i}.png"] for i in range(5)])
    return ["--data", "csv", "--root", str(t / "x.csv")], "none of the 5 images"


def _bad_undecodable(t):
    root = write_folder(t / "d")
    (root / "a" / "broken.png").write_bytes(b"this is not a png" * 10)
    return ["--data", "folder", "--root", str(root), "--workers", "1"], "broken.png"


def _bad_zero_byte(t):
    root = write_folder(t / "d")
    (root / "b" / "zero.png").write_bytes(b"")
    return ["--data", "folder", "--root", str(root)], "zero.png"


def _bad_committed_splits(t):
    return ["--data", "brain_mri", "--root", str(write_brain_mri(t / "b"))], "--splits auto"


def _bad_layout(t):
    return ["--data", "brain_mri", "--root", str(write_folder(t / "d"))], "Training/<class>"


BAD_PRETRAIN = {
    "root missing": lambda t: (["--data", "folder", "--root", str(t / "nowhere")], "does not exist"),
    "wrong layout": _bad_layout,
    "class folder without images": _bad_folder_empty_class,
    "csv without image column": _bad_csv_columns,
    "csv labels not 0/1": _bad_csv_labels,
    "csv lists no image on disk": _bad_csv_no_images,
    "undecodable image": _bad_undecodable,
    "zero-byte image": _bad_zero_byte,
    "committed splits do not match": _bad_committed_splits,
    "cuda without a gpu": lambda t: (["--device", "cuda"], "no CUDA"),
    "sync-bn on cpu": lambda t: (["--sync-bn"], "--sync-bn"),
    "resume without a run": lambda t: (["--resume", "--out", str(t / "none")], "nothing to resume"),
}


@pytest.mark.parametrize("case", list(BAD_PRETRAIN))
def test_bad_input_to_pretrain_gets_one_clear_sentence(case, tmp_path, capsys):
    extra, expected = BAD_PRETRAIN[case](tmp_path)
    if case == "cuda without a gpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fixture = ["--data", "folder", "--root", str(write_folder(tmp_path / "ok"))]
    code, out = cli([*PRETRAIN, "--epochs", "1", "--out", str(tmp_path / "run"), *fixture, *extra], capsys)
    assert code == 2, out
    assert expected in out and "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("error: ")
    if case != "undecodable image":  # found inside the first epoch, when the folder exists
        assert not (tmp_path / "run").exists()  # a run that fails its checks leaves no folder


def test_an_undecodable_image_read_by_a_worker_process_is_named_on_the_command_line(tmp_path):
    extra, expected = _bad_undecodable(tmp_path)
    code, out = run([*PRETRAIN, "--epochs", "1", "--out", str(tmp_path / "run"), *extra])
    assert code == 2 and expected in out and "Traceback" not in out, out


def test_a_loss_that_becomes_nan_stops_at_once_and_names_epoch_step_and_lr(tmp_path):
    root = write_folder(tmp_path / "d")
    code, out = run([*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "3", "--lr", "1e30",
                     "--out", str(tmp_path / "r")])
    assert code == 2 and "epoch" in out and "step" in out and "--lr" in out, out
    if (tmp_path / "r" / "last.pt").exists():  # any checkpoint kept is a good one
        ck = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["cnn"].values() if v.is_floating_point())
    assert not (tmp_path / "r" / "cnn.pt").exists()


def _bad_init_foreign(t):
    torch.save({"weights": torch.zeros(3)}, t / "foreign.pt")
    return ["--init", str(t / "foreign.pt")], "not an encoder file"


def _pretrained_run(t):
    cass.main([*PRETRAIN, "--data", "folder", "--root", str(write_folder(t / "p_data")), "--epochs", "1", "--out",
               str(t / "p")])
    return t / "p"


def _bad_one_class(t):
    root = write_folder(t / "one", ("only",), 12)
    return ["--data", "folder", "--root", str(root), "--init", "random"], "at least two"


BAD_FINETUNE = {
    "label fraction above 1": lambda t: (["--label-fraction", "1.5", "--init", "random"], "invalid choice: 1.5"),
    "label fraction 0": lambda t: (["--label-fraction", "0", "--init", "random"], "invalid choice: 0.0"),
    "init not written by cass": _bad_init_foreign,
    "init of the other arm": lambda t: (["--init", str(_pretrained_run(t) / "vit.pt"), "--arm", "cnn"],
                                        "holds the vit arm"),
    "run folder without --arm": lambda t: (["--init", str(_pretrained_run(t))], "add --arm cnn or --arm vit"),
    "folder that is no run": lambda t: (["--init", str(write_folder(t / "x")), "--arm", "cnn"],
                                        "is not a finished pretraining run folder"),
    "fewer than two classes": _bad_one_class,
    "no init": lambda t: ([], "--init"),
}


@pytest.mark.parametrize("case", list(BAD_FINETUNE))
def test_bad_input_to_finetune_gets_one_clear_sentence(case, tmp_path, capsys):
    extra, expected = BAD_FINETUNE[case](tmp_path)
    fixture = ["--data", "folder", "--root", str(write_folder(tmp_path / "ok"))]
    code, out = cli([*FINETUNE, "--out", str(tmp_path / "run"), *fixture, *extra], capsys)
    assert code == 2, out
    assert expected in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_checkpoint_for_another_class_count_or_program(tmp_path, capsys):
    root = write_folder(tmp_path / "d", n=10)
    assert cass.main([*FINETUNE, "--data", "folder", "--root", str(root), "--splits", "auto", "--init", "random",
                      "--epochs", "1", "--out", str(tmp_path / "f")]) == 0
    other = write_folder(tmp_path / "other", ("a", "q"), 10)
    code, out = cli(["evaluate", "--ckpt", tmp_path / "f" / "best.pt", "--data", "folder", "--root", other,
                     "--splits", "auto"], capsys)
    assert code == 2 and "made for 3 classes" in out and "has 2" in out and "class 1: b against q" in out, out
    code, out = cli(["evaluate", "--ckpt", tmp_path / "f" / "args.json"], capsys)
    assert code == 2 and "args.json" in out and "Traceback" not in out, out


# ------------------------------------------------------------------------------------------
# data-parallel pretraining (DDP, gloo on the CPU)
# ------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import cass
rt = cass.make_runtime("cpu", "fp32")
torch.manual_seed(0)
cnn, vit = cass.build_pair(dict(cnn="convnext_atto", vit="vit_tiny_patch16_224", img_size=32, patch_size=8, out_dim=16,
                                pretrained=False, cnn_weights=None, vit_weights=None))
images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
table = cass.Table("synthetic", [], False, {{}}, [str(i) for i in range(32)])
dataset = cass.ImageDataset(table, table.keys, 32, cache=images)
def weights():
    return {{**{{"cnn." + k: v.clone() for k, v in cnn.state_dict().items()}},
            **{{"vit." + k: v.clone() for k, v in vit.state_dict().items()}}}}
torch.save(weights(), sys.argv[1] + "/init.pt")
sampler = cass.EpochSampler(32, 8, 0, rank=rt.rank, world=rt.world)
loader = cass.make_loader(dataset, sampler, 8 // rt.world, 0, rt)
optimizer = cass.make_adam([*cnn.parameters(), *vit.parameters()], 1e-3)
cfg = dict(objective="cass", vc_weight=1.0, sched_unit="epoch", epochs=2, t_max=16, eta_min=1e-6)
scheduler = cass.cosine_schedule(optimizer, cfg)
ddp_cnn, ddp_vit = cass.wrap_ddp(cnn, rt), cass.wrap_ddp(vit, rt)
for epoch in range(2):
    sampler.set_epoch(epoch)
    cass.pretrain_epoch(ddp_cnn, ddp_vit, loader, optimizer, rt.scaler(), scheduler, rt, cfg, epoch)
torch.save(weights(), sys.argv[1] + f"/rank{{rt.rank}}.pt")
torch.manual_seed(2)
bn_model = cass.create_encoder("resnet10t", 4, {{}})  # BatchNorm's statistics recomputed on each process's share
bn_sampler = cass.EpochSampler(32, 8, 1, rank=rt.rank, world=rt.world)
cass.recompute_batchnorm(bn_model, cass.make_loader(dataset, bn_sampler, 4, 0, rt), rt)  # one process: both shares
torch.save({{k: v for k, v in bn_model.state_dict().items() if "running" in k}}, sys.argv[1] + f"/bn{{rt.rank}}.pt")
if rt.world > 1:  # gloo's threads stopped before the interpreter ends (else, at times, an abort at exit)
    torch.distributed.destroy_process_group()
"""


def _torchrun(args, n=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args],
                       capture_output=True, text=True, timeout=1800, env=env, cwd=HERE)
    return p.returncode, p.stdout + p.stderr


def _relative_update_difference(a, b, init):
    """|| (a - init) - (b - init) || / || b - init ||, over all floating-point weights."""
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in keys)
    moved = sum(float(((b[k] - init[k]).double() ** 2).sum()) for k in keys)
    return (diff / moved) ** 0.5


def test_ddp_ranks_hold_identical_weights_equal_to_one_process_on_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp_steps.py"
    script.write_text(DDP_SCRIPT.format(here=str(HERE)))
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    code, out = _torchrun([str(script), str(tmp_path / "two")])
    assert code == 0, out
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0, p.stderr
    r0, r1 = torch.load(tmp_path / "two" / "rank0.pt"), torch.load(tmp_path / "two" / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the replicas in lockstep
    # Equal up to float rounding (Adam divides by sqrt(v), so rounding in near-zero gradients shows up as
    # differences of up to ~lr in single weights; the update as a whole agrees).
    single, init = torch.load(tmp_path / "one" / "rank0.pt"), torch.load(tmp_path / "one" / "init.pt")
    assert _relative_update_difference(r0, single, init) < 1e-3
    bn0, bn1, bn = (torch.load(tmp_path / d / f"bn{r}.pt") for d, r in (("two", 0), ("two", 1), ("one", 0)))
    assert all(torch.equal(bn0[k], bn1[k]) for k in bn0)  # update_bn: every process's share, then their mean
    assert all(torch.allclose(bn0[k], bn[k], rtol=1e-4, atol=1e-6) for k in bn0)  # = one process over both shares


def test_torchrun_pretrain_matches_a_single_process_run_and_finetune_says_it_runs_in_one(tmp_path):
    root = write_folder(tmp_path / "d", n=8)  # cass-vc: its variance and covariance are the global batch's
    args = [*PRETRAIN, "--cnn", "convnext_atto", "--data", "folder", "--root", str(root), "--splits", "auto",
            "--epochs", "2", "--objective", "cass-vc"]
    code, out = _torchrun([str(HERE / "cass.py"), *args, "--out", str(tmp_path / "ddp")])
    assert code == 0, out
    code, out = run([*args, "--out", str(tmp_path / "single")])
    assert code == 0, out
    for arm in ("cnn.pt", "vit.pt"):
        a, b = _state(tmp_path / "ddp" / arm), _state(tmp_path / "single" / arm)
        assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 2e-3
    assert _epoch_losses(tmp_path / "ddp" / "log.jsonl") == pytest.approx(
        _epoch_losses(tmp_path / "single" / "log.jsonl"), rel=1e-4)
    code, out = _torchrun([str(HERE / "cass.py"), *FINETUNE, "--init", str(tmp_path / "single"), "--arm", "cnn",
                           "--out", str(tmp_path / "ft")])
    assert code != 0 and "finetune runs in one process" in out


# ------------------------------------------------------------------------------------------
# the collapse monitor and the random-bn control on real runs
# ------------------------------------------------------------------------------------------


def test_a_multilabel_csv_may_leave_some_images_unlabelled(tmp_path):
    write_folder(tmp_path / "imgs", ("x",), 12)
    rows = [["image", "p", "q"]] + [[f"imgs/x/x_{i}.png", str(i % 2), "1"] for i in range(8)]
    rows += [[f"imgs/x/x_{i}.png", "", ""] for i in range(8, 12)]
    write_csv(tmp_path / "m.csv", rows)
    table = cass.load_table("csv", tmp_path / "m.csv")
    assert len(table.keys) == 12 and len(table.labels) == 8
    assert {f"imgs/x/x_{i}.png" for i in range(8, 12)} <= set(cass.make_splits(table)["train"])


def test_the_monitor_reports_near_zero_spread_when_both_arms_collapse(tmp_path):
    cnn, vit = small_pair()
    with torch.no_grad():  # every image gets the same output: the head's bias
        cnn.fc.weight.zero_()
        vit.head.weight.zero_()
    table = cass.load_table("folder", write_folder(tmp_path / "d", n=6))
    splits = cass.make_splits(table)
    loaders = {s: torch.utils.data.DataLoader(cass.ImageDataset(table, splits[s], 32), batch_size=8)
               for s in ("train", "val")}
    m = cass.monitor(dict(cnn=cnn, vit=vit), loaders, CPU, baselines=True)
    assert m["val_std_cnn"] < 1e-6 and m["val_std_vit"] < 1e-6
    assert m["majority"] == pytest.approx(1 / 3) and 0 <= m["knn_raw_pixels"] <= 1
    healthy = cass.monitor(dict(zip(("cnn", "vit"), small_pair())), loaders, CPU)
    assert healthy["val_std_cnn"] > 100 * m["val_std_cnn"] + 1e-4 and healthy["rank_cnn"] > m["rank_cnn"]


def test_random_bn_control_reestimates_batchnorm_statistics_on_the_training_images(tmp_path):
    root = write_folder(tmp_path / "d", n=8)
    common = [*FINETUNE, "--data", "folder", "--root", str(root), "--splits", "auto", "--mode", "linear",
              "--epochs", "1", "--arm", "cnn"]
    assert cass.main([*common, "--init", "random", "--out", str(tmp_path / "r")]) == 0
    assert cass.main([*common, "--init", "random-bn", "--out", str(tmp_path / "bn")]) == 0
    plain, recal = _state(tmp_path / "r" / "best.pt"), _state(tmp_path / "bn" / "best.pt")
    assert torch.equal(plain["conv1.weight"], recal["conv1.weight"])  # the same random weights
    assert torch.equal(plain["bn1.running_mean"], torch.zeros_like(plain["bn1.running_mean"]))
    assert recal["bn1.running_mean"].abs().sum() > 0  # statistics of the images


def test_random_bn_statistics_are_those_of_shuffled_batches_not_of_class_sorted_ones(tmp_path):
    root = tmp_path / "d"  # two classes of very different brightness: their split files are sorted by class
    for c, lo in (("a", 0), ("b", 150)):
        (root / c).mkdir(parents=True)
        for i in range(16):
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(lo, lo + 100, (32, 32, 3)).astype(np.uint8)).save(root / c / f"{i}.png")
    assert cass.main([*FINETUNE, "--data", "folder", "--root", str(root), "--splits", "auto", "--mode", "linear",
                      "--epochs", "1", "--arm", "cnn", "--batch-size", "4", "--init", "random-bn",
                      "--out", str(tmp_path / "bn")]) == 0
    table = cass.load_table("folder", root)
    keys = cass.make_splits(table, seed=0)["train"]
    x = cass.normalize(torch.stack([cass.ImageDataset(table, keys, 32)[i][0] for i in range(len(keys))]))
    torch.manual_seed(0)
    model = cass.create_encoder("resnet18", 2, {})
    model.bn1.momentum = None
    model.train()
    with torch.no_grad():
        model.bn1(model.conv1(x))  # the population statistics, in one batch
    got = _state(tmp_path / "bn" / "best.pt")["bn1.running_var"]
    ratio = (got / model.bn1.running_var).mean().item()
    assert 0.7 < ratio < 1.1, ratio  # class-sorted batches of 4 lose the variance between classes (about 0.1)


def test_auto_precision_takes_bf16_only_from_compute_capability_8(monkeypatch):
    for name, value in (("is_available", lambda: True), ("set_device", lambda i: None), ("current_device", lambda: 0),
                        ("is_bf16_supported", lambda *a, **k: True)):  # emulated bf16 counts as supported
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    for capability, dtype in (((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16),
                              ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert cass.make_runtime("auto", "auto").amp_dtype == dtype, capability


def smooth_image(size=64, seed=0):
    """uint8 [3, size, size]: a few smooth blobs, so resampling errors are those of interpolation, not of aliasing."""
    g = np.linspace(0, 1, size)
    y, x = np.meshgrid(g, g, indexing="ij")
    rng = np.random.default_rng(seed)
    img = [sum(np.cos(rng.uniform(2, 6) * x + rng.uniform(0, 6)) * np.sin(rng.uniform(2, 6) * y) for _ in range(3))
           for _ in range(3)]
    return torch.from_numpy(np.clip(128 + 40 * np.stack(img), 0, 255).astype(np.uint8))


def _params(size, inwards=None, angle=0.0, vflip=False, hflip=False, factors=(1, 1, 1), order=(0, 1, 2)):
    m = cass.warp_matrix(size, None if inwards is None else np.array(inwards), angle, vflip, hflip)
    return torch.tensor(np.concatenate([m.ravel(), factors, order]), dtype=torch.float32)[None]


def test_augmenting_on_the_device_gives_what_torchvision_gives_for_the_same_draws():
    from torchvision.transforms import InterpolationMode as I
    from torchvision.transforms.v2 import functional as TF
    size, img = 64, smooth_image()
    x, inner = img.float(), (slice(None), slice(8, -8), slice(8, -8))  # borders: torchvision resamples twice
    aug = lambda **kw: cass.augment(img[None], _params(size, **kw))[0]  # noqa: E731
    assert torch.equal(aug(), x)  # a plain image passes exactly
    assert torch.equal(aug(hflip=True), TF.horizontal_flip(x)) and torch.equal(aug(vflip=True), TF.vertical_flip(x))
    turn = lambda y, a: TF.affine(y, a, [0, 0], 1.0, [0.0, 0.0], I.BILINEAR)  # noqa: E731 (RandomAffine's call)
    assert (aug(angle=7.3) - turn(x, 7.3))[inner].abs().max() < 0.5  # of 255 levels
    corners = [[3, 1], [0, 6], [5, 2], [4, 4]]  # tl, tr, br, bl moved inwards (x, y)
    start = [[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]]
    end = [[sx + dx * ix, sy + dy * iy] for (sx, sy), (ix, iy), (dx, dy) in
           zip(start, corners, [(1, 1), (-1, 1), (-1, -1), (1, -1)])]
    assert (aug(inwards=corners) - TF.perspective(x, start, end, I.BILINEAR))[inner].abs().max() < 0.5
    both = TF.horizontal_flip(TF.vertical_flip(turn(TF.perspective(x, start, end, I.BILINEAR), -4.0)))
    err = (aug(inwards=corners, angle=-4.0, vflip=True, hflip=True) - both)[inner].abs()
    assert err.mean() < 0.5 and err.max() < 3  # one warp against two resamplings
    factors, order = (1.15, 0.85, 1.1), (2, 0, 1)  # saturation, then brightness, then contrast
    y = x / 255
    for k in order:
        y = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation][k](y, factors[k])
    assert (aug(factors=factors, order=order) - 255 * y).abs().max() < 1e-3


def test_each_augmentation_is_drawn_from_the_image_seed_as_often_as_the_paper_says():
    draws = np.stack([cass.augment_params(seed, 64) for seed in range(4000)])
    m, jitter = draws[:, :9].reshape(-1, 3, 3), (draws[:, 9:12] != 1).any(1)
    perspective, turned = np.abs(m[:, 2, :2]).sum(1) > 1e-9, np.abs(m[:, 0, 1]) > 1e-9
    plain = ~perspective & ~turned  # flips alone: the diagonal's signs
    se = lambda p: 4 * math.sqrt(p * (1 - p) / len(draws))  # noqa: E731
    assert abs(jitter.mean() - 0.15) < se(0.15) and abs(perspective.mean() - 0.15) < se(0.15)
    assert not (jitter & perspective).any()  # ColorJitter *or* RandomPerspective
    assert abs((turned & ~perspective).mean() - 0.85 * 0.3) < se(0.3)
    assert abs((m[plain, 0, 0] < 0).mean() - 0.3) < 0.05 and abs((m[plain, 1, 1] < 0).mean() - 0.3) < 0.05
    assert np.array_equal(cass.augment_params(7, 64), cass.augment_params(7, 64))
    assert not np.array_equal(cass.augment_params(7, 64), cass.augment_params(8, 64))


def test_a_batch_is_the_same_whatever_the_number_of_workers(tmp_path):
    table = cass.load_table("folder", write_folder(tmp_path / "d", n=4))
    ds, rt = cass.ImageDataset(table, table.keys, 32, augment=True), cass.make_runtime("cpu", "fp32")
    batches = [list(cass.make_loader(ds, cass.EpochSampler(len(ds), 4, 3), 4, w, rt)) for w in (0, 2)]
    for (x0, y0, a0), (x1, y1, a1) in zip(*batches):
        assert torch.equal(cass.augment(x0, a0), cass.augment(x1, a1)) and torch.equal(y0, y1)


def test_a_large_jpeg_decoded_at_a_reduced_scale_stays_within_a_level_of_the_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:800, 0:1024] / 1024  # a 1024 x 800 photograph: smooth shapes and sensor noise
    img = np.stack([128 + 60 * np.sin(7 * x + c) * np.cos(5 * y - c) + rng.normal(0, 8, x.shape) for c in range(3)], -1)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / "big.jpg", quality=90)
    for size, scale in ((384, 2), (64, 8)):  # the largest of 1/2, 1/4, 1/8 that keeps both sides >= size
        with Image.open(tmp_path / "big.jpg") as im:
            assert im.draft("RGB", (size, size))[1] == (0, 0, 1024 // scale, 800 // scale)
        full = cass.image_tensor(cass.read_image(tmp_path / "big.jpg"), size).float()
        drafted = cass.decode_image(cass.Table("t", [], False, {}, ["big"], image_dir=str(tmp_path), suffix=".jpg"),
                                    "big", size).float()
        assert (full - drafted).abs().mean() < 1 and (full - drafted).abs().max() <= 8  # of 255 levels
        assert not torch.equal(full, drafted)  # the reduced decode was taken


def test_a_finetuned_head_is_fresh_even_when_as_wide_as_the_pretraining_head(tmp_path):
    root = write_folder(tmp_path / "data", classes=("a", "b"), n=8)
    assert cass.main([*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "1", "--out-dim", "2",
                      "--out", str(tmp_path / "pre")]) == 0
    assert cass.main([*FINETUNE, "--data", "folder", "--root", str(root), "--init", str(tmp_path / "pre"), "--arm",
                      "cnn", "--mode", "full", "--epochs", "1", "--lr", "1e-12", "--out", str(tmp_path / "ft")]) == 0
    pre, ft = _state(tmp_path / "pre" / "cnn.pt"), _state(tmp_path / "ft" / "best.pt")
    assert torch.allclose(pre["conv1.weight"], ft["conv1.weight"], atol=1e-6) and not torch.allclose(pre["fc.weight"],
                                                                                       ft["fc.weight"], atol=1e-3)


def test_the_image_cache_is_decoded_once_for_every_later_run_and_changes_nothing(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "d", n=6)
    given = dict(preset="tiny", img_size=32, patch_size=8, batch_size=8, workers=0, device="cpu", epochs=2,
                 data="folder", root=str(root), splits="auto", init="random", arm="cnn", mode="linear",
                 cache_dir=str(tmp_path / "cache"))
    cass.finetune(cass.resolve("finetune", {**given, "out": str(tmp_path / "plain")}))
    calls, real = [], cass.decode_image
    monkeypatch.setattr(cass, "decode_image", lambda table, key, size: calls.append(key) or real(table, key, size))
    cass.finetune(cass.resolve("finetune", {**given, "cache_images": True, "out": str(tmp_path / "cached")}))
    files, decoded = sorted((tmp_path / "cache").glob("*.npy")), len(calls)
    assert len(files) == 3 and decoded == 18 and not list((tmp_path / "cache").glob(".*"))  # train, val, test
    cass.finetune(cass.resolve("finetune", {**given, "cache_images": True, "seed": 1, "out": str(tmp_path / "again")}))
    assert len(calls) == decoded and sorted((tmp_path / "cache").glob("*.npy")) == files  # read, not decoded again
    losses = [[r["train_loss"] for r in read_log(tmp_path / d / "log.jsonl")] for d in ("plain", "cached")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    auc = [json.load(open(tmp_path / d / "metrics.json"))["test"]["roc_auc_ovr"] for d in ("plain", "cached")]
    assert auc[0] == pytest.approx(auc[1], rel=1e-6)
    table = cass.load_table("folder", root)
    cfg, keys = dict(given, cache_images=True), sorted(table.keys)
    assert torch.equal(cass.decode_all(table, keys, cfg), torch.stack([real(table, k, 32) for k in keys]))
    class_image(2, 99).save(root / keys[0])  # a file changed since: decoded again, into another file
    os.utime(root / keys[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    again = cass.decode_all(table, keys, cfg)
    assert torch.equal(again[0], real(table, keys[0], 32)) and len(list((tmp_path / "cache").glob("*.npy"))) == 5
    twin = write_folder(tmp_path / "twin", n=6)  # the same names and classes elsewhere: never taken for the first
    other = cass.decode_all(cass.load_table("folder", twin), keys, cfg)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6 and torch.equal(other[1:], again[1:])
    cass.decode_all(table, keys, dict(cfg, img_size=16))  # another size, another window: a file each
    cass.decode_all(cass.load_table("folder", root, [40, 80]), keys, cfg)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 8


def snapshot(*roots):
    """Every file under the roots with its inode, size and time (and bytes, below 1 MB): a refused command leaves
    them as they were (a file written anew, even with the same bytes, gets another inode and time)."""
    return {p: (st.st_ino, st.st_size, st.st_mtime_ns, p.read_bytes() if st.st_size < 2**20 else None)
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file() and (st := p.stat())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished pretraining run that kept its last.pt, and a finished fine-tuning run, on a folder of images."""
    t = tmp_path_factory.mktemp("runs")
    root = write_folder(t / "data", n=8)
    assert cass.main([*PRETRAIN, "--data", "folder", "--root", root, "--epochs", "1", "--keep-last", "--out",
                      t / "pre"]) == 0
    assert cass.main([*FINETUNE, "--data", "folder", "--root", root, "--init", "random", "--arm", "cnn", "--epochs",
                      "1", "--out", t / "ft"]) == 0
    return t


def _copy_run(runs, t, *own):
    """The pretraining run, its files linked (last.pt is 268 MB), those named in `own` copied to be changed."""
    import shutil

    run_copy = Path(shutil.copytree(runs / "pre", t / "pre", copy_function=os.link))
    for name in own:
        data = (run_copy / name).read_bytes()
        (run_copy / name).unlink()
        (run_copy / name).write_bytes(data)
    return run_copy


def _running(runs, t):  # a copy of the run held by a live process, with a log line its last.pt does not count
    run_copy = _copy_run(runs, t, "log.jsonl")
    hold(run_copy / "run.lock")
    with open(run_copy / "log.jsonl", "a") as f:
        f.write('{"epoch": 2}\n')
    return ["pretrain", "--resume", "--out", run_copy, "--epochs", "2"], "in use by another running process"


def _damaged(runs, t, name):  # cut short, as a full disk leaves a file
    run_copy = _copy_run(runs, t)
    with open(run_copy / name, "rb") as f:
        head = f.read(100)
    (run_copy / name).unlink()
    (run_copy / name).write_bytes(head)
    return ["pretrain", "--resume", "--out", run_copy, "--epochs", "2"], "damaged"


def _class_only_in_testing(runs, t):
    root = write_brain_mri(t / "b")
    write_folder(root / "Testing", ("rare",), 3)
    return [*FINETUNE, "--data", "brain_mri", "--root", root, "--splits", "auto", "--init", "random"], "rare"


def _listed_twice(runs, t):
    write_folder(t / "i", ("x", "y"), 4)
    rows = [[f"i/{c}/{c}_{k}.png", c] for c in "xy" for k in range(4)] + [["i/x/x_0.png", "y"]]
    write_csv(t / "l.csv", [["image", "label"], *rows])
    return [*PRETRAIN, "--data", "csv", "--root", t / "l.csv", "--out", t / "r"], "lines 2 and 10"


def _linked_class(t):  # the same files in two classes: one image twice, perhaps in two splits
    root = write_folder(t / "d", ("a", "b"), 4)
    (root / "c").symlink_to(root / "a", target_is_directory=True)
    return [*PRETRAIN, "--data", "folder", "--root", root, "--out", t / "r"], "are one file (through a link)"


def _loose_image(t):  # it has no class: said, not dropped
    root = write_folder(t / "d", ("a", "b"), 4)
    class_image(0, 9).save(root / "loose.png")
    return [*PRETRAIN, "--data", "folder", "--root", root, "--out", t / "r"], "loose.png is an image outside"


def _bomb(runs, t, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 24 x 24 image is then a decompression bomb
    return [*PRETRAIN, "--data", "folder", "--root", runs / "data", "--out", t / "r", "--epochs", "1"], "Decompression"


def _predict(runs, t, out, *extra):
    write_csv(t / "list.csv", [["image"], [str(runs / "data" / "a" / "a_0.png")]])
    (t / "old.csv").write_text("an earlier result\n")
    return ["predict", "--ckpt", runs / "ft", "--images", t / "list.csv", "--out", t / out, "--workers", "0", *extra]


def _read_only(runs, t, monkeypatch, args):
    monkeypatch.setattr(cass.os, "access", lambda *a, **k: False)  # what a read-only disk answers, even to root
    return args, "cannot be written"


def _evaluate(runs, t, out):
    (t / "old.json").write_text("{}\n")
    (t / "folder").mkdir()
    return ["evaluate", "--ckpt", runs / "ft", "--out", t / out, "--workers", "0", "--device", "cpu"]


REFUSED = {  # class: {case: (t, runs, monkeypatch) -> (arguments, what the sentence says)}
    "nothing lost or overwritten": {
        "predict --out is its --images": lambda r, t, m: (_predict(r, t, "list.csv"), "one of this command's inputs"),
        "predict --out exists": lambda r, t, m: (_predict(r, t, "old.csv"), "--overwrite"),
        "predict --out on an image it reads": lambda r, t, m: (["predict", "--ckpt", r / "ft", "--images", r / "data",
                                                                "--out", r / "data" / "a" / "a_0.png", "--overwrite"],
                                                               "inside one"),
        "a run folder inside the data": lambda r, t, m: ([*PRETRAIN, "--data", "folder", "--root", r / "data",
                                                          "--out", r / "data" / "run"], "inside one"),
        "evaluate --out exists": lambda r, t, m: (_evaluate(r, t, "old.json"), "--overwrite"),
        "resume on another --root": lambda r, t, m: (["pretrain", "--resume", "--out", r / "pre", "--root",
                                                      write_folder(t / "other")], "--root"),
        "resume of a run still going": lambda r, t, m: _running(r, t),
        "a new run into a finished one": lambda r, t, m: ([*FINETUNE, "--data", "folder", "--root", r / "data",
                                                           "--init", "random", "--out", r / "ft"], "another --out"),
        "a class folder that is a link to another": lambda r, t, m: _linked_class(t),
    },
    "nothing silent": {
        "a class only in Testing/": lambda r, t, m: _class_only_in_testing(r, t),
        "an image listed twice with two labels": lambda r, t, m: _listed_twice(r, t),
        "an image outside the class folders": lambda r, t, m: _loose_image(t),
        **{f"--{flag} {value}": (lambda flag, value: lambda r, t, m: (
            [*PRETRAIN, "--data", "folder", "--root", r / "data", "--out", t / "r", f"--{flag}", value], f"--{flag}"))(
            flag, value) for flag, value in (("epochs", "0"), ("patch-size", "0"), ("batch-size", "0"),
                                             ("batch-size", "1"), ("img-size", "-32"), ("workers", "-1"),
                                             ("out-dim", "0"), ("lr", "0"), ("lr", "nan"), ("lr", "inf"),
                                             ("epochs", "two"),
                                             ("seed", "-1"), ("vc-weight", "-1"), ("cnn", "resnet5"))},
    },
    "one sentence, never a traceback": {
        "run --out is a file": lambda r, t, m: ([*PRETRAIN, "--out", r / "pre" / "args.json"], "is a file"),
        "evaluate --out is a folder": lambda r, t, m: (_evaluate(r, t, "folder"), "is a folder"),
        "evaluate --out in a missing folder": lambda r, t, m: (_evaluate(r, t, "nowhere/m.json"), "does not exist"),
        "run --out below a file": lambda r, t, m: ([*PRETRAIN, "--out", r / "pre" / "args.json" / "r"], "cannot"),
        "evaluate --out on a read-only disk": lambda r, t, m: _read_only(r, t, m, _evaluate(r, t, "m.json")),
        "a run folder on a read-only disk": lambda r, t, m: _read_only(r, t, m, [*PRETRAIN, "--out", t / "r"]),
        "a decompression bomb": lambda r, t, m: _bomb(r, t, m),
        "a binary file given as CSV": lambda r, t, m: ((t / "b.csv").write_bytes(b"\x89PNG\x00\xff\x00"), [
            *PRETRAIN, "--data", "csv", "--root", t / "b.csv", "--out", t / "r"])[1:] + ("must start with an 'image' column",),
        "finetune --resume of a pretraining run": lambda r, t, m: (["finetune", "--resume", "--out", r / "pre"],
                                                                  "holds a pretrain run"),
        "pretrain --resume of a fine-tuning run": lambda r, t, m: (["pretrain", "--resume", "--out", r / "ft"],
                                                                  "holds a finetune run"),
        "a damaged last.pt": lambda r, t, m: _damaged(r, t, "last.pt"),
        "a damaged args.json": lambda r, t, m: _damaged(r, t, "args.json"),
        "an --init run with a damaged args.json": lambda r, t, m: (
            [*FINETUNE, "--init", _damaged(r, t, "args.json")[0][3], "--arm", "cnn", "--out", t / "f"], "damaged"),
        "an unknown flag": lambda r, t, m: (["pretrain", "--epoch", "3"], "unrecognized arguments"),
    },
    "messages that say what to do": {
        "resume of a finished run": lambda r, t, m: ([*FINETUNE, "--resume", "--out", r / "ft"], "--keep-last"),
        "a CSV with labels other than 0 and 1": lambda r, t, m: (
            [*PRETRAIN, "--data", "csv", "--root", _bad_csv_labels(t)[0][3], "--out", t / "r"], "2 cell(s): 2,0"),
        "a CSV line with too few label cells": lambda r, t, m: ((t / "s.csv").write_text("image,p,q\na.png,1\n"), [
            *PRETRAIN, "--data", "csv", "--root", t / "s.csv", "--out", t / "r"])[1:] + ("found 1 cell(s): 1",),
    },
}


@pytest.mark.parametrize("group,case", [(g, c) for g, cases in REFUSED.items() for c in cases])
def test_a_refused_command_says_one_sentence_exits_2_and_changes_no_file(group, case, runs, tmp_path, capsys,
                                                                         monkeypatch):
    args, said = REFUSED[group][case](runs, tmp_path, monkeypatch)
    before = snapshot(tmp_path, runs, HERE / "data_splits")
    capsys.readouterr()
    try:
        code = cass.main([str(a) for a in args])
    except SystemExit as e:  # a flag argparse refuses
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and said in err, err
    assert "Traceback" not in out + err and "[" not in err and "allow_pickle" not in err
    after = snapshot(tmp_path, runs, HERE / "data_splits")
    assert {p: after.get(p) for p in before} == before  # nothing changed or removed
    assert set(after) == set(before) or case == "a decompression bomb"  # found in the first epoch: a run folder


def _fault_temporary_files(runs, t, capsys):  # what kill -9 in the middle of a write leaves
    run = _copy_run(runs, t, "log.jsonl")
    (run / ".last.pt.tmp999999").write_bytes(b"half a checkpoint")
    (run / "splits" / ".train.csv.tmp999999").write_bytes(b"half")
    assert cli(["pretrain", "--resume", "--out", run, "--epochs", "2"], capsys)[0] == 0
    assert not list(run.rglob(".*.tmp*")) and (run / "cnn.pt").is_file()


def _fault_log_line_after_the_checkpoint(runs, t, capsys):  # killed between the log line and last.pt
    run = _copy_run(runs, t, "log.jsonl")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "loss": 9.0}\n')
    assert cli(["pretrain", "--resume", "--out", run, "--epochs", "2"], capsys)[0] == 0
    log = read_log(run / "log.jsonl")
    log = [r for r in log if r.get("phase") != "saved"]
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[-1]["loss"] != 9  # the line last.pt did not count went


def _fault_image_removed_since_the_start(runs, t, capsys):  # as the message about a bad image tells the user to
    root = write_folder(t / "d", n=8)
    args = [*PRETRAIN, "--data", "folder", "--root", root, "--splits", "auto", "--epochs", "1", "--keep-last", "--out",
            t / "r"]
    code, first = cli(args, capsys)
    splits = snapshot(t / "r" / "splits")
    (root / cass.read_csv(t / "r" / "splits" / "val.csv")[1][0][0]).unlink()
    code, again = cli([*args, "--resume", "--epochs", "2"], capsys)
    assert code == 0, again
    count = lambda text: text.split(" images at ")[0].split()[-1]  # noqa: E731 (the header's training images)
    assert count(again) == count(first) and "1 of the" in again  # the validation image did not move into train
    assert snapshot(t / "r" / "splits") == splits


def _fault_ctrl_c_inside_a_write(runs, t, capsys):
    (t / "m.json").write_text("the old one\n")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            cass.write_json({"new": 1}, t / "m.json")
    assert (t / "m.json").read_text() == "the old one\n" and [p.name for p in t.iterdir()] == ["m.json"]


FAULTS = {  # faults: nothing lost, and the run goes on from where it was
    "a killed process's temporary files": _fault_temporary_files,
    "a log line written after the last checkpoint": _fault_log_line_after_the_checkpoint,
    "an image removed since the run started": _fault_image_removed_since_the_start,
    "Ctrl-C inside a write": _fault_ctrl_c_inside_a_write,
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_after_a_fault_nothing_is_lost_and_a_resumed_run_is_the_run_it_was(case, runs, tmp_path, capsys):
    FAULTS[case](runs, tmp_path, capsys)


def test_resume_takes_the_same_root_spelled_another_way(runs, monkeypatch):
    monkeypatch.chdir(runs)
    assert cass.resolve("pretrain", dict(resume=True, out=str(runs / "pre"), root="data"))["root"] == str(runs / "data")


def _bad_images_in_a_folder(t):
    new = write_folder(t / "new", ("x",), 3)
    (new / "x" / "broken.png").write_bytes(b"not a png")
    (new / "x" / "empty.jpg").write_bytes(b"")
    (new / "x" / "deeper").mkdir()
    class_image(1, 9).save(new / "x" / "deeper" / "scan, 2.png")  # a comma in a name: the CSV quotes it
    return new, ["broken.png", "empty.jpg"], 4


def _bad_images_in_a_csv(t):
    new = write_folder(t / "new", ("x",), 3)
    (new / "x" / "broken.png").write_bytes(b"\x89PNG then nothing")
    write_csv(t / "list.csv", [["Image"], *([str(p)] for p in sorted((new / "x").iterdir())), ["gone.png"]])
    return t / "list.csv", ["broken.png", "gone.png"], 3


PREDICT = {  # (t) -> (--images, the names the message gives, rows predicted)
    "a folder with an undecodable, an empty and a nested image": _bad_images_in_a_folder,
    "a CSV listing an undecodable and a missing image": _bad_images_in_a_csv,
    "the same, decoded in worker processes": _bad_images_in_a_csv,
}


@pytest.mark.parametrize("case", list(PREDICT))
def test_predict_predicts_every_image_that_decodes_and_names_every_one_that_does_not(case, runs, tmp_path, capsys):
    images, bad, good = PREDICT[case](tmp_path)
    args = ["predict", "--ckpt", runs / "ft", "--images", images, "--out", tmp_path / "p.csv",
            "--workers", "2" if "worker" in case else "0"]
    code, out = cli(args, capsys)
    assert code == 2 and f"{len(bad)} of the {len(bad) + good} images" in out and all(b in out for b in bad), out
    header, rows, _ = cass.read_csv(tmp_path / "p.csv")
    assert len(rows) == good and all(len(r) == 5 and not any(b in r[0] for b in bad) for r in rows)
    if "folder" in case:
        assert any(r[0].endswith("scan, 2.png") for r in rows)
        for name in bad:
            (images / "x" / name).unlink()
        assert cli([*args, "--overwrite"], capsys)[0] == 0 and len(cass.read_csv(tmp_path / "p.csv")[1]) == good


NAMES = ["i/x/x, 0.png", *(f"i/x/x_{k}.png" for k in range(1, 4)), *(f"i/y/y_{k}.png" for k in range(4))]
ROWS = "".join(f'"{n}",{n[2]}\n' for n in NAMES)
SPREADSHEET_CSVS = {  # accepted as they come: the same table each time
    "a byte-order mark": "\ufeffimage,label\n" + ROWS,
    "Image and Label in capitals": "Image,Label\n" + ROWS,
    "blank lines, one of them last": "image,label\n\n" + ROWS.replace("\n", "\n\n", 2) + "\n\n",
    "spaces around cells": "image , label\n" + ROWS.replace(",x", ", x ").replace(",y", ",  y"),
    "Windows line ends": ("image,label\n" + ROWS).replace("\n", "\r\n"),
    "an image listed twice with one label": "image,label\n" + ROWS + f'"{NAMES[0]}",x\n',
}


@pytest.mark.parametrize("case", list(SPREADSHEET_CSVS))
def test_csvs_as_spreadsheets_export_them_are_read(case, tmp_path):
    write_folder(tmp_path / "i", ("x", "y"), 4)
    (tmp_path / "i" / "x" / "x_0.png").rename(tmp_path / "i" / "x" / "x, 0.png")
    (tmp_path / "l.csv").write_bytes(SPREADSHEET_CSVS[case].encode())
    table = cass.load_table("csv", tmp_path / "l.csv")
    assert table.classes == ["x", "y"] and table.keys == NAMES
    assert [int(np.argmax(table.labels[n])) for n in NAMES] == [0] * 4 + [1] * 4


def test_names_with_commas_and_quotes_survive_the_split_files_and_the_predictions(runs, tmp_path, capsys):
    root = write_folder(tmp_path / "d", ("a", "b"), 6)
    for c in "ab":
        (root / c / f"{c}_0.png").rename(root / c / f'{c}, "0".png')
    table = cass.load_table("folder", root)
    splits = cass.make_splits(table)
    cass.write_splits(table, splits, tmp_path / "s")
    assert cass.load_splits(dict(splits=str(tmp_path / "s")), table) == (splits, str(tmp_path / "s"))
    assert cli(["predict", "--ckpt", runs / "ft", "--images", root, "--out", tmp_path / "p.csv", "--workers", "0"],
               capsys)[0] == 0
    with open(tmp_path / "p.csv", newline="") as f:  # as any other program reads it
        assert sorted(r[0] for r in list(csv.reader(f))[1:]) == sorted(str(root / k) for k in table.keys)


def test_a_class_with_a_single_image_keeps_it_for_training(tmp_path):
    root = write_folder(tmp_path / "d", ("a", "b"), 8)
    write_folder(root, ("solo",), 1)
    splits = cass.make_splits(cass.load_table("folder", root))
    assert all("solo/solo_0.png" in splits[s] for s in ("train", "train_10pct", "train_1pct"))


def test_one_rule_for_a_folder_of_images_subfolders_count_and_names_with_a_dot_do_not(tmp_path):
    root = write_folder(tmp_path / "d", ("a", "b"), 3)
    for sub in ("scan 2", ".thumbs"):
        (root / "a" / sub).mkdir()
        class_image(0, 5).save(root / "a" / sub / "deep.png")
    (root / ".ipynb_checkpoints").mkdir()
    table = cass.load_table("folder", root)
    assert table.classes == ["a", "b"] and "a/scan 2/deep.png" in table.keys and len(table.keys) == 7
    assert table.keys == [str(p.relative_to(root)) for p in cass.image_files(root)]  # what predict reads


def test_a_write_the_system_refuses_is_one_sentence_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(cass.UserError, match="cannot write"):
        cass.atomic_write(tmp_path / "f" / "m.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_evaluate_saves_its_metrics_before_it_prints_them(runs, tmp_path, monkeypatch):
    cfg = cass.resolve("evaluate", dict(ckpt=[str(runs / "ft")], out=str(tmp_path / "m.json"), workers=0, device="cpu"))

    def broken_pipe(*args, **kwargs):
        raise BrokenPipeError

    monkeypatch.setattr("builtins.print", broken_pipe)
    with pytest.raises(BrokenPipeError):
        cass.evaluate(cfg)
    assert json.load(open(tmp_path / "m.json"))["split"] == "test"


# ------------------------------------------------------------------------------------------
# nothing lost, third pass: two runs in one folder, divergence, signals and failed writes, locks, names, pipes
# ------------------------------------------------------------------------------------------


RUN_ARGS = {"pretrain": [*PRETRAIN, "--epochs", "1"], "finetune": [*FINETUNE, "--epochs", "1", "--init", "random"]}
TWO_RUNS = {  # case: (run A, run B); B is started into A's folder, and A finishes after B's first check
    "a pretraining run, then another": ("pretrain", "pretrain"),
    "a fine-tuning run, then another": ("finetune", "finetune"),
    "a pretraining run, then a fine-tuning run": ("pretrain", "finetune"),
}


@pytest.mark.parametrize("case", TWO_RUNS)
def test_a_run_that_ends_while_another_starts_into_its_folder_is_never_written_over(case, tmp_path, monkeypatch,
                                                                                    capsys):
    first, second = TWO_RUNS[case]
    a_data, b_data, out = write_folder(tmp_path / "a", n=6), write_folder(tmp_path / "b", ("x", "y"), 6), tmp_path / "R"
    real, finished = cass.load_table, {}

    def load_table(data, root, window=None):  # B reads its data after its first check of the folder: A ends meanwhile
        if root == str(b_data) and not finished:
            assert cass.main([str(a) for a in [*RUN_ARGS[first], "--data", "folder", "--root", a_data, "--out",
                                               out]]) == 0
            finished.update(snapshot(out))
        return real(data, root, window)

    monkeypatch.setattr(cass, "load_table", load_table)
    code, text = cli([*RUN_ARGS[second], "--data", "folder", "--root", b_data, "--out", out], capsys)
    assert finished and code == 2 and "already holds a run" in text, text
    assert snapshot(out) == finished  # A's run as it ended: its log, args.json, splits and results


def _nan_loss(m):  # pretraining's loss becomes NaN in the second epoch (three steps an epoch: 18 images, batch 6)
    real, steps = cass.objective, []
    m.setattr(cass, "objective", lambda cfg, r, t: real(cfg, r, t) * (math.nan if steps.append(1) or len(steps) > 3
                                                                      else 1))
    return RUN_ARGS["pretrain"][:-1] + ["2"], "epoch 2"


def _nan_outputs(m):  # the monitor's outputs become NaN after the first epoch; the monitor itself does not raise
    real, calls = cass.encode, []

    def encode(models, loader, rt):
        got = real(models, loader, rt)
        calls.append(1)  # the second call: the queries of the init rows (both arms)
        return {a: (f, o * math.nan, y) for a, (f, o, y) in got.items()} if len(calls) > 1 else got
    m.setattr(cass, "encode", encode)
    return RUN_ARGS["pretrain"], "epoch 0"


def _nan_validation(m):  # a linear probe whose validation logits become NaN
    real = cass.logits_of

    def logits_of(*args):
        logits, targets = real(*args)
        return logits * math.nan, targets
    m.setattr(cass, "logits_of", logits_of)
    return [*FINETUNE, "--init", "random", "--mode", "linear"], "epoch 1"


DIVERGED = {  # case: (monkeypatch -> (arguments, where the sentence says it happened))
    "fine-tuning with --lr 1e3": lambda m: ([*FINETUNE, "--init", "random", "--lr", "1e3"], "epoch 1"),
    "a validation loss that becomes NaN": _nan_validation,
    "pretraining whose loss becomes NaN": _nan_loss,
    "a monitor whose outputs become NaN": _nan_outputs,
}


@pytest.mark.parametrize("case", DIVERGED)
def test_a_run_that_diverges_stops_with_one_sentence_and_never_ends_as_a_finished_run(case, tmp_path, monkeypatch,
                                                                                      capsys):
    args, where = DIVERGED[case](monkeypatch)
    root = write_folder(tmp_path / "d", n=8)
    code, text = cli([*args, "--data", "folder", "--root", root, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "diverged" in text and where in text and "--lr" in text, text
    assert len(text.strip().splitlines()[-1:]) == 1 and "Traceback" not in text
    assert not [f for f in ("best.pt", "metrics.json", "cnn.pt", "vit.pt") if (tmp_path / "r" / f).exists()]
    log = tmp_path / "r" / "log.jsonl"
    for line in open(log) if log.exists() else []:  # strict JSON: no NaN for a reader to choke on
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))


def test_the_monitor_reports_non_finite_outputs_as_values_not_as_an_exception():
    assert all(math.isnan(v) for v in cass.spectrum(torch.full((6, 4), math.nan)))
    assert math.isnan(float(cass.output_spread(torch.full((6, 4), math.nan))))


FAILED_WRITES = {  # what the system or a signal does in the middle of a write
    "a full disk": OSError(28, "No space left on device"),
    "torch.save's own error (a full disk inside its zip writer)": RuntimeError("[enforce fail at inline_container.cc]"),
    "SIGTERM or Ctrl-C": KeyboardInterrupt(),
}


@pytest.mark.parametrize("what", FAILED_WRITES)
@pytest.mark.parametrize("data", ["bytes", "a checkpoint"])
def test_a_write_that_fails_halfway_leaves_the_old_file_and_no_temporary_one(what, data, tmp_path, monkeypatch):
    (tmp_path / "last.pt").write_bytes(b"the finished epochs")
    (tmp_path / "cnn.pt").write_bytes(b"the old encoder")

    def fsync(fd):
        raise FAILED_WRITES[what]

    monkeypatch.setattr(cass.os, "fsync", fsync)
    expected = KeyboardInterrupt if what == "SIGTERM or Ctrl-C" else cass.UserError
    with pytest.raises(expected) as e:
        cass.atomic_write(tmp_path / "cnn.pt", b"new" if data == "bytes" else {"w": torch.ones(3)})
    assert (tmp_path / "cnn.pt").read_bytes() == b"the old encoder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.pt", "last.pt"]
    if expected is cass.UserError:
        assert "cannot write" in str(e.value) and "last.pt holds the finished epochs" in str(e.value)
        assert "[" not in str(e.value) and "\n" not in str(e.value)


def test_sigterm_to_the_whole_process_group_ends_a_run_with_143_and_one_sentence(tmp_path):
    root = write_folder(tmp_path / "data", n=16)
    out = tmp_path / "run"
    args = [*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "50", "--workers", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, str(HERE / "cass.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE, start_new_session=True)  # as SLURM starts it
    _wait_for(lambda: (out / "last.pt").exists(), proc)  # mid-run, its loader workers alive
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # what scancel and Kubernetes do: every process of the group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout + stderr
    assert stderr.strip().startswith("error: interrupted") and len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and "killed by signal" not in stderr
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] >= 1 and not list(out.glob(".*.tmp*"))


LOCK_CONTENTS = {  # what a lock file may hold when no living process holds it: it is taken over, whatever it holds
    "nothing (a full disk while it was written)": "",
    "a newline": "\n",
    "not a number": "cass\nrun",
    "a dead process's id": "dead",
    "the id of a live process that holds no lock": str(os.getppid()),
    "this process's id": str(os.getpid()),
}


@pytest.mark.parametrize("content", LOCK_CONTENTS)
def test_a_lock_no_living_process_holds_is_taken_over_whatever_it_holds(content, tmp_path):
    lock, text = tmp_path / "run.lock", LOCK_CONTENTS[content]
    if text == "dead":
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        text = str(dead.pid) if dead.wait() == 0 else pytest.fail("no process")
    lock.write_text(text)
    held = cass.claim(lock)
    assert held is not None and lock.read_text() == str(os.getpid())
    assert cass.claim(lock) is None  # held now: a second claim, from any process, waits for it
    cass.release(held)
    assert not lock.exists()


def test_a_lock_a_live_process_holds_is_respected_until_that_process_dies(tmp_path):
    lock = tmp_path / "cell.lock"
    holder = hold(lock)
    try:
        assert cass.claim(lock) is None
    finally:
        holder.kill()
        holder.wait()
    held = cass.claim(lock)
    assert held is not None  # its lock went with it, though its file stayed
    cass.release(held)


def _odd_names(t):
    """A folder of images whose names a disk allows and a program easily mangles."""
    folder = t / "new"
    folder.mkdir()
    names = [os.fsdecode(b"scan-\xff\xfe.png"), "two\nlines.png", "comma, \"quote\".png", "é" * 60 + ".png"]
    for i, name in enumerate(names):
        class_image(i % 3, i).save(folder / name, format="PNG")
    return folder, names


def test_names_any_disk_allows_round_trip_through_predict_splits_and_messages(runs, tmp_path, capsys):
    folder, names = _odd_names(tmp_path)
    out = tmp_path / ("p" * 246 + ".csv")  # a legal 250-byte name: its temporary file must fit too
    assert cli(["predict", "--ckpt", runs / "ft", "--images", folder, "--out", out, "--workers", "0"], capsys)[0] == 0
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))[1:]
    assert sorted(Path(r[0]).name for r in rows) == sorted(names) and all(Path(r[0]).is_file() for r in rows)
    root = tmp_path / "data" / "c"
    root.parent.mkdir()
    folder.rename(root)
    write_folder(tmp_path / "data", ("a", "b"), 4)
    table = cass.load_table("folder", tmp_path / "data")
    cass.write_splits(table, cass.make_splits(table), tmp_path / "s")
    listed = {row[0] for n in ("train", "val", "test") for row in cass.read_csv(tmp_path / "s" / f"{n}.csv")[1]}
    assert {f"c/{n}" for n in names} <= listed  # each name read back as it is on disk
    (tmp_path / "data" / "c" / "two\nlines.png").write_bytes(b"not a png")  # a message names it whole
    code, text = cli(["predict", "--ckpt", runs / "ft", "--images", tmp_path / "data" / "c", "--out",
                      tmp_path / "q.csv", "--workers", "0"], capsys)
    assert code == 2 and "two\nlines.png" in text and "cannot be read" in text, text


def test_a_link_to_nowhere_is_named_as_an_unreadable_image_not_skipped(runs, tmp_path, capsys):
    folder = write_folder(tmp_path / "new", ("a",), 3) / "a"
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    code, text = cli(["predict", "--ckpt", runs / "ft", "--images", folder, "--out", tmp_path / "p.csv", "--workers",
                      "0"], capsys)
    assert code == 2 and "gone.png" in text and "1 of the 4 images cannot be read" in text, text
    assert len(list(csv.reader(open(tmp_path / "p.csv")))) == 1 + 3  # the others are predicted


def test_a_closed_standard_output_ends_the_command_quietly_as_unix_tools_do(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    proc = subprocess.Popen([sys.executable, str(HERE / "cass.py"), *PRETRAIN, "--data", "folder", "--root",
                             str(root), "--epochs", "20", "--out", str(tmp_path / "r")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=HERE)
    proc.stdout.readline()  # `| head -1`: one line, then the reader goes
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 128 + signal.SIGPIPE and "error" not in stderr and "Traceback" not in stderr, \
        stderr


INTERRUPTED = {  # command: Ctrl-C inside it says what that command does next, never a flag it refuses
    "predict": lambda r, t: ["predict", "--ckpt", r / "ft", "--images", r / "data", "--out", t / "p.csv",
                             "--workers", "0"],
    "evaluate": lambda r, t: ["evaluate", "--ckpt", r / "ft", "--workers", "0", "--device", "cpu"],
}


@pytest.mark.parametrize("command", INTERRUPTED)
def test_ctrl_c_advises_only_what_the_command_takes(command, runs, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cass, "ensemble_probabilities", interrupt)
    code, text = cli(INTERRUPTED[command](runs, tmp_path), capsys)
    assert code == 130 and "interrupted" in text and "--resume" not in text, text


def _sigterm_inside(monkeypatch, owner, name, when=lambda *a, **k: True, surfaces_as=None):
    """`owner.name` sends this process SIGTERM (what a scheduler sends) when `when(...)` holds, then goes on; with
    `surfaces_as`, the code it interrupts reports the signal as that error (as torch.save's C++ writer does)."""
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except KeyboardInterrupt:
                if surfaces_as is None:
                    raise
                raise surfaces_as from None
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapped)


SIGTERM_PHASES = {  # phase: (extra flags, what receives the signal)
    "decoding the cache": (["--cache-images"], lambda m: _sigterm_inside(m, cass, "decode_image")),
    "an epoch": ([], lambda m: _sigterm_inside(m, cass, "objective")),
    "the monitor": ([], lambda m: _sigterm_inside(m, cass, "encode")),
    "writing last.pt": ([], lambda m: _sigterm_inside(m, cass.torch, "save", lambda obj, f: "format" in obj)),
    "writing the encoders": (["--epochs", "1"], lambda m: _sigterm_inside(
        m, cass.torch, "save", lambda obj, f: obj.get("format") == "cass-encoder")),
    "writing last.pt, the signal reported by torch.save as its own error": ([], lambda m: _sigterm_inside(
        m, cass.torch, "save", lambda obj, f: "format" in obj, RuntimeError("[enforce fail at inline_container.cc]"))),
}


@pytest.mark.parametrize("phase", SIGTERM_PHASES)
def test_sigterm_in_every_phase_is_exit_143_one_sentence_and_no_half_file(phase, tmp_path, monkeypatch, capsys):
    flags, arm = SIGTERM_PHASES[phase]
    root = write_folder(tmp_path / "d", n=8)
    arm(monkeypatch)
    code, text = cli([*PRETRAIN, "--data", "folder", "--root", root, "--epochs", "2", *flags, "--cache-dir",
                      tmp_path / "cache", "--out", tmp_path / "r"], capsys)  # a half-written cache is a half file too
    err = text.strip().splitlines()[-1]
    assert code == 143 and err.startswith("error: interrupted") and "Traceback" not in text, text
    assert not list(tmp_path.rglob(".*.tmp*")) and not (tmp_path / "r" / "cnn.pt").exists()
