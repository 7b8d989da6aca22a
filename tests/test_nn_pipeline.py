"""The pruning pipeline (nn.pipeline, nn.methods, nn.selection, nn.report, nn.cli): every method end to end
on tiny synthetic data, the reloaded model is what the report says, the selection rules
(bisection, MAC target) against brute force, resume, and the command line's errors.
ResNet-20 at width 0.25 on 8x8 images, one thread."""

import json
import math
import random

import pytest
import torch

from nn import build_model, compress, count_macs, count_params, load_pruned, prunable_structures
from nn.cli import build_parser, config_from_args, main
from nn.config import ConfigError, RunConfig
from nn.data import load_dataset, make_loader
from nn.evaluation import evaluate
from nn.methods import Run, get_method
from nn.pipeline import run_pipeline
from nn.selection import (bisect_largest, bisect_threshold, cut_points, first_at_most,
                          prefix_masks, removal_order)

SYN = {"n_train": 192, "n_test": 96, "image_size": 8, "num_classes": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


LAM = {"spr": 1.0, "bigm": 1.0, "slimming": 1e-3, "variational": 1.0}


def tiny(tmp_path, method="spr", *, optim=None, runtime=None, options=None, **method_kw):
    """ResNet-20 at width 0.25 on tiny synthetic data, 2 + 1 epochs, one thread's worth."""
    return RunConfig(
        data={"name": "synthetic", "synthetic": SYN},
        model={"name": "resnet20", "width": 0.25},
        optim={"epochs": 2, "finetune_epochs": 1, "batch_size": 32, "eval_batch_size": 96,
               "lr": 0.05, "finetune_lr": 0.01} | (optim or {}),
        method={"name": method, "lam": LAM.get(method), "options": options} | method_kw,
        selection={"bisect_images": 96, "tolerance": 5.0, "mac_target": 0.6},
        runtime={"latency_batches": (1,), "latency_repeats": 2, "progress": False,
                 "device": "cpu", "amp": "off", "out": str(tmp_path / method)} | (runtime or {}))


def strict_json(path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=no_constants)


def _test_loader(cfg):
    bundle = load_dataset("synthetic", seed=cfg.runtime.seed, **cfg.data.synthetic)
    return make_loader(bundle, "test", cfg.optim.eval_batch_size)


# ---- end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["spr", "bigm", "dense", "l1-filter", "slimming",
                                    "variational", "random"])
