"""The training loop: exact resume, DDP = single process, it learns, hooks, atomic checkpoints,
config validation, learning-rate schedules.  Tiny models on 8x8 synthetic images, 1 thread."""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn as tnn

from nn import build_model
from nn.training import (TIMING_KEYS, TrainConfig, lr_at, load_checkpoint, make_optimizer, train,
                         unwrap)
from nn.training.checkpoint import save_checkpoint

HERE = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- fixtures


def toy_data(n: int, seed: int = 0, noise: float = 0.5):
    """4 classes of 1x8x8 images: class k lights up quadrant k (+ Gaussian noise).
    Linearly separable up to the noise; chance accuracy 0.25."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = noise * torch.randn(n, 1, 8, 8, generator=g)
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 1.0
    return x, y


class ToyLoader:
    """``(x, y)`` batches: each epoch's order is a ``randperm`` from one persistent seeded
    generator (its state advances, so an exact resume needs :meth:`state_dict`); rank ``r`` of
    ``w`` takes the r-th of ``w`` equal slices of every global batch.  ``augment`` adds noise
    drawn from the *global* torch, numpy and ``random`` RNGs, so a resume must restore them."""

    def __init__(self, x, y, batch_size, *, shuffle=True, seed=0, rank=0, world_size=1,
                 augment=False):
        assert batch_size % world_size == 0 and len(x) % batch_size == 0
        self.x, self.y, self.bs, self.shuffle = x, y, batch_size, shuffle
        self.rank, self.world, self.augment = rank, world_size, augment
        self.gen = torch.Generator().manual_seed(seed)
        self.epochs_set = []

    def __len__(self):
        return len(self.x) // self.bs

    def set_epoch(self, epoch):
        self.epochs_set.append(epoch)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=self.gen) if self.shuffle \
            else torch.arange(len(self.x))
        for i in range(len(self)):
            idx = order[i * self.bs:(i + 1) * self.bs].tensor_split(self.world)[self.rank]
            x, y = self.x[idx], self.y[idx]
            if self.augment:
                x = x + 0.1 * torch.randn_like(x) + float(np.random.uniform(-0.1, 0.1))
                if random.random() < 0.5:
                    x = x.flip(3)
            yield x, y

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def tiny_resnet(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet20", width=0.25, in_channels=1, num_classes=4)


def plain_net(seed=0):
    """No BatchNorm: DDP's averaged gradient is then exactly the global-batch gradient."""
    torch.manual_seed(seed)
    return tnn.Sequential(tnn.Conv2d(1, 4, 3, padding=1), tnn.ReLU(), tnn.Conv2d(4, 4, 3),
                          tnn.ReLU(), tnn.AdaptiveAvgPool2d(2), tnn.Flatten(), tnn.Linear(16, 4))


def l2(module):
    return 1e-3 * sum(p.pow(2).sum() for p in module.parameters())


def clamp_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.clamp_(-0.6, 0.6)


def ddp_case(kind, rank, world, out_dir):
    """The same run for a DDP rank and for the single-process reference (rank 0 of 1)."""
    x, y = toy_data(64)
    xt, yt = toy_data(32, seed=1)
    model = plain_net() if kind == "plain" else tiny_resnet()
    loaders = (ToyLoader(x, y, 16, seed=3, rank=rank, world_size=world),
               ToyLoader(xt, yt, 16, shuffle=False, rank=rank, world_size=world))
    config = TrainConfig(epochs=2, lr=0.1, warmup_epochs=0.5, device="cpu", progress=False,
                         out_dir=str(out_dir), seed=5)
    return model, loaders, config, {"extra_loss": l2, "after_step": clamp_}


