"""Waiting for a KServe v2 server process (ours or Triton) to say it is ready."""

from __future__ import annotations

import subprocess
import time
import urllib.request


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
