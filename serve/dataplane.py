"""What the server does, apart from HTTP: holds the loaded models and runs requests."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mlet.files import read_json
from mlet.spec import ExportSpec
from serve.backends import Backend, OnnxRuntimeBackend, SessionOptions
from serve.protocol import InferenceError, InferRequest, decode_request, encode_response
from serve.validation import requested_outputs, validate_inputs

log = logging.getLogger("mlet.serve")
MANIFEST_FILE = "manifest.json"


@dataclass
class LoadedModel:
    name: str
    version: str
    manifest: dict
    spec: ExportSpec
    backend: Backend

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.manifest.get("platform", "onnxruntime_onnx"),
            "inputs": [t.metadata() for t in self.spec.inputs],
            "outputs": [t.metadata() for t in self.spec.outputs],
        }


def load_model(folder: Path, options: SessionOptions | None = None) -> LoadedModel:
    manifest = read_json(folder / MANIFEST_FILE)
    model_file = folder / manifest["model_file"]
    if not model_file.is_file():
        raise FileNotFoundError(
            f"{folder}: {manifest['model_file']} named by the manifest is missing"
        )
    return LoadedModel(
        name=manifest["name"],
        version=str(manifest["version"]),
        manifest=manifest,
        spec=ExportSpec.from_dict(manifest["spec"]),
        backend=OnnxRuntimeBackend(model_file, options),
    )


def model_folders(repo: Path) -> list[Path]:
    """Every model folder of a repository; hidden folders are exports in progress."""
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository {repo} does not exist")
    return sorted(
        p
        for p in repo.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
    )


class DataPlane:
    def __init__(self, models: dict[str, LoadedModel], workers: int = 2) -> None:
        self.models = models
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")

    @classmethod
    def from_repository(
        cls,
        repo: str | Path,
        options: SessionOptions | None = None,
        workers: int = 2,
        only: list[str] | None = None,
    ) -> DataPlane:
        """Load every model of `repo`, or only the named ones."""
        folders = model_folders(Path(repo))
        if only is not None:
            missing = sorted(set(only) - {f.name for f in folders})
            if missing:
                raise FileNotFoundError(f"model(s) {missing} not found in repository {repo}")
            folders = [f for f in folders if f.name in only]
        models = {}
        for folder in folders:
            model = load_model(folder, options)
            models[model.name] = model
            log.info("loaded model %s from %s", model.name, folder)
        if not models:
            raise FileNotFoundError(f"model repository {repo} holds no model (no */manifest.json)")
        return cls(models, workers=workers)

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        model = self.models.get(name)
        if model is None:
            raise InferenceError(f"unknown model '{name}'", status=404)
        if version is not None and version != model.version:
            raise InferenceError(f"model '{name}' has no version '{version}'", status=404)
        return model

    async def infer(
        self, name: str, version: str | None, body: bytes, header_length: int | None
    ) -> tuple[bytes, dict[str, str]]:
        model = self.model(name, version)
        request: InferRequest = decode_request(body, header_length)
        inputs = validate_inputs(model.spec, request)
        outputs = requested_outputs(model.spec, request)
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.executor, model.backend.infer, inputs)
        datatypes = {t.name: t.datatype for t in model.spec.outputs}
        chosen = {n: (datatypes[n], results[n]) for n in outputs}
        return encode_response(model.name, model.version, request, chosen)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
