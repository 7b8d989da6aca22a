"""Hardening: bad inputs fail early, in one line, naming what is wrong.

``python -m nn train`` / ``latency-table`` with a hostile argument -- a number that overflows
float32, a device or precision the machine lacks, data too small for the batch or the classes,
a damaged data set, weights or a reference of another width, a loss driven to NaN -- prints one
line on stderr and exits with status 2; the library raises the same as
:class:`nn.checks.ConfigError` (a ``ValueError``).  A training loss that stops being finite stops
the run where it happens (:class:`nn.training.NonFiniteError`).  A saved pruned model is
validated whole at load time (:func:`nn.models.resnet.check_spec`).  Long selection phases say
what they do.  Tiny runs: ResNet-20 at width 0.25 on 64 synthetic 8x8 images, one epoch."""

import copy
import gzip
import logging
import os
import re
import struct
import sys

import pytest
import torch
from torch import nn as tnn

from nn import build_model, compress, load_pruned, prunable_structures, save_pruned
from nn.checks import ConfigError
from nn.cli import main
from nn.data import load_dataset, make_loader
from nn.data.loaders import stratified_indices
from nn.regularizer import SPRConfig, SPRRegularizer
from nn.training import NonFiniteError, TrainConfig, resolve_device, train
from nn.weights import load_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYN = "n_train=64,n_test=32,image_size=8,num_classes=4"


def tiny_argv(out, *extra):
    return ["train", "--method", "spr", "--model", "resnet20", "--width", "0.25", "--data",
            "synthetic", "--synthetic", SYN, "--epochs", "1", "--finetune-epochs", "0",
            "--batch-size", "32", "--bisect-images", "32", "--latency-batches", "",
            "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def one_line_exit_2(argv, capsys) -> str:
    """Run the CLI, expect exit status 2 and exactly one line on stderr; return that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Weights of another width, weights holding a NaN, a text file, a Fashion-MNIST folder
    whose test set is empty."""
    d = tmp_path_factory.mktemp("files")
    torch.save(build_model("resnet20", 4, 3, 0.5).state_dict(), d / "wide.pt")
    sd = build_model("resnet20", 4, 3, 0.25).state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, d / "nan.pt")
    (d / "text.txt").write_text("hello\n")
    fm = d / "fashion"
    fm.mkdir()
    labels = bytes(range(10)) * 2
    for stem, n in (("train", 20), ("t10k", 0)):
        (fm / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            b"\x00\x00\x08\x03" + struct.pack(">III", n, 28, 28) + bytes(n * 784)))
        (fm / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            b"\x00\x00\x08\x01" + struct.pack(">I", n) + labels[:n]))
    return d


# ---- python -m nn train: one line, exit 2 --------------------------------------------------

TRAIN_CASES = {  # name: (extra argv, a word the message must hold); {d}: the files fixture
    "lr overflows float32": (["--lr", "1e300"], "lr must be"),
    "weight decay overflows": (["--weight-decay", "1e300"], "weight_decay must be"),
    "finetune lr overflows": (["--finetune-epochs", "1", "--finetune-lr", "1e300"],
                              "finetune_lr must be"),
    "amp on the CPU": (["--amp", "on"], "needs a CUDA device"),
    "batch larger than the data": (["--batch-size", "1000"], "batch size 1000 is larger"),
    "subset below the classes": (["--subset", "2"], "every one of the 4 classes"),
    "more threads than CPUs": (["--threads", str((os.cpu_count() or 1) + 1)], "threads must"),
    "out is a file": (None, "out must be a folder"),
    "weights hold a NaN": (["--weights", "{d}/nan.pt"], "not finite"),
    "reference of another width": (["--reference", "{d}/wide.pt"], "has shape (8, 8, 3, 3) in "
                                   "the file, (4, 4, 3, 3) in the model"),
    "reference missing": (["--reference", "{d}/nope.pt"], "reference: no such file"),
    "latency table missing": (["--budget", "latency=0.5", "--latency-table", "{d}/nope.json"],
                              "latency_table: no such file"),
    "latency table not a table": (["--budget", "latency=0.5", "--latency-table",
                                   "{d}/text.txt"], "not a latency table"),
    "one class": (["--synthetic", "n_train=64,n_test=32,image_size=8,num_classes=1"],
                  "num_classes must be an int >= 2"),
    "synthetic set beyond memory": (["--synthetic", "n_train=64,n_test=8,image_size=1000000"],
                                    "more than this machine's"),
    "empty test set": (["--method", "l1-filter", "--data", "fashion-mnist", "--data-dir",
                        "{d}/fashion", "--synthetic", None], "test set of Fashion-MNIST"),
    "spr penalty overflows": (["--lam", "1e30"], "the loss is inf at epoch 1/1, step 2/2"),
    "lr drives the loss to NaN": (["--lr", "1e30"], "the loss is nan at epoch 1/1, step 2/2"),
    "variational penalty overflows": (["--method", "variational", "--lam", "1e300"],
                                      "extra loss inf"),
}
if not torch.cuda.is_available():
    TRAIN_CASES["cuda without a GPU"] = (["--device", "cuda"], "no CUDA device")


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_in_one_line(case, files, tmp_path, capsys):
    extra, word = TRAIN_CASES[case]
    argv = tiny_argv(tmp_path / "run")
    if extra is None:  # --out names a file
        (tmp_path / "file").write_text("x")
        argv = tiny_argv(tmp_path / "file")
    else:
        for flag, value in zip(extra[::2], extra[1::2]):
            value = value if value is None else value.format(d=files)
            if flag in argv:
                i = argv.index(flag)
                argv[i:i + 2] = [] if value is None else [flag, value]
            else:
                argv += [flag, value]
    line = one_line_exit_2(argv, capsys)
    assert word in line
    if "loss is" in word:  # stopped where it happened: no report with a NaN in it
        assert not (tmp_path / "run" / "report.json").exists()


