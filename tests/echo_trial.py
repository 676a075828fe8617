"""One trial of the echo guard in a room (tests/room.py), shared by the tests and bench/echo.py.

The real script runs with the real sox against the fake Realtime server, whose VAD hears the
appended audio as the API's would. The assistant speaks a long reply (a British voice); the person
(an American voice) stays silent, or speaks over it `person_at` seconds after it started. What is
measured is what a person, or the bill, would notice:

- self-triggered turns: the server's VAD started a turn while the person was silent;
- local stops: the script stopped the assistant for a voice it heard (false ones, if the person
  was silent);
- stop: from the person's first word to the speaker's last sound;
- speech_started: from the person's first word to the server's VAD hearing it;
- onset missing: how much of the person's first word the server never received;
- answered: the reply to what the person said came and was shown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path as FilePath
from typing import Any

import numpy as np
from conftest import API_KEY, SCRIPT, Client, cpu_seconds
from real_audio import speech
from realtime_server import FakeRealtime, Session
from room import MIC_SOURCE, Path, Room, load_module, pactl
from websockets.exceptions import ConnectionClosed

ASSISTANT = ("Here is the whole story, as you asked. The lighthouse keeper climbed the stairs every "
             "evening at dusk, one hundred and twelve of them, counting each one under his breath. "
             "At the top he trimmed the wick, polished the great lens until it shone, and watched "
             "the ships come in from the grey water. Some nights the fog rolled in so thick that "
             "he could not see his own hands, and then he rang the bell every half minute until "
             "morning. He never missed a night in forty years, and the town still tells the story "
             "of the winter storm when he kept the light burning for three days without sleep.")
PERSON = "Wait, what's the weather?"
ANSWER = "Sure, the weather is sunny today."
QUESTION = "Tell me the story of the lighthouse keeper, please."  # about 3 s


@dataclasses.dataclass
class Result:
    self_triggered: int = 0
    local_stops: int = 0
    stop_ms: float | None = None
    detect_ms: float | None = None  # from the first word to the truncate reaching the server
    speech_started_ms: float | None = None
    onset_missing_ms: float | None = None
    answered: bool = False
    stops_before_answer: int = 0  # local stops before the answer to the person began
    question_heard: bool = False  # the person spoke first, and the server's VAD heard it
    assistant_seconds: float = 0.0  # of the assistant's speech the room heard
    cpu_percent: float = 0.0  # of one core, the whole script, once connected
    log: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def voices(work: FilePath, pair: tuple[str, str] = ("en-gb", "en-us")
           ) -> tuple[bytes, bytes, bytes]:
    """The assistant's reply, the person's words over it, and the answer to them."""
    assistant, person = pair
    return (speech(ASSISTANT, work / "assistant.raw", assistant),
            speech(PERSON, work / "person.raw", person),
            speech(ANSWER, work / "answer.raw", assistant))


def run(duplex: str, path: Path, replies: int = 1, person_at: float | None = None,
        seconds: float | None = None, work: FilePath | None = None, question: bool = False,
        cache: FilePath | None = None, person_dbfs: float | None = None,
        pair: tuple[str, str] = ("en-gb", "en-us"), anchor: str | None = None,
        changes: tuple[tuple[float, Path], ...] = (), program: FilePath = SCRIPT,
        pause: tuple[float, float] | None = None) -> Result:
    """`replies` long replies back to back (each cut to `seconds`); the person speaks `person_at`
    s into the last one; `pause` (s into each reply, s) puts a silence in it, as a speaker
    takes a breath between two thoughts. With `question`, the conversation starts in its
    natural order: the person asks first, and the first reply answers them; without, the
    assistant greets first.
    `cache` is the script's XDG_CACHE_HOME (where it remembers the room); `person_dbfs` the
    level of the person's voice at the microphone; `pair` the assistant's and the person's
    voices (see real_audio.speech); `changes` ((s into the last reply, the new path), …) change
    the room mid-reply. `anchor` puts something else in front of the script (with --duplex full),
    for bench/echo.py: "webrtc", PulseAudio's WebRTC echo canceller between the room and the
    script; "gate", the openai-agents demo's energy gate (see room.Acoustics), whose opening
    stops the playback with Enter, as the demo's does. `program`: another realtime_sox.py (a
    baseline, for bench/echo.py --baseline)."""
    work = work or FilePath(tempfile.mkdtemp(prefix="echo-"))
    work.mkdir(parents=True, exist_ok=True)
    assistant, person, answer = voices(work, pair)
    asked = speech(QUESTION, work / "question.raw", pair[1]) if question else b""
    if person_dbfs is not None:
        person, asked = at_level(person, person_dbfs), at_level(asked, person_dbfs)
    if seconds is not None:
        assistant = assistant[:int(seconds * 48_000) // 2 * 2]
    if pause is not None:
        at = int(pause[0] * 48_000) // 2 * 2
        assistant = assistant[:at] + bytes(int(pause[1] * 48_000) // 2 * 2) + assistant[at:]
    reply_seconds = len(assistant) / 48_000
    moments: dict[str, float] = {}
    answers: list[float] = []

    async def script(session: Session) -> None:
        with contextlib.suppress(ConnectionClosed):  # the client may go mid-reply: it is done
            await talk(session)

    async def talk(session: Session) -> None:
        await session.handshake()
        await asyncio.sleep(0.5)  # the microphone is awake
        if question:
            moments["ask"] = time.monotonic()
            await asyncio.wait_for(session.turns.get(), 15)  # the question, as the VAD heard it
            moments["asked"] = time.monotonic()
        for _ in range(replies):
            moments["last reply"] = time.monotonic()
            await session.reply(assistant, ASSISTANT, speed=10)
            ends = moments["last reply"] + reply_seconds + 0.3
            while (left := ends - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(session.turns.get(), left)
                except TimeoutError:
                    break
                answers.append(time.monotonic())  # a turn: the API answers it, as it would
                await session.reply(answer, ANSWER, speed=10)
                ends = time.monotonic() + len(answer) / 48_000 + 1.0
        await asyncio.sleep(3600)

    gate = work / "gate.txt" if anchor == "gate" else None
    room = Room(path, str(gate or ""))
    server = FakeRealtime(script, vad=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REALTIME_"))}
    env.update(OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=server.url, PULSE_SOURCE=MIC_SOURCE,
               PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(cache or work / "cache"))
    try:  # the canceller's own gain control off: it would make the person louder than they are
        canceller = load_module(
            "module-echo-cancel", "aec_method=webrtc", f"source_master={MIC_SOURCE}",
            "sink_master=ci_sink", "source_name=aec_mic", "sink_name=aec_speaker",
            'aec_args="analog_gain_control=0 digital_gain_control=0"') \
            if anchor == "webrtc" else None
    except subprocess.CalledProcessError:
        room.close()
        server.stop()
        raise
    if canceller:
        env.update(PULSE_SOURCE="aec_mic", PULSE_SINK="aec_speaker")
    log = work / "log.jsonl"
    client = Client(work, server, ["--duplex", duplex, "--log", str(log)], env, script=program)
    result = Result()
    pressed: list[float] = []
    watching = gate is not None
    if gate is not None:
        threading.Thread(target=stop_at_the_gate, args=(gate, client, pressed, lambda: watching),
                         daemon=True).start()
    try:
        client.wait_for("connected", timeout=15)
        cpu_from, cpu_since = cpu_seconds(client.process.pid), time.monotonic()
        if question:
            while "ask" not in moments:
                time.sleep(0.01)
            room.say(asked)
        while "last reply" not in moments:
            time.sleep(0.01)
        deadline = moments["last reply"] + reply_seconds + 0.5
        for at, changed in changes:
            while time.monotonic() < moments["last reply"] + at:
                time.sleep(0.01)
            room.change(changed)
        if person_at is not None:
            while time.monotonic() < moments["last reply"] + person_at:
                time.sleep(0.01)
            room.say(person)
            deadline = time.monotonic() + 6
        while time.monotonic() < deadline and not (person_at is not None and ANSWER in client.stdout):
            time.sleep(0.1)
        time.sleep(0.3)  # the answer's first sound, which the stop must not be confused with
        result.cpu_percent = (cpu_seconds(client.process.pid) - cpu_from) / (
            time.monotonic() - cpu_since) * 100  # from the connection on: start-up is not the loop
        client.process.send_signal(signal.SIGINT)
        client.finish()
    finally:
        watching = False
        if client.process.poll() is None:
            client.process.kill()
            client.finish()
        if canceller:  # before the room's microphone, its master, which would take it along
            pactl("unload-module", canceller)
        room.close()
        server.stop()
    assert not server.problems, server.problems
    said = room.said[-1] if room.said and person_at is not None else None
    silent_until = said if said is not None else time.monotonic()
    silent_from = moments.get("asked", 0.0)  # the question's own turn is the person's
    result.question_heard = question and "asked" in moments
    result.self_triggered = len([t for t in server.speech_started
                                 if silent_from < t < silent_until])
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    result.local_stops = len([r for r in records if r.get("event") == "barge-in"]) + len(pressed)
    loud = [at for at, level in room.speaker if level > 0.01]
    result.assistant_seconds = len([at for at in loud if at < silent_until]) * 0.02
    if said is not None:
        before_answer = [at for at in loud if not answers or at < answers[0] - 0.05]
        result.stop_ms = (max(before_answer) - said) * 1000 if before_answer else None
        truncated = [t for t, e in server.received if e["type"] == "conversation.item.truncate"]
        result.detect_ms = (truncated[0] - said) * 1000 if truncated else None
        result.stops_before_answer = len([t for t in truncated if not answers or t < answers[0]])
        after = [t for t in server.speech_started if t >= said - 0.05]
        result.speech_started_ms = (after[0] - said) * 1000 if after else None
        result.onset_missing_ms = onset_missing_ms(server, person)
        result.answered = ANSWER in client.stdout
    result.log = [r for r in records if r.get("event") in ("barge-in", "truncated")]
    return result


def stop_at_the_gate(gate: FilePath, client: Client, pressed: list[float],
                     watching: Any) -> None:
    """The energy gate's way to stop the assistant: each time it opens (a line in its file) while
    the assistant plays, Enter (at most once every 0.5 s), as the demo flushes its player."""
    seen = 0
    while watching():
        opened = gate.read_text().count("\n") if gate.exists() else 0
        if opened > seen and (not pressed or time.monotonic() > pressed[-1] + 0.5):
            # The gate sits in the room, ahead of the ~100 ms the microphone's sound takes to
            # reach a client (tests/room.py's pacat, PulseAudio, sox): a client's gate is that late.
            time.sleep(0.1)
            pressed.append(time.monotonic())
            with contextlib.suppress(BrokenPipeError, ValueError):
                client.type("")
        seen = opened
        time.sleep(0.005)


def at_level(pcm: bytes, dbfs: float) -> bytes:
    """The voice scaled so that its speech (the 20 ms blocks above -50 dBFS) is at `dbfs` RMS."""
    voice = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    blocks = voice[:len(voice) // 480 * 480].reshape(-1, 480)
    levels = np.sqrt(np.mean((blocks / 32768) ** 2, axis=1))
    speaking = blocks[levels > 10 ** (-50 / 20)]
    now = np.sqrt(np.mean((speaking / 32768) ** 2)) if len(speaking) else 1.0
    scaled = voice * 10 ** (dbfs / 20) / now
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def onset_missing_ms(server: FakeRealtime, person: bytes) -> float | None:
    """How much of the person's first word the server did not get: the appended stream is found
    where it carries the person's sentence (cross-correlation), and the held-back frames (exact
    zeros) before the real audio resumed are what is missing."""
    sent = np.frombuffer(b"".join(base64.b64decode(e["audio"]) for _, e in server.received
                                  if e["type"] == "input_audio_buffer.append"), dtype="<i2")
    voice = np.frombuffer(person, dtype="<i2").astype(np.float64)
    if len(sent) < len(voice):
        return None
    size = 1 << int(np.ceil(np.log2(len(sent) + len(voice))))
    lags = np.fft.irfft(np.fft.rfft(sent.astype(np.float64), size)
                        * np.conj(np.fft.rfft(voice, size)), size)[:len(sent)]
    at = int(np.argmax(lags))
    windows = voice[:len(voice) // 240 * 240].reshape(-1, 240)
    onset = at + int(np.argmax(np.sqrt(np.mean((windows / 32768) ** 2, axis=1)) > 0.01)) * 240
    start = onset
    while start > 0 and np.any(sent[max(start - 480, 0):start]):
        start -= 480  # back over real audio to where the held-back silence ends
    while start < len(sent) and not np.any(sent[start:start + 480]):
        start += 480
    return max(start - onset, 0) / 24.0


if __name__ == "__main__":  # a quick look: python tests/echo_trial.py auto -12 [person_at] [q]
    mode, gain = sys.argv[1], float(sys.argv[2])
    at = float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    outcome: Any = run(mode, Path(gain_db=gain), person_at=at, question="q" in sys.argv[4:],
                       seconds=float(os.environ.get("SECONDS_", "12")))
    print(json.dumps(dataclasses.asdict(outcome), indent=1))
