"""tailor.files: atomic writes of files and directories, and cleaning up after a killed writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tailor.files
from tailor.files import (
    atomic_output,
    atomic_write_json,
    atomic_write_text,
    directory_size,
    remove_stale_temporaries,
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


class Boom(Exception):
    pass


def test_write_text_and_json(tmp_path):
    path = atomic_write_text(tmp_path / "deep" / "er" / "a.txt", "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    data = {"n": 3, "name": "ü", "nested": [1, None]}
    assert json.loads(atomic_write_json(tmp_path / "d.json", data).read_text(encoding="utf-8")) == data
    assert _temporaries(tmp_path) == [] and _temporaries(tmp_path / "deep" / "er") == []


def test_modes_follow_the_umask_like_a_plain_write(tmp_path):
    """Not tempfile's 0o600 / 0o700: a report or an adapter must stay readable by others."""
    atomic_write_text(tmp_path / "f.txt", "x")
    with atomic_output(tmp_path / "d", directory=True) as tmp:
        (tmp / "inside").write_text("y")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_temporary_is_a_hidden_sibling(tmp_path):
    with atomic_output(tmp_path / "out.bin") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.tmp-") and tmp.is_file()
        assert not (tmp_path / "out.bin").exists()  # nothing at the path until the write is complete
        tmp.write_bytes(b"\x00\x01")
    assert (tmp_path / "out.bin").read_bytes() == b"\x00\x01"
    assert _temporaries(tmp_path) == []


def test_exception_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    with pytest.raises(Boom), atomic_output(path) as tmp:
        tmp.write_text("half of the new")
        raise Boom
    assert path.read_text() == "old"
    assert _temporaries(tmp_path) == []


def test_exception_without_an_old_file_leaves_nothing(tmp_path):
    with pytest.raises(Boom), atomic_output(tmp_path / "new.txt") as tmp:
        tmp.write_text("half")
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_directory_swap_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old_only.bin").write_text("stale")
    (target / "weights").write_text("old weights")
    with atomic_output(target, directory=True) as tmp:
        assert tmp.is_dir() and tmp.name.startswith(".adapter.tmp-")
        (tmp / "weights").write_text("new weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("nested")
    assert sorted(p.name for p in target.iterdir()) == ["sub", "weights"]
    assert (target / "weights").read_text() == "new weights"
    assert (target / "sub" / "f").read_text() == "nested"
    assert _temporaries(tmp_path) == []


def test_exception_keeps_the_old_directory_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(Boom), atomic_output(target, directory=True) as tmp:
        (tmp / "weights").write_text("half")
        raise Boom
    assert [p.name for p in target.iterdir()] == ["weights"] and (target / "weights").read_text() == "old"
    assert _temporaries(tmp_path) == []


def test_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old moved aside; renaming the new one in fails
            raise OSError("disk on fire")
        real_replace(src, dst)

    monkeypatch.setattr(tailor.files.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk on fire"), atomic_output(target, directory=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "old"
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("existing_is_dir", [True, False])
def test_refuses_to_replace_a_file_with_a_directory_or_the_reverse(tmp_path, existing_is_dir):
    path = tmp_path / "thing"
    if existing_is_dir:
        path.mkdir()
        (path / "keep").write_text("mine")
    else:
        path.write_text("mine")
    with pytest.raises(FileExistsError, match="Choose another path"), \
            atomic_output(path, directory=not existing_is_dir):
        pytest.fail("the body must not run")
    assert (path / "keep" if existing_is_dir else path).read_text() == "mine"
    assert _temporaries(tmp_path) == []
    with pytest.raises(FileExistsError):
        atomic_write_text(tmp_path, "a directory is not a file")


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / "report.md").write_text("keep")
    (tmp_path / ".report.md.tmp-1234abcd").write_text("half a report")
    (tmp_path / ".step-000010.tmp-5678abcd").mkdir()
    (tmp_path / ".step-000010.tmp-5678abcd" / "optimizer.pt").write_text("half")
    (tmp_path / ".hidden").write_text("not ours")
    # a swap killed between its two renames: the previous directory is aside and nothing is at its path
    (tmp_path / ".adapter.old-aaaa0000" / "adapter").mkdir(parents=True)
    (tmp_path / ".adapter.old-aaaa0000" / "adapter" / "weights").write_text("previous")
    # a swap killed after the second rename: the new directory is in place, the old one only needs deleting
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_text("new")
    (tmp_path / ".model.old-bbbb1111" / "model").mkdir(parents=True)
    (tmp_path / ".model.old-bbbb1111" / "model" / "weights").write_text("previous")

    remove_stale_temporaries(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "adapter", "model", "report.md"]
    assert (tmp_path / "adapter" / "weights").read_text() == "previous"
    assert (tmp_path / "model" / "weights").read_text() == "new"
    remove_stale_temporaries(tmp_path / "missing")  # no directory: nothing to do


def test_a_killed_writer_leaves_the_old_content_and_a_temporary_to_clean(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"step": 1}')
    script = textwrap.dedent(f"""
        import os, signal
        from tailor.files import atomic_output
        with atomic_output({str(path)!r}) as tmp:
            tmp.write_text('{{"step": 2')
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert json.loads(path.read_text()) == {"step": 1}
    assert len(_temporaries(tmp_path)) == 1
    remove_stale_temporaries(tmp_path)
    assert _temporaries(tmp_path) == [] and path.exists()


def test_directory_size(tmp_path):
    assert directory_size(tmp_path / "missing") == 0
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a").write_bytes(b"x" * 10)
    (tmp_path / "d" / "sub" / "b").write_bytes(b"y" * 5)
    assert directory_size(tmp_path / "d") == 15
    assert directory_size(tmp_path / "d" / "a") == 10
