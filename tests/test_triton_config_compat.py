"""config.pbtxt: the configs this server refuses are the ones real Triton refuses.

Each case is a copy of an exported model with one edit to its config.pbtxt. Triton loads
the whole repository once; a config it accepts then fails only for want of the ONNX
Runtime backend (the tritonserver of the nvidia-pytriton wheel ships the Python backend
alone), a config it refuses fails its model config validation. Skipped where no
tritonserver is found (on PATH, or in .venv-triton from the nvidia-pytriton wheel).
"""

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from serve.model_config import read_model_config, serving_defaults
from serve.process import free_port

ROOT = Path(__file__).resolve().parents[1]
PYTRITON = "lib/python3.11/site-packages/pytriton/tritonserver"


def find_tritonserver() -> Path | None:
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    bundled = ROOT / ".venv-triton" / PYTRITON / "bin" / "tritonserver"
    return bundled if bundled.is_file() else None


TRITONSERVER = find_tritonserver()
pytestmark = pytest.mark.skipif(
    TRITONSERVER is None,
    reason="no tritonserver on PATH or in .venv-triton (pip install nvidia-pytriton there)",
)

PREFERRED = "preferred_batch_size: [ 64, 256 ]"
CASES = {  # name -> (text replaced in the exported config, replacement)
    "as-exported": ("", ""),
    "preferred-not-positive": (PREFERRED, "preferred_batch_size: [ -5, 0 ]"),
    "preferred-above-max": (PREFERRED, "preferred_batch_size: [ 1024 ]"),
    "max-batch-negative": ("max_batch_size: 512", "max_batch_size: -1"),
    "max-batch-larger": ("max_batch_size: 512", "max_batch_size: 2048"),
    "instance-count-zero": ("count: 1", "count: 0"),
    "instance-count-negative": ("count: 1", "count: -3"),
    "no-preferred-sizes": (PREFERRED, ""),
}


@pytest.fixture(scope="module")
def configs(tiny_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-configs")
    for name, (old, new) in CASES.items():
        shutil.copytree(tiny_repo / "full", repo / name)
        config = repo / name / "config.pbtxt"
        text = config.read_text().replace('name: "full"', f'name: "{name}"')
        assert old in text
        config.write_text(text.replace(old, new) if old else text)
    return repo


def triton_index(repo: Path) -> dict[str, dict]:
    """Name -> repository index entry, from a tritonserver that tried to load every model."""
    port = free_port()
    backends = TRITONSERVER.parents[1] / "backends"
    command = [
        str(TRITONSERVER), f"--model-repository={repo}", f"--http-port={port}",
        "--allow-grpc=false", "--allow-metrics=false", "--exit-on-error=false",
        "--strict-readiness=false", f"--backend-directory={backends}",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v2/repository/index", data=b"{}", method="POST"
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    return {e["name"]: e for e in json.loads(response.read())}
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {process.returncode}") from None
                time.sleep(0.5)
        raise TimeoutError("tritonserver did not answer within 60 s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def triton_accepts(entry: dict) -> bool:
    """Validation passed: the model loaded, or failed only for want of its backend."""
    return entry.get("state") == "READY" or "backend" in entry.get("reason", "")


def we_accept(folder: Path) -> bool:
    try:
        serving_defaults(read_model_config(folder))
    except ValueError:
        return False
    return True


def test_configs_are_accepted_and_refused_as_triton_does(configs):
    index = triton_index(configs)
    verdicts = {
        name: (triton_accepts(index.get(name, {})), we_accept(configs / name)) for name in CASES
    }
    assert {n: theirs for n, (theirs, _) in verdicts.items()} == {
        n: ours for n, (_, ours) in verdicts.items()
    }
    assert not verdicts["preferred-not-positive"][0] and verdicts["instance-count-zero"][0]
