"""Measure realtime_sox.py's audio path, tuned against the article's plumbing, in one run.

    .venv/bin/python bench/run.py                (or: make bench; about 6 minutes)
    .venv/bin/python bench/run.py --three-hours  (a simulated 3-hour session; about 5 minutes)

Drives the real script against the fake Realtime server and fake sox of the tests (a player that
plays whole sox blocks at the real-time rate and logs when each 10 ms is heard), and prints one
Markdown table for the README. --quick skips the 60-minute soak.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import API_KEY, Client, SoxLog, cpu_seconds, noise  # noqa: E402
from realtime_server import FakeRealtime, Session  # noqa: E402

BPS = 48_000


def checkout(rev: str) -> Path:
    """realtime_sox.py as it was at git revision `rev`, in a file of its own: the baseline."""
    path = Path(tempfile.mkdtemp(prefix="baseline-")) / "realtime_sox.py"
    path.write_bytes(subprocess.run(["git", "show", f"{rev}:realtime_sox.py"], cwd=ROOT,
                                    check=True, capture_output=True).stdout)
    return path


def environment(work: Path, extra: dict[str, str], real_sox: bool = False
                ) -> tuple[dict[str, str], SoxLog]:
    bin_dir, log_dir = work / "bin", work / "sox"
    bin_dir.mkdir(parents=True)
    log_dir.mkdir()
    (bin_dir / "sox").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_sox.py"}" "$@"\n')
    (bin_dir / "sox").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "REALTIME_"))}
    env.update(PATH=env["PATH"] if real_sox else f"{bin_dir}{os.pathsep}{env['PATH']}",
               FAKE_SOX_DIR=str(log_dir), XDG_CACHE_HOME=str(work / "cache"),
               OPENAI_API_KEY=API_KEY, **extra)
    return env, SoxLog(log_dir)


def session_run(plumbing: str, script: Any, seconds: float, extra_env: dict[str, str] | None = None,
                real_sox: bool = False) -> tuple[FakeRealtime, SoxLog, Client, float]:
    """Run the client against `script` for `seconds`; returns the evidence and its CPU seconds."""
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    env, sox_log = environment(work, extra_env or {}, real_sox)
    server = FakeRealtime(script)
    env["OPENAI_BASE_URL"] = server.url
    client = Client(work, server, ["--plumbing", plumbing], env)
    client.started = time.monotonic()  # type: ignore[attr-defined]
    time.sleep(seconds)
    cpu = cpu_seconds(client.process.pid)
    client.rss = rss_kib(client.process.pid)  # type: ignore[attr-defined]
    client.process.send_signal(signal.SIGINT)
    client.finish()
    server.stop()
    return server, sox_log, client, cpu


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


# --- capture ---------------------------------------------------------------------------------------

def capture(plumbing: str) -> dict[str, str]:
    work_mic = Path(tempfile.mkdtemp()) / "mic.raw"
    work_mic.write_bytes(noise(6.0, seed=21))

    async def script(session: Session) -> None:
        await session.handshake()
        await asyncio.sleep(3600)

    server, sox_log, client, _ = session_run(plumbing, script, 5.0, {"FAKE_SOX_MIC": str(work_mic)})
    appends = [(t, base64.b64decode(e["audio"])) for t, e in server.received
               if e["type"] == "input_audio_buffer.append"]
    (recorder,) = sox_log.runs("recorder")
    stream = recorder["raw"]
    writes = recorder["times"]  # (moment, offset, length)
    offset = stream.find(appends[0][1])
    delays, ages = [], []
    for arrived, audio in appends:
        last_byte = offset + len(audio) - 1
        written, write_offset, write_length = next(w for w in writes
                                                   if w[1] <= last_byte < w[1] + w[2])
        delays.append((arrived - written) * 1000)
        # The append's first sample was spoken when the recorder's write was that much short.
        spoken = written - (write_offset + write_length - offset) / BPS
        ages.append((arrived - spoken) * 1000)
        offset += len(audio)
    sizes = [len(a) * 1000 / BPS for _, a in appends]
    first = (appends[0][0] - client.started) * 1000  # type: ignore[attr-defined]
    return {"append": f"{statistics.median(sizes):.0f} ms (max {max(sizes):.0f})",
            "capture": f"{pct(delays, .5):.1f} / {pct(delays, .95):.1f} ms",
            "age": f"{pct(ages, .5):.0f} / {pct(ages, .95):.0f} ms",
            "first": f"{first:.0f} ms"}


# --- playback --------------------------------------------------------------------------------------

def playback(plumbing: str, speed: float, first_ms: int | None = None,
             chunk_ms: int = 100) -> dict[str, str]:
    reply = noise(3.03, seed=31)
    sent: list[tuple[float, int]] = []  # (moment a delta left the server, its offset in the reply)

    async def script(session: Session) -> None:
        await session.handshake()
        await asyncio.sleep(0.5)
        original = session.send

        async def timed_send(type: str, **fields: Any) -> None:
            if type == "response.output_audio.delta":
                sent.append((time.monotonic(), sum(len(base64.b64decode(d)) for d in delivered)))
                delivered.append(fields["delta"])
            await original(type, **fields)

        delivered: list[str] = []
        session.send = timed_send  # type: ignore[method-assign]
        await session.reply(reply, "a reply to measure", speed=speed, chunk_ms=chunk_ms,
                            first_ms=first_ms)
        await asyncio.sleep(3600)

    _, sox_log, _, _ = session_run(plumbing, script, 0.5 + 3.03 / speed + 3.03 + 1.5)
    heard = sox_log.heard_times()
    stream = sox_log.heard()
    start = stream.find(reply[:4800])
    consumed = [t for t, _ in heard]
    # Slices are 480 bytes; find when each delta's first byte was heard.
    latency = []
    for moment, offset in sent:
        index = (start + offset) // 480
        if start >= 0 and index < len(consumed):
            latency.append((consumed[index] - moment) * 1000)
    got = max(len(stream[start:].rstrip(b"\0")), 0) if start >= 0 else 0
    # When each 10 ms of the reply was heard, found in the stream one after the other: silence
    # padded in between (a starved player) is a gap too, not heard audio.
    reply_slices, position = [], max(start, 0)
    for offset in range(0, len(reply) - 479, 480) if start >= 0 else []:
        found = stream.find(reply[offset:offset + 480], position)
        if found < 0 or found // 480 >= len(consumed):
            break
        reply_slices.append(consumed[found // 480])
        position = found + 480
    gaps = [(b - a) * 1000 - 10 for a, b in zip(reply_slices, reply_slices[1:], strict=False)]
    return {"heard": f"{min(got, len(reply)) * 100 / len(reply):.1f} %",
            "gap": f"{max(gaps, default=0):.0f} ms",
            "latency": f"{pct(latency, .5):.0f} / {pct(latency, .95):.0f} ms",
            "start": f"{latency[0]:.0f} ms" if latency else "-"}


# --- barge-in --------------------------------------------------------------------------------------

def barge_in(plumbing: str) -> dict[str, str]:
    reply = noise(5.0, seed=41)
    moments: dict[str, float] = {}

    async def script(session: Session) -> None:
        await session.handshake()
        await session.reply(reply, "a long answer that will be interrupted", speed=10)
        await asyncio.sleep(1.5)
        moments["speech"] = time.monotonic()
        await session.send("input_audio_buffer.speech_started", audio_start_ms=1000, item_id="u")
        await asyncio.sleep(3600)

    server, sox_log, _, _ = session_run(plumbing, script, 5.0)
    leftover = sum(n for t, n in sox_log.heard_times() if t > moments["speech"]) * 1000 / BPS
    heard_before = sum(n for t, n in sox_log.heard_times() if t <= moments["speech"]) * 1000 / BPS
    truncates = server.events("conversation.item.truncate")
    error = (f"{abs(truncates[0]['audio_end_ms'] - heard_before):.0f} ms" if truncates
             else f"no truncate: model assumes all {len(reply) * 1000 // BPS} ms heard")
    return {"leftover": f"{leftover:.0f} ms", "truncation": error}


# --- the real sox on PulseAudio (../shared/pulse-rig.sh) -------------------------------------------

def real_sox(plumbing: str) -> dict[str, str]:
    """Delta → sound and barge-in leftover, heard on the default sink's monitor."""
    from real_audio import Monitor, loud_windows, speech, why_no_real_audio
    if why_no_real_audio():
        return {}
    voice = speech("This is a long answer that goes on and on, so that there is plenty of time "
                   "to interrupt it somewhere in the middle.", Path(tempfile.mkdtemp()) / "v.raw")
    moments: dict[str, float] = {}

    async def script(session: Session) -> None:
        await session.handshake()
        await asyncio.sleep(0.8)
        moments["delta"] = time.monotonic()
        await session.reply(voice, "a long answer", speed=10)
        await asyncio.sleep(1.5)
        moments["speech"] = time.monotonic()
        await session.send("input_audio_buffer.speech_started", audio_start_ms=0, item_id="u")
        await asyncio.sleep(3600)

    monitor = Monitor()
    try:
        session_run(plumbing, script, 4.5, real_sox=True)
    finally:
        monitor.stop()
    loud = [t for t in monitor.loud_moments() if t > moments["delta"]]
    onset = (loud[0] - moments["delta"] - loud_windows(voice)[0] * 0.010) * 1000
    leftover = (max(loud) - moments["speech"]) * 1000
    return {"real onset": f"{onset:.0f} ms", "real leftover": f"{max(leftover, 0):.0f} ms"}


