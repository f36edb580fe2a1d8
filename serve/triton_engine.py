"""Real Triton Inference Server on a model repository: find it, start it, stop it.

Where `tritonserver` comes from, in order: the path the user names; `tritonserver` on PATH
(NVIDIA's container, whose native onnxruntime and tensorrt backends are used); the binary
of the nvidia-pytriton wheel installed in `.venv-triton` (`make triton`; the wheel pins
numpy<2, so it has an environment of its own). The wheel's Triton has only the Python
backend: where the native onnxruntime backend is missing, a backend directory is assembled
with the project's Python-based `onnxruntime` backend (serve/triton_onnxruntime.py), so the
repository loads unmodified. TensorRT plans need the native tensorrt backend; without it
they are skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlet.runtime import SessionOptions
from serve.model_config import CONFIG_FILE, read_model_config
from serve.process import wait_until_ready

log = logging.getLogger("mlet.serve")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRITON_VENV = PROJECT_ROOT / ".venv-triton"
PYTHON_BASED_ONNXRUNTIME = Path(__file__).with_name("triton_onnxruntime.py")
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
SESSION_OPTIONS_ENV = "MLET_SESSION_OPTIONS"  # both read by triton_onnxruntime.py
PYTHONPATH_ENV = "MLET_TRITON_PYTHONPATH"


class TritonUnavailable(RuntimeError):
    """No tritonserver can run here; the message says why and how to get one."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path  # the install's own backend directory
    source: str  # how it was found, for the log
    libraries: Path | None = None  # shared libraries the wheel's binary needs
    site_packages: Path | None = None  # Python packages for the Python backend's stub
    stubs: Path | None = None  # the wheel's Python backend stubs, one per Python version

    def native_backends(self) -> set[str]:
        """Backends implemented in C++ (a libtriton_<name>.so in their folder)."""
        if not self.backends.is_dir():
            return set()
        return {p.parent.name for p in self.backends.glob("*/libtriton_*.so")}


@dataclass
class TritonConfig:
    repo: Path = Path("models")
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 8000
    grpc_port: int | None = None  # None: Triton's gRPC endpoint stays off
    models: list[str] | None = None  # None: every model of the repository
    tritonserver: Path | None = None
    session: SessionOptions = field(default_factory=SessionOptions)  # Python-based backend
    ready_timeout_s: float = 120.0
    exit_timeout_s: int = 30
    log_verbose: int = 0


def wheel_install(venv: Path = TRITON_VENV) -> TritonInstall | None:
    """The tritonserver of the nvidia-pytriton wheel in `venv`, if installed."""
    for site in sorted(venv.glob("lib/python3.*/site-packages")):
        root = site / "pytriton" / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            return TritonInstall(
                binary=root / "bin" / "tritonserver",
                backends=root / "backends",
                source=f"nvidia-pytriton wheel in {venv}",
                libraries=site / "nvidia_pytriton.libs",
                site_packages=site,
                stubs=root / "python_backend_stubs",
            )
    return None


