"""The server as a separate process (``python -m tamiyo_server``), as it runs for real.

Why a process for the soak: a crash must be visible as an exit, ``kill -9`` must be a
real ``kill -9``, file descriptors / RSS / threads are read from ``/proc/<pid>``, and a
full disk is simulated per process with ``RLIMIT_FSIZE`` (writes beyond the limit fail
with EFBIG; CPython ignores SIGXFSZ, so they fail instead of killing the process).
The server's output goes through a pipe (a log *file* would itself hit the limit) to a
thread that writes it to ``runs/soak/<name>.log`` and counts lines of interest.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from soak.harness import health_status

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """One ``tamiyo_server`` process on fixed loopback ports (so a restart reuses them)."""

    def __init__(
        self,
        name: str,
        args: list[str] | None = None,
        *,
        log_dir: Path,
        fsize_limit_bytes: int = 0,
        watch: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.args = args or []
        self.log_path = log_dir / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.fsize_limit_bytes = fsize_limit_bytes
        self.watch = {k: re.compile(v) for k, v in (watch or {}).items()}
        self.counts: Counter[str] = Counter()
        self.sums: Counter[str] = Counter()  # first integer group of each watched line
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.unexpected_exits = 0
        self._killed_on_purpose = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _limit(self) -> None:  # runs in the child between fork and exec
        if self.fsize_limit_bytes:
            lim = self.fsize_limit_bytes
            resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim))

    def start(self, timeout_s: float = 120.0) -> float:
        """Start and wait until health is SERVING; returns that moment (monotonic s)."""
        cmd = [
            sys.executable, "-m", "tamiyo_server", "--host", "127.0.0.1",
            "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--grace-s", "2", *self.args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("TAMIYO_")}
        env["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=self._limit if self.fsize_limit_bytes else None,
        )
        self.starts += 1
        self._killed_on_purpose = False
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}")
            try:
                if health_status(self.target, timeout_s=1.0) == 1:
                    return time.monotonic()
            except Exception:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not SERVING within {timeout_s} s")

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with self.log_path.open("ab") as log:
            for line in proc.stdout:
                log.write(line)
                text = line.decode("utf-8", "replace")
                for key, rx in self.watch.items():
                    m = rx.search(text)
                    if m:
                        self.counts[key] += 1
                        if m.groups():
                            self.sums[key] += int(m.group(1))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Count an exit we did not cause as a crash."""
        if self.proc is not None and self.proc.poll() is not None and not self._killed_on_purpose:
            self.unexpected_exits += 1
            self._killed_on_purpose = True  # count once

    def kill(self) -> float:
        """SIGKILL; returns the moment (monotonic s)."""
        self.check()
        assert self.proc is not None
        self._killed_on_purpose = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        return time.monotonic()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful drain); returns the exit code."""
        self.check()
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self._killed_on_purpose = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    # ---------------------------------------------------------------- resources
    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def rss_mb(self) -> float:
        return self._status("VmRSS") / 1024.0

    def threads(self) -> int:
        return self._status("Threads")

    def resources(self) -> dict[str, float]:
        return {"fds": self.fds(), "threads": self.threads(), "rss_mb": round(self.rss_mb(), 1)}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` (exposition name) matching ``labels``."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total
