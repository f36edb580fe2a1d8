"""Writing artifacts so that a crash or a bad input never leaves half a file or loses one."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
            # NaN and infinity are not JSON: refuse them rather than write a file that
            # strict readers reject.
            try:
                text = json.dumps(data, indent=2, allow_nan=False)
            except ValueError as e:
                raise ValueError(f"{path}: {e} (a figure is NaN or infinite)") from e
            f.write(text + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise with_path(e, path) from e
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def with_path(error: OSError, path: str | Path) -> OSError:
    """`error` itself when it names a file already, else the same error naming `path`.

    A full disk raises OSError(ENOSPC) from a write() without a file name; the operator
    needs to know which file system filled up.
    """
    if error.filename is not None:
        return error
    return type(error)(error.errno, f"{error.strerror or error} while writing {path}", str(path))


def names_path_on_error(argument: str) -> Callable:
    """Decorator: an OSError without a file name (a full disk) raised by the function is
    re-raised naming the path passed as `argument`."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            path = signature.bind(*args, **kwargs).arguments.get(argument)
            with naming_path(path if path is not None else "?"):
                return function(*args, **kwargs)

        return wrapper

    return decorate


@contextlib.contextmanager
def naming_path(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError without a file name (a full disk, say) as one naming `path`."""
    try:
        yield
    except OSError as e:
        named = with_path(e, path)
        if named is e:
            raise
        raise named from e


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


# .<final name>.<pid of the writer>.<mkdtemp's random part>.<partial|old>
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]+\.(?P<kind>partial|old)$")


def leftovers(parent: Path) -> dict[str, list[tuple[Path, int, str]]]:
    """Staging (.partial) and retired (.old) folders in `parent`: name -> (folder, pid, kind)."""
    found: dict[str, list[tuple[Path, int, str]]] = {}
    for folder in parent.glob(".*"):
        match = LEFTOVER.match(folder.name)
        if match and folder.is_dir():
            entry = (folder, int(match["pid"]), match["kind"])
            found.setdefault(match["name"], []).append(entry)
    return found


def remove_stale_staging(final: Path) -> list[Path]:
    """Clean up after writers of `final` that died: remove their staging folders, and put
    back an old `final` that a replace moved aside when the new one never took its name."""
    removed = []
    for folder, pid, kind in leftovers(final.parent).get(final.name, []):
        if process_is_alive(pid):
            continue
        retired = folder / final.name
        if kind == "old" and retired.is_dir() and not final.exists():
            os.replace(retired, final)  # the crash came between the two renames
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def clean_leftovers(parent: str | Path) -> list[Path]:
    """`remove_stale_staging` for every name in `parent` (at a server's start, say); what this
    process may not change is left as it is."""
    parent = Path(parent)
    removed = []
    for name in sorted(leftovers(parent)):
        with contextlib.suppress(PermissionError):
            removed += remove_stale_staging(parent / name)
    return removed


RENAME_EXCHANGE = 2  # linux/fs.h


def _renameat2():
    """glibc's renameat2 (Linux 3.15+, glibc 2.28+), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the system or file system cannot."""
    function = _renameat2()
    if function is None:
        return False
    result = function(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a file system without RENAME_EXCHANGE (some FUSE, older kernels)
    raise OSError(error, os.strerror(error), str(b))


def install_directory(staging: Path, final: str | Path, replace: bool = False) -> None:
    """Rename a complete `staging` folder to `final`; an existing `final` only if `replace`.

    Replacing exchanges the two folders in one step (renameat2 with RENAME_EXCHANGE), so
    `final` is always the old complete folder or the new complete one; the old one, now
    under the staging name, is deleted after. A crash before that deletion leaves a
    staging folder of a dead process, which the next writer (or server start) removes.

    Where the file system cannot exchange, the old folder is renamed aside (into a `.old`
    folder named after this process) and the new one renamed in: a crash between the two
    leaves no `final`, and the next writer or server start puts the old one back.
    """
    final = Path(final)
    if not final.exists():
        os.replace(staging, final)
        return
    if not replace:
        raise FileExistsError(f"{final} already exists (pass --overwrite to replace it)")
    if exchange_paths(staging, final):
        shutil.rmtree(staging)
        return
    prefix = f".{final.name}.{os.getpid()}."
    retired = Path(tempfile.mkdtemp(prefix=prefix, suffix=".old", dir=final.parent))
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
