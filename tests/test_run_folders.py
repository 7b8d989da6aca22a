"""Run folders and run files (nn.io, nn.pipeline): one run per folder (a lock held for the whole
run, gone with its process), ``--out`` validated before any work and never mixed with a user's
files, every file read back checked (SHA-256 beside JSON, CRC-32 inside torch files, keys,
finite weights) and every failure -- damaged, truncated, empty, foreign, unwritable -- one line
and exit status 2 naming the file and what to do; a run killed with SIGKILL resumes bit-exactly.
ResNet-20 at width 0.25 on tiny synthetic data, one thread."""

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from nn import load_pruned
from nn.cli import main
from nn.io import (DIGEST, LOCK, FolderLock, RunFileError, read_json, read_torch,
                   remove_temporaries, save_torch, write_json)
from nn.training import TIMING_KEYS, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()
ARGV = ["train", "--method", "spr", "--model", "resnet20", "--width", "0.25", "--data",
        "synthetic", "--synthetic", "n_train=128,n_test=64,image_size=8,num_classes=4",
        "--epochs", "2", "--finetune-epochs", "1", "--batch-size", "32", "--lam", "1",
        "--bisect-images", "64", "--tolerance", "5", "--latency-batches", "", "--no-progress",
        "--device", "cpu", "--threads", "1"]


def refused(argv, capsys) -> str:
    """``python -m nn`` with ``argv`` must stop with exit status 2 and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("python -m nn: error: "), err
    return err


def flip_bytes(path: Path, n=400) -> None:
    """Flip ``n`` bytes inside the largest tensor record of a torch file (zip headers
    untouched: torch itself would load it without noticing)."""
    with zipfile.ZipFile(path) as z:
        rec = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    b = bytearray(path.read_bytes())
    at = rec.header_offset
    start = at + 30 + int.from_bytes(b[at + 26:at + 28], "little") \
        + int.from_bytes(b[at + 28:at + 30], "little")
    for i in torch.randint(start, start + rec.file_size, (n,),
                           generator=torch.Generator().manual_seed(0)).tolist():
        b[i] ^= 0x5A
    path.write_bytes(bytes(b))


class Payload:
    """A pickle that runs code when unpickled without ``weights_only``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


# ---- one run per folder -----------------------------------------------------------------------

def _wait_for(cond, proc, what, timeout=90.0):
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the holder exited ({proc.returncode}) before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_held_folder_refuses_a_second_run_and_is_free_once_its_holder_dies(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from nn.io import FolderLock; "
         f"assert FolderLock({str(out)!r}).acquire() is None; print('held', flush=True); "
         "sys.stdin.read()"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"]):
            err = refused(ARGV + ["--out", str(out)] + extra, capsys)
            assert f"{out} is in use by another run (pid {holder.pid} on host" in err
        assert FolderLock(out).acquire() == f"pid {holder.pid} on host {HOST}"
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # the refused runs wrote nothing
    finally:
        holder.kill()
        holder.wait()
    lock = FolderLock(out)  # the kernel released the dead holder's lock: never stale
    assert lock.acquire() is None
    assert FolderLock(out).acquire() == f"pid {os.getpid()} on host {HOST}"  # same process too
    lock.release()
    again = FolderLock(out)
    assert again.acquire() is None
    again.release()


def test_a_running_run_owns_its_folder_and_resumes_bit_exactly_after_sigkill(tmp_path, capsys):
    argv = ARGV + ["--epochs", "30"]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nn"] + argv + ["--out", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        metrics = run / "train" / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, proc,
                  "the first epoch")
        for extra in (["--resume"], []):  # a resume too: nothing interleaves
            err = refused(argv + ["--out", str(run)] + extra, capsys)
            assert f"in use by another run (pid {proc.pid} " in err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run / "train" / "done.json").exists()  # killed in the middle of training

    assert main(argv + ["--out", str(run), "--resume"]) == 0
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("run", "whole"))
    untimed = [{k: v for k, v in r.items() if k not in TIMING_KEYS}
               for r in a["history"]["train"] + b["history"]["train"]]
    assert untimed[:30] == untimed[30:] and a["complexity"] == b["complexity"]
    assert a["accuracy"] == b["accuracy"]
    pa, pb = (load_pruned(tmp_path / d / "pruned.pt").state_dict() for d in ("run", "whole"))
    assert list(pa) == list(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)


