"""``python -m benchmarks.depth_sweep`` end to end on a tiny setting (synthetic 8x8 images,
ResNet-20 width 0.25, 1 + 1 epochs, two gammas, 3 timed rounds): every run's report is read,
every saved model is timed against the dense one, the results agree with the run folders, and a
second invocation reads the runs back instead of training again."""

import json
import subprocess
import sys

TINY = ("--data synthetic --synthetic n_train=128,n_test=64,image_size=8 --subset 128 --width 0.25 "
        "--epochs 1 --finetune-epochs 1 --bisect-images 64 --gate-warmup-epochs 0 "
        "--theta-lr 0.05")


def sweep(tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.depth_sweep", "--gammas", "0,50", "--lam", "2",
         "--jobs", "1", "--batches", "1", "--repeats", "3", "--wait-load", "0", "--extra", TINY,
         "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "result")],
        capture_output=True, text=True, timeout=900)


def test_depth_sweep_end_to_end(tmp_path):
    done = sweep(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    rows = {r["gamma"]: r for r in res["rows"]}
    assert set(rows) == {0.0, 50.0}
    for g, r in rows.items():
        rep = json.loads((tmp_path / "runs" / f"gamma-{g:g}" / "report.json").read_text())
        assert r["blocks_kept"] == rep["blocks_kept"] and r["test_acc"] == \
            rep["accuracy"]["test_final"]
        assert r["latency_ms_b1"] > 0 and r["latency_ratio_b1"] == r["latency_ms_b1"] / \
            res["dense"]["1"]["ms"]
        assert rep["config"]["method"]["cost"]["blocks"] == g
        assert f"--gamma {g:g}" in r["command"]
    assert (tmp_path / "result.png").stat().st_size > 0
    again = sweep(tmp_path)
    assert again.returncode == 0 and again.stdout.count("done already") == 2
