"""The ``mipprune`` command line as a hostile user meets it (issue 12): time limits that cap every
phase, Ctrl-C, numbers out of range, inputs that cannot be read, arguments argparse mangles,
statuses that say what was proved.  Every bad input is one line on stderr and exit status 2."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mipprune
from mipprune import random_instance
from mipprune.cli import _parser, main
from mipprune.select import random_selection

from helpers import run_cli, strict_json

REPO = Path(mipprune.__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
BASE = {"Q": [[2.0, 0.5], [0.5, 1.0]], "c": [-1.0, 0.5], "groups": [[0], [1]],
        "a": [0.1, 0.1], "b": [0.2, 0.2], "M": [3.0, 3.0]}


def _run(capsys, *argv):
    return run_cli(main, capsys, *argv)


def _one_line_exit_2(code, out, err, needle):
    assert code == 2 and out == "", (code, out, err)
    assert needle in err and err.count("\n") == 1, err


def _cli(*argv, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "mipprune", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=ENV, **kwargs)


@pytest.fixture(scope="module")
def big_instance(tmp_path_factory):
    """750 variables: minutes for branch and bound, seconds to read."""
    path = tmp_path_factory.mktemp("big") / "big.json"
    with open(path, "w") as fh:
        subprocess.run([sys.executable, "-m", "mipprune", "generate", "--groups", "250", "--seed", "1"],
                       stdout=fh, check=True, cwd=REPO, env=ENV)
    return path


# ---- time limits and Ctrl-C --------------------------------------------------------------------
def test_time_limit_caps_every_phase_and_seconds_is_the_wall_time(big_instance):
    # the root bounds used to run unbounded before branch and bound (a Pyomo QP: ~25 s here)
    t0 = time.perf_counter()
    p = _cli("solve", str(big_instance), "--time-limit", "1", "--json")
    out, err = p.communicate(timeout=60)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, err
    d = strict_json(out)
    assert d["status"] == "time_limit"
    assert wall < 1 + 6  # the limit, plus reading the instance and starting Python
    assert 1.0 <= d["seconds"] <= wall
    assert d["lower_bound"] <= d["objective"]


def test_enumeration_respects_the_time_limit(capsys, tmp_path):
    path = tmp_path / "g16.json"
    random_instance(16, 3, seed=2).save(path)
    t0 = time.perf_counter()
    code, out, _ = _run(capsys, "solve", str(path), "--method", "enumerate", "--time-limit", "0.01",
                        "--json")
    wall = time.perf_counter() - t0
    d = strict_json(out)
    assert code == 0 and d["status"] == "time_limit"  # 2^16 patterns cannot be done in 10 ms
    assert 0.01 <= d["seconds"] <= wall
    assert d["lower_bound"] <= d["objective"] and d["patterns"] < 2 ** 16


def _interrupt_after(proc, seconds):
    time.sleep(seconds)
    assert proc.poll() is None, "finished before it could be interrupted"
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("Ctrl-C did not stop the command within 10 s")
    return proc.returncode, out, err, time.perf_counter() - t0


def test_ctrl_c_stops_branch_and_bound_promptly_with_one_line(big_instance):
    code, out, err, latency = _interrupt_after(_cli("solve", str(big_instance)), 3.0)
    assert code == 128 + signal.SIGINT and out == b""
    assert err.count(b"\n") == 1 and b"mipprune solve: interrupted after" in err
    assert latency < 2.0


def test_ctrl_c_stops_highs_promptly(tmp_path):
    # a MILP whose root node keeps HiGHS busy for seconds between two interrupt callbacks
    path = tmp_path / "hard.json"
    path.write_text(json.dumps(random_selection(300, 40, seed=1, n_pairs=600).to_json()))
    code, out, err, latency = _interrupt_after(_cli("select", str(path)), 3.0)
    assert code == 128 + signal.SIGINT and out == b""
    assert err.count(b"\n") == 1 and b"mipprune select: interrupted after" in err
    assert latency < 2.0


# ---- statuses that say what was proved ---------------------------------------------------------
def test_a_loose_gap_tolerance_is_not_called_optimal(capsys, tmp_path):
    path = tmp_path / "g20.json"
    random_instance(20, 3, seed=4).save(path)
    code, out, _ = _run(capsys, "solve", str(path), "--gap-tol", "0.1", "--json")
    d = strict_json(out)
    assert code == 0 and 1e-6 < d["gap"] <= 0.1  # 9.2% on this instance
    assert d["status"] == "within_tolerance"
    code, out, _ = _run(capsys, "solve", str(path), "--gap-tol", "0.1")
    assert "(bnb, within tolerance," in out.splitlines()[0]


def test_select_with_a_loose_gap_is_not_called_optimal(capsys, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(random_selection(40, 20, seed=0).to_json()))
    code, out, _ = _run(capsys, "select", str(path), "--gap", "0.5", "--json")
    d = strict_json(out)
    assert code == 0 and d["gap"] > 1e-6 and d["status"] == "within_tolerance"


def test_validate_says_when_enumeration_was_skipped(capsys):
    code, out, _ = _run(capsys, "validate", "--instances", "2", "--groups", "3", "--enumerate-max", "2")
    assert code == 0 and "passed every check\n" not in out + "\n"
    assert "enumeration check was skipped on all of them" in out.splitlines()[-1]
    code, out, _ = _run(capsys, "validate", "--instances", "2", "--groups", "3", "--enumerate-max", "2",
                        "--json")
    assert strict_json(out)["enumeration_skipped"] == 2


# ---- numbers out of range, wrong types ---------------------------------------------------------
@pytest.mark.parametrize("key,value,needle", [
    ("c", [1e308, 1e308], "c has an entry 1e+308 at index (0,)"),  # was -inf ... optimal
    ("Q", [[1e200, 0.0], [0.0, 1e200]], "Q has an entry 1e+200 at index (0, 0)"),  # ZeroDivisionError
    ("const", [1, 2], "const must be a number, got [1, 2]"),  # TypeError
    ("const", 10 ** 400, "const must be finite"),  # OverflowError
    ("const", "3", "const must be a number, got '3'"),  # accepted as 3.0
    ("Q", [[True, 0], [0, 1]], "Q[0, 0] must be a number, got True"),  # accepted as 1.0
    ("a", "x", "a must be numeric, got 'x'"),  # numpy's message, naming nothing
    ("b", [0.2, None], "b[1] must be a number, got None"),
])
def test_instance_numbers_out_of_range_or_of_the_wrong_type(capsys, tmp_path, key, value, needle):
    path = tmp_path / "i.json"
    path.write_text(json.dumps({**BASE, key: value}))
    _one_line_exit_2(*_run(capsys, "solve", str(path), "--json"), needle)


def test_select_numbers_out_of_range(capsys, tmp_path):
    # two values of 1e308 used to sum to inf, printed as value null beside "optimal"
    d = {"families": [{"name": "a", "widths": [0, 1], "value": [0, 1e308]},
                      {"name": "b", "widths": [0, 1], "value": [0, 1e308]}], "budget": 10}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    _one_line_exit_2(*_run(capsys, "select", str(path), "--json"), "value[1] = 1e+308 is too large")


def test_penalty_overflow_is_an_error_not_infinity(capsys):
    code, out, err = _run(capsys, "penalty", "--a", "1", "--b", "1", "--M", "1", "--w", "1e308,1e308",
                          "--json")
    _one_line_exit_2(code, out, err, "overflows double precision")


# ---- inputs that cannot be read -----------------------------------------------------------------
UNREADABLE = [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),  # was a RecursionError traceback (solve)
    ("", "it is empty"),
    ('{"a": 1' + "0" * 5000 + "}", "not valid JSON"),  # an integer too long to parse
    (b"\xff\xfe\x00binary", "not text"),
    (None, "Is a directory"),
]


def test_unreadable_inputs_are_one_line(capsys, tmp_path):
    for i, (content, needle) in enumerate(UNREADABLE):
        path = tmp_path / f"in{i}.json"
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        for command in ("solve", "select"):
            _one_line_exit_2(*_run(capsys, command, str(path)), needle)


def test_solve_reads_standard_input(capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(BASE)))
    code, out, err = _run(capsys, "solve", "-", "--json")
    assert code == 0 and err == ""
    assert strict_json(out)["status"] == "optimal"
    monkeypatch.setattr(sys, "stdin", io.StringIO("{"))
    _one_line_exit_2(*_run(capsys, "solve", "-"), "standard input is not valid JSON")


def test_generate_refuses_sizes_that_cannot_fit_before_allocating(capsys):
    _one_line_exit_2(*_run(capsys, "generate", "--groups", str(10 ** 8)), "GiB of memory available")
    _one_line_exit_2(*_run(capsys, "validate", "--groups", str(10 ** 8)), "GiB of memory available")


def test_closed_stdout_is_silent():
    p = _cli("generate", "--groups", "30")
    p.stdout.close()  # as `mipprune generate | head -c 1` does
    err = p.stderr.read()
    assert p.wait(timeout=60) == 128 + signal.SIGPIPE and err == b""


# ---- arguments -----------------------------------------------------------------------------------
def test_bare_command_prints_usage_and_exits_2(capsys):
    code, out, err = _run(capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: mipprune") and "a command is required" in err


def test_negative_values_in_both_forms(capsys):
    for form in (["--w", "-0.3,0.1"], ["--w=-0.3,0.1"]):  # argparse took "-0.3,0.1" for an option
        code, out, _ = _run(capsys, "penalty", "--a", "1", "--b", "1", "--M", "1", *form, "--json")
        assert code == 0
        d = strict_json(out)
        # t = sqrt(0.1), u = 0.3, c = 1: u <= ct < 1 -> C2, value 2 t
        assert d["case"] == "C2" and d["value"] == pytest.approx(2 * 0.1 ** 0.5)
        assert d["grad"][0] < 0 < d["grad"][1]
    # a negative number argparse does not recognise gets the range message, not "expected one argument"
    _one_line_exit_2(*_run(capsys, "solve", "x.json", "--time-limit", "-1e-3"), "--time-limit must be > 0")


def test_bad_arguments_come_before_reading_the_instance(capsys, tmp_path):
    # --gap-tol 1 used to be rejected by branch and bound, after the root bounds
    _one_line_exit_2(*_run(capsys, "solve", str(tmp_path / "none.json"), "--gap-tol", "1"),
                     "--gap-tol must be in [0, 1), got 1")
    path = tmp_path / "g17.json"
    random_instance(17, 1, seed=0).save(path)
    _one_line_exit_2(*_run(capsys, "solve", str(path), "--method", "enumerate"),
                     "--method enumerate takes at most 16 groups")


def test_every_option_has_help():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {' '.join(action.option_strings) or action.dest}"
               for name, command in sub.choices.items() for action in command._actions
               if not action.help]
    assert missing == []