def test_every_method_end_to_end(tmp_path, method):
    extra = dict(lam=3.0, options={"theta_lr": 0.05, "gate_warmup_epochs": 0.5}) \
        if method == "variational" else {}
    cfg = tiny(tmp_path, method, **extra)
    report = run_pipeline(cfg)
    out = tmp_path / method
    assert strict_json(out / "report.json") == json.loads(json.dumps(report))
    plots = {"widths.png", "training.png"} | ({"cases.png"} if method in ("spr", "bigm") else
                                              {"theta.png", "gates.png"}
                                              if method == "variational" else set())
    assert plots <= {p.split("/")[-1] for p in report["files"]["plots"]}
    assert all((out / p).stat().st_size > 1000 for p in plots)

    # the saved model, reloaded, is what the report describes
    small = load_pruned(out / "pruned.pt")
    acc = evaluate(small, _test_loader(cfg))
    a = report["accuracy"]
    assert acc == a["test_reloaded"] == a["test_final"] and a["reload_matches"]
    c = report["complexity"]
    assert c["pruned"] == {"macs": count_macs(small, (3, 8, 8)), "params": count_params(small)}
    dense = build_model("resnet20", 4, 3, 0.25)
    assert c["dense"] == {"macs": count_macs(dense, (3, 8, 8)), "params": count_params(dense)}
    assert c["macs_ratio"] == pytest.approx(c["pruned"]["macs"] / c["dense"]["macs"])
    assert report["config"]["method"]["name"] == method == report["method"]
    assert set(report["git"]) == {"commit", "dirty"}
    assert len(report["history"]["train"]) == 2
    assert len(report["history"]["finetune"]) == (0 if method == "dense" else 1)
    assert set(report["latency"]["batches"]) == {"1"}

    # layer widths and blocks as the pruned module has them
    mods = dict(small.named_modules())
    for b in report["blocks"]:
        s, i = b["name"].split(".")
        kept = [blk for blk in small.spec["stages"][int(s[-1]) - 1]]
        spec = [blk for blk in kept if blk["source"] == b["name"]]
        assert (b["branch"] == "removed") == (not spec)
        if not spec:
            continue
        spec = spec[0]
        assert spec["branch"] == b["branch"]
        if b["branch"] == "convs":
            prefix = f"{s}.{kept.index(spec)}"
            assert mods[f"{prefix}.conv1"].out_channels == b["mid"][0]
    widths = {r["name"]: r for r in report["layers"]}
    assert widths["conv1"]["pruned"] == small.conv1.out_channels

    sel = report["selection"]
    if method == "dense":
        assert c["macs_ratio"] == 1 and a["test_after_finetune"] is None
        assert sel["rule"] == "none"
    elif method in ("spr", "bigm"):
        assert sel["rule"] == "bisection"
        assert sel["train_acc_unpruned"] - sel["train_acc_pruned"] <= 0.05 + 1e-12
        assert report["regularizer"]["penalty"] == method
        assert "spr_C2" in report["history"]["train"][0]
        assert c["pruned"]["macs"] == sel["macs_at_cut"]
    elif method == "variational":
        assert sel["rule"] == "variational" and report["regularizer"]["lam"] == 3.0
        hist = report["history"]["train"]
        assert len(hist[-1]["theta"]) == len(hist[0]["theta"]) > 0
        # pruning happened during training (theta fell: with the default estimator a gate
        # dies only on evidence gathered at theta = 0, more steps than this run has), the
        # network before surgery is the rounded one
        assert hist[-1]["gates_det_macs"] < hist[0]["gates_det_macs"]
        assert sel["bn_recalibration_batches"] == 1  # 96 images, eval batch 96
        assert sel["rounded_up"] + sel["rounded_down"] <= sel["structures"]
        assert c["pruned"]["macs"] == sel["before_rounding"]["det_macs"]
        assert c["pruned"]["macs"] < c["dense"]["macs"]
    else:
        assert sel["rule"] == "mac-target" and sel["target_reached"]
        target = 0.6 * c["dense"]["macs"]
        assert c["pruned"]["macs"] <= target < sel["macs_previous_cut"]


def test_cli_run_then_resume_skips_every_stage(tmp_path, capsys):
    argv = ["train", "--method", "spr", "--model", "resnet20", "--width", "0.25", "--data",
            "synthetic", "--synthetic", "n_train=128,n_test=64,image_size=8,num_classes=4",
            "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32", "--lam", "1",
            "--bisect-images", "64", "--tolerance", "5", "--latency-batches", "1",
            "--latency-repeats", "2", "--no-progress", "--device", "cpu", "--out",
            str(tmp_path / "run")]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "test accuracy" in table and "MACs" in table and "reloaded" in table
    run = tmp_path / "run"
    files = [run / "train/checkpoint.pt", run / "finetune/checkpoint.pt", run / "report.json",
             run / "pruned.pt"]
    stamps = [f.stat().st_mtime_ns for f in files]
    first = strict_json(run / "report.json")
    assert first["timings"]["ran"] == {"train": True, "select": True, "finetune": True}

    assert main(argv + ["--resume"]) == 0  # complete: nothing runs, the table is printed
    assert capsys.readouterr().out == table
    assert [f.stat().st_mtime_ns for f in files] == stamps

    # interrupted during the report (and before fine-tuning's marker): only those redo
    (run / "report.json").unlink()
    (run / "finetune/done.json").unlink()
    assert main(argv + ["--resume"]) == 0
    again = strict_json(run / "report.json")
    assert again["timings"]["ran"] == {"train": False, "select": False, "finetune": True}
    assert len(again["history"]["finetune"]) == 1  # resumed after its last epoch: none re-run
    assert [f.stat().st_mtime_ns for f in files[:2]] == stamps[:2]
    assert again["accuracy"]["test_reloaded"] == first["accuracy"]["test_reloaded"]
    assert again["complexity"] == first["complexity"]


