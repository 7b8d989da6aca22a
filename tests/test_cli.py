"""The command line: stable JSON outputs, one-line errors with exit status 2."""

import json

import numpy as np
import pytest

from mipprune import Instance, random_instance, spr, spr_grad
from mipprune.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_penalty_json_matches_the_formula(capsys):
    code, out, _ = _run(capsys, "penalty", "--a", "1", "--b", "1", "--M", "1", "--w", "0.3,-0.1,0.2", "--json")
    assert code == 0
    d = json.loads(out)
    w = np.array([[0.3, -0.1, 0.2]])
    r = spr(w, 1.0, 1.0, 1.0)
    # t = sqrt(0.14) = 0.3742, u = 0.3, c = 1: u <= ct < 1 -> C2, value 2 t, z = t
    assert d["case"] == "C2"
    assert d["value"] == pytest.approx(2 * np.sqrt(0.14)) == float(r.value[0])
    assert d["z"] == pytest.approx(np.sqrt(0.14))
    np.testing.assert_allclose(d["grad"], spr_grad(w, 1.0, 1.0, 1.0)[0])


@pytest.mark.parametrize("w,case", [("2,0", "C1"), ("0.5,0.01", "C3")])
def test_penalty_other_cases(capsys, w, case):
    # a=1,b=4 (c=0.5), M=1: w=(2,0): u=2 >= 1 -> C1;  w=(0.5,0.01): ct~0.25 < u=0.5 -> C3
    code, out, _ = _run(capsys, "penalty", "--a", "1", "--b", "4", "--M", "1", "--w", w, "--json")
    assert code == 0 and json.loads(out)["case"] == case


@pytest.mark.parametrize("argv,needle", [
    (["penalty", "--a", "-1", "--b", "1", "--M", "1", "--w", "1"], "--a must be >= 0"),
    (["penalty", "--a", "1", "--b", "1", "--M", "0", "--w", "1"], "--M must be > 0"),
    (["penalty", "--a", "1", "--b", "1", "--M", "1", "--w", "1,x"], "comma-separated"),
    (["penalty", "--a", "nan", "--b", "1", "--M", "1", "--w", "1"], "finite"),
    (["solve", "x.json", "--method", "magic"], "invalid choice"),
    (["validate", "--instances", "0"], "--instances must be >= 1"),
])
def test_bad_arguments_one_line_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    _, err = capsys.readouterr()
    assert exc.value.code == 2
    assert needle in err and err.count("\n") == 1


def test_malformed_instance_file(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    for text, needle in [("{not json", "not valid JSON"), ('{"Q": [[1]]}', "missing key"),
                         ('{"Q": [[1]], "c": [0], "groups": [[0]], "a": [-1], "b": [1], "M": [1]}',
                          "a must be >= 0")]:
        bad.write_text(text)
        code, _, err = _run(capsys, "solve", str(bad))
        assert code == 2 and needle in err and err.count("\n") == 1
    code, _, err = _run(capsys, "solve", str(tmp_path / "missing.json"))
    assert code == 2 and "cannot read" in err


def test_solve_json(capsys, tmp_path):
    path = tmp_path / "inst.json"
    random_instance(7, 2, seed=4).save(path)
    code, out, _ = _run(capsys, "solve", str(path), "--json")
    assert code == 0
    d = json.loads(out)
    for key in ("objective", "w", "z", "lower_bound", "gap", "bigm_bound", "pr_bound", "seconds"):
        assert key in d
    code, out2, _ = _run(capsys, "solve", str(path), "--json", "--method", "enumerate")
    e = json.loads(out2)
    inst = Instance.load(path)
    assert d["objective"] == pytest.approx(e["objective"], rel=1e-6)
    assert d["z"] == e["z"]
    assert d["objective"] == pytest.approx(inst.objective(d["w"], d["z"]), rel=1e-12)
    assert d["bigm_bound"] <= d["pr_bound"] + 1e-9 <= d["objective"] + 2e-9
    assert d["gap"] <= 1e-6
    code, out3, _ = _run(capsys, "solve", str(path), "--json", "--bounds", "bigm")
    assert json.loads(out3)["objective"] == pytest.approx(d["objective"], rel=1e-6)


def test_validate_and_generate(capsys, tmp_path):
    code, out, _ = _run(capsys, "validate", "--instances", "2", "--groups", "5", "--json")
    d = json.loads(out)
    assert code == 0 and d["passed"] == 2 and d["failed"] == 0
    for c in d["instances"]:
        assert c["bigm_bound"] <= c["pr_bound_closed_form"] + 1e-9 <= c["optimum"] + 2e-9
        assert c["enumeration"] == pytest.approx(c["optimum"], rel=1e-6)
    code, out, _ = _run(capsys, "generate", "--groups", "4", "--seed", "9")
    assert code == 0
    inst = Instance.from_dict(json.loads(out))
    assert inst.n_groups == 4
    np.testing.assert_array_equal(inst.Q, random_instance(4, 3, seed=9).Q)
