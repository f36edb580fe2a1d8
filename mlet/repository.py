"""The model repository: the contract between export, serve, bench and the demo.

    <repo>/<model>/config.pbtxt       Triton model configuration
    <repo>/<model>/manifest.json      what export measured and wrote (Manifest below)
    <repo>/<model>/<version>/model.onnx or model.plan (+ model.onnx.data when large)

Export writes a model through this module, every reader opens it through `open_model`,
and every reader serves the newest numeric version folder, as Triton does by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from mlet.files import read_json, write_json
from mlet.integrity import verify_model_files
from mlet.spec import OPSET, ExportSpec
from mlet.variants import MODEL_FILES, ONNX_PLATFORM

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.pbtxt"
FIRST_VERSION = "1"
# The raw-row transform a model folder may carry (mlet.transform writes and reads it).
TRANSFORM_FILE = "transform.json"
# Edited by hand (as in Triton, the operator's to edit) or the manifest itself: not checksummed.
OPERATOR_FILES = frozenset({CONFIG_FILE, MANIFEST_FILE})


@dataclass(kw_only=True)
class Manifest:
    """manifest.json as a typed record; the figures below `parity` stay plain dicts.

    Optional sections are written only where they apply (`weights` and
    `tensorrt_compatibility` for ONNX models, `engine` for TensorRT ones); keys that this
    version does not know are kept in `extra` and written back unchanged.
    """

    name: str = ""
    version: str = FIRST_VERSION
    variant: str = "fp32"
    platform: str = ONNX_PLATFORM
    model_file: str = ""  # relative to the model folder, e.g. "1/model.onnx"
    spec: ExportSpec
    opset: int = OPSET
    engine: dict | None = None
    parity: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    weights: dict | None = None
    tensorrt_compatibility: dict | None = None
    source_run: str = ""
    source_metrics: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # source model: kind, widths, tables, bytes
    files: dict[str, dict] = field(default_factory=dict)  # path -> bytes, sha256
    model_bytes: int = 0  # bytes of the version folder
    export_seconds: float = 0.0
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # software versions
    extra: dict = field(default_factory=dict)

    @property
    def embedding_bytes(self) -> int:
        return self.model["embedding_bytes_inference"]

    @property
    def test_auc(self) -> float | None:
        """Test AUC of the exported model where export measured it, else the run's."""
        measured = self.accuracy.get("auc")
        return measured if measured is not None else self.source_metrics.get("auc")

    def to_dict(self) -> dict:
        # fields() keeps the declaration order: the order of keys earlier versions wrote
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        data["spec"] = self.spec.to_dict()
        optional = ("weights", "tensorrt_compatibility", "engine")
        data = {k: v for k, v in data.items() if not (k in optional and v is None)}
        return data | self.extra

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """Read a manifest written by any version; older ones lack platform and variant."""
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["spec"] = ExportSpec.from_dict(data["spec"])
        manifest = cls(**values, extra={k: v for k, v in data.items() if k not in known})
        if not manifest.model_file:
            manifest.model_file = f"{FIRST_VERSION}/{MODEL_FILES[manifest.platform]}"
        return manifest


@dataclass(frozen=True)
class OpenedModel:
    """A model folder as a reader finds it: its manifest and the newest version's file."""

    folder: Path
    manifest: Manifest
    version: str
    model_path: Path

    @property
    def name(self) -> str:
        return self.folder.name


def model_versions(folder: Path) -> list[str]:
    """Numeric version folders that hold a model file, oldest first."""
    versions = [
        p.name
        for p in folder.iterdir()
        if p.is_dir() and p.name.isdigit() and any((p / f).is_file() for f in MODEL_FILES.values())
    ]
    return sorted(versions, key=int)


def read_manifest(path: Path) -> Manifest:
    return Manifest.from_dict(read_json(path))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_json(folder / MANIFEST_FILE, manifest.to_dict())


def open_model(folder: str | Path, verify: bool = False) -> OpenedModel:
    """The newest version of a model folder, with the manifest that describes it.

    A version folder may carry a manifest of its own; otherwise the model folder's applies.
    With `verify`, model files whose size or sha256 differ from the manifest are refused.
    """
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not an exported model: {MANIFEST_FILE} is missing")
    versions = model_versions(folder)
    if not versions:
        raise FileNotFoundError(f"{folder} holds no version folder with a model file")
    version = versions[-1]
    own = folder / version / MANIFEST_FILE
    manifest = read_manifest(own if own.is_file() else folder / MANIFEST_FILE)
    model_path = folder / version / Path(manifest.model_file).name
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} named by the manifest is missing")
    if (
        verify
        and (damaged := verify_model_files(folder, manifest.files, OPERATOR_FILES)) is not None
    ):
        raise ValueError(f"refused: {damaged}")
    return OpenedModel(folder, manifest, version, model_path)


def model_folders(repo: str | Path) -> dict[str, Path]:
    """Every model folder of a repository; hidden folders are exports in progress."""
    repo = Path(repo)
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository {repo} does not exist")
    return {
        p.name: p
        for p in sorted(repo.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
    }


def require_models(repo: str | Path, models: list[str]) -> None:
    """Refuse, naming them, models that the repository does not hold."""
    missing = [m for m in models if not (Path(repo) / m / MANIFEST_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"model(s) {missing} not found in repository {repo}")