def test_out_holding_a_run_needs_resume_and_the_same_config(tmp_path):
    cfg = tiny(tmp_path, "dense", optim={"epochs": 1}, runtime={"latency_batches": ()})
    run_pipeline(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_pipeline(cfg)
    with pytest.raises(ConfigError, match="cannot resume .*optim.epochs was 1, now 2"):
        run_pipeline(tiny(tmp_path, "dense", optim={"epochs": 2},
                          runtime={"resume": True, "latency_batches": ()}))
    assert run_pipeline(tiny(tmp_path, "dense", optim={"epochs": 1}, runtime={
        "resume": True, "progress": True, "latency_batches": ()}))["method"] == "dense"


# ---- selection rules -------------------------------------------------------------------------

def test_bisection_picks_the_largest_threshold_within_tolerance():
    taus = [0.05 * i for i in range(41)]  # 0 .. 2
    calls = []

    def acc(tau):  # smooth, decreasing: drop <= 0.02 for tau <= sqrt(0.2) = 0.447
        calls.append(tau)
        return 0.9 - 0.1 * tau ** 2

    i, trace = bisect_threshold(taus, acc, 0.9, 0.02)
    assert taus[i] == pytest.approx(0.45 - 0.05)  # 0.40 ok (drop 0.016), 0.45 not (0.02025)
    assert len(calls) == len(trace) <= math.ceil(math.log2(len(taus) - 1)) + 1
    assert all(t["ok"] == (t["drop"] <= 0.02) for t in trace)

    rng = random.Random(0)
    for _ in range(300):  # random monotone step curves against brute force
        n = rng.randint(1, 60)
        drops = sorted(rng.choice([0.0, 0.001, 0.004, 0.005, 0.02, 0.3]) for _ in range(n))
        drops[0] = 0.0
        tol = rng.choice([0.0, 0.004, 0.005, 0.01])
        cands = sorted(rng.sample(range(1000), n))
        i, trace = bisect_threshold(cands, lambda c: 0.8 - drops[cands.index(c)], 0.8, tol)
        assert i == max(j for j in range(n) if 0.8 - (0.8 - drops[j]) <= tol)
        assert len(trace) <= (math.ceil(math.log2(n - 1)) + 1 if n > 1 else 0)
    assert bisect_threshold([1.0], lambda t: 0.0, 1.0, 0.0) == (0, [])
    with pytest.raises(ValueError):
        bisect_threshold([], lambda t: 1.0, 1.0, 0.1)


def test_first_at_most_and_bisect_largest_against_brute_force():
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(1, 40)
        vals = sorted((rng.randint(0, 30) for _ in range(n)), reverse=True)
        target = rng.randint(-1, 31)
        i, trace, reached = first_at_most(list(range(n)), lambda k: vals[k], target)
        ok = [j for j in range(n) if vals[j] <= target]
        assert reached == bool(ok) and i == (ok[0] if ok else n - 1)
        m = rng.randint(0, n)
        assert bisect_largest(lambda j: j < m, 0, n) == max(0, m - 1)


def _scores(method, model, fams):
    """A method's scores of ``fams`` of a trained ``model`` (the regularizer, where the method
    has one, is not needed for the norm score)."""
    cfg = RunConfig(method={"name": method})
    run = Run(cfg, model, (3, 8, 8), fams, fams, {}, None, 0, 1, torch.device("cpu"), 1)
    m = get_method(method)
    from nn.methods import Training
    return m.scores(run, Training(model))


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    m = build_model("resnet20", 4, 3, 0.5)
    return m, prunable_structures(m, (3, 8, 8))


@pytest.mark.parametrize("target", [0.3, 0.5, 0.77])
def test_l1_filter_reaches_the_mac_target_within_one_filter(r20, target):
    model, all_fams = r20
    fams = [f for f in all_fams if f.kind == "filter"]
    scores = _scores("l1-filter", model, fams)
    for f in fams:  # Li et al.: L1 norm of each conv filter
        w = dict(model.named_parameters())[f"{f.conv}.weight"]
        torch.testing.assert_close(scores[f.name], w.detach().abs().sum((1, 2, 3)).double())
    order = removal_order(scores, fams, per_layer=True)
    cuts = cut_points(order, scores, per_layer=True)

    def macs(k):
        return count_macs(compress(model, prefix_masks(fams, order, k)), (3, 8, 8))

    dense = macs(0)
    i, _, reached = first_at_most(cuts, macs, target * dense)
    k = cuts[i]
    assert reached and macs(k) <= target * dense < macs(k - 1)
    assert macs(k - 1) - macs(k) <= max(max(f.macs) for f in fams)  # one filter's granularity
    masks = prefix_masks(fams, order, k)
    frac = [1 - float(masks[f.name].float().mean()) for f in fams]
    assert max(frac) - min(frac) <= max(1 / f.size for f in fams) + 1e-9  # uniform per layer
    for f in fams:  # lowest L1 first within each layer
        gone, kept = scores[f.name][~masks[f.name]], scores[f.name][masks[f.name]]
        assert not len(gone) or not len(kept) or gone.max() <= kept.min()


def test_global_order_masks_are_nested_and_keep_every_stream(r20):
    model, all_fams = r20
    fams = [f for f in all_fams if f.kind in ("filter", "stream")]
    scores = _scores("spr", model, fams)
    order = removal_order(scores, fams)
    cuts = cut_points(order, scores)
    assert cuts[0] == 0 and cuts[-1] == len(order) and cuts == sorted(set(cuts))
    prev = None
    for k in cuts[::7] + [len(order)]:
        masks = prefix_masks(fams, order, k)
        if prev is not None:
            assert all(bool((masks[n] <= prev[n]).all()) for n in masks)  # nested
        prev = masks
    for f in fams:
        assert int(prev[f.name].sum()) == (1 if f.kind == "stream" else 0)
    small = compress(model, prev)  # everything removable removed: still a valid network
    assert small.spec["widths"] == [1, 1, 1]
    with pytest.raises(NotImplementedError, match="has no scores"):
        _scores("dense", model, fams)


# ---- configuration and command line ----------------------------------------------------------

@pytest.mark.parametrize("kw,word", [
    ({"method": {"name": "magic"}}, "method"), ({"method": {"structures": ("block",)}},
                                                "structures"),
    ({"selection": {"tolerance": 101}}, "tolerance"), ({"selection": {"mac_target": 0}},
                                                       "mac_target"),
    ({"data": {"synthetic": {"n_train": 8}}}, "synthetic"), ({"method": {"lam": -1}}, "lam"),
    ({"optim": {"epochs": 0}}, "epochs"), ({"optim": {"finetune_epochs": -1}},
                                           "finetune_epochs"),
    ({"method": {"cost": {"params": -1}}}, "params"), ({"method": {"cost": {"blocks": -1}}},
                                                       "blocks"),
    ({"method": {"cost": {"basis": "both"}}}, "basis"),
    ({"method": {"name": "variational", "options": {"theta_lr": 0}}}, "theta_lr"),
    ({"method": {"name": "variational", "options": {"estimator": "magic"}}}, "estimator"),
    ({"method": {"name": "variational", "options": {"theta_init": 0}}}, "theta_init"),
    ({"method": {"name": "variational", "options": {"flip_units": 0}}}, "flip_units"),
    ({"method": {"name": "variational", "options": {"flip_blocks": 1.5}}}, "flip_blocks"),
    ({"method": {"name": "variational", "options": {"alpha": 0.5}}}, "alpha"),
    ({"method": {"name": "dense", "lam": 1.0}}, "lam"),
    ({"method": {"name": "spr", "options": {"alpha": 1.5}}}, "alpha"),
    ({"method": {"name": "variational"}, "runtime": {"amp": "fp16"}}, "bf16"),
])
def test_config_validation_names_the_bad_value(kw, word):
    with pytest.raises(ValueError, match=word):
        RunConfig(**kw)


def test_quick_preset_is_a_valid_fashion_mnist_config():
    cfg = config_from_args(build_parser().parse_args(["train", "--quick"]))
    assert cfg.data.name == "fashion-mnist" and cfg.data.subset and cfg.optim.finetune_epochs >= 1
    assert cfg.method.name == "spr" and cfg.model.name == "resnet20" and cfg.preset == "quick"
    assert cfg.method.lam == 4.5 and cfg.method.options.alpha == 0.1


def test_every_default_has_one_home_and_help_prints_it_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default None" not in text and "default True" not in text
    assert "default spr 4.5, bigm 4.5, slimming 0.0001, variational 1" in text
    assert text.count("default 0.1") >= 2  # --lr and --alpha, each once
    assert "spr, bigm; default 0.1" in text and "variational; default 'batched'" in text
    cfg = RunConfig()
    assert (cfg.method.lam, cfg.method.options.M_scale, cfg.method.cost.macs) == (4.5, 2.0, 0.5)


@pytest.mark.parametrize("argv", [
    [], ["prune"], ["train", "--method", "magic"], ["train", "--lr", "-1"],
    ["train", "--lr", "nan"], ["train", "--epochs", "1.5"], ["train", "--tolerance", "200"],
    ["train", "--mac-target", "0"], ["train", "--cost", "flops"], ["train", "--alpha", "2"],
    ["train", "--synthetic", "size=3"], ["train", "--structures", "blocks"],
    ["train", "--latency-batches", "1,x"], ["train", "--bogus"],
    ["train", "--synthetic", "n_train=8"],  # needs --data synthetic: the config says no
    ["train", "--amp", "maybe"], ["train", "--beta", "2"], ["train", "--estimator", "x"],
    ["train", "--theta-lr", "0"], ["train", "--gamma", "-1"], ["train", "--flip-units", "0"],
    ["train", "--flip-blocks", "some"], ["train", "--alpha", "0.2", "--method", "variational"],
    ["train", "--theta-lr", "0.1"], ["train", "--method", "dense", "--lam", "1"],
    ["train", "--cost", "macs=x"], ["train", "--cost", "basis=both"],
    ["train", "--beta", "0.5", "--cost", "macs=1"], ["train", "--method", "l1-filter",
                                                     "--cost", "macs=1"],
    ["train", "--mac-target", "0.5"],  # spr selects by bisection: the target would be ignored
    ["train", "--method", "l1-filter", "--tolerance", "1"],
    ["train", "--budget", "macs=0.5", "--select", "bisection"], ["train", "--granularity", "8"],
    ["train", "--remove-blocks"], ["train", "--budget", "flops=0.5"],
    ["train", "--budget", "macs=2"], ["train", "--method", "dense", "--budget", "macs=0.5"],
    ["train", "--budget", "macs=0.5", "--mac-target", "0.5"],
    ["train", "--method", "variational", "--budget", "macs=0.5", "--structures", "stream"],
])
def test_cli_bad_arguments_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.count("\n") == 1 and "error" in err


def test_cli_refuses_an_out_holding_a_run_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "train").mkdir()  # a stage has started
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "synthetic", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--resume" in err