# --- CPU and memory --------------------------------------------------------------------------------

def full_duplex_cpu(plumbing: str, seconds: float = 30.0) -> dict[str, str]:
    mic = Path(tempfile.mkdtemp()) / "mic.raw"
    mic.write_bytes(noise(seconds + 5, seed=51))

    async def script(session: Session) -> None:
        await session.handshake()
        while True:  # the assistant talks all the time, delivered at real-time speed
            await session.reply(noise(5.0, seed=52), "talking", speed=1.0)

    _, _, _, cpu = session_run(plumbing, script, seconds, {"FAKE_SOX_MIC": str(mic)})
    return {"cpu": f"{cpu / seconds * 100:.2f} % of a core"}


def soak(plumbing: str, speed: float = 40.0, minutes: float = 60.0) -> dict[str, str]:
    """A simulated hour: the microphone runs `speed` times real time; a short reply every 2 s."""
    seconds = minutes * 60 / speed
    samples: list[int] = []

    async def script(session: Session) -> None:
        await session.handshake()
        n = 0
        while True:
            n += 1
            await session.send("conversation.item.input_audio_transcription.completed",
                               item_id=f"u{n}", content_index=0, transcript=f"question {n}")
            await session.reply(noise(0.5, seed=n % 7), f"answer number {n}", speed=10)
            await asyncio.sleep(1.5)

    work_env = {"FAKE_SOX_SPEED": str(speed)}

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    env, _ = environment(work, work_env)
    server = FakeRealtime(script)
    env["OPENAI_BASE_URL"] = server.url
    client = Client(work, server, ["--plumbing", plumbing], env)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(seconds / 30)
        samples.append(rss_kib(client.process.pid))
    client.process.send_signal(signal.SIGINT)
    client.finish()
    server.stop()
    mic_bytes = sum(len(e["audio"]) * 3 // 4 for e in server.events("input_audio_buffer.append"))
    warm = samples[2]  # after start-up (imports, first replies)
    return {"rss": f"{samples[-1] / 1024:.1f} MB, growth {(samples[-1] - warm) / 1024:+.2f} MB",
            "simulated": f"{mic_bytes / BPS / 60:.0f} min of mic in {seconds:.0f} s"}


def three_hours(speed: float = 40.0) -> dict[str, str]:
    """A simulated 3-hour session: each session expires after a simulated hour (90 s here), so
    the script rolls over three times; every turn must reach the --log and memory stay flat."""
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    env, _ = environment(work, {"FAKE_SOX_SPEED": str(speed)})
    hour = 3600 / speed
    sent_turns = [0]

    async def script(session: Session) -> None:
        await session.handshake(expires_in=int(hour + 60))  # the rollover margin is 60 s
        while True:
            sent_turns[0] += 1
            n = sent_turns[0]
            await session.send("input_audio_buffer.committed", item_id=f"u{n}",
                               previous_item_id=None)
            await session.send("conversation.item.input_audio_transcription.completed",
                               item_id=f"u{n}", content_index=0, transcript=f"question {n}")
            await session.reply(noise(0.5, seed=n % 7), f"answer number {n}", speed=10)
            await asyncio.sleep(1.5)

    server = FakeRealtime(script)
    env["OPENAI_BASE_URL"] = server.url
    log = work / "talk.jsonl"
    client = Client(work, server, ["--log", str(log)], env)
    samples = []
    started = time.monotonic()
    while time.monotonic() - started < 3 * hour + 20:
        time.sleep(5)
        samples.append(rss_kib(client.process.pid))
    client.process.send_signal(signal.SIGINT)
    client.finish()
    server.stop()
    lines = log.read_text().splitlines()
    answers = sum('"speaker": "assistant"' in line for line in lines)
    questions = sum('"speaker": "user"' in line for line in lines)
    sessions = len(server.sessions_received)
    growth = (max(samples[3:]) - samples[3]) / 1024
    return {"3h": f"{sessions - 1} rollovers, {questions}/{sent_turns[0]} questions and "
                  f"{answers} answers logged, RSS {samples[-1] / 1024:.1f} MB, "
                  f"growth {growth:+.2f} MB ({3 * hour + 20:.0f} s)"}


def main() -> None:
    if "--three-hours" in sys.argv:
        print(three_hours())
        return
    quick = "--quick" in sys.argv
    results: dict[str, dict[str, str]] = {}
    for plumbing in ("tuned", "article"):
        r: dict[str, str] = {}
        r.update(capture(plumbing))
        for speed, tag in ((10.0, "10x"), (1.0, "1x")):
            for key, value in playback(plumbing, speed).items():
                r[f"{key} {tag}"] = value
        # As recorded GA sessions deliver: ~100 ms first, then larger deltas, faster than real time.
        for key, value in playback(plumbing, 3.0, first_ms=100, chunk_ms=300).items():
            r[f"{key} api"] = value
        r.update(barge_in(plumbing))
        r.update(real_sox(plumbing))
        r.update(full_duplex_cpu(plumbing))
        if not quick:
            r.update(soak(plumbing))
        results[plumbing] = r
        print(f"{plumbing}: {r}", file=sys.stderr)
    labels = [
        ("append", "microphone audio per append (p50, max)"),
        ("capture", "capture latency: recorder write → append on the wire (p50 / p95)"),
        ("age", "age of an append's oldest sample on the wire, sox's holding included (p50 / p95)"),
        ("first", "start → first append on the wire"),
        ("heard 10x", "reply heard, delivered at 10x (3.03 s reply)"),
        ("gap 10x", "longest gap inside the reply, 10x"),
        ("start 10x", "first delta received → heard, 10x"),
        ("heard 1x", "reply heard, delivered at 1x"),
        ("gap 1x", "longest gap inside the reply, 1x"),
        ("latency 1x", "playback added latency, delta received → heard, 1x (p50 / p95)"),
        ("start api", "first delta received → heard, API-like delivery (100 ms, then 300 ms "
                      "deltas at 3x), a run's first reply (later ones: bench/first_sound.py)"),
        ("gap api", "longest gap inside the reply, API-like delivery"),
        ("leftover", "barge-in leftover: audio heard after speech_started"),
        ("truncation", "truncation error: audio_end_ms against the ms actually heard"),
        ("real onset", "real sox on PulseAudio: first delta received → sound on the sink"),
        ("real leftover", "real sox on PulseAudio: sound after speech_started"),
        ("cpu", "CPU, full duplex at real time (mic + continuous reply)"),
        ("rss", "peak RSS and growth over a simulated 60-minute session"),
        ("simulated", "soak length"),
    ]
    print("| measure | tuned (default) | article plumbing |")
    print("|---|---|---|")
    for key, label in labels:
        if key in results["tuned"]:
            print(f"| {label} | {results['tuned'][key]} | {results['article'].get(key, '-')} |")


if __name__ == "__main__":
    main()
