"""The latency cost model (nn.latency): units of the inference form, the table, prediction, CLI.

Timing accuracy is not asserted here (machines vary): benchmarks/latency_model.py measures it.
"""

import dataclasses
import json
import random
import subprocess
import sys

import pytest
import torch
from torch import nn as tnn

from helpers import random_bn_
from nn import build_model, compress, prunable_structures
from nn.cli import main
from nn.latency import (Entry, LatencyTable, Layer, build_unit, candidate_widths,
                        current_key, default_path, fit_constant, fit_line, grid_of,
                        inference_form, layer_families, load_table, measure_table,
                        network_layers, pad_channels, predict, random_config, save_table,
                        timed_rounds, width_masks, Tensors)

SIZE = (3, 8, 8)


def _tiny(shortcut="A", name="resnet20", width=0.25):
    torch.manual_seed(0)
    return random_bn_(build_model(name, width=width, shortcut=shortcut)).eval()


@pytest.fixture(scope="module")
def table():
    """A tiny measured table (ResNet-20 x0.25 on 8x8, granularity 2, one timed call each)."""
    return measure_table(_tiny(), SIZE, batch=2, threads=1, granularity=2, repeats=1,
                         warmup=0, quiet=None, steady=False, progress=False)


def _conv_calls(net, size=SIZE):
    """(in, out, kernel, stride, padding, H, W) of every Conv2d call, in execution order, and
    whether the conv sits in a shortcut."""
    calls = []
    hooks = [m.register_forward_hook(
        lambda m, i, o, n=n: calls.append(((m.in_channels, m.out_channels, m.kernel_size[0],
                                            m.stride[0], m.padding[0], *i[0].shape[2:]),
                                           "downsample" in n)))
             for n, m in net.named_modules() if isinstance(m, tnn.Conv2d)]
    with torch.no_grad():
        net.eval()(torch.zeros(1, *size))
    for h in hooks:
        h.remove()
    return calls


def _geometry(ly, in_w=None, out_w=None):
    return (in_w or ly.in_channels, out_w or ly.out_channels, ly.kernel, ly.stride, ly.padding,
            ly.height, ly.width)


@pytest.mark.parametrize("name,shortcut,size", [("resnet20", "A", SIZE), ("resnet20", "B", SIZE),
                                                ("resnet50", "B", (3, 32, 32))])
def test_layers_cover_every_conv_once_in_order(name, shortcut, size):
    model = _tiny(shortcut, name, 0.25 if name == "resnet20" else 0.125)
    layers = network_layers(model, size)
    calls = _conv_calls(model, size)
    convs = [ly for ly in layers if ly.kind == "conv"]
    assert [_geometry(ly) for ly in convs] == [g for g, ds in calls if not ds]
    shortcuts = [g for g, ds in calls if ds]  # option B: 1x1 conv in its block's add unit
    assert [_geometry(ly) for ly in layers if ly.kind == "add" and ly.op == "conv"] == shortcuts
    assert len(shortcuts) == (0 if shortcut == "A" else 2 if name == "resnet20" else 4)
    assert [ly.kind for ly in layers[-2:]] == ["pool", "fc"]
    assert (layers[1].kind == "pool") == (name == "resnet50")  # the ImageNet max-pool
    assert len({ly.name for ly in layers}) == len(layers)


@pytest.mark.parametrize("name,shortcut,size", [("resnet20", "A", SIZE),
                                                ("resnet50", "B", (3, 32, 32))])
def test_families_and_blocks_are_prunable_structures(name, shortcut, size):
    model = _tiny(shortcut, name, 0.25 if name == "resnet20" else 0.125)
    layers = network_layers(model, size)
    fams = {f.name: f for f in prunable_structures(model, size)}
    dense = layer_families(layers)
    assert set(dense) == {n for n, f in fams.items() if f.kind in ("filter", "stream")}
    assert all(dense[n] == fams[n].size for n in dense)
    assert {ly.block for ly in layers} - {None} == {n for n, f in fams.items()
                                                    if f.kind == "block"}
    if name == "resnet50":
        assert layers[0].out_family == "conv1" and layers[1].tied
    blk = [ly for ly in layers if ly.block == "block.layer1.1"]
    convs = ["layer1.1.conv1", "layer1.1.conv2"] + (["layer1.1.conv3"] if name == "resnet50"
                                                    else [])
    assert [ly.name for ly in blk] == convs + ["layer1.1.add"]
    assert blk[0].in_family == blk[-2].out_family == "stream.layer1" and blk[-1].tied
    assert [ly.out_family for ly in blk[:-2]] == [ly.in_family for ly in blk[1:-1]] == \
        convs[:-1]
    assert blk[-1].depth == len(convs)