def test_pipeline_imports_neither_solvers_nor_matplotlib():
    import subprocess
    import sys

    code = ("import sys, nn.cli, nn.pipeline, nn.report; print(' '.join(sorted("
            "m.split('.')[0] for m in sys.modules)))")
    mods = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True).stdout.split())
    assert "nn" in mods and not mods & {"pyomo", "highspy", "numba", "matplotlib"}


def test_cli_flip_counts_take_all_or_a_count():
    ns = build_parser().parse_args(["train", "--method", "variational", "--flip-units", "all",
                                    "--flip-blocks", "3"])
    opts = config_from_args(ns).method.options
    assert (opts.flip_units, opts.flip_blocks) == (None, 3)
    cfg = config_from_args(build_parser().parse_args(["train", "--method", "variational"]))
    assert cfg.method.options.flip_units == 4


@pytest.mark.parametrize("argv,cost", [
    ([], dict(macs=0.5, params=0.5, blocks=0.0, basis="saved")),
    (["--cost", "params"], dict(macs=0.0, params=1.0)),
    (["--cost", "macs"], dict(macs=1.0, params=0.0)),
    (["--cost", "0.25"], dict(macs=0.25, params=0.75)),
    (["--cost", "params=1,macs=0,basis=own"], dict(macs=0.0, params=1.0, basis="own")),
    (["--method", "variational", "--beta", "0.3"], dict(macs=0.7, params=0.3)),
    (["--method", "variational", "--gamma", "2"], dict(macs=0.5, params=0.5, blocks=2.0)),
    (["--method", "variational", "--cost", "blocks=1"], dict(macs=0.5, blocks=1.0)),
])
def test_cost_spellings_old_and_new_mean_the_same(argv, cost):
    got = config_from_args(build_parser().parse_args(["train", *argv])).method.cost
    assert {k: getattr(got, k) for k in cost} == cost


