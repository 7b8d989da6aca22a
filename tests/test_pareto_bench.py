"""``python -m benchmarks.pareto --tiny`` end to end: runs, branches, results, and a resume.

The tiny setting (synthetic 8x8 images, ResNet-20 width 0.25, 1 epoch + 1 fine-tuning epoch,
dense and spr, budgets macs=0.5 and latency=0.8, one seed, 3 timed rounds) takes about 12 s on
2 busy cores; the second invocation only reads the runs back and times the saved models (3 s);
the third redoes a deleted budget from the trained network and adds one that cannot be met
(5 s).
"""

import csv
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {("dense", "none"), ("spr", "macs=0.5"), ("spr", "latency=0.8")}


def _bench(tmp_path, *extra):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pareto", "--tiny", "--out",
                           str(tmp_path / "result"), "--runs", str(tmp_path / "runs"), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, time.monotonic() - t0


def _checkpoints(runs: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in runs.rglob("checkpoint.pt")}


def test_tiny_pareto_writes_consistent_results_and_resumes(tmp_path):
    out1, first_s = _bench(tmp_path)
    stem = tmp_path / "result"
    for path in (stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".png"),
                 tmp_path / "result_summary.csv"):
        assert path.stat().st_size > 0, path
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["machine"]["git"]["commit"] and data["machine"]["load_average_1_5_15"]
    points = data["points"]
    assert {(p["method"], p["budget"]) for p in points} == EXPECTED
    assert data["counts"] == {"done": 3, "unsupported": 0, "failed": 0, "blocked": 0,
                              "read_back": 0}
    for p in points:
        assert p["status"] == "done" and p["seed"] == 0 and p["threads"] == 1
        assert math.isfinite(p["test_acc"]) and 0 <= p["test_acc"] <= 1
        if p["budget_kind"] == "macs":
            assert p["macs_ratio"] <= p["budget_value"] + 1e-9
        assert 0 < p["macs_ratio"] <= 1 and p["params"] > 0 and 1 <= p["blocks_kept"] <= 9
        for b in (1, 64):
            assert math.isfinite(p[f"latency_ratio_b{b}"]) and p[f"latency_ratio_b{b}"] > 0
        assert p["command"].startswith("python -m nn train --method " + p["method"])
        assert "--seed 0" in p["command"]
    dense = next(p for p in points if p["method"] == "dense")
    assert dense["macs_ratio"] == 1.0 and "--budget" not in dense["command"]
    spr = {p["budget"]: p for p in points if p["method"] == "spr"}
    # spr trained once: the latency budget started from the macs budget's trained network
    assert spr["macs=0.5"]["trained_in"] == spr["macs=0.5"]["run"]
    assert spr["latency=0.8"]["trained_in"] == spr["macs=0.5"]["run"]
    assert "--latency-table" in spr["latency=0.8"]["command"]
    assert "--remove-blocks --granularity 2" in spr["latency=0.8"]["command"]

    aggs = {(a["method"], a["budget"]): a for a in data["aggregates"]}
    assert set(aggs) == EXPECTED
    for key, a in aggs.items():
        sub = [p for p in points if (p["method"], p["budget"]) == key]
        assert a["seeds"] == len(sub) == 1
        for field in ("test_acc", "macs_ratio", "latency_ratio_b1", "latency_ratio_b64"):
            values = [p[field] for p in sub]
            assert a[f"{field}_mean"] == pytest.approx(statistics.fmean(values))
            assert a[f"{field}_std"] == 0.0
        assert a["macs_ratio_max"] == max(p["macs_ratio"] for p in sub)
    with open(stem.with_suffix(".csv"), newline="") as fh:
        rows = {(r["method"], r["budget"]): r for r in csv.DictReader(fh)}
    assert set(rows) == EXPECTED
    for p in points:
        assert float(rows[p["method"], p["budget"]]["test_acc"]) == pytest.approx(p["test_acc"])

    trained = _checkpoints(tmp_path / "runs")
    assert len(trained) >= 4  # dense and spr train/, spr finetune/ twice (and a copy)
    out2, second_s = _bench(tmp_path)
    assert out2.count("read back (finished earlier)") == 3 and "done in" not in out2
    assert "3 runs read back" in out2
    assert _checkpoints(tmp_path / "runs") == trained  # nothing retrained
    again = json.loads(stem.with_suffix(".json").read_text())
    assert again["counts"]["read_back"] == 3
    assert [(p["test_acc"], p["macs_ratio"]) for p in again["points"]] == \
        [(p["test_acc"], p["macs_ratio"]) for p in points]
    assert second_s < first_s, (first_s, second_s)

    # a deleted budget is redone from spr's trained network; an impossible one is recorded
    shutil.rmtree(Path(spr["latency=0.8"]["run"]))
    out3, _ = _bench(tmp_path, "--latency", "0.8,0.01")
    assert "spr latency=0.8 seed 0: done in" in out3
    assert "spr latency=0.01 seed 0: unsupported: python -m nn: error: budget latency=0.01" in out3
    assert _checkpoints(tmp_path / "runs" / "t1" / "seed0" / "spr" / "macs-0.5") == {
        p: m for p, m in trained.items() if "macs-0.5" in str(p)}
    third = json.loads(stem.with_suffix(".json").read_text())
    assert third["counts"] == {"done": 3, "unsupported": 1, "failed": 0, "blocked": 0,
                               "read_back": 2}
    points = {p["budget"]: p for p in third["points"] if p["method"] == "spr"}
    assert points["latency=0.8"]["trained_in"] == points["macs=0.5"]["run"]
    bad = points["latency=0.01"]
    assert bad["test_acc"] is None and "cannot be met" in bad["error"]
    agg = next(a for a in third["aggregates"] if a["budget"] == "latency=0.01")
    assert agg["seeds"] == 0 and agg["unsupported"] == 1 and agg["test_acc_mean"] is None


