"""Tests of cass.py: each name states a property of the method or the program.

Fixtures are tiny images written into tmp_path; runs use small encoders at 32 px on the CPU.
Tests on the real images in ../shared/data skip when that folder is absent.
"""
import csv
import json
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
PRETRAIN = ["pretrain", *TINY, "--out-dim", "16", "--monitor-size", "16"]
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


def write_npz(path, label_shape="flat", n=(24, 6, 6), multilabel=False):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        y = np.arange(k) % 3
        arrays[f"{split}_images"] = (rng.random((k, 12, 12)) * 255).astype(np.uint8)
        if multilabel:
            arrays[f"{split}_labels"] = np.eye(3, dtype=np.int64)[y] | np.eye(3, dtype=np.int64)[(y + 1) % 3]
        else:
            arrays[f"{split}_labels"] = y if label_shape == "flat" else y[:, None]
    np.savez(path, **arrays)
    return Path(path)


def run(args, timeout=600, env=None):
    """cass.py as a user runs it: a subprocess, its exit status and its output."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, str(HERE / "cass.py"), *args], capture_output=True, text=True,
                       timeout=timeout, env=full_env, cwd=HERE)
    return p.returncode, p.stdout + p.stderr


def cli(args, capsys):
    """cass.main in this process (no interpreter start-up): exit status and what it printed."""
    capsys.readouterr()
    code = cass.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def small_pair(out_dim=16, cnn="resnet18"):
    torch.manual_seed(0)
    cfg = dict(cnn=cnn, vit="vit_tiny_patch16_224", img_size=32, patch_size=8, out_dim=out_dim,
               pretrained=False, cnn_weights=None, vit_weights=None)
    cnn_m, vit_m, _, _ = cass.build_pair(cfg)
    return cnn_m, vit_m


def read_log(path):
    return [json.loads(line) for line in open(path)]


# ------------------------------------------------------------------------------------------
# the CASS loss (eq. 1)
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


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_both_encoders_emit_outputs_of_the_same_shape(preset):
    p = {**cass.PRESETS["paper"], **cass.PRESETS[preset], "pretrained": False, "cnn_weights": None,
         "vit_weights": None}
    cnn, vit, _, _ = cass.build_pair(p)
    x = torch.zeros(1, 3, p["img_size"], p["img_size"])
    with torch.no_grad():
        assert cnn.eval()(x).shape == vit.eval()(x).shape == (1, p["out_dim"])


def test_one_batch_overfits():
    cnn, vit = small_pair()
    rt = cass.Runtime(torch.device("cpu"))
    opt = cass.make_adam(list(cnn.parameters()) + list(vit.parameters()), 1e-3)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    first = None
    for _ in range(40):
        loss, _, _ = cass.pretrain_step(cnn, vit, x, opt, rt.scaler(), rt)
        first = first if first is not None else float(loss)
    assert first > 0.5 and float(loss) < 0.05


def test_collapse_monitor_reports_spread_and_near_zero_when_outputs_are_constant():
    torch.manual_seed(0)
    spread = cass.output_spread(torch.randn(4096, 64))
    assert spread == pytest.approx(1 / 8, rel=0.05)  # 1/sqrt(64)
    constant = torch.ones(100, 64) + 1e-4 * torch.randn(100, 64)
    assert cass.output_spread(constant) < 1e-3


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
    rt = cass.Runtime(torch.device("cpu"))
    opt = cass.make_adam(list(cnn.parameters()) + list(vit.parameters()), 1e-3)
    swa = torch.optim.swa_utils.AveragedModel(cnn)
    torch.manual_seed(1)
    batches = [torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8) for _ in range(3)]
    for x in batches:  # three "epochs", averaged after each
        cass.pretrain_step(cnn, vit, x, opt, rt.scaler(), rt)
        swa.update_parameters(cnn)
    stale = swa.module.bn1.running_mean.clone()
    loader = [(x, None) for x in batches]
    cass.recompute_batchnorm(swa, loader, rt)
    last = dict(cnn.named_parameters())
    assert any(not torch.allclose(p, last[n]) for n, p in swa.module.named_parameters())
    # recomputed: bn1's running mean is the mean of its input under the averaged weights
    seen = []
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
    "medmnist_flat": lambda t: ("medmnist", write_npz(t / "m.npz"), 3, False),
    "medmnist_column": lambda t: ("medmnist", write_npz(t / "m.npz", "column"), 3, False),
    "medmnist_multilabel": lambda t: ("medmnist", write_npz(t / "m.npz", multilabel=True), 3, True),
    "digits": lambda t: ("digits", None, 10, False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_data_layout_loads_and_yields_three_channel_images(layout, tmp_path):
    data, root, n_classes, multilabel = LAYOUTS[layout](tmp_path)
    table = cass.load_table(data, root)
    assert len(table.classes) == n_classes and table.multilabel == multilabel
    splits = cass.make_splits(table, seed=0)
    assert splits["train"] and splits["val"] and splits["test"]
    ds = cass.ImageDataset(table, splits["train"][:3], 32, cass.cass_augment())
    x, y = ds[(0, 123)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y.shape == (n_classes,)


def test_csv_without_labels_is_usable_for_pretraining(tmp_path):
    write_folder(tmp_path / "imgs", ("x",), 10)
    write_csv(tmp_path / "u.csv", [["image"]] + [[f"imgs/x/x_{i}.png"] for i in range(10)])
    table = cass.load_table("csv", tmp_path / "u.csv")
    splits = cass.make_splits(table)
    assert len(splits["train"]) == 10 and not table.labels
    code, out = run([*PRETRAIN, "--data", "csv", "--root", str(tmp_path / "u.csv"), "--epochs", "1",
                     "--out", str(tmp_path / "run")])
    assert code == 0, out
    assert (tmp_path / "run" / "cnn.pt").exists()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16"])
def test_grey_rgb_rgba_and_16_bit_images_become_rgb_uint8(mode, tmp_path):
    if mode == "I;16":
        img = Image.fromarray((np.arange(20 * 20).reshape(20, 20) * 150).astype(np.uint16))
    else:
        img = class_image(1, 0, 20, mode)
    (tmp_path / "k" / "c").mkdir(parents=True)
    (tmp_path / "k" / "d").mkdir(parents=True)
    img.save(tmp_path / "k" / "c" / "a.png")
    img.save(tmp_path / "k" / "d" / "b.png")
    table = cass.load_table("folder", tmp_path / "k")
    x = cass.decode_image(table, "c/a.png", 16)
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
    fresh = cass.make_splits(table, 0)
    folder = HERE / "data_splits" / "digits"
    for name, keys in fresh.items():
        assert cass.read_split(table, folder, name) == keys


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("data,listing,total", [("brain_mri", "brain_mri_kaggle_files.txt", 7023),
                                                ("isic2019", "isic2019_full_GroundTruth.csv", 25331)])
def test_committed_splits_cover_the_full_public_datasets(data, listing, total, tmp_path):
    code, out = run(["splits", "--data", data, "--listing", str(SHARED / listing), "--out", str(tmp_path)])
    assert code == 0, out
    for name in ("train", "val", "test", "train_10pct", "train_1pct"):
        assert (tmp_path / f"{name}.csv").read_text() == (HERE / "data_splits" / data / f"{name}.csv").read_text()
    n = sum(len((tmp_path / f"{s}.csv").read_text().splitlines()) - 1 for s in ("train", "val", "test"))
    assert n == total


def test_brain_mri_test_split_is_the_curators_testing_folder(tmp_path):
    table = cass.load_table("brain_mri", write_brain_mri(tmp_path / "b"))
    splits = cass.make_splits(table)
    assert all(k.startswith("Testing/") for k in splits["test"]) and len(splits["test"]) == 12
    assert all(k.startswith("Training/") for k in splits["train"] + splits["val"])


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


def test_imagenet_weights_without_network_fail_fast_with_one_sentence(tmp_path):
    t0 = time.time()
    # A closed local port stands in for the hub, so the test never depends on the network.
    code, out = run([*PRETRAIN, "--pretrained", "--epochs", "1", "--out", str(tmp_path / "r")],
                    env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    assert time.time() - t0 < 30
    assert code == 2
    assert "--no-pretrained" in out and "--cnn-weights" in out and "Traceback" not in out


# ------------------------------------------------------------------------------------------
# pretrain end to end
# ------------------------------------------------------------------------------------------


def test_pretrain_writes_every_output_and_encoders_rebuild_with_timm(tmp_path):
    import timm

    root = write_folder(tmp_path / "data", n=8)
    code, out = run([*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "2", "--swa-start", "1",
                     "--out", str(tmp_path / "run")])
    assert code == 0, out
    run_dir = tmp_path / "run"
    for name in ("args.json", "log.jsonl", "last.pt", "cnn.pt", "vit.pt", "splits/train.csv"):
        assert (run_dir / name).exists(), name
    log = read_log(run_dir / "log.jsonl")
    epochs = [r for r in log if r.get("phase") != "init"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for key in ("loss", "lr", "seconds", "images_per_s", "std_cnn", "std_vit", "knn_cnn_feat"):
        assert key in epochs[0]
    assert "epoch   2/2" in out
    # the three lines the README shows
    ck = torch.load(run_dir / "cnn.pt", weights_only=True)
    model = timm.create_model(ck["model"], num_classes=ck["num_classes"], **ck["kwargs"])
    model.load_state_dict(ck["state_dict"])
    assert ck["model"] == "resnet18" and model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 16)
    vit = torch.load(run_dir / "vit.pt", weights_only=True)
    assert vit["kwargs"] == {"img_size": 32, "patch_size": 8}


def test_tiny_preset_overrides_paper_defaults_and_flags_override_the_preset():
    args = cass.build_parser().parse_args(["pretrain", "--preset", "tiny", "--img-size", "48"])
    cfg = cass.resolve_config(args, "pretrain")
    assert cfg["cnn"] == "resnet18" and cfg["img_size"] == 48 and cfg["pretrained"] is False
    paper = cass.resolve_config(cass.build_parser().parse_args(["pretrain"]), "pretrain")
    assert (paper["cnn"], paper["vit"], paper["img_size"], paper["batch_size"], paper["epochs"], paper["lr"]) == \
        ("resnet50", "vit_base_patch16_384", 384, 16, 100, 1e-3)


@pytest.mark.skipif(not (SHARED / "brain_mri_224").is_dir(), reason="../shared/data is absent")
def test_committed_brain_mri_splits_name_the_missing_files_on_the_partial_copy(tmp_path):
    code, out = run([*PRETRAIN, "--data", "brain_mri", "--root", str(SHARED / "brain_mri_224"), "--epochs", "1",
                     "--out", str(tmp_path / "r")])
    assert code == 2 and "4 of the 5140 images" in out and "--splits auto" in out


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
    inv = cass.class_weights(counts, "inverse")
    paper = cass.class_weights(counts, "paper")
    assert inv.argmax() == 1 and inv.argmin() == 0
    assert paper.argmax() == 0 and paper.argmin() == 1
    assert paper[0].item() == pytest.approx(1.0) and paper[1].item() == pytest.approx(0.2)
    assert cass.class_weights(counts, "none") is None


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
    assert got["per_class"]["b"]["recall"] == pytest.approx(M.recall_score(y, pred, average=None)[1])


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
    assert got["per_label_f1"]["r"] == pytest.approx(M.f1_score(y[:, 2], pred[:, 2]))


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    stopper = cass.EarlyStopping(patience=2)
    stopped_at = None
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.71, 0.6], start=1):
        stopper.step(loss, epoch)
        if stopper.should_stop:
            stopped_at = epoch
            break
    assert stopped_at == 6 and stopper.best_epoch == 4 and stopper.best == 0.7


def test_one_batch_fine_tune_overfits():
    cnn, _ = small_pair()
    cnn.reset_classifier(3)
    rt = cass.Runtime(torch.device("cpu"))
    opt = cass.make_adam(cnn.parameters(), 3e-3)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    y = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])]
    for _ in range(40):
        loss = cass.supervised_step(cnn, x, y, opt, rt.scaler(), None, rt, cass.normalize)
    assert float(loss) < 0.01
    cnn.eval()
    assert (cnn(cass.normalize(x)).argmax(1) == y.argmax(1)).all()


def test_linear_mode_leaves_the_encoder_unchanged_while_the_head_learns(tmp_path):
    root = write_folder(tmp_path / "data", n=10)
    cass.main([*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "1", "--out", str(tmp_path / "p")])
    assert cass.main([*FINETUNE, "--data", "folder", "--root", str(root), "--splits", str(tmp_path / "p" / "splits"),
                      "--init", str(tmp_path / "p"), "--arm", "cnn", "--mode", "linear", "--epochs", "5",
                      "--lr", "1e-2", "--out", str(tmp_path / "f")]) == 0
    before = torch.load(tmp_path / "p" / "cnn.pt", weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "f" / "best.pt", weights_only=True)["state_dict"]
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
    written = json.load(open(tmp_path / "c" / "metrics.json"))["test"]
    again = json.load(open(tmp_path / "e.json"))
    for key in ("accuracy", "f1_macro", "balanced_accuracy", "confusion_matrix"):
        assert again[key] == written[key]
    assert again["roc_auc_ovr"] == pytest.approx(written["roc_auc_ovr"], abs=1e-6)
    assert cass.main(["evaluate", "--ckpt", str(tmp_path / "c" / "best.pt"), "--ckpt", str(tmp_path / "v" / "best.pt"),
                      "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "ens.json")]) == 0
    ens = json.load(open(tmp_path / "ens.json"))
    assert len(ens["ckpts"]) == 2 and 0 <= ens["f1_macro"] <= 1


def test_multilabel_fine_tune_on_tiff_tiles(tmp_path):
    root = write_autoimmune(tmp_path / "a", n=30)
    assert cass.main([*FINETUNE, "--data", "autoimmune", "--root", str(root), "--init", "random", "--arm", "cnn",
                      "--epochs", "1", "--out", str(tmp_path / "f")]) == 0
    metrics = json.load(open(tmp_path / "f" / "metrics.json"))
    assert metrics["headline"] == "f1_macro" and "f1_samples" in metrics["test"]


def test_pretrain_then_finetune_at_ten_percent_then_evaluate_as_a_user_would(tmp_path):
    root = write_folder(tmp_path / "data", n=30)  # 10% of the 24 training images per class
    common = ["--data", "folder", "--root", str(root)]
    code, out = run([*PRETRAIN, *common, "--epochs", "1", "--out", str(tmp_path / "p")])
    assert code == 0, out
    code, out = run([*FINETUNE, *common, "--splits", str(tmp_path / "p" / "splits"), "--init", str(tmp_path / "p"),
                     "--arm", "vit", "--label-fraction", "0.1", "--out", str(tmp_path / "f")])
    assert code == 0, out
    assert "train_10pct" in out
    code, out = run(["evaluate", "--ckpt", str(tmp_path / "f" / "best.pt"), "--device", "cpu"])
    assert code == 0 and "f1_macro" in out, out


# ------------------------------------------------------------------------------------------
# interrupted runs: resume, kill -9, Ctrl-C, existing run folders
# ------------------------------------------------------------------------------------------


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _epoch_losses(path):
    return [r["loss"] for r in read_log(path) if r.get("phase") != "init"]


def test_two_epochs_equal_one_epoch_plus_resume_and_same_seed_runs_are_identical(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    common = [*PRETRAIN, "--data", "folder", "--root", str(root), "--splits", "auto", "--swa-start", "1"]
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "b")]) == 0
    assert cass.main([*common, "--epochs", "1", "--out", str(tmp_path / "c")]) == 0
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "c"), "--resume"]) == 0
    assert _epoch_losses(tmp_path / "a" / "log.jsonl") == _epoch_losses(tmp_path / "b" / "log.jsonl")
    assert _epoch_losses(tmp_path / "a" / "log.jsonl") == _epoch_losses(tmp_path / "c" / "log.jsonl")
    for arm in ("cnn.pt", "vit.pt"):
        a, c = _state(tmp_path / "a" / arm), _state(tmp_path / "c" / arm)
        assert all(torch.equal(a[k], c[k]) for k in a), arm


def test_finetune_resume_gives_the_same_weights(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    common = [*FINETUNE, "--data", "folder", "--root", str(root), "--splits", "auto", "--init", "random"]
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert cass.main([*common, "--epochs", "1", "--out", str(tmp_path / "c")]) == 0
    assert cass.main([*common, "--epochs", "2", "--out", str(tmp_path / "c"), "--resume"]) == 0
    a, c = _state(tmp_path / "a" / "best.pt"), _state(tmp_path / "c" / "best.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert [r["val_loss"] for r in read_log(tmp_path / "a" / "log.jsonl")] == \
        [r["val_loss"] for r in read_log(tmp_path / "c" / "log.jsonl")]


def _start(args):
    return subprocess.Popen([sys.executable, str(HERE / "cass.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=HERE)


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
    code, text = run([*args, "--resume", "--epochs", str(ck["epoch"] + 1)])
    assert code == 0, text
    epochs = [r["epoch"] for r in read_log(out / "log.jsonl")]
    assert epochs == list(range(0, ck["epoch"] + 2))  # no epoch logged twice
    assert (out / "cnn.pt").exists()


def test_ctrl_c_stops_after_the_step_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    root = write_folder(tmp_path / "data", n=8)
    out = tmp_path / "run"
    args = [*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "30", "--out", str(out)]
    proc = _start(args)
    _wait_for(lambda: (out / "log.jsonl").exists() and len(read_log(out / "log.jsonl")) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, text
    assert "--resume" in text and "Traceback" not in text
    ck = torch.load(out / "last.pt", weights_only=True)
    code, text = run([*args, "--resume", "--epochs", str(ck["epoch"] + 1)])
    assert code == 0, text


def test_an_existing_run_folder_is_never_overwritten_silently(tmp_path, capsys):
    root = write_folder(tmp_path / "data", n=8)
    args = [*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "1", "--out", str(tmp_path / "r")]
    assert cass.main(args) == 0
    before = (tmp_path / "r" / "cnn.pt").read_bytes()
    code, text = cli(args, capsys)
    assert code == 2 and "--resume" in text and "--overwrite" in text
    assert (tmp_path / "r" / "cnn.pt").read_bytes() == before


# ------------------------------------------------------------------------------------------
# bad input: one sentence naming the culprit, exit status 2, no traceback
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
    return ["--data", "csv", "--root", str(t / "x.csv")], "must hold 0 or 1"


def _bad_csv_missing_images(t):
    write_folder(t / "imgs", ("x",), 10)
    write_csv(t / "x.csv", [["image"]] + [[f"imgs/x/x_{i}.png"] for i in range(10)] +
              [[f"imgs/x/gone_{i}.png"] for i in range(5)])
    return ["--data", "csv", "--root", str(t / "x.csv")], "5 of the"


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
    "csv lists missing images": _bad_csv_missing_images,
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
    args = [*PRETRAIN, "--epochs", "1", "--out", str(tmp_path / "run"), *fixture, *extra]
    code, out = cli(args, capsys)
    assert code == 2, out
    assert expected in out and "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("error: ")


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


def _bad_init_arm(t):
    root = write_folder(t / "p_data")
    cass.main([*PRETRAIN, "--data", "folder", "--root", str(root), "--epochs", "1", "--out", str(t / "p")])
    return ["--init", str(t / "p" / "vit.pt"), "--arm", "cnn"], "holds the vit arm"


def _bad_one_class(t):
    root = write_folder(t / "one", ("only",), 12)
    return ["--data", "folder", "--root", str(root), "--init", "random"], "at least two"


BAD_FINETUNE = {
    "label fraction above 1": lambda t: (["--label-fraction", "1.5", "--init", "random"], "outside (0, 1]"),
    "label fraction 0": lambda t: (["--label-fraction", "0", "--init", "random"], "outside (0, 1]"),
    "init not written by cass": _bad_init_foreign,
    "init of the other arm": _bad_init_arm,
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


def test_evaluate_refuses_a_checkpoint_for_another_class_count_or_program(tmp_path, capsys):
    root = write_folder(tmp_path / "d", n=10)
    assert cass.main([*FINETUNE, "--data", "folder", "--root", str(root), "--splits", "auto", "--init", "random",
                      "--epochs", "1", "--out", str(tmp_path / "f")]) == 0
    other = write_folder(tmp_path / "other", ("p", "q"), 10)
    code, out = cli(["evaluate", "--ckpt", tmp_path / "f" / "best.pt", "--data", "folder", "--root", other,
                     "--splits", "auto"], capsys)
    assert code == 2 and "3 classes" in out and "has 2" in out, out
    code, out = cli(["evaluate", "--ckpt", tmp_path / "f" / "args.json"], capsys)
    assert code == 2 and "args.json" in out and "Traceback" not in out, out


# ------------------------------------------------------------------------------------------
# data-parallel training (DDP, gloo on the CPU)
# ------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import sys, types, torch
sys.path.insert(0, {here!r})
import cass
rt = cass.make_runtime("cpu", "fp32")
torch.manual_seed(0)
cnn, vit, _, _ = cass.build_pair(dict(cnn="convnext_atto", vit="vit_tiny_patch16_224", img_size=32, patch_size=8,
                                      out_dim=16, pretrained=False, cnn_weights=None, vit_weights=None))
ddp_cnn, ddp_vit = cass.wrap_ddp(cnn, rt), cass.wrap_ddp(vit, rt)
images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
dataset = cass.FeatureDataset(images, torch.zeros(32, 1))
init = {{**{{"cnn." + k: v.clone() for k, v in cnn.state_dict().items()}}, **{{"vit." + k: v.clone() for k, v in vit.state_dict().items()}}}}
torch.save(init, sys.argv[1] + "/init.pt")
sampler = cass.EpochSampler(32, 8, 0, rank=rt.rank, world=rt.world)
loader = cass.make_loader(dataset, sampler, 8 // rt.world, 0, rt)
optimizer = cass.make_adam(list(cnn.parameters()) + list(vit.parameters()), 1e-3)
for epoch in range(2):
    sampler.set_epoch(epoch)
    cass.pretrain_one_epoch(ddp_cnn, ddp_vit, loader, optimizer, rt.scaler(), None, rt, dict(sched_unit="epoch"),
                            epoch, cass.new_accumulators(), types.SimpleNamespace(requested=False))
state = {{**{{"cnn." + k: v for k, v in cnn.state_dict().items()}}, **{{"vit." + k: v for k, v in vit.state_dict().items()}}}}
torch.save(state, sys.argv[1] + f"/rank{{rt.rank}}.pt")
"""