def test_slimming_lambda_is_an_old_spelling_of_lam():
    ns = build_parser().parse_args(["train", "--method", "slimming", "--slimming-lambda", "0.01"])
    assert config_from_args(ns).method.lam == 0.01


def test_a_new_method_is_one_class_and_one_registration(tmp_path, monkeypatch):
    """A method the pipeline has never heard of runs end to end once registered: its hooks
    run during training, its scores drive the selection, its section lands in the report."""
    import nn.methods as M
    from nn.methods import Method, Training

    seen = {"steps": 0}

    class SmallestL2(Method):
        name, summary, score = "toy-l2", "toy: L2 norm of the group", "L2"

        def training(self, run):
            def after_step(m):
                seen["steps"] += 1
            return Training(run.model, {"after_step": after_step})

        def scores(self, run, training):
            params = dict(training.module.named_parameters())
            from nn.models import group_weights
            return {f.name: group_weights(params, f).detach().double().norm(dim=1)
                    for f in run.pruned}

        def section(self, run, training):
            return {"penalty": None, "note": "toy"}

    monkeypatch.setitem(M._REGISTRY, "toy-l2", "unused:unused")
    monkeypatch.setitem(M._loaded, "toy-l2", SmallestL2())
    report = run_pipeline(tiny(tmp_path, "toy-l2"))
    assert report["method"] == "toy-l2" and report["regularizer"] == {"penalty": None,
                                                                      "note": "toy"}
    assert seen["steps"] == 2 * 6  # 2 epochs of 192 images in batches of 32
    sel = report["selection"]
    assert sel["rule"] == "mac-target" and sel["score"] == "L2" and sel["target_reached"]
    assert report["complexity"]["pruned"]["macs"] <= 0.6 * report["complexity"]["dense"]["macs"]


