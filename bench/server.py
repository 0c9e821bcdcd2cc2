"""``nstudent serve`` as a real process on a free port, for the API latency benchmark and the end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service import cluster


class Server:
    def __init__(self, data_dir: Path, env: dict[str, str]):
        self.data_dir, self.port = data_dir, cluster.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "NSTUDENT_DATA_DIR": str(data_dir), "NSTUDENT_PORT": str(self.port), **env}
        self.env.pop("RAY_ADDRESS", None)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> Server:
        log = open(self.data_dir / "server.log", "ab")
        nstudent = os.path.join(os.path.dirname(sys.executable), "nstudent")
        self.proc = subprocess.Popen([nstudent, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the server was not ready after {timeout}s: {self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash or an OOM kill."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM: a clean stop, which also stops the local Ray head the server started."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)

    def log(self) -> str:
        return (self.data_dir / "server.log").read_text(errors="replace")