def _torchrun(args, n=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args],
                       capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
    return p.returncode, p.stdout + p.stderr


def _max_difference(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


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
    single = torch.load(tmp_path / "one" / "rank0.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the replicas in lockstep
    # Equal up to float rounding (Adam divides by sqrt(v), so rounding in near-zero gradients
    # shows up as differences of up to ~lr in single weights; the update as a whole agrees).
    assert _relative_update_difference(r0, single, torch.load(tmp_path / "one" / "init.pt")) < 1e-3


def test_torchrun_pretrain_matches_a_single_process_run(tmp_path):
    root = write_folder(tmp_path / "d", n=8)
    args = [*PRETRAIN, "--cnn", "convnext_atto", "--data", "folder", "--root", str(root), "--splits", "auto",
            "--epochs", "2", "--monitor-every", "0"]
    code, out = _torchrun([str(HERE / "cass.py"), *args, "--out", str(tmp_path / "ddp")])
    assert code == 0, out
    code, out = run([*args, "--out", str(tmp_path / "single")])
    assert code == 0, out
    for arm in ("cnn.pt", "vit.pt"):
        assert _max_difference(_state(tmp_path / "ddp" / arm), _state(tmp_path / "single" / arm)) < 2e-3
    ddp_loss = _epoch_losses(tmp_path / "ddp" / "log.jsonl")
    assert ddp_loss == pytest.approx(_epoch_losses(tmp_path / "single" / "log.jsonl"), rel=1e-4)


# ------------------------------------------------------------------------------------------
# later additions: unlabelled rows, encoder files of another architecture, forced collapse
# ------------------------------------------------------------------------------------------


def test_a_multilabel_csv_may_leave_some_images_unlabelled(tmp_path):
    write_folder(tmp_path / "imgs", ("x",), 12)
    rows = [["image", "p", "q"]] + [[f"imgs/x/x_{i}.png", str(i % 2), "1"] for i in range(8)]
    rows += [[f"imgs/x/x_{i}.png", "", ""] for i in range(8, 12)]
    write_csv(tmp_path / "m.csv", rows)
    table = cass.load_table("csv", tmp_path / "m.csv")
    assert len(table.keys) == 12 and len(table.labels) == 8
    splits = cass.make_splits(table)
    assert {f"imgs/x/x_{i}.png" for i in range(8, 12)} <= set(splits["train"])


def test_an_encoder_file_of_another_architecture_is_refused_and_a_matching_one_loads(tmp_path):
    import timm

    model = timm.create_model("resnet18", num_classes=16)
    torch.save(cass.encoder_record(model, "resnet18", {}, "cnn", {}), tmp_path / "cnn.pt")
    with pytest.raises(cass.UserError, match="holds a resnet18"):
        cass.create_encoder("resnet34", 16, {}, weights=tmp_path / "cnn.pt")
    same = cass.create_encoder("resnet18", 16, {}, weights=tmp_path / "cnn.pt")
    assert torch.equal(same.conv1.weight, model.conv1.weight)


def test_the_monitor_reports_near_zero_spread_when_both_arms_collapse(tmp_path):
    cnn, vit = small_pair()
    with torch.no_grad():  # every image gets the same output: the head's bias
        cnn.fc.weight.zero_()
        vit.head.weight.zero_()
    table = cass.load_table("folder", write_folder(tmp_path / "d", n=6))
    splits = cass.make_splits(table)
    loaders = {s: torch.utils.data.DataLoader(cass.ImageDataset(table, splits[s], 32), batch_size=8)
               for s in ("train", "val")}
    m = cass.monitor(cnn, vit, loaders, cass.Runtime(torch.device("cpu")))
    assert m["val_std_cnn"] < 1e-6 and m["val_std_vit"] < 1e-6
    healthy = cass.monitor(*small_pair(), loaders, cass.Runtime(torch.device("cpu")))
    assert healthy["val_std_cnn"] > 100 * m["val_std_cnn"] + 1e-4


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


def test_protocol_runs_the_grid_writes_a_table_and_does_not_rerun_finished_cells(tmp_path, capsys):
    root = write_folder(tmp_path / "d", n=10)
    args = ["protocol", *TINY, "--out-dim", "16", "--data", "folder", "--root", root, "--epochs", "1",
            "--arms", "cnn", "--inits", "cass", "random", "random-bn", "--modes", "linear", "--fractions", "1.0",
            "--seeds", "2", "--ft-epochs-grid", "1", "--out", tmp_path / "p"]
    code, out = cli(args, capsys)
    assert code == 0, out
    table = json.load(open(tmp_path / "p" / "table.json"))
    assert {(r["init"], r["n"]) for r in table["rows"]} == {("cass", 2), ("random", 2), ("random-bn", 2)}
    assert "| 100% | cnn | cass | linear |" in (tmp_path / "p" / "table.md").read_text()
    code, out = cli(args, capsys)  # everything finished: nothing is trained again
    assert code == 0 and "[1/6]" not in out and "fine-tuning resnet" not in out, out
    assert "6 fine-tuning runs" in (tmp_path / "p" / "table.md").read_text()
    assert json.load(open(tmp_path / "p" / "table.json"))["pretrain_minutes"] > 0  # also when nothing ran again


def test_protocol_grid_skips_the_bn_control_in_full_mode_and_takes_its_own_seeds_at_100_percent():
    cfg = dict(arms=["cnn", "vit"], inits=["cass", "random", "random-bn"], modes=["full", "linear"],
               fractions=[0.1, 1.0], seeds=3, seeds_full=1)
    cells = list(cass.protocol_cells(cfg, imagenet_ok=False))
    assert not [c for c in cells if c["init"] == "random-bn" and (c["mode"] == "full" or c["arm"] == "vit")]
    assert {c["seed"] for c in cells if c["fraction"] == 1.0} == {0}
    assert {c["seed"] for c in cells if c["fraction"] == 0.1} == {0, 1, 2}
    assert len(cells) == (2 + 2 + 1 + 2 + 2) * (3 + 1)  # cnn full/linear x2 inits + bn linear; vit 2x2
    cells = list(cass.protocol_cells({**cfg, "modes_full": ["linear"]}, imagenet_ok=False))
    assert {c["mode"] for c in cells if c["fraction"] == 1.0} == {"linear"}
    assert {c["mode"] for c in cells if c["fraction"] == 0.1} == {"full", "linear"}


def test_a_cell_lock_held_by_a_live_process_is_respected_and_a_dead_ones_taken_over(tmp_path):
    lock = tmp_path / "cell.lock"
    assert cass.claim(lock) == lock and lock.read_text() == str(os.getpid())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(other.pid))
        assert cass.claim(lock) is None  # alive: another process runs this cell
    finally:
        other.kill()
        other.wait()
    assert cass.claim(lock) == lock and lock.read_text() == str(os.getpid())  # dead: taken over


def test_cached_finetune_decodes_each_split_once_and_changes_nothing(tmp_path):
    root = write_folder(tmp_path / "d", n=6)
    common = [*FINETUNE, "--data", "folder", "--root", str(root), "--splits", "auto", "--init", "random",
              "--arm", "cnn", "--mode", "linear"]
    cass._DECODED.clear()
    assert cass.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert not cass._DECODED
    assert cass.main([*common, "--cache-images", "--out", str(tmp_path / "cached")]) == 0
    remembered = dict(cass._DECODED)
    assert len(remembered) == 3  # train, val, test
    assert cass.main([*common, "--cache-images", "--seed", "1", "--out", str(tmp_path / "again")]) == 0
    assert all(cass._DECODED[k] is v for k, v in remembered.items())  # reused, not decoded again
    losses = [[r["train_loss"] for r in read_log(tmp_path / d / "log.jsonl")] for d in ("plain", "cached")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    auc = [json.load(open(tmp_path / d / "metrics.json"))["test"]["roc_auc_ovr"] for d in ("plain", "cached")]
    assert auc[0] == pytest.approx(auc[1], rel=1e-6)
    cass._DECODED.clear()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    x = cass.normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    grads = []
    for checkpointing in (False, True):
        cnn, vit = small_pair()
        cnn.set_grad_checkpointing(checkpointing)
        vit.set_grad_checkpointing(checkpointing)
        loss = cass.cass_loss(cnn(x), vit(x))
        loss.backward()
        grads.append((float(loss.detach()), cnn.conv1.weight.grad.clone(), vit.patch_embed.proj.weight.grad.clone()))
    (l0, c0, v0), (l1, c1, v1) = grads
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert torch.allclose(c0, c1, rtol=1e-4, atol=1e-6) and torch.allclose(v0, v1, rtol=1e-4, atol=1e-6)


def test_torchrun_finetune_matches_a_single_process_run(tmp_path):
    root = write_folder(tmp_path / "d", n=10)
    args = [*FINETUNE, "--cnn", "convnext_atto", "--data", "folder", "--root", str(root), "--splits", "auto",
            "--init", "random", "--arm", "cnn", "--epochs", "2"]
    code, out = _torchrun([str(HERE / "cass.py"), *args, "--out", str(tmp_path / "ddp")])
    assert code == 0, out
    code, out = run([*args, "--out", str(tmp_path / "single")])
    assert code == 0, out
    assert _max_difference(_state(tmp_path / "ddp" / "best.pt"), _state(tmp_path / "single" / "best.pt")) < 2e-3
    losses = [[r["train_loss"] for r in read_log(tmp_path / d / "log.jsonl")] for d in ("ddp", "single")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_bench_prints_a_table_and_the_same_numbers_as_json_on_its_last_line(tmp_path, capsys):
    root = write_folder(tmp_path / "d", n=8)
    code, out = cli(["bench", *TINY, "--out-dim", "16", "--steps", "1", "--warmup", "0", "--data", "folder",
                     "--root", root, "--splits", "auto"], capsys)
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("images_per_s", "plain_images_per_s", "speedup", "flops_per_step", "peak_memory_mb",
                "data_images_per_s", "bottleneck"):
        assert key in result
    assert result["flops_per_step"] > 0 and result["speedup"] == pytest.approx(
        result["images_per_s"] / result["plain_images_per_s"], rel=1e-6)
    assert "speed-up" in out and "data pipeline" in out
    assert 0 < result["fraction_of_matmul_peak"] and result["matmul_peak_flops"] > 0
    code, out = cli(["bench", *TINY, "--max-batch"], capsys)
    assert code == 2 and "--max-batch searches GPU memory and needs --device cuda" in out, out


def test_largest_batch_doubles_then_bisects_to_the_exact_limit(monkeypatch):
    tried = []

    def fake_step(cfg, rt, plain, count_flops=True):
        tried.append(cfg["batch_size"])
        if cfg["batch_size"] > 37:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return 0.1, None, 0.0

    monkeypatch.setattr(cass, "bench_step", fake_step)
    assert cass.largest_batch({"batch_size": 16}, rt=None) == 37
    assert tried[:3] == [16, 32, 64] and len(tried) <= 3 + 5


def test_step_statistics_equal_the_monitor_and_the_cosine():
    r, t = torch.randn(16, 8), torch.randn(16, 8)
    std_r, std_t, cos = cass.step_stats(r, t)
    assert std_r == pytest.approx(cass.output_spread(r), rel=1e-5)
    assert std_t == pytest.approx(cass.output_spread(t), rel=1e-5)
    assert cos == pytest.approx(float(F.cosine_similarity(r, t, dim=-1).mean()), rel=1e-5)
