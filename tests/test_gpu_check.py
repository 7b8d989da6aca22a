"""The prepared GPU check's dry run (``--device cpu --tiny``): every section runs on the CPU,
so the command is known to work before a GPU machine is lent."""

import json

import pytest

from benchmarks import gpu_check


def test_dry_run_passes_every_section(tmp_path, capsys):
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "gc")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "gc.json").read_text())
    sections = result["sections"]
    assert code == 0, out
    assert list(sections) == list(gpu_check.SECTIONS)
    assert all(s["status"] == "ok" for s in sections.values()), out
    launches = sections["spr_launches"]["result"]
    assert launches["resnet56"]["cpu_ops"] <= gpu_check.LAUNCH_GOAL
    assert launches["resnet20"]["cpu_ops"] == launches["resnet56"]["cpu_ops"]
    assert launches["resnet56"]["groups"] > launches["resnet20"]["groups"]
    for name, row in sections["training"]["result"].items():
        if isinstance(row, dict):
            assert row["resume_bit_exact"] and row["loss_falls"] and row["finite"], name
    assert sections["ddp"]["result"]["same_weights_on_every_rank"]
    assert set(sections["spr_overhead"]["result"]["rows"]) == {"none", "fused", "autograd"}
    for name in gpu_check.SECTIONS:
        assert name in out  # the printed table names every section


def test_cuda_without_a_gpu_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cuda"])
    assert e.value.code == 2
    assert "--device cpu --tiny" in capsys.readouterr().err


def test_deadline_skips_what_would_start_late(tmp_path, capsys):
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "gc"),
                           "--sections", "environment,latency", "--deadline", "0"])
    sections = json.loads((tmp_path / "gc.json").read_text())["sections"]
    assert code == 0
    assert sections["environment"]["status"] == "ok"  # the first section always runs
    assert sections["latency"]["status"] == "skipped"
    assert "--sections latency" in sections["latency"]["reason"]


def test_unknown_section_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu", "--sections", "training,warp"])
    assert e.value.code == 2
    assert "'warp'" in capsys.readouterr().err
