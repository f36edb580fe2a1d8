"""Putting checked models into the repository: decide every model's fate, then install.

A model already there with identical files is left alone ("unchanged"); a different one
is replaced only when asked, and a refusal installs nothing at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlet.files import install_directory, sha256_file
from mlet.repository import MANIFEST_FILE, Manifest, read_manifest
from mlet.variants import TENSORRT_PLATFORM


@dataclass
class ExportResult:
    name: str
    path: Path
    manifest: Manifest
    status: str  # "written", "replaced" or "unchanged"


def file_entries(folder: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def planned_status(final: Path, manifest: Manifest, replace: bool) -> str:
    """What installing would do; refuses before anything is installed."""
    if not final.exists():
        return "written"
    existing = final / MANIFEST_FILE
    if existing.is_file() and same_model(read_manifest(existing), manifest):
        return "unchanged"
    if not replace:
        raise FileExistsError(
            f"{final} already holds a different model; choose another --name "
            "or pass --replace to replace it"
        )
    return "replaced"


def same_model(existing: Manifest, new: Manifest) -> bool:
    """Identical files; for an engine (whose bytes vary from build to build), the same
    source model, TensorRT version and spec."""
    if new.platform == TENSORRT_PLATFORM:
        keys = ("source_files", "tensorrt", "profile")
        old_engine, new_engine = existing.engine or {}, new.engine
        as_read = json.loads(json.dumps(new_engine))  # tuples become lists, as read back
        return existing.spec == new.spec and all(old_engine.get(k) == as_read[k] for k in keys)
    return existing.files == new.files


def install_all(staged: list[tuple[Path, Path, Manifest]], replace: bool) -> list[ExportResult]:
    """Install each (staging folder, final folder, manifest), after planning them all."""
    statuses = [planned_status(final, manifest, replace) for _, final, manifest in staged]
    return [
        install(staging, final, manifest, status)
        for (staging, final, manifest), status in zip(staged, statuses, strict=True)
    ]


def install(staging: Path, final: Path, manifest: Manifest, status: str) -> ExportResult:
    """Put the staged model in place (or keep the identical one already there)."""
    if status == "unchanged":
        manifest = read_manifest(final / MANIFEST_FILE)
    else:
        install_directory(staging, final, replace=status == "replaced")
    return ExportResult(name=final.name, path=final, manifest=manifest, status=status)
