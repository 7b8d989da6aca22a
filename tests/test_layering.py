"""Dependency direction (DESIGN §2): mipprune never loads torch; its import stays light."""

import subprocess
import sys


def _loaded_after(stmt):
    code = f"import sys; {stmt}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_import_mipprune_leaves_torch_unloaded():
    mods = _loaded_after("import mipprune, mipprune.spr, mipprune.instance")
    assert "mipprune" in mods
    assert "torch" not in mods
    # solvers load lazily, so nn can use the formula on machines without them
    assert "pyomo" not in mods and "numba" not in mods and "highspy" not in mods


def test_solvers_do_not_load_torch():
    mods = _loaded_after("import mipprune as m; i = m.random_instance(3, 2); m.bigm_bound(i); "
                         "m.branch_and_bound(i); import mipprune.cli")
    assert "pyomo" in mods and "numba" in mods and "highspy" in mods
    assert "torch" not in mods


def test_no_torch_import_in_source():
    import pathlib

    import mipprune

    root = pathlib.Path(mipprune.__file__).parent
    offenders = [p.name for p in root.glob("*.py")
                 if any(line.strip().startswith(("import torch", "from torch"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
