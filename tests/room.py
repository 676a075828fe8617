"""A room for the real-audio rig: laptop speakers that leak into the laptop's microphone.

On `../shared/pulse-rig.sh`'s server, the script's player plays into the default sink, ci_sink.
`Room` reads that sink's monitor (what the speaker sounds like), sends it through a
speaker-to-microphone path (a direct path with gain and delay, a small-speaker lowpass, a diffuse
reverb tail, a noise floor), mixes in the person's voice (`say`), and plays the result into a sink
of its own, room_mic. The script records room_mic.monitor (PULSE_SOURCE, which libpulse reads for
record streams only) with the article's exact `--default-device` command.

The path is a convolution (numpy, overlap-add in 20 ms blocks). What goes through PulseAudio on
the way (the monitor read, the mic write) adds ~20-40 ms of device latency on top of `delay_ms`,
as a real laptop's audio stack does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

RATE = 24_000
BLOCK = 480  # 20 ms
PCM = ["--raw", "--format=s16le", f"--rate={RATE}", "--channels=1"]
MIC_SINK = "room_mic"
MIC_SOURCE = MIC_SINK + ".monitor"


@dataclasses.dataclass(frozen=True)
class Path:
    """The speaker-to-microphone path of one room."""
    gain_db: float = -12.0  # the direct path
    delay_ms: float = 20.0  # the direct path's, on top of the devices' own latency
    lowpass_hz: float = 3500.0  # a laptop speaker has little top end
    rt60_ms: float = 300.0  # the diffuse tail: how long it takes to fall 60 dB
    tail_db: float = -3.0  # the tail's energy against the direct path's
    noise_dbfs: float = -60.0  # the room's and the microphone's own hiss
    wakes_ms: float = 0.0  # the microphone gives exact zeros until then (a Mac's waking up)
    echo: bool = True  # False: headphones (the speaker does not reach the microphone)

    def impulse_response(self, seed: int = 7) -> np.ndarray:
        """Direct path (a windowed-sinc lowpass at `delay_ms`) plus exponentially decaying noise."""
        rng = np.random.default_rng(seed)
        delay = int(self.delay_ms * RATE / 1000)
        taps = np.arange(-32, 33)
        cutoff = self.lowpass_hz / RATE
        lowpass = 2 * cutoff * np.sinc(2 * cutoff * taps) * np.hamming(len(taps))
        lowpass /= lowpass.sum()
        length = delay + 64 + int(self.rt60_ms * RATE / 1000)
        response = np.zeros(length)
        response[delay:delay + len(taps)] = lowpass * 10 ** (self.gain_db / 20)
        start = delay + 48  # the first reflections come ~2 ms after the direct sound
        t = np.arange(length - start) / RATE
        tail = rng.standard_normal(len(t)) * np.exp(-6.908 * t / (self.rt60_ms / 1000))
        tail = np.convolve(tail, lowpass, mode="same")  # the tail is the same speaker's sound
        direct_energy = float(np.sum(response ** 2))
        tail *= np.sqrt(direct_energy * 10 ** (self.tail_db / 10) / float(np.sum(tail ** 2)))
        response[start:] += tail
        return response


class Room:
    """Start it before the script; `say()` the person's words; `close()` removes its devices.

    After `close()` it tells what a person in the room would have noticed: when the speaker
    sounded (`speaker`, one (time, rms) per 20 ms block as read from the sink's monitor) and when
    each of the person's sentences started (`said`, the time its first loud block went to the
    microphone). The room runs in a process of its own, so that nothing the test does in the
    meantime (a fake server validating a burst of events) can hold up the sound: a stall would
    make PulseAudio delay the echo for good, which no real room does."""

    def __init__(self, path: Path, gate: str = "") -> None:
        """`gate`: a file to note in when the energy gate (see Acoustics) opens, "" for none."""
        self.process = subprocess.Popen([sys.executable, __file__, json.dumps(
            dataclasses.asdict(path)), gate], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the room did not start (is ../shared/pulse-rig.sh up?)")
        self.speaker: list[tuple[float, float]] = []
        self.said: list[float] = []
        self.words = tempfile.mkdtemp(prefix="room-")

    def say(self, pcm: bytes) -> None:
        """The person speaks these words (24 kHz PCM) into the microphone, from the next block."""
        spoken = os.path.join(self.words, f"{time.monotonic_ns()}.raw")
        with open(spoken, "wb") as file:
            file.write(pcm)
        assert self.process.stdin is not None
        self.process.stdin.write(f"say {spoken}\n")
        self.process.stdin.flush()

    def change(self, path: Path) -> None:
        """The path changes from the next block: speakers turned up or down, headphones plugged
        in or out. What was already on its way through the room still rings out."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"change {json.dumps(dataclasses.asdict(path))}\n")
        self.process.stdin.flush()

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write("close\n")
            self.process.stdin.flush()
            noticed = json.loads(self.process.stdout.read() or "{}")
        except (BrokenPipeError, ValueError):
            noticed = {}
        self.process.wait(10)
        self.speaker = [tuple(pair) for pair in noticed.get("speaker", [])]  # type: ignore[misc]
        self.said = noticed.get("said", [])
        shutil.rmtree(self.words, ignore_errors=True)


