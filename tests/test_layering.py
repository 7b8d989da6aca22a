"""Dependency direction (DESIGN §2): mipprune never loads torch; its import stays light."""

import subprocess
import sys


def _loaded_after(stmt):
    code = f"import sys; {stmt}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_import_mipprune_leaves_torch_unloaded():
    mods = _loaded_after("import mipprune, mipprune.penalty, mipprune.instance")
    assert "mipprune" in mods
    assert "torch" not in mods
    # solvers load lazily, so nn can use the formula on machines without them
    assert "pyomo" not in mods and "numba" not in mods and "highspy" not in mods


def test_solvers_do_not_load_torch():
    mods = _loaded_after("import mipprune as m; i = m.random_instance(3, 2); m.bigm_bound(i); "
                         "m.branch_and_bound(i); import mipprune.cli")
    assert "pyomo" in mods and "numba" in mods and "highspy" in mods
    assert "torch" not in mods


def test_import_nn_leaves_solvers_unloaded():
    # nn uses only the pure formula (mipprune.penalty): GPU machines lack pyomo and highspy
    mods = _loaded_after("import nn, nn.regularizer")
    assert "nn" in mods and "torch" in mods and "mipprune" in mods
    assert "pyomo" not in mods and "highspy" not in mods


def test_module_names_do_not_shadow_exports():
    # importing a submodule binds it on the package: the formula's module is ``penalty``, so
    # ``import mipprune.penalty`` leaves the re-exported function ``mipprune.spr`` in place
    import types

    import mipprune
    import mipprune.bounds
    import mipprune.enumerate
    import mipprune.highs
    import mipprune.penalty

    assert isinstance(mipprune.penalty, types.ModuleType)
    assert callable(mipprune.spr) and not isinstance(mipprune.spr, types.ModuleType)
    assert mipprune.spr is mipprune.penalty.spr
    assert mipprune.bigm_bound is mipprune.bounds.bigm_bound
    assert mipprune.enumerate_solve is mipprune.enumerate.enumerate_solve


def test_no_torch_import_in_source():
    import pathlib

    import mipprune

    root = pathlib.Path(mipprune.__file__).parent
    offenders = [p.name for p in root.glob("*.py")
                 if any(line.strip().startswith(("import torch", "from torch"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