# ---- where the output goes -------------------------------------------------------------------

def test_an_empty_out_is_refused_and_the_current_folder_untouched(tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.json").write_text('{"mine": 1}')
    err = refused(ARGV + ["--out", ""], capsys)
    assert "out is empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert (tmp_path / "report.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize("names", [["report.json"], ["config.json"], ["notes.txt", "data"]])
@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_of_other_files_is_refused_untouched(tmp_path, capsys, names, resume):
    out = tmp_path / "mine"
    out.mkdir()
    for n in names:
        (out / n).write_text('{"complexity": "mine"}')
    err = refused(ARGV + ["--out", str(out)] + ["--resume"] * resume, capsys)
    assert f"out {out} holds files that are not a run" in err and names[0] in err
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert all((out / n).read_text() == '{"complexity": "mine"}' for n in names)


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_an_out_that_is_or_lies_under_a_file_is_one_line(tmp_path, capsys, where):
    (tmp_path / "f").write_text("mine")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    err = refused(ARGV + ["--out", str(out)], capsys)
    assert str(tmp_path / "f") in err
    assert (tmp_path / "f").read_text() == "mine"


def test_an_out_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    import nn.io

    real = os.open

    def read_only(path, flags, *a):  # as on a read-only folder (root ignores chmod)
        if flags & os.O_CREAT and str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, flags, *a)

    monkeypatch.setattr(nn.io.os, "open", read_only)
    err = refused(ARGV + ["--out", str(tmp_path / "run")], capsys)
    assert f"cannot use {tmp_path / 'run' / LOCK} as the run folder: Permission denied" in err