def test_weights_start_the_run_and_must_fit_the_model(tmp_path):
    start = build_model("resnet20", 4, 3, 0.25)
    with torch.no_grad():
        for p in start.parameters():
            p.mul_(0.5)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    cfg = tiny(tmp_path, "dense", optim={"epochs": 1, "lr": 1e-9},
               runtime={"latency_batches": ()})
    cfg = RunConfig(**{**cfg.__dict__, "model": {"name": "resnet20", "width": 0.25,
                                                 "weights": str(tmp_path / "start.pt")}})
    run_pipeline(cfg)  # lr 1e-9: the trained weights are the start's (BN statistics aside)
    ck = torch.load(tmp_path / "dense" / "train" / "checkpoint.pt", weights_only=True)
    w = ck["model"]["layer2.0.conv1.weight"]
    torch.testing.assert_close(w, start.state_dict()["layer2.0.conv1.weight"], rtol=0,
                               atol=1e-6)
    wide = build_model("resnet20", 4, 3, 0.5)
    torch.save({"state_dict": wide.state_dict()}, tmp_path / "wide.pt")
    bad = RunConfig(**{**cfg.__dict__, "model": {"name": "resnet20", "width": 0.25,
                                                 "weights": str(tmp_path / "wide.pt")},
                       "runtime": {**cfg.runtime.__dict__, "out": str(tmp_path / "x")}})
    with pytest.raises(ConfigError, match="conv1.weight has shape"):
        run_pipeline(bad)
    (tmp_path / "text.pt").write_text("not weights")
    bad = RunConfig(**{**bad.__dict__, "model": {"name": "resnet20", "width": 0.25,
                                                 "weights": str(tmp_path / "text.pt")}})
    with pytest.raises(ConfigError, match="not a weights file"):
        run_pipeline(bad)


