"""Starting and stopping as an operator sees it: every refusal to start names the flag or
variable and exits 2, unknown ``TAMIYO_*`` variables are warned about, ``--help`` shows
each flag's variable and default, the metrics endpoint's address can be set apart, and
the drain ends with one line saying how it went (docs QA findings 3, 9, 13-17).

Real servers on port 0, real files in tmp dirs; no timing is asserted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from tamiyo.config import OTHER_VARIABLES, ServerConfig
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server import __main__ as server_main
from tamiyo_server.app import TamiyoServer
from tamiyo_server.cli import build_parser, parse_config
from tamiyo_server.environment import ENVIRONMENT_ONLY, env_name, unknown_variables
from tamiyo_server.policy_holder import ServedPolicy
from tamiyo_server.preflight import StartupError
from tests.server.conftest import make_config
from tests.server.test_serving import open_stream, read, read_all

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_tamiyo_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the shell running the tests has set must not leak into them."""
    for key in [k for k in os.environ if k.upper().startswith("TAMIYO_")]:
        monkeypatch.delenv(key)


# ----------------------------------------------------------------- token (finding 3)
@pytest.mark.parametrize("blank", ["", "   ", "\n"], ids=["empty", "spaces", "newline"])
def test_a_blank_token_variable_is_refused_naming_it(
    blank: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Kubernetes Secret with an empty key did this: the server ran open, silently."""
    monkeypatch.setenv("TAMIYO_AUTH_TOKEN", blank)
    with pytest.raises(SystemExit, match="TAMIYO_AUTH_TOKEN is set but blank"):
        parse_config([])
    with pytest.raises(SystemExit) as exit_:
        server_main.main(["--port", "0", "--metrics-port", "0"])
    assert exit_.value.code == 2  # as every other refusal to start
    assert "tamiyo-server: error: TAMIYO_AUTH_TOKEN is set but blank" in capsys.readouterr().err


def test_a_bad_variable_exits_2_like_a_bad_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One exit code for every refusal to start (a variable's used to be 1, a flag's 2)."""
    monkeypatch.setenv("TAMIYO_PORT", "abc")
    with pytest.raises(SystemExit) as exit_:
        server_main.main(["--metrics-port", "0"])
    assert exit_.value.code == 2
    assert "tamiyo-server: error: TAMIYO_PORT='abc' (for --port)" in capsys.readouterr().err


def test_half_a_tls_pair_names_the_missing_flag_and_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(SystemExit, match=r"^--tls-key needs --tls-cert \(TAMIYO_TLS_CERT\)"):
        parse_config(["--tls-key", "k.pem"])
    monkeypatch.setenv("TAMIYO_TLS_CERT", "c.pem")  # (set in a manifest, say)
    with pytest.raises(SystemExit, match=r"^--tls-cert needs --tls-key \(TAMIYO_TLS_KEY\)"):
        parse_config([])


# --------------------------------------------------------- directories (finding 9, 14)
async def test_a_checkpoint_dir_that_is_a_file_is_refused_before_binding(
    tmp_path: Path,
) -> None:
    """A typo class error: it used to serve the bundled default and say "does not exist"."""
    afile = tmp_path / "checkpoints"
    afile.write_text("")
    srv = TamiyoServer(make_config(checkpoint_dir=str(afile)))
    with pytest.raises(StartupError, match=f"^--checkpoint-dir {afile} is not a directory"):
        await srv.start()
    assert srv.port == 0
    await srv.stop()


async def test_an_experience_dir_that_cannot_be_created_is_named_before_binding(
    tmp_path: Path, served_policy: ServedPolicy
) -> None:
    """It used to fail after the policy was loaded, as a bare ``[Errno 20] ...`` line."""
    afile = tmp_path / "afile"
    afile.write_text("")
    where = afile / "sub"
    experience = replace(ServerConfig().experience, dir=str(where))
    srv = TamiyoServer(make_config(experience=experience), policy=served_policy)
    with pytest.raises(StartupError) as err:
        await srv.start()
    assert str(err.value).startswith(f"--experience-dir {where}: cannot create or write there")
    assert (srv.port, srv.pipeline) == (0, None)
    await srv.stop()


# ------------------------------------------------------ unknown variables (finding 15)
def test_an_unknown_variable_is_warned_about_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # (typos built at run time: a literal would count as a name the project reads below)
    typo, spelling = "TAMIYO_CHECKPOINT_DIR" + "R", "TAMIYO_HEALTH_" + "TRESHOLD"
    nothing = "TAMIYO_" + "NOTHING_LIKE_ANY"
    for name in (typo, spelling, nothing):
        monkeypatch.setenv(name, "1")
    for name in (*ENVIRONMENT_ONLY, *OTHER_VARIABLES, "TAMIYO_PORT"):
        monkeypatch.setenv(name, "7")  # known names: no warning (and a valid port)
    with caplog.at_level(logging.WARNING, logger="tamiyo_server.cli"):
        config = parse_config([])
    assert config.checkpoint_dir == ""  # the typo was ignored: hence the warning
    said = sorted(r.getMessage() for r in caplog.records)
    assert said == [
        f"{typo} is set, but nothing in Tamiyo reads it (ignored); did you mean "
        "TAMIYO_CHECKPOINT_DIR?",
        f"{spelling} is set, but nothing in Tamiyo reads it (ignored); did you mean "
        "TAMIYO_HEALTH_THRESHOLD?",
        f"{nothing} is set, but nothing in Tamiyo reads it (ignored); tamiyo-server --help "
        "lists the variables",
    ]


def _names_the_project_uses() -> set[str]:
    """Every ``TAMIYO_*`` name in the project's code, build files and manifests."""
    files = [ROOT / "Dockerfile", ROOT / "Makefile", ROOT / "setup.py"]
    for top in ("tamiyo", "tamiyo_server", "tamiyo_client", "trainer", "tools", "soak",
                "bench", "deploy", "tests"):  # fmt: skip
        for pattern in ("*.py", "*.yaml", "*.yml", "*.sh", "*.toml"):
            files += (ROOT / top).rglob(pattern)
    names: set[str] = set()
    for path in files:
        if path.is_file():
            names |= set(re.findall(r"\bTAMIYO_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return names


def test_no_name_the_project_reads_is_warned_about() -> None:
    """Client-side and build-time variables (TAMIYO_TOKEN, TAMIYO_MARCH, ...) are set in
    the same shells and images as the server's: a new one must be added to
    ``tamiyo.config.OTHER_VARIABLES``, or every server start would warn about it."""
    names = _names_the_project_uses()
    assert {"TAMIYO_TOKEN", "TAMIYO_MARCH", "TAMIYO_DEFAULT_CHECKPOINT_DIR"} <= names
    assert unknown_variables(build_parser(), dict.fromkeys(names, "1")) == []


# ------------------------------------------------------------------ --help (finding 13)
def test_help_shows_every_flags_variable_and_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TAMIYO_PORT", "6000")
    with pytest.raises(SystemExit) as exit_:
        parse_config(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # (argparse wraps lines anywhere)
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert f"[{env_name(action.dest)}; default: " in text, action.dest
    assert "[TAMIYO_HOST; default: 127.0.0.1]" in text
    assert "[TAMIYO_PORT; default: 6000 from TAMIYO_PORT]" in text  # where it came from
    assert "[TAMIYO_CHECKPOINT_DIR; default: empty]" in text
    for name in (*ENVIRONMENT_ONLY, *OTHER_VARIABLES):
        assert f"{name}: " in text
    assert "plaintext HTTP without authentication" in text
    assert "Exit status: 0 after a drain" in text


# ----------------------------------------------------------- metrics host (finding 17)
def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return bytes(resp.read())


async def test_metrics_bind_to_metrics_host_and_say_they_are_open(
    served_policy: ServedPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    assert parse_config([]).metrics_host == ""  # default: the --host address
    assert parse_config(["--metrics-host", "127.0.0.2"]).metrics_host == "127.0.0.2"
    port = _free_port("127.0.0.2")
    config = make_config(host="127.0.0.1", metrics_port=port, metrics_host="127.0.0.2")
    srv = TamiyoServer(config, policy=served_policy)
    with caplog.at_level(logging.INFO, logger="tamiyo_server.metrics"):
        await srv.start()
    try:
        assert b"tamiyo_decisions_total" in await asyncio.to_thread(
            _scrape, f"http://127.0.0.2:{port}/metrics"
        )
        with pytest.raises(OSError, match="Connection refused"):  # not on the gRPC address
            await asyncio.to_thread(_scrape, f"http://127.0.0.1:{port}/metrics")
    finally:
        await srv.stop()
    assert (
        f"metrics on http://127.0.0.2:{port}/metrics (plaintext HTTP, no authentication"
        in caplog.text
    )


# ------------------------------------------------------------------ drain (finding 16)
async def test_the_drain_ends_with_one_line_saying_how_it_went(
    served_policy: ServedPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    """One stream half-closes after SessionClosing (clean), one never does (cut at the
    grace limit); the operator reads both counts, and "stopped", in the last line."""
    srv = TamiyoServer(make_config(grace_s=0.5), policy=served_policy)
    await srv.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        polite, rude = await open_stream(stub), await open_stream(stub)
        with caplog.at_level(logging.INFO, logger="tamiyo_server.app"):
            stopping = asyncio.create_task(srv.stop())
            while (await read(polite)).WhichOneof("message") != "closing":
                pass
            await polite.done_writing()
            await read_all(polite)
            assert await polite.code() == grpc.StatusCode.OK
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                await read_all(rude)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            await stopping
    assert srv.drained is not None
    d = srv.drained
    assert (d.closed, d.gone, d.cut, d.grace_s, d.answered) == (1, 0, 1, 0.5, True)
    last = [r.getMessage() for r in caplog.records if r.name == "tamiyo_server.app"][-1]
    assert re.fullmatch(
        r"drained in \d+\.\d s: 1 streams closed cleanly, 1 cut at the 0\.5 s grace limit; "
        r"in flight: \d+ queued evaluations answered; stopped",
        last,
    ), last


def test_kubernetes_service_links_are_not_warned_about() -> None:
    """A Service named ``tamiyo`` makes Kubernetes inject ``TAMIYO_SERVICE_HOST``,
    ``TAMIYO_PORT_50051_TCP`` and more (unless ``enableServiceLinks: false``): known
    noise, not a typo; a real typo beside them is still named."""
    from tamiyo_server.cli import build_parser
    from tamiyo_server.environment import unknown_variables

    links = {
        "TAMIYO_SERVICE_HOST": "10.0.0.1",
        "TAMIYO_SERVICE_PORT": "50051",
        "TAMIYO_SERVICE_PORT_METRICS": "9464",
        "TAMIYO_PORT_50051_TCP": "tcp://10.0.0.1:50051",
        "TAMIYO_PORT_50051_TCP_PROTO": "tcp",
        "TAMIYO_PORT_50051_TCP_PORT": "50051",
        "TAMIYO_PORT_50051_TCP_ADDR": "10.0.0.1",
        "TAMIYO_SERVER_SERVICE_HOST": "10.0.0.2",
    }
    assert unknown_variables(build_parser(), links) == []
    misspelt = "TAMIYO_HEALTH_" + "TRESHOLD"  # (split: the repo scan above reads this file)
    typo = unknown_variables(build_parser(), links | {misspelt: "1"})
    assert len(typo) == 1
    assert "did you mean TAMIYO_HEALTH_THRESHOLD?" in typo[0]
