import errno
import os
import subprocess
import sys

import pytest

from mlet.files import (
    clean_leftovers,
    install_directory,
    new_staging_directory,
    staged_directory,
    write_json,
)


def test_staged_directory_appears_only_when_complete(tmp_path):
    final = tmp_path / "run"
    with pytest.raises(RuntimeError), staged_directory(final) as staging:
        write_json(staging / "a.json", {"x": 1})
        raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with staged_directory(final) as staging:
        write_json(staging / "a.json", {"x": 2})
    assert (final / "a.json").read_text().strip().endswith("}")


def test_install_refuses_to_replace_unless_asked(tmp_path):
    final = tmp_path / "m"
    first = new_staging_directory(final)
    (first / "v").write_text("1")
    install_directory(first, final)
    second = new_staging_directory(final)
    (second / "v").write_text("2")
    with pytest.raises(FileExistsError, match="already exists"):
        install_directory(second, final)
    install_directory(second, final, replace=True)
    assert (final / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_staging_left_by_a_killed_process_is_removed(tmp_path):
    final = tmp_path / "model"
    # a staging folder named after a process that has exited, as a SIGKILL leaves it
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True)  # fmt: skip
    dead = tmp_path / f".model.{child.stdout.strip()}.abc.partial"
    dead.mkdir()
    alive = tmp_path / f".model.{os.getpid()}.def.partial"
    alive.mkdir()
    staging = new_staging_directory(final)
    assert not dead.exists() and alive.exists() and staging.exists()


CRASH_BETWEEN_STEPS = """
import os, sys
from pathlib import Path
import mlet.files as files

final = Path(sys.argv[1])
staging = files.new_staging_directory(final)
(staging / "v").write_text("new")
if sys.argv[2] == "no-exchange":
    files.exchange_paths = lambda a, b: False
real_replace = os.replace
calls = []

def replace_then_die(a, b):
    calls.append(a)
    if len(calls) == 2:
        os._exit(9)  # killed between moving the old folder aside and renaming the new one in
    real_replace(a, b)

def rmtree_then_die(path, *args, **kwargs):
    os._exit(9)  # killed before the old folder is deleted

files.os.replace = replace_then_die
files.shutil.rmtree = rmtree_then_die
files.install_directory(staging, final, replace=True)
"""


def crash_while_replacing(final, mode: str) -> None:
    final.mkdir()
    (final / "v").write_text("old")
    subprocess.run([sys.executable, "-c", CRASH_BETWEEN_STEPS, str(final), mode], check=False)


def test_replace_takes_the_name_in_one_step_even_when_killed(tmp_path):
    final = tmp_path / "model"
    crash_while_replacing(final, "exchange")
    assert (final / "v").read_text() == "new"  # never a moment without the model
    leftovers = [p for p in tmp_path.iterdir() if p.name != "model"]
    assert len(leftovers) == 1 and (leftovers[0] / "v").read_text() == "old"
    assert clean_leftovers(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_without_exchange_the_next_start_puts_the_old_folder_back(tmp_path):
    final = tmp_path / "model"
    crash_while_replacing(final, "no-exchange")
    assert not final.exists()  # the window the fallback cannot close
    assert len(clean_leftovers(tmp_path)) == 2  # the .old folder and the new staging folder
    assert (final / "v").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_leftovers_of_live_processes_and_other_names_are_kept(tmp_path):
    mine = tmp_path / f".model.{os.getpid()}.abc.old"
    mine.mkdir()
    other = tmp_path / ".model.5.x.partial.keep"
    other.mkdir()
    assert clean_leftovers(tmp_path) == []
    assert mine.exists() and other.exists()


def test_json_refuses_nan_and_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"manifest\.json.*NaN"):
        write_json(tmp_path / "manifest.json", {"parity": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_path(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mlet.files.json.dumps", full)
    with pytest.raises(OSError, match=r"No space left on device while writing .*a\.json"):
        write_json(tmp_path / "a.json", {})
    assert list(tmp_path.iterdir()) == []
