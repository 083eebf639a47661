"""Tests of the tools beside cass.py: tools/protocol.py, tools/bench.py and tools/dino.py (the comparator)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_cass import CPU, TINY, read_log, write_folder

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tools"))
import bench  # noqa: E402
import cass  # noqa: E402
import dino  # noqa: E402
import explain  # noqa: E402
import export  # noqa: E402
import plot  # noqa: E402
import protocol  # noqa: E402
import medmnist  # noqa: E402
import splits  # noqa: E402


def test_protocol_runs_the_grid_writes_a_table_and_does_not_rerun_finished_cells(tmp_path, capsys):
    root = write_folder(tmp_path / "d", n=10)
    args = [*TINY, "--out-dim", "16", "--data", "folder", "--root", root, "--epochs", "1", "--arms", "cnn",
            "--inits", "cass", "dino", "random", "random-bn", "imagenet", "--modes", "linear", "--fractions", "1.0",
            "--prototypes", "256",
            "--seeds", "2", "--ft-epochs-linear", "1", "--out", tmp_path / "p"]
    env_hub = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the hub is unreachable: the imagenet cells are skipped
    try:
        assert protocol.main(args) == 0
    finally:
        os.environ.pop("HF_ENDPOINT") if env_hub is None else os.environ.update(HF_ENDPOINT=env_hub)
    out = capsys.readouterr().out
    assert "skipping the imagenet cells: the Hugging Face hub cannot be reached" in out
    table = json.load(open(tmp_path / "p" / "table.json"))
    assert {(r["init"], r["n"]) for r in table["rows"]} == {("cass", 2), ("dino", 2), ("random", 2), ("random-bn", 2)}
    assert "| 100% | cnn | cass | linear |" in (tmp_path / "p" / "table.md").read_text()
    cell = tmp_path / "p" / "cells" / "cnn-cass-linear-1-seed0"
    assert json.load(open(cell / "args.json"))["splits"] == str(tmp_path / "p" / "pretrain" / "splits")
    dino_run = tmp_path / "p" / "dino"  # both arms, on the CASS run's splits; its cells start from it
    assert json.load(open(dino_run / "args.json"))["splits"] == str(tmp_path / "p" / "pretrain" / "splits")
    assert json.load(open(tmp_path / "p" / "cells" / "cnn-dino-linear-1-seed0" / "args.json"))["init"] == str(dino_run)
    assert protocol.main(args) == 0  # everything finished: nothing is trained again
    out = capsys.readouterr().out
    assert "[1/8]" not in out and "fine-tuning resnet" not in out and "CASS pretraining" not in out, out
    assert "DINO pretraining (" not in out
    assert "8 fine-tuning runs" in (tmp_path / "p" / "table.md").read_text()
    assert json.load(open(tmp_path / "p" / "table.json"))["pretrain_minutes"] > 0


def test_protocol_grid_skips_the_bn_control_in_full_mode_and_takes_its_own_seeds_at_100_percent():
    grid = dict(arms=["cnn", "vit"], inits=["cass", "random", "random-bn"], modes=["full", "linear"],
                fractions=[0.1, 1.0], seeds=3, seeds_full=1, modes_full=None)
    cells = list(protocol.cells(grid, imagenet_ok=False))
    assert not [c for c in cells if c["init"] == "random-bn" and (c["mode"] == "full" or c["arm"] == "vit")]
    assert {c["seed"] for c in cells if c["fraction"] == 1.0} == {0}
    assert {c["seed"] for c in cells if c["fraction"] == 0.1} == {0, 1, 2}
    assert len(cells) == (2 + 2 + 1 + 2 + 2) * (3 + 1)  # cnn full/linear x2 inits + bn linear; vit 2x2
    cells = list(protocol.cells({**grid, "modes_full": ["linear"]}, imagenet_ok=False))
    assert {c["mode"] for c in cells if c["fraction"] == 1.0} == {"linear"}
    assert {c["mode"] for c in cells if c["fraction"] == 0.1} == {"full", "linear"}


def test_bench_prints_a_table_and_the_same_numbers_as_json_on_its_last_line(tmp_path, capsys):
    root = write_folder(tmp_path / "d", n=8)
    assert bench.main([*TINY, "--out-dim", "16", "--steps", "1", "--warmup", "0", "--data", "folder", "--root", root,
                       "--splits", "auto"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("images_per_s", "plain_images_per_s", "speedup", "flops_per_step", "peak_memory_mb",
                "data_images_per_s", "bottleneck", "matmul_peak_flops", "fraction_of_matmul_peak"):
        assert key in result
    assert result["flops_per_step"] > 0 and result["fraction_of_matmul_peak"] > 0
    assert result["speedup"] == pytest.approx(result["images_per_s"] / result["plain_images_per_s"], rel=1e-6)
    assert 0 <= result["loader_wait_seconds"] <= result["loader_seconds"] and result["loader_steps"] >= 1
    assert "waiting for data: the bottleneck is the" in out  # the epoch line's split, over real steps
    assert "speed-up" in out and "data pipeline" in out
    if not torch.cuda.is_available():
        assert bench.main([*TINY, "--max-batch"]) == 2
        assert "--max-batch searches GPU memory and needs --device cuda" in capsys.readouterr().err


def test_largest_batch_doubles_then_bisects_to_the_exact_limit(monkeypatch):
    tried = []

    def fake_step(cfg, rt, plain, count_flops=True):
        tried.append(cfg["batch_size"])
        if cfg["batch_size"] > 37:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return 0.1, None, 0.0

    monkeypatch.setattr(bench, "bench_step", fake_step)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert bench.largest_batch({"batch_size": 16}, rt=None) == 37
    assert tried[:3] == [16, 32, 64] and len(tried) <= 3 + 5


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    x = cass.normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0)))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cnn, vit = cass.build_pair(dict(cnn="resnet18", vit="vit_tiny_patch16_224", img_size=32, patch_size=8,
                                        out_dim=16, pretrained=False, cnn_weights=None, vit_weights=None))
        cnn.set_grad_checkpointing(checkpointing)
        vit.set_grad_checkpointing(checkpointing)
        loss = cass.cass_loss(cnn(x), vit(x))
        loss.backward()
        grads.append((float(loss.detach()), cnn.conv1.weight.grad.clone(), vit.patch_embed.proj.weight.grad.clone()))
    (l0, c0, v0), (l1, c1, v1) = grads
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert torch.allclose(c0, c1, rtol=1e-4, atol=1e-6) and torch.allclose(v0, v1, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# tools/dino.py: the paper's comparator
# ------------------------------------------------------------------------------------------

DINO_CFG = dict(cnn="resnet18", vit="vit_tiny_patch16_224", img_size=32, patch_size=8, pretrained=False,
                cnn_weights=None, vit_weights=None, recipe="vit-pytorch", lr=1e-3, sched_unit="epoch", t_max=16,
                eta_min=1e-6, prototypes=256)


def test_dino_moves_the_teacher_and_the_centre_every_step_and_trains_only_the_student():
    torch.manual_seed(0)
    learner = dino.build_learner(DINO_CFG, "cnn", CPU)
    optimizer = cass.make_adam(learner.student_encoder.parameters(), DINO_CFG["lr"])
    scheduler = cass.cosine_schedule(optimizer, DINO_CFG)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    teacher = lambda: [p.detach().clone() for p in learner.teacher_encoder.parameters()]  # noqa: E731
    assert not any(p.requires_grad for p in learner.teacher_encoder.parameters())
    for _ in range(2):
        before, centre = teacher(), learner.teacher_centers.clone()
        student = [p.detach().clone() for p in learner.student_encoder.parameters()]
        r = dino.dino_epoch(learner, [(x, None)], optimizer, CPU.scaler(), scheduler, CPU, DINO_CFG, "test")
        assert r["steps"] == 1 and r["loss"] > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, teacher())), "the teacher did not move"
        assert not torch.equal(centre, learner.teacher_centers), "the centre did not move"
        assert any(not torch.equal(a, b.detach()) for a, b in zip(student, learner.student_encoder.parameters()))


def test_building_dino_leaves_the_cnns_batchnorm_statistics_as_they_were():
    torch.manual_seed(0)
    fresh = cass.create_encoder(DINO_CFG["cnn"], 0, {})  # the same seed, the network Dino is built around
    torch.manual_seed(0)
    learner = dino.build_learner(DINO_CFG, "cnn", CPU)  # its constructor runs a train-mode pass on noise
    for net in (learner.student_encoder.net, learner.teacher_encoder.net):
        got = dict(net.named_buffers())
        for k, v in fresh.named_buffers():
            assert torch.equal(got[k], v), k


def test_bench_times_last_pt_before_and_after_swa_start_and_times_decoding(tmp_path, capsys):
    assert bench.main([*TINY, "--out-dim", "16", "--checkpoint"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < r["checkpoint_bytes_before_swa"] < r["checkpoint_bytes_after_swa"]
    assert r["checkpoint_seconds_before_swa"] > 0 and r["write_seconds_after_swa"] > 0
    write_folder(tmp_path / "d", ("a",), 1)
    assert bench.main([*TINY, "--decode", tmp_path / "d" / "a" / "a_0.png"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["img_size"] == 32 and list(r["decode_seconds"].values())[0] > 0


def test_bench_pipeline_times_the_cache_the_loader_and_the_device_augmentation_without_a_step(tmp_path, capsys):
    root = write_folder(tmp_path / "d", ("a", "b"), 8)
    args = [*TINY, "--pipeline", "--data", "folder", "--root", root, "--splits", "auto", "--batch-size", "4"]
    assert bench.main([*args, "--cache-images", "--cache-dir", tmp_path / "c"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out.strip().splitlines()[-1])
    assert r["cache_images_per_s"] > 0 and r["data_images_per_s"] > 0 and r["augment_seconds_per_batch"] > 0, out
    assert "speed-up" not in out and list((tmp_path / "c").glob("*.npy"))  # no step timed; the cache kept


def test_bench_refuses_to_compare_a_compiled_or_checkpointed_cass_step_with_dino(capsys):
    for flag in ("--compile", "--grad-checkpointing"):
        assert bench.main([*TINY, "--out-dim", "16", "--steps", "1", "--dino", flag]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--dino compares" in err


def test_explain_tells_a_vit_as_cass_does_not_by_a_blocks_attribute():
    import timm

    effnet = timm.create_model("efficientnet_b0", pretrained=False)  # has .blocks, is no ViT
    assert explain.tokens_to_grid(effnet) is None
    assert explain.target_layer(effnet) is effnet.get_submodule(effnet.feature_info[-1]["module"])
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    assert explain.target_layer(vit) is vit.blocks[-1].norm1 and explain.tokens_to_grid(vit) is not None


def test_dino_recipes_set_the_class_arguments():
    learner = dino.build_learner({**DINO_CFG, "recipe": "dino-paper"}, "vit", CPU)
    assert learner.student_temp == 0.1 and learner.teacher_ema_updater.beta == 0.996
    learner = dino.build_learner(DINO_CFG, "vit", CPU)
    assert learner.student_temp == 0.9 and learner.teacher_ema_updater.beta == 0.9  # vit_pytorch's, as the paper ran


def test_importing_cass_or_the_dino_tool_does_not_import_vit_pytorch():
    code = "import sys, cass; sys.path.insert(0, 'tools'); import dino; print('vit_pytorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert out.stdout.strip() == "False", out.stderr


def test_a_dino_run_gives_encoders_that_finetune_and_load_model_take_as_a_cass_run(tmp_path, capsys):
    root = write_folder(tmp_path / "d", n=8)
    run = tmp_path / "dino"
    assert dino.main([*TINY, "--out-dim", "16", "--data", "folder", "--root", root, "--splits", "auto", "--epochs",
                      "1", "--prototypes", "256", "--out", run]) == 0
    out = capsys.readouterr().out
    assert "cnn epoch   1/1" in out and "vit epoch   1/1" in out and "20-NN features" in out
    log = read_log(run / "log.jsonl")
    assert [(r["arm"], r["epoch"]) for r in log] == [("cnn", 0), ("cnn", 1), ("vit", 0), ("vit", 1)]
    for r in log[1::2]:
        arm = r["arm"]
        for key in ("loss", f"std_{arm}", f"val_std_{arm}", f"rank_{arm}", f"pc1_{arm}", f"knn_{arm}_feat",
                    f"knn_{arm}_out", "seconds", "std_healthy"):
            assert key in r, key
    assert "knn_raw_pixels" in log[0] and not (run / "last.pt").exists()
    args = json.load(open(run / "args.json"))
    assert args["method"] == "dino" and "objective" not in args and args["arms"] == ["cnn", "vit"]
    for arm in ("cnn", "vit"):
        obj = torch.load(run / f"{arm}.pt", weights_only=True)
        assert obj["format"] == "cass-encoder" and obj["arm"] == arm and obj["num_classes"] == 16
    assert cass.main(["finetune", *TINY, "--epochs", "1", "--init", run, "--arm", "vit", "--label-fraction", "1.0",
                      "--out", tmp_path / "ft"]) == 0
    model, preprocess, classes = cass.load_model(tmp_path / "ft" / "best.pt")
    assert classes == ["a", "b", "c"] and model(preprocess(_image())).shape == (1, 3)
    assert dino.main([*TINY, "--data", "folder", "--root", root, "--out", run]) == 2  # never written over
    assert "already holds a run" in capsys.readouterr().err
    for args, said in ((["--root", tmp_path / "nowhere"], "does not exist"), (["--resume"], "nothing to resume"),
                       (["--root", root, "--batch-size", "500"], "fewer than one batch")):
        assert dino.main([*TINY, "--data", "folder", "--out", tmp_path / "other", *args]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_dino_writes_the_student_by_default_and_the_teacher_when_asked(tmp_path):
    root = write_folder(tmp_path / "d", n=8)
    common = [*TINY, "--out-dim", "16", "--data", "folder", "--root", root, "--splits", "auto", "--epochs", "1",
              "--prototypes", "256", "--arms", "cnn"]
    for encoder in ("student", "teacher"):
        assert dino.main([*common, "--encoder", encoder, "--out", tmp_path / encoder]) == 0
    student, teacher = (torch.load(tmp_path / e / "cnn.pt", weights_only=True) for e in ("student", "teacher"))
    assert student["dino_encoder"] == "student" and teacher["dino_encoder"] == "teacher"
    assert not torch.equal(student["state_dict"]["conv1.weight"], teacher["state_dict"]["conv1.weight"])


def _image():
    from PIL import Image

    return Image.new("RGB", (20, 20), (90, 30, 200))


def test_an_interrupted_dino_run_resumes_to_the_same_encoders_and_log(tmp_path, monkeypatch, capsys):
    root = write_folder(tmp_path / "d", n=8)
    common = [*TINY, "--out-dim", "16", "--data", "folder", "--root", root, "--splits", "auto", "--epochs", "2",
              "--prototypes", "256"]
    assert dino.main([*common, "--out", tmp_path / "a"]) == 0
    epoch, calls = dino.dino_epoch, []

    def second_call_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C or SIGTERM inside an epoch
        return epoch(*args, **kwargs)

    monkeypatch.setattr(dino, "dino_epoch", second_call_interrupted)
    b = tmp_path / "b"
    # first in the CNN pass's second epoch; then, resumed, in the ViT pass's first (after cnn.pt was written)
    for resume in ([], ["--resume"]):
        calls.clear()
        assert dino.main([*common, "--out", b, *resume]) == 130  # as Ctrl-C: 128 + SIGINT
        assert "--resume" in capsys.readouterr().err
    assert (b / "cnn.pt").exists() and not (b / "vit.pt").exists()
    monkeypatch.setattr(dino, "dino_epoch", epoch)
    assert dino.main([*common, "--out", b, "--resume"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k and k != "images_per_s"} for r in rs]  # noqa
    assert strip(read_log(tmp_path / "a" / "log.jsonl")) == strip(read_log(b / "log.jsonl"))
    for arm in ("cnn", "vit"):
        x, y = (torch.load(p / f"{arm}.pt", weights_only=True)["state_dict"] for p in (tmp_path / "a", b))
        assert all(torch.equal(x[k], y[k]) for k in x), arm


def test_bench_dino_gives_the_cass_over_dino_ratio_of_steps_and_of_real_epochs(tmp_path, capsys):
    root = write_folder(tmp_path / "d", n=6)
    assert bench.main([*TINY, "--out-dim", "16", "--steps", "1", "--warmup", "0", "--data", "folder", "--root", root,
                       "--splits", "auto", "--dino", "--prototypes", "256"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out.strip().splitlines()[-1])
    assert r["cass_over_dino_step"] == pytest.approx(
        r["seconds_per_step"] / (r["dino_cnn_seconds_per_step"] + r["dino_vit_seconds_per_step"]))
    assert r["cass_over_dino_epoch"] == pytest.approx(
        r["cass_epoch_seconds"] / (r["dino_cnn_epoch_seconds"] + r["dino_vit_epoch_seconds"]))
    assert "CASS / (DINO CNN + DINO ViT)" in out


# ------------------------------------------------------------------------------------------
# tools/export.py: encoders in timm's own format
# ------------------------------------------------------------------------------------------


def test_an_exported_model_loads_in_one_line_of_timm_with_the_same_outputs_and_serves_as_weights(tmp_path, capsys):
    import timm
    from PIL import Image

    root = write_folder(tmp_path / "d", n=8)
    ft = tmp_path / "ft"
    assert cass.main(["finetune", *TINY, "--data", "folder", "--root", root, "--splits", "auto", "--init", "random",
                      "--arm", "cnn", "--mode", "linear", "--epochs", "1", "--out", ft]) == 0
    assert export.main([ft, "--out", tmp_path / "e"]) == 0  # the run folder: its best.pt
    model, preprocess, classes = cass.load_model(ft)
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'e'}", pretrained=True).eval()
    with torch.no_grad():
        x = preprocess(Image.open(next((root / "a").iterdir())))
        assert torch.equal(timm_model(x), model(x))
    config = json.load(open(tmp_path / "e" / "config.json"))
    assert config["architecture"] == "resnet18" and config["label_names"] == classes == ["a", "b", "c"]
    data = timm.data.resolve_data_config({}, model=timm_model)
    assert data["input_size"] == (3, 32, 32) and tuple(data["mean"]) == cass.IMAGENET_MEAN and data["crop_pct"] == 1
    wide = Image.open(next((root / "b").iterdir())).convert("RGB").resize((61, 37))  # not square, as scans often are
    timm_x = timm.data.create_transform(**data)(wide)[None]  # timm's own eval transform of the export
    assert (timm_x - preprocess(wide)).abs().max() < 1e-5  # the tensor cass.py trained on: a square resize, no crop
    with torch.no_grad():
        assert torch.allclose(timm_model(timm_x).softmax(1), model(preprocess(wide)).softmax(1), atol=1e-5)
    assert config["pretrained_cfg"]["paper_ids"] == "arXiv:2206.04170" and "cass.py" in config["pretrained_cfg"]["tag"]
    assert not config["pretrained_cfg"].get("license") and not config["pretrained_cfg"].get("origin_url")
    backbone = timm.create_model(f"local-dir:{tmp_path / 'e'}", pretrained=True, num_classes=0).eval()
    assert backbone(x).shape == (1, 512)
    # the round trip: the folder as the ImageNet weights of a fine-tuning run (linear: the encoder stays as given)
    assert cass.main(["finetune", *TINY, "--data", "folder", "--root", root, "--splits", "auto", "--init",
                      "imagenet", "--cnn-weights", tmp_path / "e", "--mode", "linear", "--epochs", "1", "--out",
                      tmp_path / "rt"]) == 0
    again = torch.load(tmp_path / "rt" / "best.pt", weights_only=True)["state_dict"]
    assert torch.equal(again["conv1.weight"], model.state_dict()["conv1.weight"])
    capsys.readouterr()
    assert cass.main(["finetune", *TINY, "--data", "folder", "--root", root, "--init", "imagenet", "--arm", "vit",
                      "--vit-weights", tmp_path / "e", "--out", tmp_path / "x"]) == 2
    assert "holds a resnet18, not the vit_tiny_patch16_224" in capsys.readouterr().err


def test_export_refuses_what_it_cannot_export_in_one_sentence_and_leaves_nothing_behind(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"format": "cass-run", "epoch": 1}, tmp_path / "last.pt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    for args, said in (([tmp_path / "empty"], "is not a finished run"), ([tmp_path / "missing"], "does not exist"),
                       ([tmp_path / "notes.pt"], "was not written by cass.py"),
                       ([tmp_path / "last.pt"], "is not an encoder file written by cass.py"),
                       ([tmp_path / "notes.pt", "--arm", "cnn"], "was not written by cass.py")):
        capsys.readouterr()
        assert export.main([*args, "--out", tmp_path / "out"]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))
    assert export.main([tmp_path / "notes.pt", "--out", tmp_path / "taken"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------
# tools/plot.py: pictures of runs
# ------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def pretrain_log(spread):
    init = dict(epoch=0, phase="init", val_std_cnn=0.01, val_std_vit=0.02, rank_cnn=8.0, rank_vit=3.0, pc1_cnn=0.5,
                pc1_vit=0.7, knn_cnn_feat=0.6, knn_cnn_out=0.6, knn_vit_feat=0.7, knn_vit_out=0.7, val_cos=0.0,
                majority=0.3, knn_raw_pixels=0.63)
    return [init] + [dict(init, phase=None, epoch=e, loss=1 / e, std_cnn=spread, std_vit=spread, cos_cnn_vit=0.5,
                          val_std_cnn=spread, val_std_vit=spread, std_healthy=0.0625) for e in (1, 2, 3)]


def is_png(path):
    from PIL import Image

    with Image.open(path) as img:
        return img.format == "PNG" and min(img.size) > 200


def test_plot_draws_pretraining_finetuning_and_protocol_folders_and_shows_collapse_at_a_glance(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    write_jsonl(tmp_path / "healthy" / "log.jsonl", pretrain_log(0.05))
    write_jsonl(tmp_path / "collapsed" / "log.jsonl", pretrain_log(0.0001))
    assert "no collapse" in plot.figure_pretrain([tmp_path / "healthy"], ["healthy"])._suptitle.get_text()
    title = plot.figure_pretrain([tmp_path / "collapsed"], ["collapsed"])._suptitle.get_text()
    assert "COLLAPSE" in title and "from epoch 1" in title
    assert plot.main([tmp_path / "collapsed"]) == 0 and is_png(tmp_path / "collapsed" / "monitor.png")
    assert plot.main([tmp_path / "healthy", tmp_path / "collapsed", "--out", tmp_path / "both.png"]) == 0
    assert is_png(tmp_path / "both.png")
    write_jsonl(tmp_path / "ft" / "log.jsonl", [dict(epoch=e, train_loss=1 / e, val_loss=1.2 / e, val_f1_macro=e / 4,
                                                      best_epoch=min(e, 2)) for e in (1, 2, 3)])
    (tmp_path / "ft" / "metrics.json").write_text(json.dumps(dict(headline="f1_macro", test=dict(
        f1_macro=0.5, confusion_matrix=[[3, 1], [2, 4]], per_class={"glioma": {}, "notumor": {}}))))
    assert plot.main([tmp_path / "ft"]) == 0
    assert is_png(tmp_path / "ft" / "curves.png") and is_png(tmp_path / "ft" / "confusion.png")
    rows = [dict(arm=a, init=i, mode="linear", fraction=f, n=3, mean=m + f / 4, std=0.01)
            for a in ("cnn", "vit") for i, m in (("cass", 0.5), ("dino", 0.45)) for f in (0.01, 0.1, 1.0)]
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "table.json").write_text(json.dumps(dict(headline="f1_macro", rows=rows,
                                                                   config=dict(data="brain_mri"))))
    assert plot.main([tmp_path / "grid", "--paper"]) == 0 and is_png(tmp_path / "grid" / "label_efficiency.png")
    assert not list(tmp_path.rglob(".*tmp*"))


def test_plot_ticks_whole_epochs_shows_where_the_seconds_went_and_says_what_it_cannot_add(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    rows = [{**r, "seconds": 10.0, "data_seconds": 4.0, "monitor_seconds": 1.0} if "loss" in r else r
            for r in pretrain_log(0.05)]
    write_jsonl(tmp_path / "run" / "log.jsonl", rows)
    (tmp_path / "run" / "args.json").write_text(json.dumps(dict(cnn="resnet18", vit="vit_tiny_patch16_224",
                                                                patch_size=8, img_size=64)))
    fig = plot.figure_pretrain([tmp_path / "run"], ["run"])
    assert "vit_tiny_patch16_224, patch 8, 64 px" in fig._suptitle.get_text()  # the ViT as it ran
    loss, timing = fig.axes[0], fig.axes[5]
    assert all(float(x).is_integer() for x in loss.get_xticks()) and timing.get_title().startswith("seconds")
    assert sorted(line.get_label() for line in timing.lines) == ["monitor", "training steps", "waiting for data"]
    assert [float(y) for y in timing.lines[1].get_ydata()][:1] == [4.0]
    rows = [dict(arm="cnn", init="cass", mode="linear", fraction=f, n=3, mean=0.5, std=0.01) for f in (0.1, 1.0)]
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "table.json").write_text(json.dumps(dict(headline="f1_macro", rows=rows,
                                                                   config=dict(data="digits"))))
    capsys.readouterr()
    assert plot.main([tmp_path / "grid", "--paper"]) == 0
    assert "the paper has no label-efficiency table for --data digits" in capsys.readouterr().out


def test_plot_refuses_what_it_cannot_draw_in_one_sentence(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "table.json").write_text(json.dumps({"rows": [{"x": 1}]}))
    write_jsonl(tmp_path / "run" / "log.jsonl", pretrain_log(0.05))
    write_jsonl(tmp_path / "ft" / "log.jsonl", [dict(epoch=1, train_loss=1.0, val_loss=1.0)])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.jsonl").write_text("{not json\n")
    for args, said in (([tmp_path / "empty"], "is not a run"), ([tmp_path / "other"], "is not a table written by"),
                       ([tmp_path / "run", tmp_path / "ft", "--out", tmp_path / "x.png"], "different kinds"),
                       ([tmp_path / "run", tmp_path / "run"], "name it with --out"),
                       ([tmp_path / "bad"], "not a log.jsonl written by cass.py"),
                       ([tmp_path / "run", "--out", tmp_path / "no" / "such" / "x.png"], "does not exist")):
        capsys.readouterr()
        assert plot.main(args) == 2, args
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not list(tmp_path.rglob("*.png"))


# ------------------------------------------------------------------------------------------
# tools/explain.py: heat-maps of both arms
# ------------------------------------------------------------------------------------------


def write_lesions(root, n=16, size=128):
    """Two classes told apart only by a bright square that sits in the top-left quadrant of every 'lesion' image."""
    import numpy as np
    from PIL import Image

    for name, lesion in (("clear", False), ("lesion", True)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            rng = np.random.default_rng(i + 1000 * lesion)
            a = rng.normal(90, 25, (size, size, 3))
            if lesion:
                y, x = rng.integers(4, 16, 2)
                a[y:y + 28, x:x + 28] = 250
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i}.png")
    return root


def test_both_arms_heat_maps_peak_where_the_evidence_is_and_are_drawn_side_by_side(tmp_path, capsys):
    import numpy as np

    root = write_lesions(tmp_path / "d")
    common = [*TINY, "--data", "folder", "--root", root, "--splits", "auto", "--init", "random"]
    assert cass.main(["finetune", *common, "--arm", "cnn", "--img-size", "128", "--epochs", "5", "--lr", "1e-3",
                      "--out", tmp_path / "cnn"]) == 0
    assert cass.main(["finetune", *common, "--arm", "vit", "--img-size", "64", "--epochs", "8", "--lr", "1e-3",
                      "--out", tmp_path / "vit"]) == 0
    for arm, size in (("cnn", 128), ("vit", 64)):
        path, obj = cass.load_finetuned(tmp_path / arm)
        model, table = cass.load_encoder(obj, path), explain.image_table(root / "lesion", obj["classes"])
        in_quadrant = 0
        for key in table.keys:
            maps, probs, explained = explain.heatmaps(model, cass.normalize(cass.decode_image(table, key, size)[None]))
            y, x = np.unravel_index(maps[0].argmax(), maps[0].shape)
            in_quadrant += bool(y < size // 2 and x < size // 2 and maps[0].max() > 0)  # chance: a quarter
        assert in_quadrant >= 0.75 * len(table.keys), (arm, in_quadrant)
    few = tmp_path / "few" / "scans"
    few.mkdir(parents=True)
    for i in (0, 1):
        (few / f"lesion_{i}.png").write_bytes((root / "lesion" / f"lesion_{i}.png").read_bytes())
    assert explain.main(["--ckpt", tmp_path / "cnn", "--ckpt", tmp_path / "vit" / "best.pt", "--images",
                         tmp_path / "few", "--out", tmp_path / "maps"]) == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["scans__lesion_0.png", "scans__lesion_1.png"]
    from PIL import Image

    with Image.open(tmp_path / "maps" / "scans__lesion_0.png") as img:
        assert img.size[0] > 2.5 * img.size[1]  # the image and two heat-maps side by side
    capsys.readouterr()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    for args, said in ((["--images", tmp_path / "nowhere"], "is neither a folder"),
                       (["--images", few, "--target", "tumour"], "is not one of the classes"),
                       (["--images", tmp_path / "broken"], "cannot decode image"),
                       (["--images", few, "--ckpt", root], "is a folder without best.pt")):
        assert explain.main(["--ckpt", tmp_path / "cnn", "--out", tmp_path / "maps2", *args]) == 2, args
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not list(tmp_path.rglob(".*.tmp*"))


# ------------------------------------------------------------------------------------------
# every tool's outputs checked as cass.py's; damaged files; messages true to the command
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    """A finished one-epoch fine-tuning run (best.pt, metrics.json, log.jsonl) and its images."""
    t = tmp_path_factory.mktemp("ft")
    root = write_folder(t / "data", n=6)
    assert cass.main(["finetune", *TINY, "--data", "folder", "--root", root, "--splits", "auto", "--init", "random",
                      "--arm", "cnn", "--epochs", "1", "--out", t / "ft"]) == 0
    return t


def _scans(t, run):  # a folder of scans to explain
    (t / "scans").mkdir(exist_ok=True)
    for name in ("scan_0.png", "scan_1.png"):
        (t / "scans" / name).write_bytes((run / "data" / "a" / "a_0.png").read_bytes())
    return t / "scans"


TOOL_OUTPUTS = {  # case: (run, t) -> (tool, arguments, what the sentence says); no file may change
    "plot --out an encoder of the run": lambda r, t: (plot, [r / "ft", "--out", r / "ft" / "best.pt"], "end in .png"),
    "plot --out a folder": lambda r, t: (plot, [r / "ft", "--out", r / "ft"], "end in .png"),
    "plot --out a folder named like a PNG": lambda r, t: ((t / "x.png").mkdir(), (
        plot, [r / "ft", "--out", t / "x.png"], "is a folder"))[1],
    "explain --out its --images": lambda r, t: (explain, ["--ckpt", r / "ft", "--images", _scans(t, r), "--out",
                                                          _scans(t, r)], "one of this command's inputs"),
    "explain --out inside its --images": lambda r, t: (explain, ["--ckpt", r / "ft", "--images", _scans(t, r),
                                                                 "--out", _scans(t, r) / "maps"], "inside one"),
    "explain --out the folder of an image it reads": lambda r, t: (explain, [
        "--ckpt", r / "ft", "--images", _scans(t, r) / "scan_0.png", "--out", _scans(t, r)], "holds the input"),
    "export --out inside the checkpoint's path": lambda r, t: (export, [r / "ft" / "best.pt", "--out",
                                                                        r / "ft" / "best.pt" / "e"], "inside one"),
    "protocol --out inside --root": lambda r, t: (protocol, [*TINY, "--data", "folder", "--root", r / "data",
                                                             "--out", r / "data" / "grid"], "inside one"),
    "protocol --seeds 0": lambda r, t: (protocol, [*TINY, "--seeds", "0", "--out", t / "g"], "--seeds 0"),
    "bench --steps 0": lambda r, t: (bench, [*TINY, "--steps", "0"], "--steps 0 cannot work"),
    "dino --prototypes 0": lambda r, t: (dino, [*TINY, "--prototypes", "0", "--out", t / "d"], "--prototypes 0"),
    "splits without --out": lambda r, t: (splits, ["--data", "digits"], "--out"),
    "splits into a folder of split files": lambda r, t: (splits, ["--data", "digits", "--out", cass.HERE /
                                                                  "data_splits" / "digits"], "--overwrite"),
    "splits --out inside the data": lambda r, t: (splits, ["--data", "folder", "--root", r / "data", "--out",
                                                           r / "data" / "splits"], "inside one"),
    "splits --listing of a dataset without one": lambda r, t: (splits, ["--data", "folder", "--root", r / "data",
                                                                        "--listing", r / "x.txt", "--out", t / "s"],
                                                               "--listing serves brain_mri and isic2019"),
}


SHARED = cass.HERE.parent / "shared" / "data"


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



@pytest.mark.parametrize("shape", ["flat", "column", "multilabel"])
def test_a_medmnist_file_becomes_a_csv_dataset_with_the_curators_splits(shape, tmp_path):
    npz = write_npz(tmp_path / "m.npz", shape, multilabel=shape == "multilabel")
    assert medmnist.main([npz, "--out", tmp_path / "m"]) == 0
    table = cass.load_table("csv", tmp_path / "m" / "labels.csv")
    got, source = cass.load_splits(dict(splits=str(tmp_path / "m" / "splits")), table)
    assert [len(got[s]) for s in ("train", "val", "test")] == [24, 6, 6] and table.classes == ["0", "1", "2"]
    assert all(k.startswith("images/val/") for k in got["val"]) and set(got["train_1pct"]) <= set(got["train_10pct"])
    assert table.multilabel == (shape == "multilabel")
    arrays = np.load(npz)
    assert (np.asarray(cass.read_image(tmp_path / "m" / "images" / "test" / "5.png")) == arrays["test_images"][5]).all()
    y = arrays["test_labels"].reshape(len(arrays["test_labels"]), -1)[5]
    assert (table.labels["images/test/5.png"] == (y if shape == "multilabel" else np.eye(3)[int(y[0])])).all()


@pytest.mark.parametrize("content", [b"image,label\na.png,x\n", None])
def test_a_damaged_medmnist_file_or_another_kind_is_one_sentence(content, tmp_path, capsys):
    whole = write_npz(tmp_path / "ok.npz").read_bytes()
    (tmp_path / "m.npz").write_bytes(content or whole[:300])
    capsys.readouterr()
    assert medmnist.main([tmp_path / "m.npz", "--out", tmp_path / "m"]) == 2
    err = capsys.readouterr().err
    assert "damaged, or another kind" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m" / "labels.csv").exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("data,listing,total", [("brain_mri", "brain_mri_kaggle_files.txt", 7023),
                                                ("isic2019", "isic2019_full_GroundTruth.csv", 25331)])
def test_committed_splits_cover_the_full_public_datasets(data, listing, total, tmp_path):
    assert splits.main(["--data", data, "--listing", SHARED / listing, "--out", tmp_path]) == 0
    for name in ("train", "val", "test", "train_10pct", "train_1pct"):
        assert (tmp_path / f"{name}.csv").read_text() == (cass.HERE / "data_splits" / data / f"{name}.csv").read_text()
    assert sum(len((tmp_path / f"{s}.csv").read_text().splitlines()) - 1 for s in ("train", "val", "test")) == total


def test_splits_writes_the_split_files_a_run_reads(tmp_path):
    root = write_folder(tmp_path / "data", n=10)
    assert splits.main(["--data", "folder", "--root", root, "--out", tmp_path / "s"]) == 0
    table = cass.load_table("folder", root)
    read, source = cass.load_splits(dict(splits=str(tmp_path / "s")), table)
    assert source == str(tmp_path / "s") and {k: read[k] for k in cass.make_splits(table)} == cass.make_splits(table)


@pytest.mark.parametrize("case", TOOL_OUTPUTS)
def test_a_tools_output_is_never_an_input_and_a_refusal_is_one_sentence(case, ft_run, tmp_path, capsys):
    from test_cass import snapshot

    tool, args, said = TOOL_OUTPUTS[case](ft_run, tmp_path)
    before = snapshot(ft_run, tmp_path)
    capsys.readouterr()
    try:
        code = tool.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    after = snapshot(ft_run, tmp_path)
    assert after == before  # nothing written, changed or removed


def test_explain_and_plot_show_dicom_images_with_the_window_each_model_was_trained_on(tmp_path, capsys):
    pytest.importorskip("pydicom")
    from test_cass import write_dicoms

    root = write_dicoms(tmp_path / "data", n=5)
    assert cass.main(["finetune", *TINY, "--data", "folder", "--root", root, "--splits", "auto", "--init", "random",
                      "--arm", "cnn", "--epochs", "1", "--window", "1000,1200", "--out", tmp_path / "ft"]) == 0
    seen = []
    real = cass.decode_image
    with pytest.MonkeyPatch.context() as m:  # what explain feeds the model: the run's window
        m.setattr(cass, "decode_image", lambda table, key, size: seen.append(table.window) or real(table, key, size))
        assert explain.main(["--ckpt", tmp_path / "ft", "--images", root / "a", "--out", tmp_path / "maps"]) == 0
    assert seen == [[1000.0, 1200.0]] * 5 and len(list((tmp_path / "maps").glob("*.png"))) == 5
    assert plot.main(["--images", root / "a" / "a_0.dcm", root / "b", "--window", "own", "--window", "1000,1200",
                      "--out", tmp_path / "views.png"]) == 0
    assert (tmp_path / "views.png").stat().st_size > 10000
    capsys.readouterr()
    assert plot.main([tmp_path / "ft", "--images", root, "--out", tmp_path / "both.png"]) == 2  # not both kinds
    with pytest.raises(SystemExit) as e:
        plot.main(["--images", root / "a", "--window", "40", "--out", tmp_path / "w.png"])
    assert e.value.code == 2 and "40 is not CENTER,WIDTH" in capsys.readouterr().err


def test_explain_gives_two_images_that_share_a_name_two_pngs(ft_run, tmp_path):
    from PIL import Image

    (tmp_path / "in").mkdir()
    for suffix in ("png", "bmp"):
        Image.open(ft_run / "data" / "a" / "a_0.png").save(tmp_path / "in" / f"scan.{suffix}")
    class_png = ft_run / "data" / "b" / "b_1.png"
    assert explain.main(["--ckpt", ft_run / "ft", "--images", tmp_path / "in", class_png, "--out",
                         tmp_path / "maps"]) == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["b_1.png", "scan.bmp.png", "scan.png.png"]
    assert explain.main(["--ckpt", ft_run / "ft", "--images", tmp_path / "in", tmp_path / "in", "--out",
                         tmp_path / "again"]) == 2  # one image twice: refused, not written over itself


DAMAGED = {  # a file a tool reads, cut short as a full disk or a kill leaves it
    "args.json of a run": ("pretrain", "args.json"),
    "metrics.json of a fine-tuning run": ("finetune", "metrics.json"),
    "table.json of a grid": ("protocol", "table.json"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_plot_on_a_damaged_file_says_so_in_one_sentence(case, tmp_path, capsys):
    kind, name = DAMAGED[case]
    folder = tmp_path / "run"
    if kind == "pretrain":
        write_jsonl(folder / "log.jsonl", pretrain_log(0.05))
    elif kind == "finetune":
        write_jsonl(folder / "log.jsonl", [dict(epoch=1, train_loss=1.0, val_loss=1.0, val_f1_macro=0.5)])
    else:
        folder.mkdir()
    (folder / name).write_text('{"headline": "f1_ma')
    capsys.readouterr()
    assert plot.main([folder]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and name in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def _grid(tmp_path, root):
    return [*TINY, "--out-dim", "16", "--data", "folder", "--root", root, "--epochs", "1", "--arms", "cnn", "--inits",
            "random", "--modes", "linear", "--fractions", "1.0", "--seeds", "2", "--ft-epochs-linear", "1", "--out",
            tmp_path / "p"]


def test_protocol_reruns_a_cell_whose_result_is_damaged_and_its_table_is_what_is_on_disk(tmp_path, monkeypatch,
                                                                                          capsys):
    from test_cass import hold

    root = write_folder(tmp_path / "d", n=6)
    cells = tmp_path / "p" / "cells"
    cells.mkdir(parents=True)
    other = hold(cells / "cnn-random-linear-1-seed0.lock")  # another process sharing the grid runs seed 0
    real = cass.finetune

    def finetune(cfg):  # while this process runs seed 1, the other one finishes seed 0
        out = real(cfg)
        seed0 = cells / "cnn-random-linear-1-seed0"
        seed0.mkdir()
        for name in ("metrics.json", "args.json"):
            (seed0 / name).write_bytes((Path(out) / name).read_bytes())
        other.kill()
        other.wait()
        return out

    monkeypatch.setattr(cass, "finetune", finetune)
    assert protocol.main(_grid(tmp_path, root)) == 0
    table = json.load(open(tmp_path / "p" / "table.json"))
    assert [r["n"] for r in table["rows"]] == [2]  # both seeds, though this process ran one
    monkeypatch.setattr(cass, "finetune", real)
    metrics = cells / "cnn-random-linear-1-seed1" / "metrics.json"
    metrics.write_text(metrics.read_text()[:20])  # cut short
    capsys.readouterr()
    assert protocol.main(_grid(tmp_path, root)) == 0
    assert "[2/2] cnn-random-linear-1-seed1" in capsys.readouterr().out  # run again, the other cell not
    assert json.load(open(metrics))["headline"] == "f1_macro"


def test_ctrl_c_in_a_protocol_cell_advises_rerunning_the_grid_not_a_flag_it_refuses(tmp_path, monkeypatch, capsys):
    def interrupt(cfg):
        raise KeyboardInterrupt("interrupted in epoch 1; continue with the same command plus --resume")

    monkeypatch.setattr(cass, "finetune", interrupt)
    capsys.readouterr()
    assert protocol.main(_grid(tmp_path, write_folder(tmp_path / "d", n=6))) == 130
    err = capsys.readouterr().err
    assert "rerun this command" in err and "--resume" not in err, err