def test_widths_set_the_compressed_networks_shapes():
    """predict reads each unit at the widths nn.compress gives it (width_masks keeps the first
    w channels of each family)."""
    model = _tiny("B")
    layers = network_layers(model, SIZE)
    widths, kept = random_config(layers, 2, random.Random(3), 0.5)
    assert not all(kept.values()) and widths
    pruned = compress(model, width_masks(layers, widths, kept))
    live = [ly for ly in layers if ly.kind == "conv" and kept.get(ly.block, True)]
    want = [_geometry(ly, widths.get(ly.in_family, ly.in_channels) if ly.in_family else None,
                      widths.get(ly.out_family, ly.out_channels)) for ly in live]
    assert want == [g for g, ds in _conv_calls(pruned) if not ds]


def test_inference_form_keeps_the_function():
    model = _tiny("B")
    layers = network_layers(model, SIZE)
    pruned = compress(model, width_masks(layers, *random_config(layers, 2, random.Random(1),
                                                                0.3)))
    folded = inference_form(pruned)
    assert not any(isinstance(m, tnn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), pruned(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_add_unit_runs_a_block_of_its_widths(shortcut):
    model = _tiny(shortcut)
    layers = network_layers(model, SIZE)
    add = next(ly for ly in layers if ly.name == "layer3.0.add")
    assert (add.stride, add.in_channels, add.out_channels, add.op) == \
        (2, 8, 16, "pad" if shortcut == "A" else "conv")
    unit = build_unit(add, 6, 10, 3, Tensors("cpu", torch.float32))
    with torch.inference_mode():
        out = unit()
    assert out.shape == (3, 10, 2, 2) and out.min() >= 0  # 4x4 input, stride 2, final ReLU


def test_pad_channels_are_the_compressed_shortcuts():
    model = _tiny("A")
    layers = network_layers(model, SIZE)
    add = next(ly for ly in layers if ly.name == "layer3.0.add")
    for w2, w3 in ((8, 6), (6, 10), (2, 16), (8, 3)):
        sc = compress(model, width_masks(layers, {"stream.layer2": w2, "stream.layer3": w3})
                      ).layer3[0].downsample
        assert pad_channels(add, w2, w3) == (sc.src.tolist(), sc.dst.tolist())
    assert pad_channels(add, 8, 6) == ([0, 1], [4, 5])  # front = (16 - 8) // 2 = 4


def test_unit_widths_are_checked():
    layers = network_layers(_tiny(), SIZE)
    t = Tensors("cpu", torch.float32)
    with pytest.raises(ValueError, match="fixed in width 3"):
        build_unit(layers[0], 2, 4, 1, t)
    with pytest.raises(ValueError, match=r"in width of layer1.0.conv1 must be an int in 1..4"):
        build_unit(layers[1], 5, 4, 1, t)
    tied = next(ly for ly in layers if ly.tied)
    with pytest.raises(ValueError, match="one family"):
        build_unit(tied, 2, 4, 1, t)


def test_candidate_widths():
    assert candidate_widths(16, 8) == (8, 16)
    assert candidate_widths(20, 8) == (8, 16, 20)
    assert candidate_widths(4, 8) == (4,)
    with pytest.raises(ValueError, match="granularity"):
        candidate_widths(16, 0)


def test_entry_is_exact_at_grid_points_and_bilinear_between():
    e = Entry((2, 4), (2, 4, 6), ((1.0, 2.0, 3.0), (3.0, 5.0, 7.0)))
    assert e.at(4, 6) == 7.0 and e.at(2, 2) == 1.0
    # in 3 (s = 1/2), out 5 (t = 1/2): rows 2.5 and 6.0 -> 4.25
    assert e.at(3, 5) == pytest.approx(4.25)
    assert e.at(2, 3) == pytest.approx(1.5) and e.at(3, 2) == pytest.approx(2.0)
    for args in ((1, 2), (2, 7), (5, 4)):
        with pytest.raises(ValueError, match="outside the table's grid"):
            e.at(*args)
    t = Entry((2, 4), (2, 4), (1.0, 2.0), tied=True)
    assert t.at(3, 3) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="one width"):
        t.at(2, 4)
    with pytest.raises(ValueError, match="shape"):
        Entry((2, 4), (2,), ((1.0,),))
    with pytest.raises(ValueError, match="increasing"):
        Entry((4, 2), (2,), ((1.0,), (2.0,)))


def test_table_lookup_reads_the_measured_grid(table):
    layers = network_layers(_tiny(), SIZE)
    assert set(table.entries) == {ly.key for ly in layers}
    conv = next(ly for ly in layers if ly.name == "layer3.1.conv1")
    e = table.entries[conv.key]
    assert (e.in_widths, e.out_widths) == grid_of(conv, 2) == ((2, 4, 6, 8, 10, 12, 14, 16),) * 2
    assert table.lookup(conv, 6, 10) == e.ms[2][4]
    assert table.lookup(conv, 7, 10) == pytest.approx((e.ms[2][4] + e.ms[3][4]) / 2)
    assert all(v > 0 for row in e.ms for v in row)
    assert table.meta["points"] == sum(len(x.in_widths) if x.tied else
                                       len(x.in_widths) * len(x.out_widths)
                                       for x in table.entries.values())


def test_predict_sums_entries_scales_and_adds_the_constant(table):
    layers = network_layers(_tiny(), SIZE)
    dense = sum(table.lookup(ly, ly.in_channels, ly.out_channels) for ly in layers)
    assert predict(table, layers) == pytest.approx(dense)
    fitted = table.with_fit(0.25, 1.5)
    assert predict(fitted, layers) == pytest.approx(1.5 * dense + 0.25)
    blk = "block.layer2.1"
    own = sum(table.lookup(ly, ly.in_channels, ly.out_channels) for ly in layers
              if ly.block == blk)
    assert own > 0
    assert predict(table, layers, {}, {blk: False}) == pytest.approx(dense - own)
    w = {"stream.layer3": 8, "layer3.2.conv1": 4}
    want = sum(table.lookup(ly, w.get(ly.in_family, ly.in_channels) if ly.in_family else
                            ly.in_channels, w.get(ly.out_family, ly.out_channels)
                            if ly.out_family else ly.out_channels) for ly in layers)
    assert predict(table, layers, w) == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown families"):
        predict(table, layers, {"stream.layer9": 4})
    with pytest.raises(ValueError, match="unknown blocks"):
        predict(table, layers, {}, {"block.layer1.0.x": False})


def test_table_round_trips_and_refuses_another_key(table, tmp_path):
    path = save_table(table.with_fit(0.5, 0.9), tmp_path / "t.json")
    back = load_table(path, table.key)
    assert back == table.with_fit(0.5, 0.9)
    other = dataclasses.replace(table.key, threads=table.key.threads + 1)
    with pytest.raises(ValueError, match=r"another key \(threads 1 != 2\)"):
        load_table(path, other)
    d = json.loads(path.read_text())
    d["constant_ms"] = float("nan")
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not strict JSON: NaN"):
        load_table(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a latency table"):
        load_table(path)


def test_key_and_layer_validation_and_default_path(monkeypatch, tmp_path):
    key = current_key("cpu", "float32", 3, 64)
    assert (key.threads, key.batch, key.torch) == (3, 64, torch.__version__)
    with pytest.raises(ValueError, match="dtype must be one of"):
        dataclasses.replace(key, dtype="float64")
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        dataclasses.replace(key, batch=0)
    with pytest.raises(ValueError, match="allocator"):
        dataclasses.replace(key, allocator="jemalloc")
    with pytest.raises(ValueError, match="op of a conv"):
        Layer("x", "conv", "max", 3, 1, 1, 8, 8, 4, 4, None, None)
    with pytest.raises(ValueError, match="Layer stride must be an int >= 1"):
        Layer("x", "conv", "conv", 3, 0, 1, 8, 8, 4, 4, None, None)
    with pytest.raises(ValueError, match="depth"):
        Layer("x", "add", "identity", 1, 1, 0, 8, 8, 4, 4, "s", "s")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_path({"arch": {"name": "resnet56", "width": 1.0, "shortcut": "A",
                                  "num_classes": 10}, "input_size": [3, 32, 32]}, key)
    assert path.parent == tmp_path / "mipprune" / "latency"
    assert path.name.startswith("resnet56-w1-A-3x32x32-c10__cpu-") and "-t3-float32-b64-" in \
        path.name and path.suffix == ".json"
    with pytest.raises(ValueError, match="scale"):
        LatencyTable(key, {}, 8, scale=0.0)


def test_fit_line_recovers_scale_and_constant():
    assert fit_line([1.0, 2.0, 3.0], [2.5, 4.5, 6.5], True) == pytest.approx((2.0, 0.5))
    # a = 1: c = sum w (M - S) / sum w with w = 1/M^2 (M - S = 1, 2, 3; M = 2, 4, 6)
    w = [1 / 4, 1 / 16, 1 / 36]
    a, c = fit_line([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], False)
    assert a == 1.0 and c == pytest.approx((w[0] + 2 * w[1] + 3 * w[2]) / sum(w))
    assert fit_line([2.0, 2.0], [3.0, 3.0], True) == pytest.approx((1.0, 1.0))  # no slope
    assert fit_line([1.0, 3.0], [3.0, 1.0], True)[0] == 1.0  # a falling line: a = 1
    with pytest.raises(ValueError, match="positive"):
        fit_line([1.0], [0.0], False)


def test_timed_rounds_shuffles_and_counts():
    seen = []
    fns = [(lambda i=i: seen.append(i)) for i in range(5)]
    res = timed_rounds(fns, repeats=4, warmup=1, quiet=None)
    assert len(seen) == 25 and res["rounds"] == 4
    assert all(len(t) == 4 and min(t) >= 0 for t in res["ms"])
    rounds = [tuple(seen[5 * r:5 * r + 5]) for r in range(5)]
    assert all(sorted(r) == list(range(5)) for r in rounds) and len(set(rounds)) > 1
    with pytest.raises(ValueError, match="repeats"):
        timed_rounds(fns, repeats=0)


def test_fit_constant_measures_networks_under_the_key(table):
    fitted = fit_constant(table, _tiny(), SIZE, networks=3, repeats=1, warmup=0, quiet=None,
                          scale=True, progress=False)
    fit = fitted.meta["fit"]
    assert fit["networks"] == len(fit["measured_ms"]) == len(fit["sum_ms"]) == 3
    a, c = fit_line(fit["sum_ms"], fit["measured_ms"], True)
    assert (fitted.scale, fitted.constant_ms) == pytest.approx((a, c))
    assert fitted.entries == table.entries
    wrong = dataclasses.replace(table, key=dataclasses.replace(table.key, torch="0.0"))
    with pytest.raises(ValueError, match="torch '0.0'"):
        fit_constant(wrong, _tiny(), SIZE, networks=1, repeats=1, progress=False)


def test_steady_allocator_stops_page_faults():
    """A freed 32 MB tensor, allocated again: faulted in page by page with glibc's defaults,
    reused without faults once the allocator is steady (in a subprocess: it is for good)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc mallopt only")
    code = """
import resource, torch
from nn.latency import steady_allocator, allocator_state
def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(8 * 2**20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
faults()
before = faults()
assert allocator_state() == "as-is" and steady_allocator() and allocator_state() == "steady"
faults()
print(before, faults())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before > 5 * 4000 and after < 500  # 8192 pages of 4 KiB per allocation


def _cli(capsys, *argv):
    code = main(["latency-table", *argv])
    return code, *capsys.readouterr()


@pytest.mark.parametrize("argv,needle", [
    (["--model", "resnet7", "--batch", "1"], "unknown model 'resnet7'"),
    (["--model", "resnet20", "--batch", "0"], "--batch must be >= 1"),
    (["--model", "resnet20", "--batch", "1", "--input", "3,8"], "--input must be"),
    (["--model", "resnet20", "--batch", "1", "--granularity", "x"], "--granularity must be an "
                                                                     "integer"),
    (["--model", "resnet20", "--batch", "1", "--dtype", "float64"], "invalid choice"),
    (["--model", "resnet20", "--batch", "1", "--device", "tpu"], "--device must be"),
    (["--model", "resnet20"], "--batch"),
])
def test_cli_errors_are_one_line_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(["latency-table", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err


def test_cli_cuda_unavailable_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        main(["latency-table", "--model", "resnet20", "--batch", "1", "--device", "cuda"])
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_cli_writes_a_loadable_table(capsys, tmp_path):
    out = tmp_path / "r20.json"
    code, stdout, _ = _cli(capsys, "--model", "resnet20", "--width", "0.25", "--input", "3,8,8",
                           "--batch", "2", "--threads", "1", "--granularity", "4", "--repeats",
                           "1", "--warmup", "0", "--fit-networks", "2", "--allocator", "as-is",
                           "--out", str(out), "--no-progress")
    assert code == 0 and f"wrote {out}" in stdout and "x sum of entries" in stdout
    t = load_table(out, current_key("cpu", "float32", 1, 2))
    layers = network_layers(_tiny(), SIZE)
    assert set(t.entries) == {ly.key for ly in layers} and t.granularity == 4
    assert t.meta["fit"]["networks"] == 2 and t.model["input_size"] == [3, 8, 8]
    assert predict(t, layers) > 0
