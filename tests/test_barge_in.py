"""Interrupting the assistant, and the echo guard: what the player still plays, what the server is
told was heard, and what the microphone sends while the assistant speaks."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from conftest import BYTES_PER_SECOND, noise


def ms(byte_count: int) -> float:
    return byte_count * 1000 / BYTES_PER_SECOND


def heard_after(sox_log, moment: float) -> float:
    return ms(sum(n for t, n in sox_log.heard_times() if t > moment))


def test_speech_started_stops_the_sound_and_truncates_at_what_was_heard(serve, run_client,
                                                                        sox_log):
    reply, late = noise(4.0, seed=3), noise(0.5, seed=99)

    async def script(session):
        await session.handshake()
        await session.reply(reply, "one two three four five six seven eight nine ten", speed=10)
        await asyncio.sleep(1.2)
        session.server.speech_at = time.monotonic()
        await session.send("input_audio_buffer.speech_started", audio_start_ms=900, item_id="u1")
        truncate = await session.expect("conversation.item.truncate")
        await session.send("response.output_audio.delta", response_id="r", item_id=truncate["item_id"],
                           output_index=0, content_index=0, delta=base64.b64encode(late).decode())
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server)
    client.wait_for("interrupted, heard")
    time.sleep(0.5)
    assert client.stop() == 0

    assert heard_after(sox_log, server.speech_at) <= 30  # the bench measures it finely
    (truncate,) = server.events("conversation.item.truncate")
    heard = sox_log.heard()
    assert truncate["content_index"] == 0 and truncate["item_id"].startswith("item_")
    assert abs(truncate["audio_end_ms"] - ms(len(heard))) <= 40
    assert 1300 <= truncate["audio_end_ms"] <= 1800
    assert heard == reply[:len(heard)]  # and nothing of the late delta
    words = "one two three four five six seven eight nine ten"
    (shown,) = [line for line in client.stdout.splitlines() if "interrupted, heard: " in line]
    heard_words = shown.split("heard: ")[1]
    assert heard_words == words  # plain text: the struck-through part is only styled differently


def test_no_truncate_for_a_reply_heard_to_the_end(serve, run_client):
    async def script(session):
        await session.handshake()
        await session.reply(noise(0.5), "short", speed=10)
        await asyncio.sleep(1.2)
        await session.send("input_audio_buffer.speech_started", audio_start_ms=900, item_id="u1")
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server)
    client.wait_for("tokens in")
    time.sleep(1.8)
    assert client.stop() == 0
    assert server.events("conversation.item.truncate") == []
    assert "interrupted" not in client.stdout


def test_enter_interrupts_and_cancels_the_response_in_progress(serve, run_client, sox_log):
    async def script(session):
        await session.handshake()
        stop = asyncio.Event()
        reply = asyncio.create_task(session.reply(noise(4.0), "a slow answer", speed=1, stop=stop))
        await session.expect("response.cancel")
        stop.set()
        await reply
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server)
    client.wait_for("connected")
    time.sleep(1.0)
    pressed = time.monotonic()
    client.type("")
    client.wait_for("interrupted, heard")
    time.sleep(0.3)
    assert client.stop() == 0
    (truncate,) = server.events("conversation.item.truncate")
    assert 600 <= truncate["audio_end_ms"] <= 1100
    assert len(server.events("response.cancel")) == 1
    assert heard_after(sox_log, pressed) <= 30


@pytest.mark.parametrize("duplex", ["half", "full"])
def test_half_duplex_sends_silence_while_the_assistant_is_audible(serve, run_client, sox_log,
                                                                  tmp_path, duplex):
    (tmp_path / "mic.raw").write_bytes(noise(8.0, seed=5))

    async def script(session):
        await session.handshake()
        await asyncio.sleep(0.6)
        await session.reply(noise(1.0, seed=6), "I am talking now", speed=10)
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server, "--duplex", duplex, env={"FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    client.wait_for("tokens in")
    time.sleep(2.0)
    assert client.stop() == 0
    audible = [t for t, _ in sox_log.heard_times()]
    first, last = audible[0], audible[-1]
    appends = [(t, base64.b64decode(e["audio"])) for t, e in server.received
               if e["type"] == "input_audio_buffer.append"]
    assert {len(a) for _, a in appends} == {960}
    silent = [not any(audio) for _, audio in appends]
    during = [s for (t, _), s in zip(appends, silent, strict=True) if first + 0.1 < t < last + 0.2]
    before = [s for (t, _), s in zip(appends, silent, strict=True) if t < first - 0.2]
    after = [s for (t, _), s in zip(appends, silent, strict=True) if t > last + 0.6]
    assert during and before and after
    assert not any(before) and not any(after)  # the microphone otherwise
    assert all(during) if duplex == "half" else not any(during)


def test_reply_endings_play_in_full_where_the_article_held_them_back(serve, run_client, sox_log):
    reply = noise(1.03, seed=11)  # not a whole number of sox blocks

    async def script(session):
        await session.handshake()
        await session.reply(reply, "the end matters", speed=10)
        await asyncio.sleep(3600)

    client = run_client(serve(script))
    client.wait_for("tokens in")
    time.sleep(1.6)
    assert client.stop() == 0
    assert sox_log.heard()[:len(reply)] == reply


def test_article_plumbing_uses_the_exact_commands_and_loses_the_ending(serve, run_client, sox_log):
    reply = noise(1.2, seed=11)  # three 8192-sample blocks and 176 ms

    async def script(session):
        await session.handshake()
        await session.reply(reply, "the end matters", speed=10)
        await asyncio.sleep(3600)

    client = run_client(serve(script), "--plumbing", "article")
    client.wait_for("tokens in")
    time.sleep(1.6)
    assert client.stop() == 0
    assert sox_log.heard() == reply[:3 * 16384]  # the last 176 ms wait for input forever
    assert sox_log.runs("player")[0]["argv"][0] == "--type"
    assert sox_log.runs("recorder")[0]["argv"][0] == "--default-device"


def test_manual_turns_without_turn_detection(serve, run_client):
    async def script(session):
        update = await session.handshake()
        assert update["session"]["audio"]["input"]["turn_detection"] is None
        await session.expect("input_audio_buffer.commit")
        await session.expect("response.create")
        await session.reply(noise(0.3), "you pressed enter")
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server, "--turn-detection", "none")
    client.wait_for("press Enter to end your turn")
    time.sleep(0.5)
    client.type("")
    client.wait_for("tokens in")
    assert client.stop() == 0
    assert len(server.events("input_audio_buffer.commit")) == 1