def find_tritonserver(explicit: Path | None = None) -> TritonInstall:
    """The tritonserver to run; raises TritonUnavailable saying what was looked for."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise TritonUnavailable(f"--tritonserver {explicit} is not a file")
        binary = Path(explicit).resolve()
        return TritonInstall(binary, binary.parent.parent / "backends", f"--tritonserver {binary}")
    on_path = shutil.which("tritonserver")
    if on_path is not None:
        binary = Path(on_path).resolve()
        backends = binary.parent.parent / "backends"
        if not backends.is_dir():
            backends = Path("/opt/tritonserver/backends")  # the container's default
        return TritonInstall(binary, backends, f"PATH ({binary})")
    install = wheel_install()
    if install is None:
        raise TritonUnavailable(
            "no tritonserver: none given with --tritonserver, none on PATH, and the "
            f"nvidia-pytriton wheel is not installed in {TRITON_VENV} (run `make triton`)"
        )
    return install


def unavailable_reason() -> str | None:
    """Why Triton cannot run here, or None (tests skip with this reason)."""
    try:
        install = find_tritonserver()
    except TritonUnavailable as e:
        return str(e)
    try:
        result = subprocess.run(
            [str(install.binary), "--help"],
            env=triton_env(install, SessionOptions()),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{install.binary} cannot run here: {e}"
    if "Usage: tritonserver" not in result.stdout + result.stderr:  # --help exits 1
        return f"{install.binary} cannot run here: {(result.stderr or result.stdout)[-500:]}"
    return None


def repository_models(repo: Path) -> dict[str, str]:
    """Model name -> platform for every model folder with a config.pbtxt."""
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository {repo} does not exist")
    configs = {
        p.name: read_model_config(p)
        for p in sorted(repo.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).is_file()
    }
    return {name: config.platform or config.backend for name, config in configs.items()}


def backend_plan(install: TritonInstall) -> dict[str, str]:
    """Backend name -> which implementation serves it here."""
    native = install.native_backends()
    plan = {name: f"Triton's native {name} backend" for name in native}
    if "onnxruntime" not in native:
        plan["onnxruntime"] = f"the project's Python-based onnxruntime backend ({install.source})"
    plan["ensemble"] = "Triton's ensemble scheduler"  # in the core: raw-row models
    return plan


def models_to_load(
    repo: Path, models: list[str] | None, plan: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """(models Triton loads, {skipped model: reason}). Models asked for by name must load."""
    platforms = repository_models(repo)
    names = models or list(platforms)
    missing = [m for m in names if m not in platforms]
    if missing:
        raise FileNotFoundError(f"model(s) {missing} have no {CONFIG_FILE} in {repo}")
    load, skipped = [], {}
    for name in names:
        backend = PLATFORM_BACKENDS.get(platforms[name], platforms[name])
        if backend not in plan:
            skipped[name] = (
                f"platform {platforms[name]} needs Triton's native {backend} backend, which "
                "this tritonserver lacks (TensorRT plans run only in the native backend)"
            )
        else:
            load.append(name)
    if models and skipped:
        raise RuntimeError("; ".join(f"{m}: {why}" for m, why in skipped.items()))
    if not load:
        raise RuntimeError(f"no model of {repo} can be served by this tritonserver: {skipped}")
    return load, skipped


def backend_directory(install: TritonInstall, folder: Path) -> Path:
    """The install's own backends where it has the native onnxruntime one; else a directory
    in `folder` with its backends plus the Python-based onnxruntime one."""
    if "onnxruntime" in install.native_backends():
        return install.backends
    if not (install.backends / "python" / "libtriton_python.so").is_file():
        raise TritonUnavailable(
            f"{install.binary} has neither the native onnxruntime backend nor the Python "
            f"backend (looked in {install.backends})"
        )
    backends = folder / "backends"
    backends.mkdir(parents=True)
    for entry in install.backends.iterdir():
        if entry.is_dir() and entry.name != "python":
            (backends / entry.name).symlink_to(entry)
    # Copies, not links: Triton refuses a backend library whose real path leaves its folder.
    python = backends / "python"
    shutil.copytree(install.backends / "python", python, ignore=shutil.ignore_patterns("__*"))
    stub = python / "triton_python_backend_stub"
    if not stub.exists() and install.stubs is not None:
        version = install.site_packages.parent.name.removeprefix("python")
        shutil.copy(install.stubs / version / stub.name, stub)
    (backends / "onnxruntime").mkdir()
    shutil.copy(PYTHON_BASED_ONNXRUNTIME, backends / "onnxruntime" / "model.py")
    return backends


def triton_env(install: TritonInstall, session: SessionOptions) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = without_virtual_envs(env.get("PATH", ""))
    if install.libraries is not None:
        env["LD_LIBRARY_PATH"] = ":".join(
            p for p in (str(install.libraries), env.get("LD_LIBRARY_PATH")) if p
        )
    # The Python backend's stub embeds Python in isolated mode (PYTHONPATH ignored); the
    # Python-based backend puts the wheel environment's packages (numpy, onnxruntime) and
    # the project's session factory on its path from this variable.
    paths = [str(install.site_packages)] if install.site_packages else []
    env[PYTHONPATH_ENV] = ":".join([*paths, str(PROJECT_ROOT)])
    env[SESSION_OPTIONS_ENV] = json.dumps(asdict(session))
    return env


def without_virtual_envs(path: str) -> str:
    """PATH less the bin folders of virtual environments: the Python backend's stub finds
    its home from the python3 on PATH, and an activated venv's (another Python's
    standard library) makes its imports fail, ssl's first."""
    return os.pathsep.join(
        entry for entry in path.split(os.pathsep)
        if entry and not (Path(entry).parent / "pyvenv.cfg").is_file()
    )  # fmt: skip


