"""The prepared GPU check: every GPU path of ``nn`` exercised and measured in one command.

A GPU machine is lent to this project now and then, for minutes; this script is what to run
first when one is.  On one H100/H200 it finishes in about 6 minutes (``--deadline`` 450 s: a
section that would start after it is recorded as skipped, with the reason) and writes
``benchmarks/results/gpu_check_<device>.json`` plus a printed table.  Sections, each recorded
with ``ok`` (or the error and its traceback) and its measurements:

``environment``   torch, CUDA, the devices; that ``nn`` imported without pyomo/highspy/numba.
``spr_launches``  kernel launches of one SPR penalty step (``SPRRegularizer.add_grad_``) for
                  ResNet-56: profiler-counted CPU operators and, on CUDA, the CUDA kernels
                  themselves (goal <= 30, independent of the number of groups).
``training``      ResNet-56 on CIFAR-shaped synthetic data (3x32x32, 10 classes) with SPR
                  (``train(extra_grad=...)``, deterministic) under AMP bf16, AMP fp16 (loss
                  scaling), channels-last and ``torch.compile``: the loss falls, nothing is
                  non-finite, and a run cut in its last epoch resumes bit-exactly.
``spr_overhead``  a training step at batch 128 (AMP bf16) without and with the penalty, eager
                  and with ``torch.compile(model)``, interleaved rounds (goal < 1% on GPU).
``gate_overhead`` the variational gates' step at theta = 1 against a plain step, per
                  estimator (``st``, ``flip``).
``latency``       pruned vs dense forward latency at batch 256 in fp16 and bf16 (BN folded,
                  channels-last): half the filters removed, kept widths as they fall, rounded
                  to multiples of 8 and of 32.
``ddp``           two processes train with SPR over NCCL (over gloo on the CPU dry run); both
                  end with the same weights.  Skipped with fewer than 2 GPUs.

The dry run ``--device cpu --tiny`` (ResNet-20 at width 1/4, 8x8 images, a few steps, no AMP,
no ``torch.compile``: neither exists on the CPU path) runs every other code path and is a test
of the suite (``tests/test_gpu_check.py``).  Exit status 0 when every section that ran is ok.

    python -m benchmarks.gpu_check                              # on the GPU machine
    python -m benchmarks.gpu_check --device cpu --tiny --out /tmp/gc   # the dry run (~1 min)

On this project's lent machine (its own torch with CUDA; of ``nn``'s needs only
array-api-compat is missing): once, here, ``python3 -m pip download --no-deps
--only-binary=:all: -d .whl array-api-compat==1.16.0`` (``.whl/`` is git-ignored), then run with
``.whl`` carried: ``python3 -m pip install -q --no-index --no-deps --target /tmp/site
.whl/*.whl && PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_check``.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from benchmarks import _common
from benchmarks.measure import fold_bn, fraction_masks, interleaved_rounds, kept_rounds, \
    launch_count, paired_ratio, round_masks, summarize, train_step

SECTIONS = ("environment", "spr_launches", "training", "spr_overhead", "gate_overhead",
            "latency", "ddp")
LAUNCH_GOAL = 30
OVERHEAD_GOAL_PCT = {"cuda": 1.0, "cpu": 3.0}


class Skip(Exception):
    """A section that cannot run here (said why); not a failure."""


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the dry run)")
    p.add_argument("--tiny", action="store_true", help="tiny model and data: the dry run")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--deadline", type=float, default=450.0,
                   help="seconds after which no further section starts (default 450)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per timing section (default 30; 3 with --tiny)")
    p.add_argument("--out", default=None, help="result stem (default benchmarks/results/"
                   "gpu_check_<device>)")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_worker is not None:
        return args
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section {bad[0]!r}: choose from {', '.join(SECTIONS)}")
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device here (for the dry run: "
                "--device cpu --tiny)")
    if args.repeats is None:
        args.repeats = 3 if args.tiny else 30
    elif args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


class Sizes:
    """Model and data of the check: ResNet-56 on 3x32x32, or the tiny dry run."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.model, self.width = ("resnet20", 0.25) if tiny else ("resnet56", 1.0)
        self.image = 8 if tiny else 32
        self.n_train, self.n_test = (256, 64) if tiny else (4096, 512)
        self.batch = 32 if tiny else 128
        self.epochs = 3
        self.latency_batch = 16 if tiny else 256

    def build(self, device, seed=0):
        from nn import build_model

        torch.manual_seed(seed)
        return build_model(self.model, 10, 3, self.width).to(device)

    def batch_xy(self, device, batch=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        n = batch or self.batch
        return (torch.randn(n, 3, self.image, self.image, generator=g).to(device),
                torch.randint(0, 10, (n,), generator=g).to(device))


# ---- sections --------------------------------------------------------------------------------

def environment(args, sz, device):
    import subprocess

    # a fresh interpreter: what importing nn alone loads (this process may hold more)
    probe = ("import sys, nn, nn.training, nn.methods; print(','.join(m for m in "
             "('pyomo', 'highspy', 'numba') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"importing nn failed: {done.stderr.strip()[-2000:]}")
    heavy = [m for m in done.stdout.strip().split(",") if m]
    out = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
           "nn_imported_without": ["pyomo", "highspy", "numba"] if not heavy else [],
           "modules_loaded_by_nn": heavy}
    if heavy:
        raise AssertionError(f"importing nn loaded {heavy}: the GPU image lacks them")
    return out


def _reg(model, sz):
    from nn import SPRConfig, SPRRegularizer

    return SPRRegularizer(model, SPRConfig(lam=1.0), (3, sz.image, sz.image))


def spr_launches(args, sz, device):
    from nn import build_model

    out = {}
    for name in ("resnet20", "resnet56"):
        torch.manual_seed(0)
        model = build_model(name, 10, 3, sz.width).to(device)
        reg = _reg(model, sz)
        model(sz.batch_xy(device, 2)[0]).sum().backward()  # .grad exists, as in a step
        reg.path = "per-family"
        per_family = launch_count(reg.add_grad_)
        reg.path = "flat"  # the GPU's path (the default there)
        c = launch_count(reg.add_grad_)
        out[name] = {"groups": reg.flat.n_groups, "tensors": len(reg.flat.names),
                     "cpu_ops": c["cpu_ops"], "cuda_kernels": c["cuda_kernels"],
                     "by_op": c["by_op"], "per_family_cpu_ops": per_family["cpu_ops"],
                     "per_family_cuda_kernels": per_family["cuda_kernels"]}
    n = out["resnet56"]["cuda_kernels"] or out["resnet56"]["cpu_ops"]
    out["goal"] = LAUNCH_GOAL
    out["meets_goal"] = n <= LAUNCH_GOAL
    out["independent_of_groups"] = out["resnet20"]["cpu_ops"] == out["resnet56"]["cpu_ops"]
    if not (out["meets_goal"] and out["independent_of_groups"]):
        raise AssertionError(f"SPR step launches {n} (goal <= {LAUNCH_GOAL}), resnet20 vs "
                             f"resnet56 CPU ops {out['resnet20']['cpu_ops']} vs "
                             f"{out['resnet56']['cpu_ops']}")
    return out


def _train_variants(device):
    if device.type == "cpu":
        return {"fp32": {"amp": "off"}, "channels-last": {"amp": "off", "channels_last": True}}
    return {"amp-bf16": {"amp": "bf16"}, "amp-fp16": {"amp": "fp16"},
            "channels-last": {"amp": "bf16", "channels_last": True},
            "compile": {"amp": "bf16", "channels_last": True, "compile": True}}


def _one_training(sz, device, options, out_dir, stop_at=None):
    from nn.data import load_dataset, make_loader
    from nn.training import TrainConfig, train

    data = load_dataset("synthetic", device=device, n_train=sz.n_train, n_test=sz.n_test,
                        image_size=sz.image, channels=3, num_classes=10)
    cl = bool(options.get("channels_last"))
    loaders = [make_loader(data, split, sz.batch, seed=1, device=device, channels_last=cl)
               for split in ("train", "test")]
    model = sz.build("cpu")
    reg = _reg(model, sz)
    cfg = TrainConfig(epochs=sz.epochs, lr=0.05, warmup_epochs=0.5, device=str(device),
                      deterministic=True, seed=3, out_dir=str(out_dir), progress=False,
                      **options)
    steps = [0]

    class Cut(Exception):
        pass

    def after_step(m):
        reg.project_()
        steps[0] += 1
        if stop_at is not None and steps[0] == stop_at:
            raise Cut

    hooks = {"extra_grad": lambda m, scale: reg.add_grad_(scale), "after_step": after_step}
    try:
        res = train(model, *loaders, cfg, **hooks)
    except Cut:
        model = sz.build("cpu", seed=99)  # other weights: the resume must restore them
        reg = _reg(model, sz)
        hooks["extra_grad"] = lambda m, scale: reg.add_grad_(scale)
        stop_at = None
        res = train(model, *loaders, cfg, resume=True, **hooks)
    return model, res, len(loaders[0])


def training(args, sz, device):
    out = {}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in _train_variants(device).items():
            t0 = time.perf_counter()
            try:
                model, res, steps = _one_training(sz, device, options, Path(tmp, name, "full"))
                cut, res_cut, _ = _one_training(sz, device, options, Path(tmp, name, "cut"),
                                                stop_at=(sz.epochs - 1) * steps + steps // 2)
                losses = [h["train_loss"] for h in res.history]
                extras = [h["train_extra"] for h in res.history]
                a, b = model.state_dict(), cut.state_dict()
                same = [k for k in a if torch.equal(a[k].cpu(), b[k].cpu())]
                row = {"options": options, "train_loss": losses, "penalty": extras,
                       "test_acc": res.final_acc, "loss_falls": losses[-1] < losses[0],
                       "finite": all(map(_finite, losses + extras)),
                       "resume_bit_exact": len(same) == len(a),
                       "tensors_equal_after_resume": f"{len(same)}/{len(a)}",
                       "seconds": time.perf_counter() - t0}
                row["ok"] = row["loss_falls"] and row["finite"] and row["resume_bit_exact"]
            except Exception as e:  # noqa: BLE001 -- one variant's failure is recorded
                row = {"options": options, "ok": False, "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(), "seconds": time.perf_counter() - t0}
            out[name] = row
            if not row["ok"]:
                failures.append(name)
    if device.type == "cpu":
        out["not_run_here"] = "AMP bf16/fp16 and torch.compile: CUDA only in this check"
    if failures:
        raise _Partial(out, f"training variants failed: {', '.join(failures)}")
    return out


class _Partial(Exception):
    """A section that measured something but failed a check: keeps what it measured."""

    def __init__(self, result, message):
        super().__init__(message)
        self.result = result


def _finite(x) -> bool:
    return x is not None and x == x and abs(x) != float("inf")


def _penalty(reg, mode):
    """What :func:`benchmarks.measure.train_step` takes for ``mode``: ``none``, ``fused``
    (``add_grad_`` after backward, the training loop's) or ``autograd`` (the term in the loss)."""
    return {"none": None, "fused": reg, "autograd": reg.__call__}[mode]


def _overhead_rows(rounds_ms, base, seed=0):
    rows = {}
    for name, ms in rounds_ms.items():
        s = summarize(ms)
        row = {"median_ms": s["median_ms"], "q1_ms": s["q1_ms"], "q3_ms": s["q3_ms"]}
        if name != base:
            r = paired_ratio(rounds_ms[base], ms, seed=seed)
            row.update(ratio=r["ratio_of_medians"], overhead_pct=100 * (r["ratio_of_medians"] - 1),
                       ci95_pct=[100 * (r["ci95"][0] - 1), 100 * (r["ci95"][1] - 1)])
        rows[name] = row
    return rows


def spr_overhead(args, sz, device):
    model = sz.build(device)
    reg = _reg(model, sz)
    x, y = sz.batch_xy(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    steps = {m: train_step(model, opt, x, y, _penalty(reg, m), dtype)
             for m in ("none", "fused", "autograd")}
    compile_s = None
    if device.type == "cuda":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.compile(model)
            t0 = time.perf_counter()
            for m in ("none", "fused"):
                steps["compiled_" + m] = train_step(net, opt, x, y, _penalty(reg, m), dtype)
                steps["compiled_" + m]()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
    rounds = interleaved_rounds(steps, args.repeats, 3, device)
    _, clean, ms = kept_rounds(rounds)
    rows = _overhead_rows({k: v for k, v in ms.items() if not k.startswith("compiled_")}, "none")
    if compile_s is not None:
        rows.update({k: v for k, v in _overhead_rows(
            {k: v for k, v in ms.items() if k.startswith("compiled_")}, "compiled_none").items()})
    goal = OVERHEAD_GOAL_PCT[device.type]
    out = {"batch": sz.batch, "amp": str(dtype), "rows": rows, "goal_pct": goal,
           "compile_s": compile_s, "clean_rounds_only": clean,
           "meets_goal": {k: r["overhead_pct"] < goal for k, r in rows.items()
                          if k in ("fused", "compiled_fused")}}
    return out  # timing is reported, not asserted: a noisy machine is not a broken path


def gate_overhead(args, sz, device):
    from benchmarks.gate_overhead import gated_step
    from nn.methods.variational import ESTIMATORS, GatedResNet, VariationalOptions, hooks

    x, y = sz.batch_xy(device)
    base = sz.build(device)
    steps = {"plain": train_step(base, torch.optim.SGD(base.parameters(), lr=1e-4), x, y)}
    for est in ESTIMATORS:
        net = sz.build("cpu")
        net.load_state_dict(base.state_dict())
        gated = GatedResNet(net, (3, sz.image, sz.image), lam=1.0, estimator=est).to(device)
        opts = VariationalOptions(theta_lr=1e-9, gate_warmup_epochs=0, estimator=est)
        opt = torch.optim.SGD(net.parameters(), lr=1e-4)
        steps[est] = gated_step(gated, opt, x, y, hooks(gated, opts, 1)["after_backward"])
    rounds = interleaved_rounds(steps, args.repeats, 3, device)
    _, clean, ms = kept_rounds(rounds)
    return {"batch": sz.batch, "rows": _overhead_rows(ms, "plain"), "clean_rounds_only": clean,
            "note": "theta = 1 (nothing pruned): the price of the gates themselves"}


def latency(args, sz, device):
    from nn import compress, count_macs
    from nn.models import build_families

    dense = sz.build(device).eval()
    fams = build_families(dense)
    half = fraction_masks(fams, 0.5, seed=0)
    ragged = fraction_masks(fams, 0.45, seed=0)  # kept widths 9, 18, 35: no alignment
    models = {"dense": dense, "filters45_ragged": compress(dense, ragged),
              "filters50_r8": compress(dense, round_masks(fams, half, 8)),
              "filters50_r32": compress(dense, round_masks(fams, half, 32))}
    shape = (3, sz.image, sz.image)
    macs = {k: count_macs(m, shape) for k, m in models.items()}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16} if device.type == "cuda" else \
        {"fp32": torch.float32}
    x, _ = sz.batch_xy(device, sz.latency_batch)
    fns = {}
    for dname, dt in dtypes.items():
        xin = x.to(dt).contiguous(memory_format=torch.channels_last)
        for name, m in models.items():
            net = fold_bn(copy.deepcopy(m)).to(device, dt).to(memory_format=torch.channels_last)

            def fwd(net=net, xin=xin):
                with torch.inference_mode():
                    return net(xin)
            fns[f"{dname}:{name}"] = fwd
    rounds = interleaved_rounds(fns, args.repeats, 3, device)
    _, clean, ms = kept_rounds(rounds)
    rows = {}
    for key, t in ms.items():
        dname, name = key.split(":")
        dense_ms = statistics.median(ms[f"{dname}:dense"])
        rows[key] = {"median_ms": statistics.median(t), "mac_ratio": macs[name] / macs["dense"],
                     "latency_ratio": statistics.median(t) / dense_ms,
                     "speedup": dense_ms / statistics.median(t)}
    return {"batch": sz.latency_batch, "rows": rows, "clean_rounds_only": clean,
            "layout": "BN folded, channels-last, inference_mode"}


def ddp_worker(folder: str, tiny: bool) -> None:
    """One rank of the ``ddp`` section (started by torchrun, which sets the environment that
    :func:`nn.training.train` reads): train with SPR, write the weights' checksums."""
    import json

    from nn.data import load_dataset, make_loader
    from nn.training import TrainConfig, distributed_env, train

    rank, world, local = distributed_env()
    torch.set_num_threads(1)
    sz = Sizes(tiny)
    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    data = load_dataset("synthetic", device=device, n_train=sz.n_train, n_test=sz.n_test,
                        image_size=sz.image, channels=3, num_classes=10)
    tr = make_loader(data, "train", sz.batch, seed=1, device=device, rank=rank,
                     world_size=world)
    model = sz.build("cpu")
    reg = _reg(model, sz)
    res = train(model, tr, None, TrainConfig(epochs=1, lr=0.05, device=device.type,
                                             progress=False),
                extra_grad=lambda m, scale: reg.add_grad_(scale))
    flat = torch.cat([t.detach().reshape(-1).cpu().double()
                      for t in model.state_dict().values() if t.is_floating_point()])
    Path(folder, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "sum": float(flat.sum()),
        "sum_sq": float(flat.square().sum()), "train_loss": res.history[-1]["train_loss"]}))


def ddp(args, sz, device):
    import json
    import subprocess

    world = torch.cuda.device_count() if device.type == "cuda" else 2
    if device.type == "cuda" and world < 2:
        raise Skip(f"{world} GPU: DDP over NCCL needs at least 2")
    world = min(world, 2)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", "-m", "benchmarks.gpu_check",
               "--ddp-worker", tmp] + (["--tiny"] if sz.tiny else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        log = Path(tmp, "torchrun.log")
        with open(log, "w") as fh:  # a file, not a pipe: a stray rank cannot block us
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                rc = None
        text = log.read_text()[-3000:]
        if rc != 0:
            raise AssertionError(f"torchrun {'timed out' if rc is None else f'exit {rc}'}: "
                                 f"{text}")
        got = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    out = {"backend": "nccl" if device.type == "cuda" else "gloo", "world": world,
           "same_weights_on_every_rank": len({(g["sum"], g["sum_sq"]) for g in got}) == 1,
           "train_loss": [g["train_loss"] for g in got]}
    if not out["same_weights_on_every_rank"]:
        raise _Partial(out, f"ranks ended with different weights: {got}")
    return out


# ---- driver ----------------------------------------------------------------------------------

def _slug(device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return "cpu-tiny"


def _summary(name, res) -> str:
    if res.get("status") != "ok":
        return res.get("error") or res.get("reason", "")
    r = res["result"]
    if name == "spr_launches":
        n = r["resnet56"]
        return (f"ResNet-56 SPR step: {n['cpu_ops']:.0f} CPU ops, CUDA kernels "
                f"{n['cuda_kernels']}; {n['groups']} groups")
    if name == "training":
        return "; ".join(f"{k}: loss {v['train_loss'][0]:.3f}->{v['train_loss'][-1]:.3f}, "
                         f"resume {'exact' if v['resume_bit_exact'] else 'DIFFERS'}"
                         for k, v in r.items() if isinstance(v, dict) and "train_loss" in v)
    if name in ("spr_overhead", "gate_overhead"):
        return "; ".join(f"{k} {v['overhead_pct']:+.2f}%" for k, v in r["rows"].items()
                         if "overhead_pct" in v)
    if name == "latency":
        return "; ".join(f"{k} x{v['speedup']:.2f} (MACs {v['mac_ratio']:.2f})"
                         for k, v in r["rows"].items() if not k.endswith("dense"))
    if name == "ddp":
        return f"{r['backend']} x{r['world']}: same weights {r['same_weights_on_every_rank']}"
    if name == "environment":
        return f"torch {r['torch']}, CUDA {r['cuda']}, {r['devices'] or 'no GPU'}"
    return ""


def main(argv=None) -> int:
    args = parse(argv)
    if args.ddp_worker is not None:
        ddp_worker(args.ddp_worker, args.tiny)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sz = Sizes(args.tiny)
    info = _common.machine_info(device.type)
    print(_common.format_machine(info), flush=True)
    fns = {"environment": environment, "spr_launches": spr_launches, "training": training,
           "spr_overhead": spr_overhead, "gate_overhead": gate_overhead, "latency": latency,
           "ddp": ddp}
    t_start = time.perf_counter()
    results = {}
    for name in args.sections:
        t0 = time.perf_counter()
        if results and t0 - t_start > args.deadline:  # the first section always runs
            results[name] = {"status": "skipped", "reason": f"past the {args.deadline:.0f} s "
                             "deadline: run it alone with --sections " + name}
        else:
            try:
                results[name] = {"status": "ok", "result": fns[name](args, sz, device)}
            except Skip as e:
                results[name] = {"status": "skipped", "reason": str(e)}
            except _Partial as e:
                results[name] = {"status": "failed", "error": str(e), "result": e.result}
            except Exception as e:  # noqa: BLE001 -- every section runs; failures recorded
                results[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
        print(f"{name:14s} {results[name]['status']:8s} {results[name].get('seconds', 0):6.1f} s"
              f"  {_summary(name, results[name])}", flush=True)
    stem = _common.results_path(args.out, f"gpu_check_{_slug(device)}")
    failed = [k for k, v in results.items() if v["status"] == "failed"]
    _common.write_json(stem.with_suffix(".json"), {
        "benchmark": "gpu_check", "config": vars(args), "machine": info,
        "sizes": {k: v for k, v in vars(sz).items()}, "sections": results,
        "failed": failed, "wall_s": time.perf_counter() - t_start})
    print(f"{len(results) - len(failed)}/{len(results)} sections without failure "
          f"({time.perf_counter() - t_start:.0f} s); wrote {stem}.json", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