def test_imagenet_without_torchvision_is_one_line(tmp_path, monkeypatch, capsys):
    for split in ("train", "val"):
        (tmp_path / "inet" / split / "n01").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    argv = tiny_argv(tmp_path / "run", "--data", "imagenet", "--data-dir", str(tmp_path / "inet"))
    del argv[argv.index("--synthetic"):argv.index("--synthetic") + 2]
    assert "torchvision is required for ImageNet" in one_line_exit_2(argv, capsys)


LATENCY_CASES = {
    "width beyond 64": (["--width", "1e9"], "--width must be <= 64"),
    "more threads than CPUs": (["--threads", str((os.cpu_count() or 1) + 1)], "--threads"),
    "repeats beyond int32": (["--repeats", str(10 ** 21)], "--repeats must be <="),
    "out is a folder": (["--out", "{tmp}"], "--out must be a JSON file"),
}


@pytest.mark.parametrize("case", list(LATENCY_CASES))
def test_latency_table_refuses_in_one_line(case, tmp_path, capsys):
    extra, word = LATENCY_CASES[case]
    argv = ["latency-table", "--model", "resnet20", "--width", "0.25", "--input", "3,8,8",
            "--batch", "2", "--repeats", "1", "--warmup", "0", "--fit-networks", "0",
            "--granularity", "4", "--no-progress", "--out", str(tmp_path / "t.json")]
    for flag, value in zip(extra[::2], extra[1::2]):
        value = value.format(tmp=tmp_path)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert word in one_line_exit_2(argv, capsys)


# ---- the library raises the same, early -------------------------------------------------------

