"""common.staging.staged_dir: a folder appears whole at its destination or not at all."""

from __future__ import annotations

import os
import stat
from unittest import mock

import pytest

from common.staging import give_files_folder_mode, staged_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _siblings(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_the_folder_appears_at_the_destination_on_success(tmp_path):
    dest = tmp_path / "out"
    with staged_dir(str(dest)) as staging:
        assert os.path.dirname(staging) == str(tmp_path)  # same file system: an atomic rename
        assert not dest.exists()  # nothing visible while it is written
        (tmp_path / staging / "a.txt").write_text("a")
    assert (dest / "a.txt").read_text() == "a"
    assert _siblings(tmp_path) == ["out"]


def test_the_parent_is_made(tmp_path):
    dest = tmp_path / "deep" / "er" / "out"
    with staged_dir(str(dest)) as staging:
        (tmp_path / staging / "f").write_text("")
    assert (dest / "f").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_the_folder_gets_mkdirs_permissions_not_mkdtemps(tmp_path, umask):
    """Regression: make-model's folder kept tempfile.mkdtemp's 0700."""
    old = os.umask(umask)
    try:
        with staged_dir(str(tmp_path / "out")):
            pass
        os.mkdir(tmp_path / "plain")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out") == 0o777 & ~umask == _mode(tmp_path / "plain")


def test_an_existing_destination_is_refused_before_the_block_runs(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    ran = []
    with pytest.raises(FileExistsError):
        with staged_dir(str(dest)):
            ran.append(True)
    assert not ran
    assert (dest / "old").read_text() == "old"
    assert _siblings(tmp_path) == ["out"]


def test_a_destination_that_appears_meanwhile_is_refused_and_kept(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(FileExistsError):
        with staged_dir(str(dest)) as staging:
            (tmp_path / staging / "new").write_text("new")
            dest.mkdir()  # another writer got there first (an empty folder rename would take)
    assert list(dest.iterdir()) == []
    assert _siblings(tmp_path) == ["out"]


def test_force_replaces_the_old_destination(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    with staged_dir(str(dest), force=True) as staging:
        (tmp_path / staging / "new").write_text("new")
        assert (dest / "old").exists()  # the old one stays until the new one is whole
    assert sorted(os.listdir(dest)) == ["new"]
    assert _siblings(tmp_path) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failure_or_ctrl_c_leaves_nothing_and_keeps_the_old(tmp_path, error):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(type(error)):
        with staged_dir(str(dest), force=True) as staging:
            (tmp_path / staging / "half").write_text("half")
            raise error
    assert sorted(os.listdir(dest)) == ["old"]
    assert _siblings(tmp_path) == ["out"]


def test_a_failure_leaves_no_destination_when_there_was_none(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_dir(str(tmp_path / "out")) as staging:
            (tmp_path / staging / "half").write_text("half")
            raise RuntimeError("boom")
    assert _siblings(tmp_path) == []


def test_a_failed_swap_puts_the_old_destination_back(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".out.partial-"):
            raise OSError("disk gone")
        return real_rename(src, dst)

    with pytest.raises(OSError, match="disk gone"):
        with mock.patch("common.staging.os.rename", side_effect=rename):
            with staged_dir(str(dest), force=True) as staging:
                (tmp_path / staging / "new").write_text("new")
    assert sorted(os.listdir(dest)) == ["old"]
    assert _siblings(tmp_path) == ["out"]


def test_files_get_the_folders_mode(tmp_path):
    """Regression: train-tiny and make-model wrote model.safetensors 0600 (safetensors' mode)."""
    old = os.umask(0o022)
    try:
        with staged_dir(str(tmp_path / "out")) as staging:
            weights = os.path.join(staging, "model.safetensors")
            open(weights, "w").close()
            os.chmod(weights, 0o600)
            os.mkdir(os.path.join(staging, "sub"))
            give_files_folder_mode(staging)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out" / "model.safetensors") == 0o644
    assert _mode(tmp_path / "out" / "sub") == 0o755  # folders keep theirs