def drop_timing(record):
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def metrics_lines(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- (1) resume


def _run3(out_dir, model_seed=0, **kw):
    x, y = toy_data(64)
    xt, yt = toy_data(32, seed=1)
    config = TrainConfig(epochs=3, lr=0.1, warmup_epochs=1, progress=False, out_dir=out_dir,
                         seed=7)
    model = tiny_resnet(model_seed)
    res = train(model, ToyLoader(x, y, 16, seed=11, augment=True),
                ToyLoader(xt, yt, 16, shuffle=False), config, **kw)
    return model, res


def test_resume_after_interruption_is_bit_identical(tmp_path):
    full_model, full = _run3(tmp_path / "full")

    class Interrupt(Exception):
        pass

    steps = []

    def crash(module):  # dies in the middle of epoch 3 (4 steps an epoch)
        steps.append(1)
        if len(steps) == 2 * 4 + 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run3(tmp_path / "cut", after_step=crash)
    cut = tmp_path / "cut"
    assert [r["epoch"] for r in metrics_lines(cut)] == [1, 2]
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 2
    # as if killed between writing epoch 3's metrics line and its checkpoint
    with open(cut / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 3, "stale": True}) + "\n")

    model, res = _run3(cut, model_seed=99, resume=True)  # other init: must be overwritten

    want, got = full_model.state_dict(), model.state_dict()
    assert list(want) == list(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(
        cut / "checkpoint.pt")
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert (a["epoch"], a["step"], a["best_acc"]) == (b["epoch"], b["step"], b["best_acc"]) \
        == (3, 12, full.best_acc)
    lines_full, lines_cut = metrics_lines(tmp_path / "full"), metrics_lines(cut)
    assert len(lines_cut) == 3
    assert [drop_timing(r) for r in lines_full] == [drop_timing(r) for r in lines_cut]
    assert [drop_timing(r) for r in full.history] == [drop_timing(r) for r in res.history]
    assert res.final_acc == full.final_acc


def test_resume_refuses_a_changed_recipe_and_needs_out_dir(tmp_path):
    x, y = toy_data(32)
    base = TrainConfig(epochs=1, lr=0.1, progress=False, out_dir=str(tmp_path))
    train(plain_net(), ToyLoader(x, y, 16), None, base)
    with pytest.raises(ValueError, match="lr="):
        train(plain_net(), ToyLoader(x, y, 16), None,
              TrainConfig(epochs=1, lr=0.2, progress=False, out_dir=str(tmp_path)), resume=True)
    with pytest.raises(ValueError, match="steps per epoch"):
        train(plain_net(), ToyLoader(x, y, 8), None, base, resume=True)
    with pytest.raises(ValueError, match="out_dir"):
        train(plain_net(), ToyLoader(x, y, 16), None, TrainConfig(epochs=1, lr=0.1),
              resume=True)
    # a finished run resumes to nothing more: same history, no new line
    res = train(plain_net(), ToyLoader(x, y, 16), None, base, resume=True)
    assert [r["epoch"] for r in res.history] == [1] and len(metrics_lines(tmp_path)) == 1


# --------------------------------------------------------------------------- (2) DDP


def _kill_tree(marker: str) -> None:
    """SIGKILL every process whose command line contains ``marker`` (torchrun starts its
    workers in sessions of their own, so killing torchrun's process group misses them)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def _torchrun(tmp_path, attempt: int):
    """Run the two-rank worker; returns (return code or None on timeout, its log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "ddp_worker.py"), str(tmp_path)]
    log = tmp_path / f"torchrun-{attempt}.log"
    with open(log, "w") as fh:  # a file, not a pipe: a stray worker cannot block the test
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _kill_tree(str(tmp_path))
            proc.wait()
            rc = None
    return rc, log.read_text()[-3000:]


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    # one retry on a timeout: on a loaded machine a rank can sit in gloo's rendezvous until
    # killed, which says nothing about train()
    rc, err = _torchrun(tmp_path, 0)
    if rc is None:
        rc, err = _torchrun(tmp_path, 1)
    assert rc is not None, f"DDP run timed out twice: {err}"
    assert rc == 0, err
    for kind in ("plain", "resnet"):
        r0, r1 = (torch.load(tmp_path / f"{kind}-rank{r}.pt", weights_only=True) for r in (0, 1))
        # every rank ends with the same weights and buffers (BN running stats: rank 0's)
        for k in r0["state"]:
            assert torch.equal(r0["state"][k], r1["state"][k]), (kind, k)
        # metrics are reduced over ranks: both see the global numbers
        assert [drop_timing(h) for h in r0["history"]] == [drop_timing(h) for h in r1["history"]]
        assert not r0["group_alive"] and not r1["group_alive"]  # train() destroyed its group
        # only rank 0 wrote: its metrics and checkpoint; rank 1's folder never appeared
        assert sorted(p.name for p in (tmp_path / kind / "rank0").iterdir()) == [
            "checkpoint.pt", "metrics.jsonl"]
        assert not (tmp_path / kind / "rank1").exists()
        assert r0["checkpoint"] is not None and r1["checkpoint"] is None
    # the BN-free net: 2 ranks x 8 samples == 1 process x 16 samples, to float rounding
    model, (tl, vl), config, kw = ddp_case("plain", 0, 1, tmp_path / "single")
    single = train(model, tl, vl, config, **kw)
    ddp = torch.load(tmp_path / "plain-rank0.pt", weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=1e-5, atol=1e-6)
    for a, b in zip(ddp["history"], single.history):
        assert a["epoch"] == b["epoch"] and a["test_acc"] == b["test_acc"]
        for key in ("train_loss", "train_extra", "test_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert load_checkpoint(tmp_path / "plain" / "rank0" / "checkpoint.pt")["world_size"] == 2


# --------------------------------------------------------------------------- (3) learning


def test_learns_a_separable_toy_problem():
    x, y = toy_data(256, seed=0)
    xt, yt = toy_data(128, seed=1)
    config = TrainConfig(epochs=4, lr=0.05, warmup_epochs=0.5, progress=False, seed=1)
    res = train(tiny_resnet(), ToyLoader(x, y, 32, seed=2), ToyLoader(xt, yt, 32, shuffle=False),
                config)
    assert res.final_acc >= 0.9  # chance: 0.25
    assert res.best_acc >= res.final_acc and 1 <= res.best_epoch <= 4
    assert res.history[-1]["train_loss"] < 0.5 * res.history[0]["train_loss"]
    assert res.checkpoint is None and res.seconds > 0


# --------------------------------------------------------------------------- (4) hooks


def test_hooks_are_called_and_logged(tmp_path):
    x, y = toy_data(48)
    calls = {"extra": 0, "after": 0, "epochs": []}
    seen_modules = set()

    def extra(module):
        calls["extra"] += 1
        seen_modules.add(type(module).__name__)
        return torch.tensor(0.25) + 0 * next(module.parameters()).sum()

    def after(module):
        calls["after"] += 1
        assert module.training

    def metrics(module, epoch):
        calls["epochs"].append(epoch)
        return {"custom": {"epoch_twice": torch.tensor(2 * epoch)}, "n": np.int64(7)}

    loader = ToyLoader(x, y, 16)
    config = TrainConfig(epochs=2, lr=0.1, progress=False, out_dir=str(tmp_path),
                         deterministic=True)
    res = train(plain_net(), loader, None, config, extra_loss=extra, after_step=after,
                epoch_metrics=metrics)
    assert calls == {"extra": 6, "after": 6, "epochs": [1, 2]}
    assert seen_modules == {"Sequential"}
    assert loader.epochs_set == [0, 1]
    assert not torch.are_deterministic_algorithms_enabled()  # restored
    for r in metrics_lines(tmp_path) + res.history:
        assert r["train_extra"] == pytest.approx(0.25)
        assert r["custom"] == {"epoch_twice": 2 * r["epoch"]} and r["n"] == 7
        assert "test_acc" not in r
    assert res.final_acc is None and res.best_acc is None

    with pytest.raises(ValueError, match="reserved"):
        train(plain_net(), ToyLoader(x, y, 16), None, TrainConfig(epochs=1, lr=0.1,
              progress=False), epoch_metrics=lambda m, e: {"train_loss": 0})


# --------------------------------------------------------------------------- (5) checkpoint


def test_checkpoint_is_atomic_and_weights_only(tmp_path, monkeypatch):
    x, y = toy_data(32)
    config = TrainConfig(epochs=2, lr=0.1, progress=False, out_dir=tmp_path, batch_size=16)
    model = tiny_resnet()
    train(model, ToyLoader(x, y, 16), ToyLoader(x, y, 16, shuffle=False), config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 4 and ck["steps_per_epoch"] == 2
    assert ck["config"] == config.to_dict() and ck["config"]["out_dir"] == str(tmp_path)
    assert ck["history"] == metrics_lines(tmp_path) and len(ck["history"]) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(ck["model"][k], v)
    rng = ck["rng"][0]
    assert rng["torch"].dtype == torch.uint8 and len(rng["python"]["state"]) == 625
    assert rng["numpy"]["keys"].shape == (624,) and ck["loader"][0]["gen"].dtype == torch.uint8
    assert ck["scaler"] == {} and ck["world_size"] == 1

    # a save that dies half-way leaves the previous checkpoint intact and no temporary file
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"x": 1}, tmp_path / "checkpoint.pt")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