class Acoustics:
    """The room itself, in its process: the speaker's sound through the path into the microphone.

    With a `gate` file, the microphone goes through the openai-agents demo's energy gate before
    it reaches the script (a comparison for bench/echo.py, not the script's own): while the
    assistant plays, a block passes only when its RMS >= max(0.015, 0.6 x the playback's smoothed
    RMS + 0.002), others are silence; the moment one passes, the gate notes it in the file (the
    trial then stops the playback, as the demo does)."""

    def __init__(self, path: Path, gate: str = "") -> None:
        self.path = path
        self.gate = gate
        self.playback = 0.0  # the playback's smoothed RMS, for the gate
        self.modules = [load_module("module-null-sink", f"sink_name={MIC_SINK}", "format=s16le",
                                    f"rate={RATE}", "channels=1",
                                    "sink_properties=device.description=Room_Microphone"),
                        load_module("module-loopback", f"source={MIC_SOURCE}", "sink=ci_keeper",
                                    "latency_msec=10", "source_dont_move=true",
                                    "sink_dont_move=true")]
        pactl("suspend-sink", MIC_SINK, "1")  # re-arm its render timer with the keeper's 10 ms
        pactl("suspend-sink", MIC_SINK, "0")
        self.size = 1 << int(np.ceil(np.log2(int(1.2 * RATE) + BLOCK)))  # any path fits
        self.response = np.fft.rfft(path.impulse_response(), self.size)
        self.overlap = np.zeros(self.size)
        self.rng = np.random.default_rng(11)
        self.noise = 32768 * 10 ** (path.noise_dbfs / 20)
        self.voice: list[np.ndarray] = []  # the person's words still to be said
        self.speaker: list[tuple[float, float]] = []
        self.said: list[float] = []
        self.onset_pending = True  # the sentence being said has not yet been loud
        self.lock = threading.Lock()
        self.listen = subprocess.Popen(["parec", "--device=ci_sink.monitor", *PCM,
                                        "--latency-msec=10"], stdout=subprocess.PIPE)
        self.mouth = subprocess.Popen(["pacat", "--playback", f"--device={MIC_SINK}", *PCM,
                                       "--latency-msec=40"], stdin=subprocess.PIPE)
        self.running = True
        self.awake_at = time.monotonic() + path.wakes_ms / 1000
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        time.sleep(0.3)  # the first blocks are through: the microphone carries the room

    def say(self, pcm: bytes) -> None:
        """The person speaks these words (24 kHz PCM) into the microphone, from the next block."""
        with self.lock:
            self.voice.append(np.frombuffer(pcm, dtype="<i2").astype(np.float64))

    def change(self, path: Path) -> None:
        with self.lock:
            self.path, self.response = path, np.fft.rfft(path.impulse_response(), self.size)

    def _run(self) -> None:
        assert self.listen.stdout is not None and self.mouth.stdin is not None
        fd, held = self.listen.stdout.fileno(), b""
        while self.running:
            data = os.read(fd, 65536)
            if not data:
                return
            now = time.monotonic()
            held += data
            blocks, held = held[:len(held) // (2 * BLOCK) * 2 * BLOCK], held[len(held) // (
                2 * BLOCK) * 2 * BLOCK:]
            out = bytearray()
            count = len(blocks) // (2 * BLOCK)
            for n in range(count):
                played = np.frombuffer(blocks[n * 2 * BLOCK:(n + 1) * 2 * BLOCK], dtype="<i2")
                at = now - (count - n) * BLOCK / RATE
                self.speaker.append((at, float(np.sqrt(np.mean((played / 32768.0) ** 2)))))
                out += self._microphone(played.astype(np.float64), at)
            try:
                self.mouth.stdin.write(bytes(out))
                self.mouth.stdin.flush()
            except (BrokenPipeError, ValueError):
                return

    def _microphone(self, played: np.ndarray, at: float) -> bytes:
        mic = self.rng.standard_normal(BLOCK) * self.noise
        with self.lock:
            if self.path.echo:
                self.overlap += np.fft.irfft(np.fft.rfft(played, self.size) * self.response,
                                             self.size)
            mic += self.overlap[:BLOCK]
            self.overlap = np.concatenate([self.overlap[BLOCK:], np.zeros(BLOCK)])
            if self.voice:
                piece, self.voice[0] = self.voice[0][:BLOCK], self.voice[0][BLOCK:]
                if self.onset_pending and np.sqrt(np.mean((piece / 32768) ** 2)) > 0.01:
                    self.said.append(at)
                    self.onset_pending = False
                mic[:len(piece)] += piece
                if not len(self.voice[0]):
                    self.voice.pop(0)
                    self.onset_pending = True
        if self.gate:
            mic = self._gated(mic, float(np.sqrt(np.mean((played / 32768) ** 2))), at)
        if at < self.awake_at:
            mic[:] = 0.0
        return np.clip(mic, -32768, 32767).astype("<i2").tobytes()

    def _gated(self, mic: np.ndarray, played_rms: float, at: float) -> np.ndarray:
        self.playback = 0.8 * self.playback + 0.2 * played_rms
        if self.playback < 0.001:  # the assistant is not playing: everything passes
            return mic
        if float(np.sqrt(np.mean((mic / 32768) ** 2))) >= max(0.015, 0.6 * self.playback + 0.002):
            with open(self.gate, "a") as notes:
                notes.write(f"{at}\n")
            return mic
        return np.zeros(BLOCK)

    def close(self) -> None:
        self.running = False
        for process in (self.listen, self.mouth):
            process.kill()
            process.wait()
        self.thread.join(2)
        for module in reversed(self.modules):
            pactl("unload-module", module)


def pactl(*args: str) -> str:
    return subprocess.run(["pactl", *args], capture_output=True, text=True, check=True).stdout


def load_module(*args: str) -> str:
    return pactl("load-module", *args).strip()


def serve(path: Path, gate: str) -> None:
    """The room's process: commands on stdin ("say FILE", "change PATH", "close"), what it
    noticed on stdout."""
    room = Acoustics(path, gate)
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "change":
            room.change(Path(**json.loads(argument)))
            continue
        if command != "say":
            break
        with open(argument, "rb") as file:
            room.say(file.read())
    room.close()
    json.dump({"speaker": room.speaker, "said": room.said}, sys.stdout)


if __name__ == "__main__":
    serve(Path(**json.loads(sys.argv[1])), sys.argv[2] if len(sys.argv) > 2 else "")
