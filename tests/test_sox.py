"""sox as it behaves on a Mac and on real devices: CoreAudio's resampler holding a reply's end back,
devices that vanish without a word, warning floods on stderr, device names, and the variables of
the user's environment that would change the article's commands."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from conftest import noise
from test_failures import handshake_then_wait


async def one_reply(session, audio: bytes, speed: float = 1.0):
    await session.handshake()
    await session.reply(audio, "A reply that must be heard to its very last word", speed=speed)
    await asyncio.sleep(3600)


def longest_gap_ms(heard_times, first: int, last: int) -> float:
    """The longest silence between the 10 ms slices that carried bytes first..last of the stream."""
    moments, position = [], 0
    for moment, length in heard_times:
        if first <= position < last:
            moments.append(moment)
        position += length
    return max(((b - a) * 1000 - 10 for a, b in zip(moments, moments[1:], strict=False)),
               default=0.0)


@pytest.mark.parametrize("plumbing, heard_in_full", [("coreaudio", True), ("tuned", False)])
def test_coreaudio_resampler_every_reply_heard_to_its_end(serve, run_client, sox_log, plumbing,
                                                          heard_in_full):
    reply = noise(1.2, seed=21)
    client = run_client(serve(lambda session: one_reply(session, reply)), "--plumbing", plumbing,
                        env={"FAKE_SOX_COREAUDIO": "1"})
    client.wait_for("tokens in")
    time.sleep(1.0)  # the reply plays out (or waits, held back, for input that never comes)
    assert client.stop() == 0
    heard = sox_log.heard()
    if heard_in_full:  # the Mac settings: every byte, in order, and no gap over 30 ms
        assert heard[:len(reply)] == reply
        assert longest_gap_ms(sox_log.heard_times(), 0, len(reply)) <= 30
    else:  # the Linux settings on a Mac: the reply's last words wait in the resampler
        assert len(heard) < len(reply) and reply.startswith(heard)
        assert (len(reply) - len(heard)) * 1000 / 48_000 > 30


def heard_at(heard_times, position: int) -> float:
    """When the byte at `position` of the player's stream was heard."""
    for moment, length in heard_times:
        if position < length:
            return moment
        position -= length
    raise AssertionError("never heard")


@pytest.mark.parametrize("first_ms, chunk_ms, speed", [(100, 300, 3.0), (100, 100, 1.0)],
                         ids=["as-the-api-sends", "real-time"])
def test_the_cushion_is_learned_from_how_the_last_reply_arrived(serve, run_client, sox_log,
                                                                first_ms, chunk_ms, speed):
    replies = [noise(0.6, seed=51), noise(0.6, seed=52)]
    sent_at: list[float] = []

    async def script(session):
        await session.handshake()
        for reply in replies:
            sent_at.append(time.monotonic())  # the first delta follows within a millisecond
            await session.reply(reply, "A reply", speed=speed, chunk_ms=chunk_ms, first_ms=first_ms)
            await asyncio.sleep(0.8)  # heard to its end: the next reply starts from silence
        await asyncio.sleep(3600)

    client = run_client(serve(script))
    client.wait_for("tokens in", count=2)
    time.sleep(0.8)
    assert client.stop() == 0
    heard, times = sox_log.heard(), sox_log.heard_times()
    starts = [heard.find(reply[:4800]) for reply in replies]
    waits = [(heard_at(times, start) - moment) * 1000 for start, moment in zip(starts, sent_at, strict=True)]
    for start, reply in zip(starts, replies, strict=True):
        assert heard[start:start + len(reply)] == reply
        assert longest_gap_ms(times, start, start + len(reply)) <= 15  # never a stutter
    assert waits[0] >= 30  # nothing known yet: the whole cushion
    if speed > 1:  # audio ran ahead of real time: the next reply starts at once
        assert waits[1] <= 20
    else:  # audio came just in time: the next reply keeps the cushion
        assert waits[1] >= 30


