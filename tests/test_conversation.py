"""A whole conversation against the fake API and fake sox: what goes on the wire, what reaches the
player, what shows on screen, and how it ends."""

from __future__ import annotations

import asyncio
import base64
import signal
import time

from conftest import API_KEY, noise

RECORDER = ("--default-device --no-show-progress --rate 24000 --channels 1 --encoding signed-integer "
            "--bits 16 --type raw -").split()
PLAYER = ("--type raw --rate 24000 --encoding signed-integer --bits 16 --channels 1 - "
          "--no-show-progress --default-device").split()



def test_voice_turn_end_to_end(serve, run_client, sox_log, tmp_path):
    mic = noise(1.5, seed=7)
    (tmp_path / "mic.raw").write_bytes(mic)
    reply = noise(1.2, seed=8)

    async def script(session):
        update = await session.handshake()
        session.server.update = update
        while len(session.server.events("input_audio_buffer.append")) < 60:  # 1.2 s of speech
            await asyncio.sleep(0.02)
        await session.send("input_audio_buffer.speech_started", audio_start_ms=0, item_id="item_u")
        await session.user_said("item_u", "Hello there, haiku bot")
        await session.reply(reply, "Autumn wind replies softly")
        await asyncio.sleep(3600)

    server = serve(script)
    # Full duplex: every byte as recorded (auto holds back what it hears while a reply plays).
    client = run_client(server, "--duplex", "full", env={"FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    client.wait_for("tokens in 118")
    time.sleep(1.5)  # let the reply finish playing
    assert client.stop() == 0

    # The wire: Authorization only, the GA session shape, 20 ms appends of exactly the mic's bytes.
    headers = server.request_headers[0]
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert not any(name.lower() == "openai-beta" for name in headers)
    session = server.update["session"]
    assert session["type"] == "realtime"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["output"] == {"format": {"type": "audio/pcm", "rate": 24000},
                                          "voice": "echo"}
    assert session["audio"]["input"]["turn_detection"] == {"type": "server_vad"}
    appends = [base64.b64decode(e["audio"]) for e in server.events("input_audio_buffer.append")]
    assert {len(a) for a in appends} == {960}
    recorded = b"".join(run["raw"] for run in sox_log.runs("recorder"))
    sent = b"".join(appends)
    assert sent and recorded.find(sent[:9600]) >= 0  # audio before session.updated is dropped
    start = recorded.find(sent[:9600])
    assert recorded[start:start + len(sent)] == sent
    assert server.closed_with == [1000]

    # The player: the reply's bytes, in order, then at most a block of silence padding.
    heard = sox_log.heard()
    assert heard[:len(reply)] == reply
    assert heard[len(reply):] == bytes(len(heard) - len(reply)) and len(heard) - len(reply) < 1920

    # The sox commands: the article's arguments verbatim and in order, with --buffer in front.
    (recorder,) = sox_log.runs("recorder")
    assert recorder["argv"] == ["--buffer", "960", *RECORDER]
    assert all(run["argv"] == ["--buffer", "960", *PLAYER] for run in sox_log.runs("player"))

    # The screen.
    out = client.stdout
    assert "you: Hello there, haiku bot" in out
    assert "assistant: Autumn wind replies softly" in out
    assert ("tokens in 118 (text 102, audio 16, cached 0) · out 22 (text 22, audio 0) · $0.0014"
            in out)
    assert "session: 1 responses · 118 tokens in · 22 out · $0.0014" in out
    assert API_KEY not in out + client.stderr


def test_typed_line_becomes_a_user_message_and_a_response(serve, run_client):
    async def script(session):
        await session.handshake()
        await session.expect("conversation.item.create")
        await session.expect("response.create")
        await session.reply(noise(0.3), "Hello, typed friend")
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server)
    client.wait_for("connected")
    client.type("I'm feeling great today!")
    client.wait_for("tokens in")
    assert client.stop() == 0
    (create,) = server.events("conversation.item.create")
    assert create["item"] == {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "I'm feeling great today!"}]}
    assert len(server.events("response.create")) == 1
    assert "you: I'm feeling great today!" in client.stdout
    assert "assistant: Hello, typed friend" in client.stdout