# --------------------------------------------------------------------------- (6) validation


@pytest.mark.parametrize("kw, word", [
    ({"epochs": 0}, "epochs"), ({"epochs": 2.0}, "epochs"), ({"lr": 0}, "lr"),
    ({"lr": float("nan")}, "lr"), ({"momentum": 1.0}, "momentum"),
    ({"nesterov": True, "momentum": 0.0}, "nesterov"), ({"weight_decay": -1e-4}, "weight_decay"),
    ({"schedule": "step"}, "schedule"), ({"milestones": (0.75, 0.5)}, "milestones"),
    ({"milestones": (0.5, 3)}, "milestones"), ({"milestones": (11,)}, "milestones"),
    ({"milestones": 5}, "milestones"), ({"gamma": 0}, "gamma"),
    ({"warmup_epochs": 10}, "warmup_epochs"), ({"warmup_epochs": -1}, "warmup_epochs"),
    ({"batch_size": 0}, "batch_size"), ({"device": "gpu"}, "device"),
    ({"device": "cuda:x"}, "device"), ({"amp": "yes"}, "amp"),
    ({"channels_last": 1}, "channels_last"), ({"compile": "no"}, "compile"),
    ({"seed": -1}, "seed"), ({"out_dir": ""}, "out_dir"), ({"out_dir": 3}, "out_dir"),
    ({"checkpoint_every": -1}, "checkpoint_every"), ({"log_every": 0}, "log_every"),
    ({"restart_step": 0}, "restart_step"), ({"restart_step": 2.0}, "restart_step"),
    ({"restart_warmup": -1}, "restart_warmup"), ({"restart_warmup": 0.5}, "restart_warmup"),
])
def test_config_validation_names_the_bad_value(kw, word):
    with pytest.raises(ValueError, match=word):
        TrainConfig(**{"epochs": 10, "lr": 0.1, **kw})