def triton_command(
    install: TritonInstall, config: TritonConfig, backends: Path, load: list[str]
) -> list[str]:
    command = [
        str(install.binary),
        f"--model-repository={Path(config.repo).resolve()}",
        f"--backend-directory={backends}",
        # explicit: only the models named load (so plans can be skipped), and the
        # repository API can load and unload them while Triton runs, as on our server
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in load),
        f"--http-address={config.host}",
        f"--http-port={config.port}",
        *grpc_options(config),
        "--allow-metrics=false",
        f"--exit-timeout-secs={config.exit_timeout_s}",
        f"--log-verbose={config.log_verbose}",
        # a prefix of its own, so that several Tritons on one machine keep their shm apart
        f"--backend-config=python,shm-region-prefix-name=mlet{os.getpid()}p{config.port}_",
    ]
    return command


def grpc_options(config: TritonConfig) -> list[str]:
    """Triton's gRPC endpoint on the HTTP host when a port is given; off otherwise, as ours."""
    if config.grpc_port is None:
        return ["--allow-grpc=false"]
    return ["--allow-grpc=true", f"--grpc-address={config.host}", f"--grpc-port={config.grpc_port}"]


def terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM it when its parent dies, so Triton is never orphaned."""
    with contextlib.suppress(OSError):  # not Linux: the normal path stops Triton
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class TritonServer:
    """A started tritonserver: its URL, process, what it loads and why it skipped the rest."""

    url: str
    process: subprocess.Popen
    loaded: list[str]
    skipped: dict[str, str]
    backends: dict[str, str]
    log_path: Path | None
    grpc_address: str | None = None  # host:port, when its gRPC endpoint is on

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM: Triton stops accepting, finishes what is in flight, and exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def running_triton(config: TritonConfig, log_path: Path | None = None):
    """Start Triton on the repository, wait until its models are ready, stop it on exit.

    Triton's output goes to `log_path` (None: this process's stdout and stderr).
    """
    install = find_tritonserver(config.tritonserver)
    plan = backend_plan(install)
    load, skipped = models_to_load(Path(config.repo), config.models, plan)
    for name, reason in skipped.items():
        log.warning("skipping %s: %s", name, reason)
    for backend, how in sorted(plan.items()):
        log.info("Triton backend %s: %s", backend, how)
    with tempfile.TemporaryDirectory(prefix="mlet-triton-") as work:
        backends = backend_directory(install, Path(work))
        command = triton_command(install, config, backends, load)
        env = triton_env(install, config.session)
        output = open(log_path, "wb") if log_path else None  # noqa: SIM115 (closed below)
        process = subprocess.Popen(
            command,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=terminate_with_parent,
        )
        grpc_address = None if config.grpc_port is None else f"{config.host}:{config.grpc_port}"
        server = TritonServer(
            f"http://{config.host}:{config.port}", process, load, skipped, plan, log_path,
            grpc_address,
        )  # fmt: skip
        try:
            try:
                wait_until_ready(server.url, process, config.ready_timeout_s, "tritonserver")
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"{e}; its log:\n{server.log_text()[-3000:]}") from e
            yield server
        finally:
            server.stop(config.exit_timeout_s + 30)
            if output is not None:
                output.close()


def run_triton(config: TritonConfig) -> int:
    """`mlet serve --engine triton`: serve until SIGTERM or SIGINT, which go to Triton."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = []
    previous = {
        s: signal.signal(s, lambda signum, frame: stop.append(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        with running_triton(config) as server:
            log.info(
                "Triton serving %s on %s (pid %d)",
                ", ".join(server.loaded),
                server.url,
                server.process.pid,
            )
            if server.grpc_address is not None:
                log.info("Triton serving gRPC on %s", server.grpc_address)
            while not stop and server.process.poll() is None:
                time.sleep(0.2)
            code = server.stop(config.exit_timeout_s + 30)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("tritonserver exited with code %d", code)
    # asked to stop: Triton's own status; stopped by itself: a failure even if it said 0
    return code if stop else (code or 1)


if __name__ == "__main__":  # pragma: no cover - a manual check: python -m serve.triton_engine R
    sys.exit(run_triton(TritonConfig(repo=Path(sys.argv[1]))))
