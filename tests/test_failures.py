"""Every way start-up or the session can fail: one clear line, its own exit code, no traceback, no
key on screen, no sox left running (checked by the run_client fixture)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import threading
import time

import pytest
from conftest import API_KEY, noise


async def handshake_then_wait(session):
    await session.handshake()
    await asyncio.sleep(3600)


def assert_one_clean_line(client, code, *fragments):
    assert client.finish() == code, client.stderr
    err = client.stderr
    assert "Traceback" not in err
    assert API_KEY not in client.stdout + err
    for fragment in fragments:
        assert fragment in err, err


def test_no_key_without_a_terminal(run_client, base_env):
    client = run_client(None, env={"OPENAI_API_KEY": None}, stdin=subprocess.DEVNULL)
    client.process.wait(10)
    assert client.finish() == 3
    assert "OPENAI_API_KEY is not set: copy .env.example to .env" in client.stderr


def test_key_and_settings_from_dotenv_flag_beats_env_beats_file(serve, run_client, tmp_path):
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={API_KEY}\nREALTIME_VOICE=marin\n")
    voices = []
    for extra_env, args in (({}, []), ({"REALTIME_VOICE": "cedar"}, []),
                            ({"REALTIME_VOICE": "cedar"}, ["--voice", "ash"])):
        server = serve(handshake_then_wait)
        client = run_client(server, *args, env={"OPENAI_API_KEY": None, **extra_env})
        client.wait_for("connected")
        assert client.stop() == 0
        (update,) = server.events("session.update")
        voices.append(update["session"]["audio"]["output"]["voice"])
    assert voices == ["marin", "cedar", "ash"]


def test_sox_not_installed(run_client, base_env, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    client = run_client(None, env={**base_env, "PATH": str(empty),
                                   "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert_one_clean_line(client, 4, "sox is not installed", "apt-get install sox libsox-fmt-pulse")


def test_sox_cannot_open_the_audio_device(serve, run_client):
    client = run_client(serve(handshake_then_wait), env={
        "FAKE_SOX_FAIL_RECORDER": "Sorry, there is no default audio device configured"})
    assert_one_clean_line(client, 5, "the sox recorder stopped: sox FAIL sox: Sorry, there is no "
                                     "default audio device configured")
    assert "ALSA lib" not in client.stderr


def test_a_sox_that_dies_twice_ends_the_session_with_its_reason(serve, run_client, sox_log):
    client = run_client(serve(handshake_then_wait), env={"FAKE_SOX_DIE_PLAYER": "1.0"})
    client.wait_for("connected")
    assert_one_clean_line(client, 5, "the sox player stopped", "Connection terminated")
    assert "Connection terminated: Operation not permitted; restarting it" in client.stderr
    assert len(sox_log.runs("player")) == 2
    assert "session: 0 responses" in client.stdout


@pytest.mark.parametrize("role", ["recorder", "player"])
def test_a_sox_that_dies_once_is_restarted_and_the_talk_goes_on(serve, run_client, sox_log, role,
                                                                 tmp_path):
    async def script(session):
        await session.handshake()
        await asyncio.sleep(1.6)
        await session.reply(noise(0.4, seed=4), "still talking", speed=10)
        await asyncio.sleep(3600)

    server = serve(script)
    (tmp_path / "mic.raw").write_bytes(noise(6.0, seed=12))
    client = run_client(server, env={f"FAKE_SOX_DIE_{role.upper()}": "0.8",
                                     "FAKE_SOX_DIE_ONCE": "1", "FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    client.wait_for("tokens in")
    time.sleep(0.8)
    assert client.stop() == 0
    assert f"the sox {role} stopped" in client.stderr and "restarting it" in client.stderr
    assert len(sox_log.runs(role)) == 2
    if role == "recorder":  # the new recorder's audio reaches the server
        second = sox_log.runs("recorder")[1]["raw"]
        sent = b"".join(base64.b64decode(e["audio"])
                        for e in server.events("input_audio_buffer.append"))
        assert second[4096:8192] in sent
    else:  # the reply plays on the new player
        assert sox_log.runs("player")[1]["raw"][:19200] == noise(0.4, seed=4)[:19200]


@pytest.mark.parametrize("status, code, body, shown", [
    (401, 6, {"message": f"Incorrect API key provided: {API_KEY}.", "code": "invalid_api_key"},
     "(HTTP 401): Incorrect API key provided: sk-…. — check OPENAI_API_KEY"),
    (403, 6, {"message": "Project does not have access to model", "code": "model_not_found"},
     "(HTTP 403): Project does not have access to model — your key or project has no access"),
    (404, 7, {"message": "The model 'gpt-4o-realtime-preview-2024-10-01' does not exist.",
              "code": "model_not_found"},
     "does not exist. — check --model and OPENAI_BASE_URL"),
    (429, 8, {"message": "You exceeded your current quota.", "code": "insufficient_quota"},
     "(HTTP 429): You exceeded your current quota. — rate limit or quota reached"),
])
def test_handshake_refused(serve, run_client, status, code, body, shown):
    server = serve(handshake_then_wait, refuse=(status, json.dumps({"error": body})))
    assert_one_clean_line(run_client(server), code, "the API refused the connection", shown)


def test_host_unreachable(run_client):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = run_client(None, env={"OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1"})
    assert_one_clean_line(client, 9, f"cannot reach 127.0.0.1:{port} (Connection refused)",
                          "check your network")


def test_tls_failure(run_client):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def not_tls():
        connection, _ = listener.accept()
        connection.recv(1024)
        connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\nthis port speaks no TLS\r\n")
        connection.close()

    threading.Thread(target=not_tls, daemon=True).start()
    client = run_client(None, env={"OPENAI_BASE_URL": f"https://127.0.0.1:{port}/v1"})
    assert_one_clean_line(client, 10, "TLS with 127.0.0.1 failed")
    listener.close()


def test_refusals_that_no_retry_can_fix_end_at_once(serve, run_client):
    async def script(session):
        await session.handshake()
        await session.send("error", error={
            "type": "invalid_request_error", "code": "beta_api_shape_disabled",
            "message": "The Realtime Beta API is no longer supported."})
        await session.ws.close(4000, "beta_api_shape_disabled")

    server = serve(script)
    client = run_client(server)
    assert_one_clean_line(client, 11, "the API ended the session: The Realtime Beta API is no "
                                      "longer supported. (beta_api_shape_disabled)")
    assert len(server.request_headers) == 1  # no retry


def test_gives_up_after_its_tries_to_reconnect(serve, run_client):
    async def script(session):
        if len(session.server.request_headers) == 1:
            await session.handshake()
            await session.ws.close(1011, "internal server error")

    server = serve(script)
    client = run_client(server, "--reconnect-tries", "3")  # 6 by default: 20 s of backoff
    client.wait_for("reconnecting in")
    server.refuse = (503, '{"error": {"message": "The server is overloaded."}}')
    assert client.finish(40) == 11
    assert ("the API closed the session (1011, internal server error); reconnecting in"
            in client.stderr)
    assert "(try 3 of 3)" in client.stderr
    assert "gave up after 3 tries to reconnect" in client.stderr
    assert len(server.request_headers) == 4
    assert "Traceback" not in client.stderr


def test_plain_ws_only_to_loopback(run_client):
    client = run_client(None, env={"OPENAI_BASE_URL": "http://api.example.com/v1"})
    assert_one_clean_line(client, 2, "refusing to send the API key in clear text to api.example.com")


@pytest.mark.parametrize("variable, value, shown", [
    ("REALTIME_KEEPALIVE", "soon", "argument --keepalive: invalid float value: 'soon'"),
    ("REALTIME_DUPLEX", "quarter", "--duplex (or its environment variable) must be one of auto, full, half"),
    ("REALTIME_VAD_THRESHOLD", "2", "--vad-threshold must be between 0 and 1"),
    ("REALTIME_PRICES", "1,2,3", "REALTIME_PRICES must be 6 or 7 numbers"),
])
def test_bad_settings_from_the_environment(run_client, variable, value, shown):
    client = run_client(None, env={variable: value})
    assert_one_clean_line(client, 2, shown)
