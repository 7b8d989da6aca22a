"""mipprune.instance: validation (ValueError naming the bad value), immutability, exact JSON round
trips, and the least-squares / random instance builders against hand formulas."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from mipprune.instance import Instance, least_squares_instance, random_instance

# A hand-checkable valid instance: Q has eigenvalues 1, 3 (block [[2,1],[1,2]]) and 1.
Q0 = [[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
C0 = [1.0, -1.0, 0.5]
G0 = [[0, 1], [2]]
A0, B0, M0 = [0.1, 0.2], [1.0, 2.0], [3.0, 4.0]
KEYS = {"Q", "c", "groups", "a", "b", "M"}


def _args(**over):
    d = dict(Q=Q0, c=C0, groups=G0, a=A0, b=B0, M=M0)
    d.update(over)
    return d


def _make(**over):
    return Instance(**_args(**over))


def _assert_same(x: Instance, y: Instance):
    for name in ("Q", "c", "a", "b", "M", "index"):
        np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
    assert x.groups == y.groups
    assert x.const == y.const


def test_valid_instance_fields():
    inst = _make()
    assert (inst.n, inst.n_groups) == (3, 2)
    assert inst.groups == ((0, 1), (2,))
    np.testing.assert_array_equal(inst.index, [[0, 1], [2, -1]])
    np.testing.assert_array_equal(inst.group_of(), [0, 0, 1])
    for name in ("Q", "c", "a", "b", "M"):
        assert getattr(inst, name).dtype == np.float64
    # scalars broadcast to one entry per group
    inst = _make(a=0.5, b=2, M=1)
    np.testing.assert_array_equal(inst.a, [0.5, 0.5])
    np.testing.assert_array_equal(inst.b, [2.0, 2.0])
    np.testing.assert_array_equal(inst.M, [1.0, 1.0])


def test_objective_padded_and_violation_by_hand():
    inst = _make(const=0.25)
    w = np.array([1.0, -2.0, 3.0])
    # f = 1/2 w^T Q w + c^T w + const: Qw = [0, -3, 3], w^T Q w = 0 + 6 + 9 = 15;
    # c^T w = 1 + 2 + 1.5 = 4.5;  f = 7.5 + 4.5 + 0.25 = 12.25
    assert inst.f(w) == pytest.approx(12.25)
    # penalty: a ||w_j||^2 = 0.1*5 + 0.2*9 = 2.3;  b z = 1*1 + 2*0.5 = 2  ->  16.55
    assert inst.objective(w, [1.0, 0.5]) == pytest.approx(16.55)
    np.testing.assert_array_equal(inst.padded(w), [[1.0, -2.0], [3.0, 0.0]])
    # |w_i| <= M_j z_j: group 0 max 2 <= 3*1 ok; group 1: 3 - 4*0.5 = 1 violated by 1
    assert inst.violation(w, [1.0, 0.5]) == pytest.approx(1.0)
    assert inst.violation(w, [1.0, 1.0]) == 0.0


# ----------------------------------------------------------------------------------------------
# validation: ValueError naming the bad value
# ----------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
BAD = [
    # groups that do not partition 0..n-1
    ("overlap", dict(groups=[[0, 1], [1, 2]]), r"index 1 is in more than one group"),
    ("gap", dict(groups=[[0], [2]]), r"index 1 is in no group"),
    ("empty group", dict(groups=[[0, 1, 2], []]), r"group 1 is empty"),
    ("index too large", dict(groups=[[0, 1], [3]]), r"group 1 has index 3, outside 0\.\.2"),
    ("negative index", dict(groups=[[0, -1], [2]]), r"group 0 has index -1, outside 0\.\.2"),
    ("groups not lists", dict(groups=5), r"groups must be lists of integer indices, got 5"),
    ("group not a list", dict(groups=[[0, 1], 2]), r"groups must be lists of integer indices"),
    ("non-integer index", dict(groups=[[0, 1.5], [2]]), r"1\.5"),
    ("string group", dict(groups=["01", [2]]), r"'01'"),
    # coefficients
    ("negative a", dict(a=[0.1, -0.5]), r"a must be >= 0, got a\[1\] = -0\.5"),
    ("negative b", dict(b=[-2.0, 1.0]), r"b must be >= 0, got b\[0\] = -2\.0"),
    ("negative scalar b", dict(b=-1.0), r"b must be >= 0, got b\[0\] = -1\.0"),
    ("zero M", dict(M=[3.0, 0.0]), r"M must be > 0, got M\[1\] = 0\.0"),
    ("negative M", dict(M=-2.0), r"M must be > 0, got M\[0\] = -2\.0"),
    # Q
    ("Q not PSD", dict(Q=[[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
     r"Q must be positive semidefinite, smallest eigenvalue -1"),
    ("Q not symmetric", dict(Q=[[2.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]),
     r"Q must be symmetric, max \|Q - Q\^T\| = 1"),
    ("Q 1-D", dict(Q=[1.0, 2.0, 3.0]), r"Q must be 2-dimensional, got shape \(3,\)"),
    ("Q not numeric", dict(Q="abc"), r"Q must be numeric, got 'abc'"),
    # NaN / inf anywhere
    ("NaN in Q", dict(Q=[[2.0, NAN, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]),
     r"Q has a non-finite entry nan at index \(0, 1\)"),
    ("inf in Q", dict(Q=[[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, INF]]),
     r"Q has a non-finite entry inf at index \(2, 2\)"),
    ("NaN in c", dict(c=[1.0, NAN, 0.5]), r"c has a non-finite entry nan at index \(1,\)"),
    ("-inf in c", dict(c=[1.0, 0.0, -INF]), r"c has a non-finite entry -inf at index \(2,\)"),
    ("NaN in a", dict(a=[NAN, 0.1]), r"a has a non-finite entry nan at index \(0,\)"),
    ("inf in b", dict(b=[1.0, INF]), r"b has a non-finite entry inf at index \(1,\)"),
    ("inf M", dict(M=INF), r"M has a non-finite entry inf"),
    ("NaN M", dict(M=[NAN, 1.0]), r"M has a non-finite entry nan at index \(0,\)"),
    ("NaN const", dict(const=NAN), r"const must be finite, got nan"),
    ("inf const", dict(const=INF), r"const must be finite, got inf"),
    # shapes
    ("c shorter than Q", dict(c=[1.0, 2.0]), r"Q must have shape \(2, 2\) to match c, got \(3, 3\)"),
    ("Q not square", dict(Q=[[1.0, 0.0, 0.0]]), r"Q must have shape \(3, 3\) to match c, got \(1, 3\)"),
    ("a too long", dict(a=[1.0, 2.0, 3.0]), r"a must have one entry per group \(2\), got 3"),
    ("b too short", dict(b=[1.0]), r"b must have one entry per group \(2\), got 1"),
    ("M too long", dict(M=[1.0, 2.0, 3.0]), r"M must have one entry per group \(2\), got 3"),
    ("a 2-D", dict(a=[[1.0, 2.0]]), r"a must be 1-dimensional, got shape \(1, 2\)"),
]


@pytest.mark.parametrize("over,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_instance_raises_naming_the_value(over, match):
    with pytest.raises(ValueError, match=match):
        _make(**over)


def test_tolerances_symmetrise_and_accept_tiny_negative_curvature():
    Q = np.array(Q0)
    Q[0, 1] += 1e-12  # asymmetry below 1e-9 * max|Q|: accepted, stored exactly symmetric
    inst = _make(Q=Q)
    assert np.array_equal(inst.Q, inst.Q.T)
    assert inst.Q[0, 1] == pytest.approx(1.0 + 5e-13, abs=1e-15)
    # rank-one PSD matrix with rounding: smallest eigenvalue ~ -1e-16, accepted
    v = np.array([0.1, 0.7, 0.3])
    inst = _make(Q=np.outer(v, v))
    assert np.linalg.eigvalsh(inst.Q).min() > -1e-12
    # clearly negative (-1e-6): rejected
    with pytest.raises(ValueError, match="smallest eigenvalue -1e-06"):
        _make(Q=np.diag([1.0, 1.0, -1e-6]))


# ----------------------------------------------------------------------------------------------
# immutability and with_b
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Q", "c", "a", "b", "M", "index"])
def test_arrays_are_read_only(name):
    inst = _make()
    arr = getattr(inst, name)
    before = arr.copy()
    with pytest.raises(ValueError, match="read-only"):
        arr[(0,) * arr.ndim] = 99.0
    np.testing.assert_array_equal(getattr(inst, name), before)


def test_fields_cannot_be_reassigned_and_inputs_are_copied():
    Q, c, a = np.array(Q0), np.array(C0), np.array(A0)
    inst = _make(Q=Q, c=c, a=a)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inst.Q = np.eye(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inst.const = 1.0
    Q[0, 0], c[0], a[0] = 100.0, 100.0, 100.0  # mutating the caller's arrays changes nothing
    assert (inst.Q[0, 0], inst.c[0], inst.a[0]) == (2.0, 1.0, 0.1)
    assert isinstance(inst.groups, tuple) and all(isinstance(g, tuple) for g in inst.groups)


def test_with_b_makes_a_new_validated_instance():
    inst = _make(const=0.5)
    new = inst.with_b([5.0, 6.0])
    assert new is not inst and isinstance(new, Instance)
    np.testing.assert_array_equal(new.b, [5.0, 6.0])
    np.testing.assert_array_equal(inst.b, B0)  # the original is untouched
    for name in ("Q", "c", "a", "M"):
        np.testing.assert_array_equal(getattr(new, name), getattr(inst, name))
    assert new.groups == inst.groups and new.const == 0.5
    np.testing.assert_array_equal(inst.with_b(0.0).b, [0.0, 0.0])
    with pytest.raises(ValueError, match=r"b must be >= 0, got b\[1\] = -1\.0"):
        inst.with_b([1.0, -1.0])
    with pytest.raises(ValueError, match=r"b must have one entry per group \(2\), got 3"):
        inst.with_b([1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["least_squares", "quadratic"])
def test_json_round_trip_is_exact(tmp_path, kind):
    inst = random_instance(4, 3, seed=11, kind=kind)
    d = inst.to_dict()
    json.dumps(d, allow_nan=False)  # plain JSON types only
    assert set(d) == KEYS | ({"const"} if inst.const else set())
    _assert_same(Instance.from_dict(json.loads(json.dumps(d))), inst)
    path = tmp_path / "inst.json"
    inst.save(path)
    _assert_same(Instance.load(path), inst)
    _assert_same(Instance.load(str(path)), inst)


def test_json_key_set_exact_when_const_is_zero(tmp_path):
    inst = _make()
    assert inst.const == 0.0
    d = inst.to_dict()
    assert set(d) == KEYS
    assert d == {"Q": Q0, "c": C0, "groups": G0, "a": A0, "b": B0, "M": M0}
    path = tmp_path / "i.json"
    inst.save(path)
    assert set(json.loads(path.read_text())) == KEYS
    # const != 0 is written, and read back
    inst = _make(const=0.75)
    assert inst.to_dict()["const"] == 0.75
    assert Instance.from_dict(inst.to_dict()).const == 0.75


@pytest.mark.parametrize("d,match", [
    ([1, 2], r"an instance must be a JSON object, got list"),
    ("Q", r"an instance must be a JSON object, got str"),
    (None, r"an instance must be a JSON object, got NoneType"),
    ({k: v for k, v in _args().items() if k != "M"}, r"instance is missing key\(s\) \['M'\]"),
    ({"Q": Q0, "c": C0, "groups": G0}, r"missing key\(s\) \['a', 'b', 'M'\]"),
    ({**_args(), "foo": 1, "bar": 2}, r"instance has unknown key\(s\) \['bar', 'foo'\]"),
    ({**_args(), "a": [0.1, -1.0]}, r"a\[1\] = -1\.0"),  # from_dict validates like the constructor
], ids=["list", "str", "null", "missing M", "missing a b M", "unknown keys", "bad value"])
def test_from_dict_errors(d, match):
    with pytest.raises(ValueError, match=match):
        Instance.from_dict(d)


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nothere.json"
    with pytest.raises(ValueError, match=r"cannot read instance file .*nothere\.json"):
        Instance.load(missing)
    with pytest.raises(ValueError, match=r"cannot read instance file .*" + re.escape(tmp_path.name)):
        Instance.load(tmp_path)  # a directory
    bad = tmp_path / "bad.json"
    bad.write_text('{"Q": [[1]], "c": [0')
    with pytest.raises(ValueError, match=r"instance file .*bad\.json is not valid JSON"):
        Instance.load(bad)
    arr = tmp_path / "list.json"
    arr.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"must be a JSON object, got list"):
        Instance.load(arr)
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps({**_args(), "c": [1.0, float("nan"), 0.0]}))  # JSON's NaN extension
    with pytest.raises(ValueError, match=r"c has a non-finite entry nan at index \(1,\)"):
        Instance.load(nan)


def test_load_binary_file_names_the_file(tmp_path):
    """A non-UTF-8 (binary) file is a non-JSON file too: the ValueError must name the file."""
    blob = tmp_path / "blob.json"
    blob.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(ValueError, match=r"blob\.json"):
        Instance.load(blob)


# ----------------------------------------------------------------------------------------------
# least squares
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", ["inputs", "outputs"])
def test_least_squares_objective_equals_hand_formula(groups):
    rng = np.random.default_rng(0)
    ns, p, k = 9, 4, 3
    X, Y = rng.standard_normal((ns, p)), rng.standard_normal((ns, k))
    G = p if groups == "inputs" else k
    a, b = rng.uniform(0.1, 1.0, G), rng.uniform(0.1, 1.0, G)
    inst = least_squares_instance(X, Y, a, b, 5.0, groups=groups)
    assert (inst.n, inst.n_groups) == (p * k, G)
    for W in (rng.standard_normal((p, k)), np.zeros((p, k))):
        w = W.ravel()  # row-major vec: w[i*k + o] = W[i, o]
        norms = np.sum(W * W, axis=1 if groups == "inputs" else 0)  # rows / columns of W
        loss = np.sum((Y - X @ W) ** 2) / (2 * ns)
        assert inst.f(w) == pytest.approx(loss, rel=1e-12, abs=1e-14)
        assert inst.objective(w, np.ones(G)) == pytest.approx(loss + a @ norms + b.sum(), rel=1e-12)
        assert inst.objective(w, np.zeros(G)) == pytest.approx(loss + a @ norms, rel=1e-12)
    # which variables each group holds
    if groups == "inputs":
        assert inst.groups[1] == (3, 4, 5)
    else:
        assert inst.groups[1] == (1, 4, 7, 10)
    assert inst.const == pytest.approx(np.sum(Y * Y) / (2 * ns))


def test_least_squares_bad_arguments():
    X, Y = np.ones((5, 2)), np.ones((4, 3))
    with pytest.raises(ValueError, match=r"same number of rows, got 5 and 4"):
        least_squares_instance(X, Y, 0.1, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"groups must be 'inputs' or 'outputs', got 'rows'"):
        least_squares_instance(X, np.ones((5, 3)), 0.1, 1.0, 1.0, groups="rows")
    Xn = np.ones((5, 2))
    Xn[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"X has a non-finite entry nan at index \(3, 1\)"):
        least_squares_instance(Xn, np.ones((5, 3)), 0.1, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"Y must be 2-dimensional, got shape \(5,\)"):
        least_squares_instance(X, np.ones(5), 0.1, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"a must have one entry per group \(2\), got 3"):
        least_squares_instance(X, np.ones((5, 3)), [0.1, 0.1, 0.1], 1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# random instances
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["least_squares", "quadratic"])
def test_random_instance_is_seeded(kind):
    x, y = random_instance(5, 2, seed=3, kind=kind), random_instance(5, 2, seed=3, kind=kind)
    _assert_same(x, y)
    z = random_instance(5, 2, seed=4, kind=kind)
    assert not np.array_equal(x.Q, z.Q) or not np.array_equal(x.c, z.c)
    assert not np.array_equal(x.b, z.b)


@pytest.mark.parametrize("kind", ["least_squares", "quadratic"])
@pytest.mark.parametrize("G,k", [(1, 1), (3, 2), (6, 4)])
def test_random_instance_is_valid(kind, G, k):
    inst = random_instance(G, k, seed=G * 10 + k, kind=kind)
    assert (inst.n, inst.n_groups) == (G * k, G)
    assert inst.groups == tuple(tuple(range(j * k, (j + 1) * k)) for j in range(G))
    assert np.linalg.eigvalsh(inst.Q).min() > 0  # positive definite: a unique f-minimiser
    assert np.all(inst.a >= 0) and np.all(inst.b > 0) and np.all(inst.M > 0)
    # the unregularised minimiser of f lies inside the box (M = 2 max|W_ls|, resp. 2 max|w*| + 1)
    w_min = np.linalg.solve(inst.Q, -inst.c)
    assert np.abs(w_min).max() <= inst.M.min() / 2 * (1 + 1e-9)
    # round-trips through the constructor's validation unchanged
    _assert_same(Instance.from_dict(inst.to_dict()), inst)


def test_random_instance_ridge_scales_a():
    x = random_instance(4, 2, seed=1, ridge=0.1)
    y = random_instance(4, 2, seed=1, ridge=0.3)
    np.testing.assert_allclose(y.a, 3 * x.a, rtol=1e-12)
    np.testing.assert_array_equal(random_instance(4, 2, seed=1, ridge=0.0).a, 0.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_groups=0), r"n_groups must be an integer >= 1, got 0"),
    (dict(n_groups=-2), r"n_groups must be an integer >= 1, got -2"),
    (dict(n_groups=2.5), r"n_groups must be an integer >= 1, got 2\.5"),
    (dict(n_groups="3"), r"n_groups must be an integer >= 1, got '3'"),
    (dict(group_size=0), r"group_size must be an integer >= 1, got 0"),
    (dict(ridge=-0.1), r"ridge must be >= 0, got -0\.1"),
    (dict(ridge=float("nan")), r"ridge must be >= 0, got nan"),
    (dict(ridge=float("inf")), r"ridge must be >= 0, got inf"),
    (dict(rho=1.0), r"rho must be in \[0, 1\), got 1\.0"),
    (dict(rho=-0.2), r"rho must be in \[0, 1\), got -0\.2"),
    (dict(kind="cubic"), r"kind must be 'least_squares' or 'quadratic', got 'cubic'"),
])
def test_random_instance_bad_arguments(kwargs, match):
    args = dict(n_groups=3, group_size=2, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        random_instance(**args)
