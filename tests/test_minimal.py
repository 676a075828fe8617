"""examples/minimal.py, the reference for people who copy: the same fake API (every client event
checked against the openai types), the same fake sox, and the real sox on the rig."""

from __future__ import annotations

import asyncio
import base64
import os
import time

import pytest
from conftest import ROOT, noise
from real_audio import Monitor, why_no_real_audio

MINIMAL = ROOT / "examples" / "minimal.py"
REPLY = noise(0.9, seed=31)  # 43,200 bytes: not a whole number of sox's 16,384-byte blocks


def test_a_voice_turn_and_a_typed_turn_heard_to_their_end_the_microphone_muted_meanwhile(
        serve, run_client, sox_log, tmp_path):
    (tmp_path / "mic.raw").write_bytes(noise(6.0, seed=33))  # someone talking all along
    replied: list[float] = []

    async def turns(session):
        """A voice turn (as the server's VAD would commit it), then a typed one."""
        await session.handshake()
        await session.expect("input_audio_buffer.append")
        await session.send("input_audio_buffer.committed", item_id="u1", previous_item_id=None)
        await session.user_said("u1", "What is a haiku?")
        replied.append(time.monotonic())
        await session.reply(REPLY, "A short poem.", speed=10)
        await session.expect("response.create", timeout=20)
        await session.reply(noise(0.4, seed=32), "Hello to you.", speed=10)
        await asyncio.sleep(3600)

    server = serve(turns)
    client = run_client(server, script=MINIMAL, env={"FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    client.wait_for("assistant: A short poem.")
    client.wait_for("$0.0014 (session $0.0014)")
    deadline = time.monotonic() + 3  # the reply plays (0.9 s), and its padded last block with it
    while REPLY not in sox_log.heard() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert REPLY in sox_log.heard()  # every byte, its end included: sox's last block was filled
    sent = [(at, base64.b64decode(e["audio"])) for at, e in server.received
            if e["type"] == "input_audio_buffer.append"]
    audible = [audio for at, audio in sent if replied[0] + 0.2 < at < replied[0] + 0.8]
    assert audible and not any(any(audio) for audio in audible)  # silence while it speaks
    assert any(any(audio) for at, audio in sent if at < replied[0])  # the microphone before
    client.type("hello")
    client.wait_for("assistant: Hello to you.")
    (typed,) = server.events("conversation.item.create")
    assert typed["item"]["content"][0] == {"type": "input_text", "text": "hello"}
    assert "you: What is a haiku?" in client.stdout
    (update,) = server.events("session.update")
    assert update["session"]["type"] == "realtime"
    assert sox_log.runs("recorder")[0]["argv"] == ["--default-device", "--no-show-progress",
                                                   "--rate", "24000", "--channels", "1",
                                                   "--encoding", "signed-integer", "--bits", "16",
                                                   "--type", "raw", "-"]
    client.wait_for("(session $0.0029)")
    assert client.stop() == 0
    assert "session: $0.0029" in client.stdout


def test_enter_interrupts_and_tells_the_model_what_was_heard(serve, run_client, sox_log):
    async def script(session):
        await session.handshake()
        await session.reply(noise(6.0, seed=35), "A long story.", speed=1)
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server, script=MINIMAL)
    client.wait_for("connected")
    time.sleep(1.3)
    pressed = time.monotonic()
    client.type("")
    time.sleep(0.3)
    assert client.stop() == 0
    (cancel,) = server.events("response.cancel")
    (truncate,) = server.events("conversation.item.truncate")
    heard_ms = truncate["audio_end_ms"]
    first = max(sox_log.runs("player"), key=lambda run: len(run["raw"]))
    played_ms = len(first["raw"]) * 1000 // 48_000
    # Honest: never more than the speaker played (a block at most less, never more).
    assert played_ms - 400 <= heard_ms <= played_ms + 20, (heard_ms, played_ms)
    assert len(sox_log.runs("player")) == 2  # the old player killed, its buffer unheard
    late = [t for t, _, _ in first["times"] if t > pressed + 0.05]
    assert not late  # nothing more of the reply played after Enter


@pytest.mark.skipif(why_no_real_audio() is not None, reason=f"needs real audio: {why_no_real_audio()}")
def test_the_real_sox_plays_the_reply_to_its_end(serve, run_client):
    tone = noise(1.0, seed=36, level=12000)

    async def script(session):
        await session.handshake()
        await asyncio.sleep(0.5)
        await session.reply(tone, "Listen to the end.", speed=10)
        await asyncio.sleep(3600)

    recorder = Monitor()
    try:
        client = run_client(serve(script), script=MINIMAL, env={"PATH": os.environ["PATH"]})
        client.wait_for("assistant: Listen to the end.")
        time.sleep(1.9)  # 1 s of sound, sox's first block, the sink's latency
        assert client.stop() == 0
    finally:
        recorder.stop()
    loud = recorder.loud_moments()
    assert loud, "the speaker never sounded"
    # The whole second of noise was heard: sox's last partial block played, padded with silence.
    assert 0.9 <= max(loud) - min(loud) <= 1.3, (min(loud), max(loud))
