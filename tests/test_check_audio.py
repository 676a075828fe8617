"""`--check-audio`: microphone level, playback, and the speaker-to-microphone echo test, with no
API key; and choosing devices other than the default."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import time

import pytest
from conftest import noise
from real_audio import loud_windows, speech, why_no_real_audio
from room import MIC_SOURCE, Path, Room

REAL = why_no_real_audio()
needs_real_audio = pytest.mark.skipif(REAL is not None, reason=f"needs real audio: {REAL}")


def test_check_audio_with_a_working_microphone(run_client, sox_log, tmp_path):
    (tmp_path / "mic.raw").write_bytes(noise(4.0, seed=2, level=6000))
    client = run_client(None, "--check-audio", env={"OPENAI_API_KEY": None, "FAKE_SOX_SPEED": "10",
                                                    "FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    assert client.finish(30) == 0, client.stderr
    assert "microphone level -" in client.stdout and "good; playing it back" in client.stdout
    assert "the microphone did not hear the speakers" in client.stdout
    recorder = sox_log.runs("recorder")[0]
    played_back = sox_log.runs("player")[0]["raw"]
    assert played_back == recorder["raw"][:len(played_back)] and len(played_back) == 3 * 48_000
    assert recorder["argv"][0] == "--default-device"  # the article's exact commands


def test_check_audio_says_when_the_microphone_is_silent(run_client):
    client = run_client(None, "--check-audio", env={"OPENAI_API_KEY": None, "FAKE_SOX_SPEED": "10"})
    assert client.finish(30) == 5
    assert "the microphone recorded silence" in client.stderr
    assert "Privacy & Security → Microphone" in client.stderr


def test_check_audio_warns_when_the_echo_is_as_loud_as_the_voice(run_client, tmp_path):
    """Every recorder hears the test tone come back at full strength: the microphone is the
    speaker (the fake sox's clock runs 10x: nothing here is timed)."""
    tone = b"".join(int(8000 * math.sin(2 * math.pi * 1000 * n / 24_000)).to_bytes(
        2, "little", signed=True) for n in range(3 * 24_000))
    (tmp_path / "mic.raw").write_bytes(bytes(48_000 // 2) + tone)
    client = run_client(None, "--check-audio", env={"OPENAI_API_KEY": None, "FAKE_SOX_SPEED": "10",
                                                    "FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    assert client.finish(30) == 0, client.stderr
    assert re.search(r"warning: your speakers reach the microphone at 0 dB after \d+ ms, about as "
                     r"loud as your voice: .* use headphones to interrupt by voice", client.stderr)


@needs_real_audio
@pytest.mark.skipif("pulse-ci" not in os.environ.get("PULSE_SERVER", ""),
                    reason="the room adds its own microphone to ../shared/pulse-rig.sh's server")
def test_check_audio_measures_a_laptops_speaker_to_microphone_path(run_client, real_env_path,
                                                                   tmp_path):
    speech("Testing, testing, one two three, can you hear me?", tmp_path / "voice.raw")
    room = Room(Path(gain_db=-14, delay_ms=35))
    try:
        client = run_client(None, "--check-audio", env={
            "OPENAI_API_KEY": None, "PATH": real_env_path, "PULSE_SOURCE": MIC_SOURCE})
        time.sleep(0.4)
        room.say((tmp_path / "voice.raw").read_bytes())
        assert client.finish(30) == 0, client.stderr
    finally:
        room.close()
    found = re.search(r"your speakers reach the microphone at (-?\d+) dB after (\d+) ms: the "
                      r"echo guard will hold it back; you can still interrupt by speaking up",
                      client.stdout)
    # A steady tone gathers the room's tail too (-3 dB of the direct path's energy): -12 dB.
    assert found and -15 <= int(found[1]) <= -10, client.stdout + client.stderr
    assert 35 < int(found[2]) < 300


@needs_real_audio
def test_an_unknown_input_device_fails_with_sox_reason(serve, run_client, real_env_path):
    async def listen(session):
        await session.handshake()
        await asyncio.sleep(3600)

    client = run_client(serve(listen), "--input-device", "no_such_microphone",
                        env={"PATH": real_env_path})
    assert client.finish(15) == 2
    assert "the sox recorder stopped" in client.stderr and "No such entity" in client.stderr
    assert "no microphone is named 'no_such_microphone'; see --list-devices" in client.stderr


@needs_real_audio
def test_list_devices_names_what_input_and_output_device_take(run_client, real_env_path):
    client = run_client(None, "--list-devices", env={"OPENAI_API_KEY": None, "PATH": real_env_path})
    assert client.finish(15) == 0, client.stderr
    sources, sinks = client.stdout.split("speakers (sinks), for --output-device:")
    assert "microphones (sources), for --input-device:" in sources
    assert "  ci_sink.monitor" in sources.splitlines() and "  ci_sink" in sinks.splitlines()


@needs_real_audio
@pytest.mark.skipif("pulse-ci" not in os.environ.get("PULSE_SERVER", ""),
                    reason="needs the rig's second sink, ci_keeper")
def test_output_device_moves_the_sound_off_the_default_speaker(serve, run_client, real_env_path,
                                                              tmp_path):
    voice = speech("Where does this sound go?", tmp_path / "v.raw")
    started: dict[str, float] = {}

    async def script(session):
        await session.handshake()
        await asyncio.sleep(0.5)
        started["reply"] = time.monotonic()
        await session.reply(voice, "elsewhere", speed=10)
        await asyncio.sleep(3600)

    server = serve(script)
    # ci_keeper is another sink on the rig; the default source hears only the default sink.
    client = run_client(server, "--output-device", "ci_keeper", env={"PATH": real_env_path})
    client.wait_for("tokens in")
    time.sleep(len(voice) / 48_000 + 0.8)
    assert client.stop() == 0
    after = b"".join(base64.b64decode(e["audio"]) for t, e in server.received
                     if e["type"] == "input_audio_buffer.append" and t > started["reply"])
    assert after and loud_windows(after) == []


@pytest.fixture
def real_env_path():
    return os.environ["PATH"]
