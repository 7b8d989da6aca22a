"""Torch-Pruning as methods (nn.methods.torch_pruning): tiny end-to-end runs of tp-groupnorm and
tp-magnitude on option-A and option-B ResNet-20s; the size met and within one channel of the
target; the logits check recorded; the masks are exactly the channels Torch-Pruning removes when
run by hand on the trained weights; the group regulariser changes training; the refusals and the
missing-library error.  ResNet-20 at width 0.25 on 8x8 synthetic data, one thread."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp  # the dev extra installs it (torch-pruning==1.6.1)
from torch import nn as tnn

from nn import build_model, count_macs, prunable_structures
from nn.cli import main
from nn.config import ConfigError, RunConfig
from nn.io import read_torch
from nn.methods.torch_pruning import _ratio
from nn.pipeline import run_pipeline

SYN = {"n_train": 192, "n_test": 96, "image_size": 8, "num_classes": 4}
INPUT = (3, 8, 8)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(out, method, shortcut="A", lam=None, options=None, **selection):
    return RunConfig(
        data={"name": "synthetic", "synthetic": SYN},
        model={"name": "resnet20", "width": 0.25, "shortcut": shortcut},
        optim={"epochs": 2, "finetune_epochs": 1, "batch_size": 32, "eval_batch_size": 96,
               "lr": 0.05, "finetune_lr": 0.01},
        method={"name": method, "lam": lam, "options": options},
        selection={"bisect_images": 96} | (selection or {"mac_target": 0.6}),
        runtime={"latency_batches": (), "progress": False, "device": "cpu", "amp": "off",
                 "out": str(out)})


RUNS = {  # name -> (method, shortcut, lam, options, selection)
    "groupnorm-B": ("tp-groupnorm", "B", 0.05, None, {}),
    "magnitude-B": ("tp-magnitude", "B", None, None, {}),
    "magnitude-A-l1-params": ("tp-magnitude", "A", None, {"importance": "l1", "round_to": 2},
                              {"budget": "params=0.7"}),
    "groupnorm-A": ("tp-groupnorm", "A", None, None, {}),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four pipeline runs of :data:`RUNS` (one thread): their reports and run folders."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, (method, shortcut, lam, options, sel) in RUNS.items():
            folder = tmp_path_factory.mktemp(name)
            out[name] = (run_pipeline(config(folder, method, shortcut, lam, options, **sel)),
                         folder)
        return out
    finally:
        torch.set_num_threads(n)


def trained(report, folder):
    """The trained dense model of a run (its training checkpoint) and its filter families."""
    m = report["config"]["model"]
    model = build_model("resnet20", SYN["num_classes"], 3, m["width"], m["shortcut"])
    model.load_state_dict(read_torch(folder / "train" / "checkpoint.pt")["model"])
    return model.eval(), [f for f in prunable_structures(model, INPUT) if f.kind == "filter"]


def tp_by_hand(model, families, sel):
    """Torch-Pruning run directly (not through the method) at the selection's ratio."""
    imp = {"GroupNormPruner": tp.importance.GroupMagnitudeImportance(p=2),
           "MagnitudePruner": tp.importance.MagnitudeImportance(
               p=1 if "L1" in sel["importance"] else 2)}[sel["pruner"]]
    convs = {f.conv for f in families}
    ignored = [m for n, m in model.named_modules()
               if isinstance(m, (tnn.Conv2d, tnn.Linear)) and n not in convs]
    pruner = getattr(tp.pruner, sel["pruner"])(
        model, torch.zeros(1, *INPUT), importance=imp, global_pruning=True,
        pruning_ratio=sel["pruning_ratio"], round_to=sel["round_to"], ignored_layers=ignored)
    pruner.step()
    return model.eval()