def test_config_accepts_and_normalises():
    c = TrainConfig(epochs=10, lr=0.1, milestones=[3, 6], out_dir=Path("/tmp/x"), amp="off")
    assert c.milestones == (3, 6) and c.out_dir == "/tmp/x"
    assert c.to_dict()["milestones"] == [3, 6]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0


def test_runtime_refusals():
    x, y = toy_data(16)
    with pytest.raises(ValueError, match="amp='on' needs a CUDA device"):
        train(plain_net(), ToyLoader(x, y, 16), None,
              TrainConfig(epochs=1, lr=0.1, device="cpu", amp="on", progress=False))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            train(plain_net(), ToyLoader(x, y, 16), None,
                  TrainConfig(epochs=1, lr=0.1, device="cuda", progress=False))
    with pytest.raises(ValueError, match="config"):
        train(plain_net(), ToyLoader(x, y, 16), None, {"epochs": 1})
    with pytest.raises(ValueError, match="plain module"):
        train(tnn.DataParallel(plain_net()), ToyLoader(x, y, 16), None,
              TrainConfig(epochs=1, lr=0.1))
    net = plain_net()
    assert unwrap(tnn.DataParallel(net)) is net and unwrap(net) is net


# --------------------------------------------------------------------------- (7) schedules


def _observed_lrs(config, steps_per_epoch):
    opt, sched = make_optimizer(plain_net(), config, steps_per_epoch)
    lrs = []
    for _ in range(config.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_with_warmup_by_hand():
    # 4 epochs x 10 steps, 1 warm-up epoch: W = 10, T = 40
    config = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1, schedule="cosine")
    lrs = _observed_lrs(config, 10)
    hand = {0: 0.01, 4: 0.05, 9: 0.1,  # (s + 1) / 10 * 0.1, cosine still at p = 0
            10: 0.1, 25: 0.05,  # p = 15/30: cos(pi/2) = 0
            30: 0.05 * (1 + math.cos(math.pi * 20 / 30)),
            39: 0.05 * (1 + math.cos(math.pi * 29 / 30))}
    for s, want in hand.items():
        assert lrs[s] == pytest.approx(want, rel=1e-12, abs=1e-15), s
        assert lr_at(config, s, 10) == pytest.approx(want, rel=1e-12, abs=1e-15), s
    assert all(v > 0 for v in lrs)


