"""``python -m benchmarks.from_scratch`` on a tiny run: the architecture is rebuilt (MACs and
parameters equal the run's saved model), the weights are not the run's, and a second
invocation reads the finished trainings back instead of training again (about 10 s)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import from_scratch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scratch") / "runs" / "s0"
    proc = subprocess.run([sys.executable, "-m", "nn", "train", "--method", "spr", "--model",
                           "resnet20", "--width", "0.25", "--data", "synthetic", "--synthetic",
                           "n_train=256,n_test=128,image_size=8", "--epochs", "1",
                           "--finetune-epochs", "1", "--budget", "macs=0.5", "--no-progress",
                           "--latency-batches", "", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def test_rebuilds_the_architecture_with_fresh_weights_and_resumes(run, tmp_path, monkeypatch,
                                                                     capsys):
    args = ["--arch", f"tiny={run.parent}/s*", "--seed-offsets", "0,3", "--jobs", "1",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "result")]
    assert from_scratch.main(args) == 0
    data = json.loads((tmp_path / "result.json").read_text())
    report = json.loads((run / "report.json").read_text())
    rows = data["trainings"]
    assert [r["train_seed"] for r in rows] == [0, 3]
    for r in rows:
        assert r["macs"] == report["complexity"]["pruned"]["macs"]
        assert r["params"] == report["complexity"]["pruned"]["params"]
        assert r["epochs"] == 2 and 0 <= r["test_acc"] <= 1
        assert r["run_test_acc"] == report["accuracy"]["test_final"]
    (s,) = data["summary"]
    assert s["trainings"] == 2 and s["runs"] == 1
    assert s["scratch_minus_run"] == pytest.approx(
        sum(r["test_acc"] for r in rows) / 2 - report["accuracy"]["test_final"])
    assert data["machine"]["git"]["commit"]

    # the same seed and architecture from scratch: the same first weights; the run's differ
    net = from_scratch_weights(run, 0)
    saved = torch.load(run / "pruned.pt", weights_only=True)
    state = saved["state_dict"] if "state_dict" in saved else saved
    first = next(k for k in net if k.endswith("weight") and net[k].dim() == 4)
    assert net[first].shape == state[first].shape
    assert not torch.equal(net[first], state[first])

    def refuse(*a, **k):
        raise AssertionError("trained again although the result was kept")

    monkeypatch.setattr(from_scratch, "train_one", refuse)
    capsys.readouterr()
    assert from_scratch.main(args) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().out
    assert json.loads((tmp_path / "result.json").read_text())["trainings"] == rows


def from_scratch_weights(run: Path, seed: int) -> dict:
    """The untrained network ``train_one`` starts from (the run's masks on a fresh model)."""
    from nn.io import read_torch
    from nn.models.registry import build_model, compress
    from nn.training.runtime import seed_all

    seed_all(seed)
    model = build_model("resnet20", 10, 3, 0.25, None)
    return compress(model, read_torch(run / "select" / "masks.pt")).state_dict()


@pytest.mark.parametrize("args, message", [
    (["--arch", "nolabel"], "LABEL=GLOB"),
    (["--arch", "a=/nonexistent/*"], "no run folder matches"),
    (["--arch", "a=x", "--arch", "a=y"], "labels must differ"),
    (["--arch", "a=x", "--seed-offsets", "-1"], "integers >= 0"),
    (["--arch", "a=x", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_input_is_named(args, message, capsys):
    with pytest.raises(SystemExit):
        from_scratch.main(args)
    assert message in capsys.readouterr().err


def test_an_unfinished_run_folder_is_refused(tmp_path, capsys):
    (tmp_path / "runs" / "s0").mkdir(parents=True)
    (tmp_path / "runs" / "s0" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        from_scratch.main(["--arch", f"a={tmp_path}/runs/*"])
    assert "not a finished run" in capsys.readouterr().err