def toy_loader(n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 4
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def toy_net():
    torch.manual_seed(0)
    return tnn.Sequential(tnn.Conv2d(1, 4, 3), tnn.ReLU(), tnn.Flatten(), tnn.Linear(144, 4))


@pytest.mark.parametrize("hook, where", [
    ("extra", "the loss is inf at epoch 2/2, step 3/4 (step 7 overall; cross-entropy finite, "
              "extra loss inf)"),
    ("weight", "0.weight is not finite after epoch 2/2"),
    ("metric", "the epoch metric theta.1 is not finite after epoch 1/2"),
])
def test_training_stops_at_the_first_non_finite_value(hook, where, tmp_path):
    calls = {"n": 0}

    def extra_loss(m):
        calls["n"] += 1
        return torch.tensor(float("inf") if calls["n"] == 7 else 0.0)

    def after_step(m):
        calls["n"] += 1
        if calls["n"] == 8:  # after the last step of epoch 2: no loss sees it
            with torch.no_grad():
                m[0].weight[0, 0, 0, 0] = float("nan")

    hooks = {"extra": dict(extra_loss=extra_loss), "weight": dict(after_step=after_step),
             "metric": dict(epoch_metrics=lambda m, e: {"theta": [0.5, float("nan")]})}[hook]
    cfg = TrainConfig(epochs=2, lr=0.01, device="cpu", progress=False, out_dir=str(tmp_path))
    with pytest.raises(NonFiniteError, match="^" + re.escape(f"toy: {where}")) as e:
        train(toy_net(), toy_loader(), toy_loader(), cfg, name="toy", **hooks)
    assert isinstance(e.value, ConfigError)
    assert "nan" not in (tmp_path / "metrics.jsonl").read_text().lower()


def test_data_refusals_are_config_errors():
    b = load_dataset("synthetic", n_train=12, n_test=4, image_size=8, num_classes=4)
    with pytest.raises(ConfigError, match="batch size 16 is larger than the 12 images"):
        make_loader(b, "train", 16)
    assert len(make_loader(b, "test", 16)) == 1  # evaluation keeps the partial batch
    with pytest.raises(ValueError, match=r"subset must be an int in \[4, 12\]"):
        stratified_indices(b.train_y, 3, 4)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_weights_and_reference_must_fit_in_shape_and_value(tmp_path):
    model = build_model("resnet20", 4, 3, 0.25)
    wide = build_model("resnet20", 4, 3, 0.5).state_dict()
    with pytest.raises(ValueError, match=r"reference weights do not fit the model: "
                                         r"layer1.0.conv1.weight has shape \(8, 8, 3, 3\) in "
                                         r"the file, \(4, 4, 3, 3\) in the model"):
        SPRRegularizer(model, SPRConfig(lam=1.0), (3, 8, 8), reference=wide)
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["fc.bias"][0] = float("inf")
    with pytest.raises(ValueError, match="not finite .* in fc.bias"):
        load_weights(model, bad)
    with pytest.raises(ValueError, match="M of 'layer1.0.conv1' .* not a normal float32"):
        SPRRegularizer(model, SPRConfig(lam=1.0, M_scale=1e-300), (3, 8, 8))


# ---- a saved pruned model is validated whole when it is loaded ---------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ResNet-20 pruned in its filters and block outputs (so blocks add into a subset of
    the stream: ``index`` lists) and its stream, saved."""
    torch.manual_seed(0)
    model = build_model("resnet20", 4, 3, 0.5).eval()
    fams = prunable_structures(model, (3, 8, 8))
    masks = {f.name: torch.rand(f.size) > 0.3 for f in fams if f.kind in ("filter", "block_out")}
    masks["stream.layer2"] = torch.tensor([True] * 15 + [False])
    path = save_pruned(compress(model, masks), tmp_path_factory.mktemp("pruned") / "net.pt")
    return torch.load(path, weights_only=True)


def _dup(spec, sd):
    spec["stages"][0][0]["index"][1] = spec["stages"][0][0]["index"][0]


def _set(where, value):
    def edit(spec, sd):
        node = spec
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = value(node[where[-1]]) if callable(value) else value
    return edit


def _shrink_fc(spec, sd):
    sd["fc.weight"] = sd["fc.weight"][:, :-1]


def _double_fc(spec, sd):
    sd["fc.weight"] = sd["fc.weight"].double()


@pytest.mark.parametrize("edit, message", [
    (_dup, r"stages\[0\]\[0\].index\[1\] repeats channel"),
    (_set(["stages", 0, 0, "index", 0], 999), r"stages\[0\]\[0\].index\[0\] must be a channel "
                                              r"index in \[0, 8\), got 999"),
    (_set(["stages", 1, 0, "stride"], 0), r"stages\[1\]\[0\].stride must be an int >= 1, got 0"),
    (_set(["stages", 1, 0, "stride"], "2"), r"stride must be an int >= 1, got '2'"),
    (_set(["widths", 0], 8.0), r"widths\[0\] must be an int >= 1, got 8.0"),
    (_set(["stem", "maxpool"], 0), "stem.maxpool must be a bool"),
    (_set(["stages", 0, 0, "kind"], "wide"), r"kind must be one of \('basic', 'bottleneck'\)"),
    (_set(["stages", 1, 0, "pad_src"], [0, 0]), r"pad_src\[1\] repeats channel 0"),
    (_set(["stages", 0, 1, "in"], lambda v: v + 1), r"stages\[0\]\[1\].in is 9, but the stream "
                                                    r"it reads has 8 channels"),
    (_set(["stages", 0, 0, "mid"], [4, 4]), r"mid must hold 1 width\(s\) for a basic block"),
    (_shrink_fc, r"fc.weight has shape \(4, 31\), the spec's network \(4, 32\)"),
    (_double_fc, "state_dict mixes dtypes"),
])
def test_load_pruned_refuses_a_damaged_spec(saved, edit, message, tmp_path):
    blob = copy.deepcopy(saved)
    edit(blob["spec"], blob["state_dict"])
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message) as e:
        load_pruned(tmp_path / "bad.pt")
    assert str(e.value).startswith(str(tmp_path / "bad.pt")) and "\n" not in str(e.value)


# ---- long phases say what they do -----------------------------------------------------------

@pytest.mark.parametrize("extra, phase", [
    ([], "bisection over"),
    (["--method", "l1-filter", "--budget", "macs=0.5", "--remove-blocks"], "depth search over"),
])
def test_selection_phases_announce_themselves(extra, phase, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert main(tiny_argv(tmp_path / "run", *extra)) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("selection:")]
    assert len(said) == 1 and phase in said[0]


def test_a_disturbed_latency_measurement_says_so_with_the_load(monkeypatch, caplog):
    import nn.latency.measure as M

    def busy(fns, repeats, *args):
        return {"ms": [[1.0] * repeats for _ in fns], "rounds": repeats + 4, "quiet_rounds": 1,
                "disturbed": True, "foreign_cores": [None, 1.4, 0.6]}

    monkeypatch.setattr(M, "timed_rounds", busy)
    with caplog.at_level(logging.WARNING, logger="nn.latency.measure"):
        ms, res = M.measure_networks([tnn.Identity()], (1, 2, 2), 3, repeats=5, steady=False,
                                     progress=False)
    assert ms == [1.0] and res["disturbed"]
    assert [r.getMessage() for r in caplog.records] == [
        "latency at batch 3: only 1 of 9 timed rounds were quiet (other processes used up to "
        "1.40 cores): the medians are disturbed; measure again on a quiet machine"]