def test_a_silent_recorder_is_reported_and_restarted(serve, run_client, sox_log, tmp_path):
    (tmp_path / "mic.raw").write_bytes(noise(12.0, seed=22))

    server = serve(handshake_then_wait)
    client = run_client(server, env={"FAKE_SOX_STALL_RECORDER": "1.0", "FAKE_SOX_DIE_ONCE": "1",
                                     "FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    client.wait_for("the sox recorder gave no audio for 4 s (did the microphone go away?); "
                    "restarting it", timeout=10)

    def new_audio_sent() -> bool:
        runs = sox_log.runs("recorder")
        sent = b"".join(base64.b64decode(e["audio"])
                        for e in server.events("input_audio_buffer.append"))
        return len(runs) == 2 and len(runs[1]["raw"]) >= 8192 and runs[1]["raw"][4096:8192] in sent

    deadline = time.monotonic() + 3
    while not new_audio_sent() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.stop() == 0
    assert new_audio_sent()  # the new recorder's audio reaches the server


def test_a_player_that_takes_no_audio_is_reported_and_restarted(serve, run_client, sox_log):
    async def script(session):
        await session.handshake()
        await session.reply(noise(8.0, seed=23), "A long reply into a speaker that vanished",
                            speed=10)
        await asyncio.sleep(6)
        await session.reply(noise(0.4, seed=24), "Can you hear me now", speed=10)
        await asyncio.sleep(3600)

    client = run_client(serve(script), env={"FAKE_SOX_STALL_PLAYER": "0.5",
                                            "FAKE_SOX_DIE_ONCE": "1"})
    client.wait_for("the sox player took no audio for 4 s (did the speaker go away?); "
                    "restarting it", timeout=12)
    client.wait_for("Can you hear me now", timeout=10)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not any(
            noise(0.4, seed=24)[:9600] in run["raw"] for run in sox_log.runs("player")[1:]):
        time.sleep(0.05)
    assert client.stop() == 0
    assert len(sox_log.runs("player")) == 2
    assert noise(0.4, seed=24)[:9600] in sox_log.runs("player")[1]["raw"]


def test_a_flood_of_sox_warnings_never_stops_the_microphone(serve, run_client, sox_log, tmp_path):
    (tmp_path / "mic.raw").write_bytes(noise(4.0, seed=25))

    server = serve(handshake_then_wait)
    client = run_client(server, env={"FAKE_SOX_WARN_FLOOD": "1",
                                     "FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    client.wait_for("connected")
    time.sleep(3.0)  # ~1500 warning lines, 100 KiB: more than a pipe holds
    assert client.stop() == 0
    (recorder,) = sox_log.runs("recorder")
    moments = [moment for moment, _, _ in recorder["times"]]
    assert len(moments) >= 30  # 3.5 s of 4096-byte writes: the recorder never stalled
    assert max(b - a for a, b in zip(moments, moments[1:], strict=False)) < 0.3
    assert "warning" not in client.stderr and "restarting" not in client.stderr
    assert len(server.events("input_audio_buffer.append")) >= 100


def test_an_unknown_device_name_is_a_usage_error(serve, run_client):
    client = run_client(serve(handshake_then_wait), "--output-device", "Nobody’s AirPods",
                        env={"FAKE_SOX_FAIL_PLAYER": "can not open audio device: Operation not "
                                                     "permitted"})
    assert client.finish(10) == 2
    assert ("the sox player stopped: sox FAIL sox: can not open audio device: Operation not "
            "permitted: no speaker is named 'Nobody’s AirPods'; see --list-devices") in client.stderr
    assert "Traceback" not in client.stderr


def test_sox_variables_of_the_environment_are_cleared_and_said(serve, run_client, sox_log):
    client = run_client(serve(handshake_then_wait), env={"SOX_OPTS": "--buffer 99999", "AUDIODEV": "hw:9"})
    client.wait_for("connected")
    assert client.stop() == 0
    assert ("ignoring SOX_OPTS='--buffer 99999' from your environment: it would change the sox "
            "commands") in client.stderr
    assert "ignoring AUDIODEV='hw:9'" in client.stderr
    for run in sox_log.runs("recorder") + sox_log.runs("player"):
        assert run["SOX_OPTS"] is None and run["AUDIODEV"] is None


@pytest.mark.parametrize("args, size", [(["--output-device", "Jo’s AirPods Pro"], "4096"),
                                        (["--sox-buffer", "2048"], "2048"), ([], "960")])
def test_the_sox_buffer_for_bluetooth(serve, run_client, sox_log, args, size):
    client = run_client(serve(handshake_then_wait), *args)
    client.wait_for("connected")
    assert client.stop() == 0
    for run in sox_log.runs("recorder") + sox_log.runs("player"):
        assert run["argv"][:2] == ["--buffer", size]
