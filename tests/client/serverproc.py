"""A real Tamiyo server in its own process, plus a slow TCP proxy in front of it.

Run as ``python -m tests.client.serverproc [delay_ms] [chunk_bytes]``: prints
``PORTS <server> <proxy>`` once serving, and shuts down when stdin closes. The proxy
forwards bytes in both directions in chunks of at most ``chunk_bytes``, sleeping
``delay_ms`` before each one: a server reachable only through a slow, narrow link.
Used by the training-speed test and ``bench.client`` (through ``spawn``) so that the
server's CPU use stays out of the training process, as in production.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from tamiyo.config import ServerConfig
from tamiyo_server.app import TamiyoServer


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
                chunk: int) -> None:  # fmt: skip
    try:
        while data := await reader.read(chunk):
            await asyncio.sleep(delay_s)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def start_slow_proxy(
    target_port: int, delay_s: float, chunk: int, host: str = "127.0.0.1"
) -> asyncio.Server:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(host, target_port)
        await asyncio.gather(_pipe(cr, sw, delay_s, chunk), _pipe(sr, cw, delay_s, chunk))

    return await asyncio.start_server(handle, host, 0)


async def main(delay_ms: float, chunk: int) -> None:
    srv = TamiyoServer(replace(ServerConfig(), port=0, metrics_port=0, grace_s=0.5))
    port = await srv.start()
    proxy = await start_slow_proxy(port, delay_ms / 1000, chunk)
    proxy_port = proxy.sockets[0].getsockname()[1]
    print(f"PORTS {port} {proxy_port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    proxy.close()
    await srv.stop()


ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    """A running ``python -m tests.client.serverproc``; ``close()`` ends it."""

    proc: subprocess.Popen[str]
    log: IO[str]
    server_port: int
    proxy_port: int

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def spawn(log_path: Path, delay_ms: float = 50.0, chunk: int = 1024) -> ServerProcess:
    """Start the server + slow proxy process and wait for its ports (the built-in policy
    loads in a few seconds). Raises RuntimeError with the log tail if it fails."""
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.client.serverproc", str(delay_ms), str(chunk)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORTS"):
        proc.kill()
        proc.wait()
        log.close()
        raise RuntimeError(f"server process did not start: {log_path.read_text()[-2000:]}")
    _, server, proxy = line.split()
    return ServerProcess(proc, log, int(server), int(proxy))


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(float(args[0]) if args else 50.0, int(args[1]) if len(args) > 1 else 1024))