@pytest.mark.parametrize("name", list(RUNS))
def test_end_to_end_meets_the_target_within_one_channel(runs, name):
    report, folder = runs[name]
    sel, c = report["selection"], report["complexity"]
    kind = "params" if "budget" in sel else "macs"
    limit = 0.7 * c["dense"]["params"] if kind == "params" else 0.6 * c["dense"]["macs"]
    assert sel["limit"] == pytest.approx(limit)
    assert c["pruned"][kind] == sel["value"] <= limit  # counted on the saved model
    assert sel["value_previous"] > limit  # one channel less pruned misses: the resolution
    assert sel["trials" if kind == "params" else "trace"]
    assert 0 < sel["pruning_ratio"] < 1 and sel["version"] == "1.6.1"
    assert sel["logits_max_abs_diff"] <= sel["logits_tolerance"] == 1e-4
    assert sel["tp_model_macs"] == sel["macs_at_cut"] == c["pruned"]["macs"]
    assert report["regularizer"]["version"] == "1.6.1"
    assert "internal filters only" in report["regularizer"]["pruned"]
    # internal filters only: every masked family is a block's conv1, every other conv (the
    # stem, conv2s, downsamples: the streams) keeps its dense width
    masks = read_torch(folder / "select" / "masks.pt")
    assert all(k.endswith(".conv1") and k.startswith("layer") for k in masks)
    assert sum(int((~m).sum()) for m in masks.values()) > 0
    rows = report["layers"]
    assert {r["name"] for r in rows if r["pruned"] < r["dense"]} <= set(masks)
    assert sum(r["name"].endswith("conv2") and r["pruned"] == r["dense"] for r in rows) == 9


@pytest.mark.parametrize("name", list(RUNS))
def test_masks_are_what_torch_pruning_removes(runs, name):
    report, folder = runs[name]
    sel = report["selection"]
    model, families = trained(report, folder)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned = tp_by_hand(model, families, sel)
    masks = read_torch(folder / "select" / "masks.pt")
    mods = dict(pruned.named_modules())
    for f in families:
        conv, keep = mods[f.conv], masks[f.name]
        assert conv.out_channels == int(keep.sum()), f.name
        assert torch.equal(conv.weight, weights[f.conv + ".weight"][keep]), f.name
    assert count_macs(pruned, INPUT) == sel["macs_at_cut"]
    if sel["round_to"]:
        assert all(int(m.sum()) % sel["round_to"] == 0 for m in masks.values())


def test_group_regulariser_changes_training(runs):
    """Same seed, data and schedule; only tp-groupnorm's regularize(model) after each backward
    differs: the trained weights differ, and the regularised filters are smaller."""
    (rg, fg), (rm, fm) = runs["groupnorm-B"], runs["magnitude-B"]
    assert [h["tp_regularized_steps"] for h in rg["history"]["train"]] == [6, 6]
    assert "tp_regularized_steps" not in rm["history"]["train"][0]
    a, fams = trained(rg, fg)
    b, _ = trained(rm, fm)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert any(not torch.equal(pa[n], pb[n]) for n in pa)
    sq = [sum(float(p[f.conv + ".weight"].detach().pow(2).sum()) for f in fams)
          for p in (pa, pb)]
    assert sq[0] < sq[1]
    assert rg["regularizer"]["reg"] == 0.05 and "regularize" in rg["regularizer"]["regularizer"]


