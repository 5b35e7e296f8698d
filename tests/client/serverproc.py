"""A real Tamiyo server in its own process, plus a slow TCP proxy in front of it.

Run as ``python -m tests.client.serverproc [delay_ms] [chunk_bytes]``: prints
``PORTS <server> <proxy>`` once serving, and shuts down when stdin closes. The proxy
forwards bytes in both directions in chunks of at most ``chunk_bytes``, sleeping
``delay_ms`` before each one: a server reachable only through a slow, narrow link.
Used by the training-speed test so that the server's CPU use stays out of the
training process, as in production.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace

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


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(float(args[0]) if args else 50.0, int(args[1]) if len(args) > 1 else 1024))
