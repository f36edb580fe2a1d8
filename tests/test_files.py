import os
import subprocess
import sys

import pytest

from mlet.files import install_directory, new_staging_directory, staged_directory, write_json


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
