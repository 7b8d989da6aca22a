"""Code provenance (nn.provenance.git_info): what "dirty" means, in a throw-away git repository."""

import shutil
import subprocess

import pytest

from nn.provenance import REPO, git_info

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                    "-c", "commit.gpgsign=false", *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".gitignore", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


def test_clean_checkout(repo):
    info = git_info(repo)
    assert len(info["commit"]) == 40 and info["dirty"] is False


def test_ignored_files_do_not_make_it_dirty(repo):
    (repo / "ignored").mkdir()
    (repo / "ignored" / "out.json").write_text("{}\n")
    assert git_info(repo)["dirty"] is False


def test_modified_tracked_file_is_dirty(repo):
    (repo / "a.py").write_text("x = 2\n")
    assert git_info(repo)["dirty"] is True


def test_deleted_tracked_file_is_dirty(repo):
    (repo / "a.py").unlink()
    assert git_info(repo)["dirty"] is True


def test_untracked_file_is_dirty(repo):
    (repo / "new_module.py").write_text("y = 1\n")
    assert git_info(repo)["dirty"] is True


def test_outside_a_checkout_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repo above tmp_path
    assert git_info(tmp_path) == {"commit": None, "dirty": None}


def test_one_implementation_for_reports_and_benchmarks():
    from benchmarks import _common
    from nn.report import git_info as report_git_info

    assert report_git_info is git_info and _common.git_info is git_info
    assert (REPO / "nn" / "provenance.py").is_file()  # default root: this checkout
    assert set(git_info()) == {"commit", "dirty"}