@pytest.mark.parametrize("milestones", [(0.5, 0.8), (5, 8)])
def test_multistep_by_hand(milestones):
    # 10 epochs x 5 steps, milestones at epochs 5 and 8 -> steps 25 and 40
    config = TrainConfig(epochs=10, lr=0.1, schedule="multistep", milestones=milestones,
                         gamma=0.1)
    lrs = _observed_lrs(config, 5)
    hand = {0: 0.1, 24: 0.1, 25: 0.01, 39: 0.01, 40: 0.001, 49: 0.001}
    for s, want in hand.items():
        assert lrs[s] == pytest.approx(want, rel=1e-12), s


def test_multistep_and_constant_with_warmup_by_hand():
    c = TrainConfig(epochs=4, lr=0.2, schedule="multistep", milestones=(2,), gamma=0.5,
                    warmup_epochs=0.5)  # S = 4: W = 2 steps; milestone at step 8
    assert [lr_at(c, s, 4) for s in (0, 1, 2, 7, 8, 15)] == pytest.approx(
        [0.1, 0.2, 0.2, 0.2, 0.1, 0.1])
    k = TrainConfig(epochs=3, lr=0.3, schedule="constant", warmup_epochs=1)
    assert [lr_at(k, s, 3) for s in range(9)] == pytest.approx(
        [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3])


def test_restarted_schedules_by_hand():
    # cosine, 4 epochs x 10 steps, 1 warm-up epoch (W = 10), restart at K = 25: the 15 steps
    # left run the 30-step cosine again, compressed
    c = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1, restart_step=25)
    lrs = _observed_lrs(c, 10)
    plain = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1)
    assert lrs[:25] == pytest.approx([lr_at(plain, s, 10) for s in range(25)], rel=1e-12)
    hand = {25: 0.1, 30: 0.05 * (1 + math.cos(math.pi * 5 / 15)),
            39: 0.05 * (1 + math.cos(math.pi * 14 / 15))}
    for s, want in hand.items():
        assert lrs[s] == pytest.approx(want, rel=1e-12), s
    # multistep, 10 epochs x 5 steps, milestones at 0.5 and 0.8 of the schedule; restart at
    # step 30: the 20 steps left drop at 30 + 10 and 30 + 16
    m = TrainConfig(epochs=10, lr=0.1, schedule="multistep", milestones=(0.5, 0.8), gamma=0.1,
                    restart_step=30)
    got = [lr_at(m, s, 5) for s in (24, 25, 29, 30, 39, 40, 45, 46, 49)]
    assert got == pytest.approx([0.1, 0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # a restart at or past the end changes nothing
    late = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1, restart_step=40)
    assert [lr_at(late, s, 10) for s in range(40)] == [lr_at(plain, s, 10) for s in range(40)]
    # a 4-step warm-up from the restart: 1/4, 2/4, 3/4 of the rewound cosine, then all of it
    warm = dataclasses.replace(c, restart_warmup=4)
    got = _observed_lrs(warm, 10)
    assert got[:25] == pytest.approx(lrs[:25], rel=1e-12)
    for s, f in ((25, 0.25), (26, 0.5), (27, 0.75), (28, 1.0), (30, 1.0), (39, 1.0)):
        want = f * 0.05 * (1 + math.cos(math.pi * (s - 25) / 15))
        assert got[s] == pytest.approx(want, rel=1e-12), s


def test_resume_refuses_a_checkpoint_written_without_the_restart(tmp_path):
    """A checkpoint from before ``restart_step`` existed ran the plain schedule: resuming it
    with a restart would change the trajectory, so it is refused by name."""
    x, y = toy_data(32)
    base = TrainConfig(epochs=2, lr=0.1, progress=False, out_dir=str(tmp_path))
    train(plain_net(), ToyLoader(x, y, 16), None, base)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["config"].pop("restart_step") is None  # as an older checkpoint has it
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="restart_step=None, config has restart_step=3"):
        train(plain_net(), ToyLoader(x, y, 16), None,
              dataclasses.replace(base, restart_step=3), resume=True)
    res = train(plain_net(), ToyLoader(x, y, 16), None, base, resume=True)  # as it was: fine
    assert [r["epoch"] for r in res.history] == [1, 2]


def test_logged_lr_is_the_last_step_of_the_epoch():
    x, y = toy_data(32)
    config = TrainConfig(epochs=3, lr=0.1, warmup_epochs=1, progress=False)
    res = train(plain_net(), ToyLoader(x, y, 16), None, config)
    assert [r["lr"] for r in res.history] == [lr_at(config, 2 * e - 1, 2) for e in (1, 2, 3)]