def test_sigterm_ends_cleanly_and_eof_on_stdin_does_not(serve, run_client):
    server = serve(wait_forever_after)
    client = run_client(server)
    client.wait_for("connected")
    client.process.stdin.close()  # EOF: typing is over, the voice session is not
    time.sleep(0.5)
    assert client.process.poll() is None
    started = time.monotonic()
    assert client.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 1.0
    assert "session: 0 responses" in client.stdout
    assert server.closed_with == [1000]


async def wait_forever_after(session):
    await session.handshake()
    await asyncio.sleep(3600)


def test_error_events_are_shown_and_the_conversation_goes_on(serve, run_client):
    async def script(session):
        await session.handshake()
        await session.send("error", error={"type": "invalid_request_error",
                                           "code": "conversation_already_has_active_response",
                                           "message": "Conversation already has an active response"})
        await session.reply(noise(0.2), "Still here")
        await asyncio.sleep(3600)

    client = run_client(serve(script))
    client.wait_for("tokens in")
    assert client.stop() == 0
    assert ("the API reported conversation_already_has_active_response: Conversation already has "
            "an active response") in client.stderr
    assert "assistant: Still here" in client.stdout


def test_bad_frames_are_reported_once_per_kind_and_skipped(serve, run_client):
    async def script(session):
        await session.handshake()
        for _ in range(2):
            await session.ws.send("this is not json")
            await session.ws.send(b"\x00\x01binary")
            await session.ws.send('{"no_type": true}')
            await session.send("response.brand_new_event", checked=False, x=1)
            await session.send("response.output_audio.delta", checked=False, item_id="item_x",
                               delta="%%%not b64")
        await session.ws.send('{"type": "response.unknown_big", "blob": "' + "x" * 4_000_000 + '"}')
        await session.reply(noise(0.2), "Survived the garbage")
        await asyncio.sleep(3600)

    client = run_client(serve(script))
    client.wait_for("tokens in", timeout=20)
    assert client.stop() == 0
    err = client.stderr
    for warning in ("not JSON", "binary frame", "without a type",
                    "unknown server event 'response.brand_new_event'", "not valid base64"):
        assert err.count(warning) == 1, (warning, err)
    assert "assistant: Survived the garbage" in client.stdout


def test_ctrl_c_again_and_again_and_sighup_end_cleanly(serve, run_client, sox_log):
    """Ctrl-C pressed over and over reaches every moment of the way out, the interpreter's own
    shutdown included: none of them may end the script by the signal."""
    for repeat, sig in ((True, signal.SIGINT), (False, signal.SIGHUP)):
        server = serve(wait_forever_after)
        client = run_client(server)
        client.wait_for("connected")
        client.process.send_signal(sig)
        sent = 1
        while repeat and client.process.poll() is None:
            try:
                client.process.send_signal(sig)
            except ProcessLookupError:
                break
            sent += 1
            time.sleep(0.0005)
        assert client.finish() == 0, (sent, client.stderr)
        assert "session: 0 responses" in client.stdout and "Traceback" not in client.stderr
        assert not repeat or sent > 20


def test_a_malformed_event_is_skipped_and_reported_once(serve, run_client):
    async def script(session):
        await session.handshake()
        for _ in range(2):
            await session.send("response.output_item.done", checked=False, response_id="r",
                               output_index=0, item="not an object")
        await session.reply(noise(0.2), "Still fine")
        await asyncio.sleep(3600)

    client = run_client(serve(script))
    client.wait_for("assistant: Still fine")
    client.wait_for("tokens in 118")
    assert client.stop() == 0
    assert client.stderr.count("skipping a malformed 'response.output_item.done' event") == 1
    assert "session: 1 responses · 118 tokens in" in client.stdout
    assert "Traceback" not in client.stderr
