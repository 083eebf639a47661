"""Tests of tools/protocol.py and tools/bench.py, the reproduction tools beside cass.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cass import TINY, write_folder

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tools"))
import bench  # noqa: E402
import cass  # noqa: E402
import protocol  # noqa: E402


def test_protocol_runs_the_grid_writes_a_table_and_does_not_rerun_finished_cells(tmp_path, capsys):
    root = write_folder(tmp_path / "d", n=10)
    args = [*TINY, "--out-dim", "16", "--data", "folder", "--root", root, "--epochs", "1", "--arms", "cnn",
            "--inits", "cass", "random", "random-bn", "imagenet", "--modes", "linear", "--fractions", "1.0",
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
    assert {(r["init"], r["n"]) for r in table["rows"]} == {("cass", 2), ("random", 2), ("random-bn", 2)}
    assert "| 100% | cnn | cass | linear |" in (tmp_path / "p" / "table.md").read_text()
    cell = tmp_path / "p" / "cells" / "cnn-cass-linear-1-seed0"
    assert json.load(open(cell / "args.json"))["splits"] == str(tmp_path / "p" / "pretrain" / "splits")
    assert protocol.main(args) == 0  # everything finished: nothing is trained again
    out = capsys.readouterr().out
    assert "[1/6]" not in out and "fine-tuning resnet" not in out, out
    assert "6 fine-tuning runs" in (tmp_path / "p" / "table.md").read_text()
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


def test_a_lock_held_by_a_live_process_is_respected_and_a_dead_ones_taken_over(tmp_path):
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
