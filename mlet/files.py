"""Writing artifacts so that a crash or a bad input never leaves half a file or loses one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide artifacts from other users
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


def new_staging_directory(final: str | Path) -> Path:
    """An empty hidden folder beside `final`, on the same file system so renames are atomic.

    Its name carries this process's id, so that a later writer can remove what a killed
    one left behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    prefix = f".{final.name}.{os.getpid()}."
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would survive the rename
    return staging


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_staging(final: Path) -> list[Path]:
    """Remove staging folders of `final` whose writing process no longer runs."""
    removed = []
    for folder in final.parent.glob(f".{final.name}.*.partial"):
        pid = folder.name[len(final.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not process_is_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def install_directory(staging: Path, final: str | Path, replace: bool = False) -> None:
    """Rename a complete `staging` folder to `final`; an existing `final` only if `replace`.

    The old folder is moved aside before the new one takes its name and deleted after, so
    at every moment `final` is either the old complete folder or the new complete one.
    """
    final = Path(final)
    if not final.exists():
        os.replace(staging, final)
        return
    if not replace:
        raise FileExistsError(f"{final} already exists (pass --overwrite to replace it)")
    retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, retired / final.name)
    os.replace(staging, final)
    shutil.rmtree(retired)


@contextlib.contextmanager
def staged_directory(final: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; rename it to `final` when the block succeeds.

    On failure the temporary folder is removed and `final` is untouched. An existing
    `final` is replaced only when `replace` is set, and only after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists (pass --overwrite to replace it)")
    staging = new_staging_directory(final)
    try:
        yield staging
        install_directory(staging, final, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