def test_latency_budget_costed_by_the_table(tmp_path):
    """tp-magnitude to ``--budget latency=0.6 --granularity 2`` with a given table (one measured
    here by ``python -m nn latency-table`` for its key and units, its entries then replaced by a
    known cost, 1 us per channel pair, so the test does not depend on timing noise): round_to is
    the granularity, the recorded cost is the table's prediction at the saved widths, within the
    budget, and one channel less pruned goes over it."""
    import dataclasses

    from nn.latency import load_table, network_layers, save_table
    from nn.latency.table import Entry

    measured, table_path = tmp_path / "measured.json", tmp_path / "table.json"
    common = ["--model", "resnet20", "--width", "0.25", "--shortcut", "B"]
    done = subprocess.run(
        [sys.executable, "-m", "nn", "latency-table", *common, "--input", "3,8,8",
         "--num-classes", "4", "--batch", "4", "--threads", "1", "--granularity", "2",
         "--repeats", "1", "--warmup", "0", "--fit-networks", "0", "--no-progress",
         "--out", str(measured)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = load_table(measured)

    def known(e):
        if e.tied:
            return Entry(e.in_widths, e.out_widths, tuple(1e-3 * w for w in e.in_widths), True)
        return Entry(e.in_widths, e.out_widths,
                     tuple(tuple(1e-3 * i * o for o in e.out_widths) for i in e.in_widths))

    table = dataclasses.replace(table, entries={k: known(e) for k, e in table.entries.items()},
                                constant_ms=0.05, scale=1.0, meta={})
    save_table(table, table_path)
    argv = [sys.executable, "-m", "nn", "train", "--method", "tp-magnitude", *common,
            "--data", "synthetic", "--synthetic", "n_train=64,n_test=32,image_size=8,"
            "num_classes=4", "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "32",
            "--budget", "latency=0.6", "--granularity", "2", "--latency-table",
            str(table_path), "--latency-batches", "4", "--threads", "1", "--no-progress",
            "--device", "cpu", "--out", str(tmp_path / "run")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    sel = json.loads((tmp_path / "run" / "report.json").read_text())["selection"]
    assert sel["cost_kind"] == "latency" and sel["round_to"] == 2
    assert sel["latency_table"]["key"]["batch"] == 4
    masks = read_torch(tmp_path / "run" / "select" / "masks.pt")
    widths = {n: int(m.sum()) for n, m in masks.items()}
    assert all(w % 2 == 0 for w in widths.values())

    def predicted(widths):
        return table.constant_ms + sum(
            table.lookup(ly, widths.get(ly.in_family, ly.in_channels),
                         widths.get(ly.out_family, ly.out_channels))
            for ly in network_layers(build_model("resnet20", 4, 3, 0.25, "B"), INPUT))

    assert sel["dense_cost"] == pytest.approx(predicted({}), rel=1e-12)
    assert sel["limit"] == pytest.approx(0.6 * sel["dense_cost"], rel=1e-12)
    assert sel["value"] == pytest.approx(predicted(widths), rel=1e-12)
    assert sel["value"] <= sel["limit"] < sel["value_previous"]


def test_ratio_removes_exactly_k_channels():
    """Torch-Pruning removes ``total - int(total * (1 - ratio))`` ranked channels."""
    for total in range(1, 1500):
        for k in range(total + 1):
            assert total - int(total * (1 - _ratio(k, total))) == k, (total, k)


def test_unreachable_target_is_one_line(tmp_path):
    cfg = config(tmp_path / "run", "tp-magnitude", mac_target=0.01)
    with pytest.raises(ConfigError, match="cannot bring macs to .* raise the target") as e:
        run_pipeline(cfg)
    assert "\n" not in str(e.value)


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="removes no blocks .* drop --remove-blocks"):
        config(tmp_path, "tp-magnitude", budget="latency=0.5", remove_blocks=True)
    with pytest.raises(ConfigError, match="not bisection"):
        config(tmp_path, "tp-groupnorm", rule="bisection")
    with pytest.raises(ConfigError, match="--granularity 2 is Torch-Pruning's round_to, which "
                                          "--round-to sets to 4"):
        config(tmp_path, "tp-magnitude", options={"round_to": 4}, budget="macs=0.5",
               granularity=2)
    from nn.methods import get_method

    assert config(tmp_path, "tp-magnitude", options={"round_to": 2}, budget="macs=0.5",
                  granularity=2).selection.granularity == 2  # the same grid twice: accepted
    assert not get_method("tp-groupnorm").removes_blocks and get_method("spr").removes_blocks
    with pytest.raises(ValueError, match="importance"):
        config(tmp_path, "tp-magnitude", options={"importance": "l3"})
    with pytest.raises(ValueError, match="round_to"):
        config(tmp_path, "tp-groupnorm", options={"round_to": 0})
    with pytest.raises(ValueError, match="no lam"):
        config(tmp_path, "tp-magnitude", lam=1e-3)
    cfg = config(tmp_path, "tp-magnitude").to_dict()
    cfg["method"]["structures"] = ["stream"]
    with pytest.raises(ConfigError, match="internal filters only"):
        RunConfig(**{k: v for k, v in cfg.items() if k != "preset"})


def test_missing_library_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails
    for method in ("tp-groupnorm", "tp-magnitude"):
        with pytest.raises(ConfigError, match=r"pip install torch-pruning==1\.6\.1") as e:
            config(tmp_path, method)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--method", "tp-magnitude", "--data", "synthetic",
              "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2
    assert "pip install torch-pruning==1.6.1" in err and "\n" not in err
    assert not (tmp_path / "cli").exists()


def test_nn_imports_without_torch_pruning():
    code = ("import sys; sys.modules['torch_pruning'] = None\n"
            "import nn, nn.cli, nn.methods.torch_pruning\n"
            "from nn.methods import get_method\n"
            "print(get_method('tp-groupnorm').summary)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[1])  # this checkout's nn
    assert out.returncode == 0, out.stderr
    assert "internal filters only" in out.stdout