def test_a_full_disk_is_one_line_and_the_run_resumes_after(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real = torch.save

    def full(obj, fh):  # the first torch file is the first checkpoint
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    err = refused(ARGV + ["--out", str(run)], capsys)
    assert f"cannot write {run / 'train' / 'checkpoint.pt'}: No space left on device" in err
    assert "--resume" in err
    assert sorted(p.name for p in (run / "train").iterdir()) == ["metrics.jsonl"]  # no temp
    monkeypatch.setattr(torch, "save", real)
    assert main(ARGV + ["--out", str(run), "--resume"]) == 0


def test_a_full_disk_writing_a_json_file_is_one_line(tmp_path, capsys, monkeypatch):
    import nn.io

    real = nn.io.os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f".config.json.tmp-{os.getpid()}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(nn.io.os, "fsync", full)
    err = refused(ARGV + ["--out", str(tmp_path / "run")], capsys)
    assert f"cannot write {tmp_path / 'run' / 'config.json'}: No space left on device" in err


# ---- damaged files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A complete run (nothing is ever written into it: tests work on copies)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(ARGV + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def _copy(finished, tmp_path, keep="select") -> Path:
    """The finished run with every stage after ``keep`` undone (``"train-running"``: killed
    during training)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    gone = {"finetune": ["report.json"], "select": ["finetune", "report.json"],
            "train-running": ["train/done.json", "train/done.json" + DIGEST, "select",
                              "finetune", "report.json"], "report": []}[keep]
    for g in gone + ["pruned.pt"] * (keep != "report"):
        p = out / g
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


def _nan(path):
    ck = torch.load(path, weights_only=True)
    next(iter(ck["model"].values()))[0] = float("nan")
    torch.save(ck, path)


def _foreign(path):
    torch.save({"model": {"w": torch.zeros(2)}}, path)



TORCH_DAMAGE = {
    "flipped bytes": flip_bytes,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "missing": lambda p: p.unlink(),
}
CHECKPOINT_DAMAGE = TORCH_DAMAGE | {"NaN weights": _nan, "wrong keys": _foreign}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
@pytest.mark.parametrize("keep, name", [("select", "train/checkpoint.pt"),
                                        ("train-running", "train/checkpoint.pt"),
                                        ("finetune", "finetune/checkpoint.pt")])
def test_a_damaged_checkpoint_is_one_line_naming_it_and_what_to_do(finished, tmp_path, capsys,
                                                                     damage, keep, name):
    if keep == "train-running" and damage == "missing":
        pytest.skip("a missing checkpoint of a running stage: training starts afresh")
    out = _copy(finished, tmp_path, keep)
    CHECKPOINT_DAMAGE[damage](out / name)
    err = refused(ARGV + ["--out", str(out), "--resume"], capsys)
    assert f"{out / name}: " in err
    stage = name.split("/")[0]
    assert f"rm -r {out / stage}" in err and "--resume" in err and "new --out" in err
    if damage == "NaN weights":
        assert "NaN or infinite" in err


@pytest.mark.parametrize("stage, other, keep", [("train", "finetune", "select"),
                                               ("finetune", "train", "finetune")])
def test_a_checkpoint_of_another_model_is_one_line(finished, tmp_path, capsys, stage, other,
                                                   keep):
    out = _copy(finished, tmp_path, keep)
    shutil.copy(finished / other / "checkpoint.pt", out / stage / "checkpoint.pt")
    err = refused(ARGV + ["--out", str(out), "--resume"], capsys)
    assert f"{out / stage / 'checkpoint.pt'}: its weights do not fit the model" in err
    assert f"rm -r {out / stage}" in err


@pytest.mark.parametrize("damage", sorted(TORCH_DAMAGE) + ["not masks"])
def test_damaged_masks_are_one_line(finished, tmp_path, capsys, damage):
    out = _copy(finished, tmp_path, "finetune")
    masks = out / "select" / "masks.pt"
    (TORCH_DAMAGE | {"not masks": lambda p: torch.save([torch.ones(2)], p)})[damage](masks)
    err = refused(ARGV + ["--out", str(out), "--resume"], capsys)
    assert f"{masks}: " in err and f"rm -r {out / 'select'} {out / 'finetune'}," in err


def _garble(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


def _unchecked(text):
    def damage(path):
        path.write_text(text)
        (path.parent / (path.name + DIGEST)).unlink()  # as written by an older version
    return damage


JSON_DAMAGE = {
    "one bit flipped": _garble, "truncated": lambda p: p.write_text(p.read_text()[:40]),
    "empty": lambda p: p.write_text(""), "missing": lambda p: p.unlink(),
    "digest of another file": lambda p: p.with_name(p.name + DIGEST).write_text(
        f"{'0' * 64}  {p.name}\n"),
    "not JSON (unchecked)": _unchecked("{not json"), "a list (unchecked)": _unchecked("[1, 2]"),
    "wrong keys (unchecked)": _unchecked('{"complexity": 1}'),
}


@pytest.mark.parametrize("damage", sorted(JSON_DAMAGE))
@pytest.mark.parametrize("name, keep", [("config.json", "report"),
                                        ("train/done.json", "finetune"),
                                        ("select/selection.json", "finetune"),
                                        ("finetune/done.json", "finetune"),
                                        ("report.json", "report")])
def test_a_damaged_json_file_is_one_line_naming_it(finished, tmp_path, capsys, damage, name,
                                                    keep):
    if damage == "missing" and name != "config.json":
        pytest.skip("a stage without its marker is simply redone")
    out = _copy(finished, tmp_path, keep)
    JSON_DAMAGE[damage](out / name)
    err = refused(ARGV + ["--out", str(out), "--resume"], capsys)
    assert f"{out / name}: " in err
    if damage == "missing" or name == "config.json":
        assert "start a new --out" in err
    else:
        assert f"rm -r {out / name.split('/')[0]}" in err and "--resume" in err


def test_a_checkpoint_holding_code_is_refused_and_the_code_never_runs(finished, tmp_path,
                                                                      capsys):
    out = _copy(finished, tmp_path, "select")
    marker = tmp_path / "ran"
    torch.save({"model": Payload(marker)}, out / "train" / "checkpoint.pt")
    err = refused(ARGV + ["--out", str(out), "--resume"], capsys)
    assert "weights_only=True" in err and not marker.exists()
    torch.save({"spec": Payload(marker), "state_dict": {}}, tmp_path / "pruned.pt")
    with pytest.raises(Exception, match="weights_only"):
        load_pruned(tmp_path / "pruned.pt")
    assert not marker.exists()


def test_stale_temporaries_are_deleted_on_the_next_call(finished, tmp_path):
    out = _copy(finished, tmp_path, "report")
    stale = [out / ".report.json.tmp-4242", out / "train" / ".checkpoint.pt.tmp-17",
             out / "select" / ".selection.json.sha256.tmp-9"]
    keep = [out / ".notes.tmp-draft", out / "train" / "x.tmp-1"]
    for p in stale + keep:
        p.write_text("partial")
    assert main(ARGV + ["--out", str(out), "--resume"]) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


# ---- the checked files themselves --------------------------------------------------------------

def test_json_run_files_carry_a_sha256sum_digest_and_a_crash_leaves_a_readable_file(
        tmp_path, monkeypatch):
    path = tmp_path / "done.json"
    write_json(path, {"v": 1}, checked=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "done.json.sha256").read_text() == f"{digest}  done.json\n"

    # the process dies at each rename of a rewrite: the file read back is the old or the new
    import nn.io
    real = os.replace
    for kill_at in range(1, 4):
        calls = []

        def dying(src, dst):
            calls.append(dst)
            if len(calls) == kill_at:
                raise KeyboardInterrupt  # like SIGKILL here: no later step runs
            return real(src, dst)

        monkeypatch.setattr(nn.io.os, "replace", dying)
        with pytest.raises(KeyboardInterrupt):
            write_json(path, {"v": 1 + kill_at}, checked=True)
        monkeypatch.setattr(nn.io.os, "replace", real)
        assert read_json(path)["v"] in (1, 1 + kill_at)
        write_json(path, {"v": 1}, checked=True)
    assert len(calls) == 3  # digest (old and new), the file, digest (new)
    assert remove_temporaries(tmp_path) == []


def test_unchecked_json_of_older_versions_is_read_with_a_warning(tmp_path, caplog):
    (tmp_path / "old.json").write_text('{"a": 1}')
    with caplog.at_level("WARNING", logger="nn.io"):
        assert read_json(tmp_path / "old.json", ["a"]) == {"a": 1}
    assert "old.json has no old.json.sha256" in caplog.text


def test_torch_files_are_written_with_crcs_whatever_torch_is_set_to(tmp_path):
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        save_torch(tmp_path / "m.pt", {"w": torch.arange(1000.0)})
    finally:
        torch.serialization.set_crc32_options(was)
    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        assert z.testzip() is None and all(i.CRC for i in z.infolist() if i.file_size)
    assert torch.equal(read_torch(tmp_path / "m.pt")["w"], torch.arange(1000.0))
    flip_bytes(tmp_path / "m.pt", n=1)
    with pytest.raises(RunFileError, match="fails its CRC-32 check"):
        read_torch(tmp_path / "m.pt")


def test_load_checkpoint_refuses_what_would_not_resume(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.tensor([1.0, float("inf")])}}, path)
    with pytest.raises(RunFileError, match="lacks the key"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="delete it to train from the beginning"):
        load_checkpoint(path)


def test_load_pruned_refuses_a_damaged_model_file(tmp_path):
    """pruned.pt carries torch's CRC-32 of every record: flipped bytes are one ValueError
    naming the file, not a model with other weights."""
    from nn import build_model, compress, save_pruned

    path = save_pruned(compress(build_model("resnet20", 10, 1, 0.25), {}), tmp_path / "p.pt")
    blob = bytearray(path.read_bytes())
    for i in range(400):
        blob[len(blob) // 2 + i] ^= 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"bad\.pt: fails its CRC-32 check"):
        load_pruned(bad)
    assert type(load_pruned(path)).__name__ == "PrunedResNet"
    with pytest.raises(FileNotFoundError):
        load_pruned(tmp_path / "missing.pt")
