"""Server processes: ours started on a free loopback port, and waiting for any KServe v2
server (ours or Triton) to say it is ready."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil

HOST = "127.0.0.1"


def wait_until_ready(
    url: str, process: subprocess.Popen, timeout: float, what: str = "server"
) -> None:
    """Poll `url`/v2/health/ready until 200; fail early when the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} at {url} was not ready within {timeout:.0f}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(repo: Path, models: list[str], *options: str, timeout: float = 60.0):
    """A server subprocess on a free loopback port; yields (url, psutil.Process).

    `options` are extra `mlet serve` arguments.
    """
    port = free_port()
    command = [sys.executable, "-m", "cli", "serve", "--repo", str(repo), "--port", str(port)]
    command += [*(["--models", ",".join(models)] if models else []), *options]
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_until_ready(url, process, timeout)
            except (RuntimeError, TimeoutError) as e:
                log.seek(0)
                output = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{e}; server output:\n{output}") from e
            yield url, psutil.Process(process.pid)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
