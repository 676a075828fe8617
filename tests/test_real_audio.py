"""The real sox binary on a real (headless) PulseAudio server: the plumbing the fakes cannot prove.

On the rig (`../shared/pulse-rig.sh up`) the default source is the default sink's monitor, so the
script's recorder hears its own player, exactly like laptop speakers next to a microphone.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import subprocess
import time

import pytest
from real_audio import (
    RIG,
    Monitor,
    loud_windows,
    play_into_default_sink,
    rms,
    sox_processes,
    speech,
    why_no_real_audio,
)

REASON = why_no_real_audio()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs real audio: {REASON}")


@pytest.fixture
def real_env(base_env):
    """The fake-sox environment, but with the real sox on PATH."""
    return {"PATH": os.environ["PATH"]}


@pytest.fixture
def no_orphan_real_sox():
    yield
    deadline = time.monotonic() + 3
    while sox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sox_processes() == [], "a real sox process outlived the test"


async def listen(session):
    await session.handshake()
    await asyncio.sleep(3600)


def appended_audio(server) -> list[tuple[float, bytes]]:
    return [(t, base64.b64decode(e["audio"])) for t, e in server.received
            if e["type"] == "input_audio_buffer.append"]


def test_the_persons_speech_reaches_the_server(serve, run_client, real_env, tmp_path,
                                               no_orphan_real_sox):
    voice = speech("The quick brown fox jumps over the lazy dog.", tmp_path / "voice.raw")
    server = serve(listen)
    client = run_client(server, env=real_env)
    client.wait_for("connected")
    time.sleep(0.5)
    play_into_default_sink(tmp_path / "voice.raw").wait(15)
    time.sleep(0.6)
    assert client.stop() == 0
    heard = b"".join(audio for _, audio in appended_audio(server))
    said, got = loud_windows(voice), loud_windows(heard)
    assert abs(len(got) - len(said)) <= 0.15 * len(said), (len(got), len(said))
    loud_said = b"".join(voice[i * 480:(i + 1) * 480] for i in said)
    loud_got = b"".join(heard[i * 480:(i + 1) * 480] for i in got)
    assert 0.7 < rms(loud_got) / rms(loud_said) < 1.3


def reply_then(after: str, voice: bytes, moments: dict[str, float]):
    async def script(session):
        await session.handshake()
        await asyncio.sleep(0.8)
        moments["first delta"] = time.monotonic()
        await session.reply(voice, "a spoken reply", speed=10)
        if after == "interrupt":
            await asyncio.sleep(1.0)
            moments["speech"] = time.monotonic()
            await session.send("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u")
        await asyncio.sleep(3600)
    return script


def test_the_reply_reaches_the_speaker_promptly(serve, run_client, real_env, tmp_path,
                                                no_orphan_real_sox):
    voice = speech("Autumn wind, slightly chilly, quietly ends.", tmp_path / "reply.raw")
    moments: dict[str, float] = {}
    monitor = Monitor()
    try:
        client = run_client(serve(reply_then("listen", voice, moments)), env=real_env)
        client.wait_for("tokens in")
        time.sleep(len(voice) / 48_000 + 0.5)
        assert client.stop() == 0
    finally:
        monitor.stop()
    onset = min(t for t in monitor.loud_moments() if t > moments["first delta"])
    lead_in = loud_windows(voice)[0] * 0.010  # espeak's own silence before the first word
    delay_ms = (onset - moments["first delta"] - lead_in) * 1000
    print(f"delta → sound on the real sox: {delay_ms:.0f} ms")
    assert 0 < delay_ms < 250
    sounding = [t for t in monitor.loud_moments() if t > moments["first delta"]]
    assert sounding[-1] - sounding[0] > 0.8 * len(loud_windows(voice)) * 0.010 * 0.9


def test_barge_in_silences_the_real_player(serve, run_client, real_env, tmp_path,
                                           no_orphan_real_sox):
    voice = speech("This is a long answer that goes on and on, so that there is plenty of "
                   "time to interrupt it somewhere in the middle of the sentence.",
                   tmp_path / "long.raw")
    moments: dict[str, float] = {}
    monitor = Monitor()
    try:
        client = run_client(serve(reply_then("interrupt", voice, moments)), env=real_env)
        client.wait_for("interrupted, heard")
        time.sleep(1.0)
        assert client.stop() == 0
    finally:
        monitor.stop()
    loud = monitor.loud_moments()
    assert any(moments["first delta"] < t < moments["speech"] for t in loud)
    leftover_ms = (max(loud) - moments["speech"]) * 1000
    print(f"sound after speech_started on the real sox: {leftover_ms:.0f} ms")
    assert leftover_ms <= 60


@pytest.mark.parametrize("plumbing, heard_ms", [("tuned", (1170, 1260)), ("article", (980, 1060))])
def test_reply_endings_on_the_real_sox(serve, run_client, real_env, plumbing, heard_ms,
                                       no_orphan_real_sox):
    """A 1.2 s tone: the article's player plays whole 8192-sample blocks and keeps the last 176 ms
    waiting for input that never comes; ours pads the end and plays every sample."""
    tone = b"".join(int(8000 * math.sin(2 * math.pi * 440 * n / 24_000)).to_bytes(2, "little",
                    signed=True) for n in range(int(1.2 * 24_000)))
    moments: dict[str, float] = {}
    monitor = Monitor()
    try:
        client = run_client(serve(reply_then("listen", tone, moments)), "--plumbing", plumbing,
                            env=real_env)
        client.wait_for("tokens in")
        time.sleep(2.0)
        assert client.stop() == 0
    finally:
        monitor.stop()
    loud = [t for t in monitor.loud_moments() if t > moments["first delta"]]
    played_ms = len(loud) * 10
    print(f"{plumbing}: {played_ms} ms of a 1200 ms reply reached the speaker")
    assert heard_ms[0] <= played_ms <= heard_ms[1]


@pytest.mark.parametrize("duplex", ["full", "half"])
def test_the_speaker_to_microphone_loop(serve, run_client, real_env, tmp_path, duplex,
                                        no_orphan_real_sox):
    voice = speech("Can you hear yourself talking?", tmp_path / "echo.raw")
    moments: dict[str, float] = {}
    server = serve(reply_then("listen", voice, moments))
    client = run_client(server, "--duplex", duplex, env=real_env)
    client.wait_for("tokens in")
    time.sleep(len(voice) / 48_000 + 1.0)
    assert client.stop() == 0
    during = b"".join(audio for t, audio in appended_audio(server)
                      if t > moments["first delta"])
    loud = len(loud_windows(during))
    if duplex == "full":  # the model hears its own voice, as the article warns
        assert loud >= 0.8 * len(loud_windows(voice))
    else:
        assert loud == 0


@pytest.mark.skipif(not RIG.exists() or "pulse-ci" not in os.environ.get("PULSE_SERVER", ""),
                    reason="stops and restarts the audio server: only on ../shared/pulse-rig.sh")
def test_the_audio_server_dies_mid_session(serve, run_client, real_env, no_orphan_real_sox):
    client = run_client(serve(listen), env=real_env)
    client.wait_for("connected")
    try:
        subprocess.run(["bash", str(RIG), "down"], check=True, capture_output=True)
        assert client.finish() == 5
    finally:
        subprocess.run(["bash", str(RIG), "up"], check=True, capture_output=True,
                       env={**os.environ, "PULSE_RIG_SKIP_INSTALL": "1"})
    assert "the sox recorder stopped" in client.stderr or "the sox player stopped" in client.stderr
    assert "Connection terminated" in client.stderr
    assert "Traceback" not in client.stderr