@pytest.mark.parametrize("method,budget,extra", [
    ("spr", "macs=0.5", {"granularity": 2, "remove_blocks": True}),
    ("variational", "macs=0.5", {"remove_blocks": True}),
    ("l1-filter", "params=0.6", {}), ("random", "macs=0.3", {"remove_blocks": True}),
])
def test_a_stated_budget_is_met_exactly(tmp_path, method, budget, extra):
    """The MILP's predicted cost is the counted cost of the saved model, within the budget and
    close to it (scores are non-negative, so the optimum spends what it may)."""
    cfg = tiny(tmp_path, method, **({"options": {"gate_warmup_epochs": 0.5}}
                                    if method == "variational" else {}))
    cfg = RunConfig(**{**cfg.__dict__, "selection": {**cfg.selection.__dict__, "budget": budget,
                                                      **extra}})
    report = run_pipeline(cfg)
    sel, c = report["selection"], report["complexity"]
    kind, frac = budget.split("=")
    assert sel["rule"] == "budget" and sel["status"] == "optimal" and sel["gap"] <= 1e-6
    assert c["pruned"][kind] == pytest.approx(sel["cost_predicted"], rel=1e-9)
    assert 0.9 * float(frac) <= c[f"{kind}_ratio"] <= float(frac) + 1e-12
    assert sel["greedy"]["value"] <= sel["greedy"]["milp_value"] + 1e-9
    if extra.get("granularity"):  # family sizes here are 4, 8, 16: every candidate is even
        assert all(w % 2 == 0 for w in sel["widths"].values())
    blocks = [b for b in report["blocks"] if b["branch"] == "removed"]
    assert len(blocks) == len(sel["blocks_removed"])


def test_depth_search_picks_the_most_accurate_optimum_over_depths(tmp_path):
    """With removable blocks, one exact optimum per depth (only the ``m`` least harmful blocks
    may go), the most accurate on the calibration images chosen; ``depth value`` is the last,
    unrestricted candidate."""
    cfg = tiny(tmp_path, "l1-filter")
    sel = {**cfg.selection.__dict__, "budget": "macs=0.4", "remove_blocks": True}
    rep = run_pipeline(RunConfig(**{**cfg.__dict__, "selection": sel}))["selection"]
    s = rep["depth_search"]
    without = s["accuracy_without"]
    assert sorted(without) == sorted(s["ranked"]) and len(without) == 7  # strided: kept
    assert [without[b] for b in s["ranked"]] == sorted(without.values(), reverse=True)
    cands = s["candidates"]
    assert len(cands) == 8 and cands[0]["removable"] == []
    for m, c in enumerate(cands):
        assert c["removable"] == s["ranked"][:m]
        if c["status"] != "infeasible":
            assert set(c["blocks_removed"]) <= set(c["removable"])
    feasible = [c for c in cands if c["status"] != "infeasible"]
    best = max(c["calibration_acc"] for c in feasible)
    chosen = cands[s["chosen"]]
    assert chosen["calibration_acc"] == best == s["calibration_acc"]
    assert rep["value"] == chosen["value"] and rep["blocks_removed"] == chosen["blocks_removed"]
    # depth value: the single optimum of the value model, the unrestricted candidate
    cfg2 = tiny(tmp_path / "v", "l1-filter")
    rep2 = run_pipeline(RunConfig(**{**cfg2.__dict__, "selection": {**sel, "depth": "value"}}))
    assert "depth_search" not in rep2["selection"]
    assert rep2["selection"]["value"] == pytest.approx(cands[-1]["value"], rel=1e-9)