def test_training_shared_only_where_the_budget_does_not_shape_it():
    """Plain-training methods share one training per seed, a method with its own training
    shares it across budgets, and the variational pruner (its price follows the budget)
    trains once per budget."""
    from benchmarks.pareto import Point, _train_key

    def key(method, kind="macs", value=0.5):
        return _train_key(Point(method, kind, value, 0, 1))

    assert key("l1-filter") == key("random") == key("tp-magnitude") == "plain"
    assert key("spr", "macs", 0.5) == key("spr", "latency", 0.3) == "spr"
    assert key("dense", None, None) == "dense"
    assert key("variational", "macs", 0.5) != key("variational", "macs", 0.3)
    assert key("variational", "macs", 0.5) != key("variational", "latency", 0.5)


def test_full_budget_runs_without_quick_at_four_plus_two_epochs():
    """``--full`` trains on all of Fashion-MNIST (no ``--quick``) with fmnist_methods' 4 + 2
    epochs in its own run folder; explicit epochs win, and ``--tiny --full`` is refused."""
    from benchmarks.pareto import Point, _argv, parse

    args = parse(["--full", "--methods", "spr", "--seeds", "0"])
    argv = _argv(Point("spr", "macs", 0.2, 0, 1), args, None)
    assert "--quick" not in argv and argv[argv.index("--data") + 1] == "fashion-mnist"
    assert argv[argv.index("--epochs") + 1] == "4"
    assert argv[argv.index("--finetune-epochs") + 1] == "2"
    assert argv[argv.index("--out") + 1].startswith(str(Path("runs/pareto-full")))
    dense = _argv(Point("dense", None, None, 0, 1), args, None)
    assert dense[dense.index("--epochs") + 1] == "6"
    quick = _argv(Point("spr", "macs", 0.2, 0, 1), parse(["--methods", "spr"]), None)
    assert "--quick" in quick and quick[quick.index("--epochs") + 1] == "5"
    explicit = parse(["--full", "--epochs", "3", "--finetune-epochs", "1"])
    assert (explicit.epochs, explicit.finetune_epochs) == (3, 1)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pareto", "--tiny", "--full"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "exclude each other" in proc.stderr


@pytest.mark.parametrize("threads, point_threads, peak_threads", [(1, (1, 2), 2), (2, (1,), 4)])
def test_runs_of_the_other_thread_count_share_the_granted_threads(
        tmp_path, monkeypatch, threads, point_threads, peak_threads):
    """``--jobs 2``: runs start while their threads fit in the 2 x ``--threads`` granted, each
    group's training first.  With ``--threads 1 --threads-compare`` the 1-thread runs go two at
    a time and the 2-thread runs one at a time; with ``--threads 2`` four 1-thread runs go at
    once (dense trains long, beside spr's three budgets)."""
    import threading

    from benchmarks import pareto

    args = pareto.parse(["--tiny", "--methods", "dense,spr", "--macs", "0.5,0.3,0.2,0.1",
                         "--latency", "", "--threads-compare", "--threads", str(threads),
                         "--runs", str(tmp_path)])
    points = [pareto.Point(m, k, v, 0, t) for t in point_threads for m, k, v in
              (("dense", None, None), ("spr", "macs", 0.5), ("spr", "macs", 0.3),
               ("spr", "macs", 0.2), ("spr", "macs", 0.1))]
    lock, busy, peak, started = threading.Lock(), [0], [], []

    def fake_run(out, argv, cfg, source):
        threads = int(argv[argv.index("--threads") + 1])
        with lock:
            busy[0] += threads
            peak.append(busy[0])
            started.append((out, source))
        seconds = 0.5 if "dense" in argv else 0.05
        time.sleep(seconds)
        (out / "train").mkdir(parents=True, exist_ok=True)
        (out / "train" / "done.json").write_text("{}")
        with lock:
            busy[0] -= threads
        return {"status": "done", "seconds": seconds, "read_back": False}

    monkeypatch.setattr(pareto, "_run", fake_run)
    outcome = pareto.run_points(points, args)
    assert {p: r["status"] for p, r in outcome.items()} == {p: "done" for p in points}
    assert max(peak) == peak_threads  # never more threads than granted, and all of them used
    by_out = dict(started)
    for t in point_threads:  # spr's other budgets start from its first budget's training
        first = pareto.Point("spr", "macs", 0.5, 0, t).folder(tmp_path)
        assert by_out[first] is None
        for v in (0.3, 0.2, 0.1):
            assert by_out[pareto.Point("spr", "macs", v, 0, t).folder(tmp_path)] == first
