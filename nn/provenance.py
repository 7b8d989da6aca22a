"""Code provenance of a result: the git commit of the source checkout and whether it is dirty.

``dirty`` means the working tree differs from ``commit`` in a way that could change what runs:
a tracked file is modified, staged, deleted or renamed, **or** an untracked file exists that
``.gitignore`` does not ignore (a new module not yet committed is code too).  Ignored files
(``__pycache__``, ``/runs/``, ...) never make it dirty.  This is exactly "``git status
--porcelain`` prints something".

Torch-free and read-only: the only git commands run are ``rev-parse`` and ``status``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["REPO", "git_info"]

REPO = Path(__file__).resolve().parent.parent
"""The source checkout this package was imported from (the repository root)."""


def _git(root: Path, *args: str) -> str | None:
    """Stdout of a read-only git command in ``root``; None if git is missing or it fails."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info(root: str | Path | None = None) -> dict:
    """``{"commit": HEAD's hash, "dirty": bool}`` of the checkout at ``root`` (default: this
    repository); ``dirty`` as defined in the module docstring.  Both are None outside a git
    checkout (or without git); ``dirty`` is None whenever ``commit`` is."""
    root = REPO if root is None else Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=normal") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}