def test_a_budget_that_cannot_be_met_is_one_line_and_exit_2(tmp_path, capsys):
    argv = ["train", "--method", "l1-filter", "--model", "resnet20", "--width", "0.25",
            "--data", "synthetic", "--synthetic", "n_train=64,n_test=32,image_size=8,num_classes=4",
            "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "32", "--budget",
            "macs=0.05", "--granularity", "4", "--latency-batches", "", "--no-progress",
            "--device", "cpu", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "cannot be met" in err and "smallest network" in err
    assert not (tmp_path / "run" / "train").exists()  # said before any training


@pytest.mark.parametrize("method", ["spr", "variational"])
def test_a_group_that_does_not_divide_the_widths_is_one_line_and_exit_2(tmp_path, capsys,
                                                                         method):
    argv = ["train", "--method", method, "--model", "resnet20", "--width", "0.25", "--data",
            "synthetic", "--synthetic", "n_train=64,n_test=32,image_size=8,num_classes=4",
            "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "32", "--group", "3",
            "--latency-batches", "", "--no-progress", "--device", "cpu",
            "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"--method {method}: group 3 does not divide family 'layer1.0.conv1'" in err


def test_latency_cost_and_latency_budget_end_to_end(tmp_path):
    """SPR trained against the latency cost, then pruned to a latency budget: the latency table
    is measured once (in a subprocess: timing switches the process's allocator), cached under
    XDG_CACHE_HOME, and read again by the selection."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "nn", "train", "--method", "spr", "--model", "resnet20",
            "--width", "0.25", "--data", "synthetic", "--synthetic",
            "n_train=64,n_test=32,image_size=8,num_classes=4", "--epochs", "1",
            "--finetune-epochs", "0", "--batch-size", "32", "--cost", "latency",
            "--budget", "latency=0.6", "--remove-blocks", "--granularity", "2",
            "--latency-batches", "4", "--latency-repeats", "3", "--threads", "1",
            "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = strict_json(tmp_path / "run" / "report.json")
    assert report["regularizer"]["cost"]["latency"] == 1.0
    sel = report["selection"]
    assert sel["rule"] == "budget" and sel["cost_kind"] == "latency"
    assert sel["status"] == "optimal" and sel["cost_predicted"] <= sel["budget_abs"] + 1e-9
    assert sel["latency_table"]["key"]["batch"] == 4
    assert list((tmp_path / "cache" / "mipprune" / "latency").glob("*.json"))


def test_spr_groups_train_and_leave_together(tmp_path):
    """--group 2 --granularity 2: SPR regularises pairs of filters, scores a pair as one, and
    the budgeted selection keeps or removes whole pairs."""
    cfg = tiny(tmp_path, "spr", options={"group": 2})
    cfg = RunConfig(**{**cfg.__dict__, "selection": {**cfg.selection.__dict__,
                                                      "budget": "macs=0.6", "granularity": 2}})
    report = run_pipeline(cfg)
    assert report["regularizer"]["kinds"] == ["filter"]
    masks = torch.load(tmp_path / "spr" / "select" / "masks.pt", weights_only=True)
    fams = [n for n in masks if not n.startswith("block.")]
    assert fams and all(bool((masks[n].reshape(-1, 2).sum(1) % 2 == 0).all()) for n in fams)
    assert report["selection"]["status"] == "optimal"
