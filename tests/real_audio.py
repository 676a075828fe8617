"""Helpers for tests and benchmarks that use the real sox on a real (headless) PulseAudio server:
espeak-ng speech, a timestamped recorder of the default source, and a player into the default sink.

On `../shared/pulse-rig.sh`'s rig the default source is the default sink's monitor: whatever
realtime_sox.py plays, this recorder (and realtime_sox.py's own recorder) hears.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

BPS = 48_000
WINDOW = 480  # 10 ms
PCM = ["--type", "raw", "--rate", "24000", "--encoding", "signed-integer", "--bits", "16",
       "--channels", "1"]
RIG = Path(__file__).resolve().parent.parent.parent / "shared" / "pulse-rig.sh"


def why_no_real_audio() -> str | None:
    """None when the real sox can record and play here; otherwise the reason to skip."""
    for tool in ("sox", "pactl", "espeak-ng"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (CI installs it with ../shared/pulse-rig.sh up)"
    if shutil.which("flite") is None:
        return "flite is not installed (apt-get install flite; .ci/run installs it)"
    if subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
        return "no PulseAudio server is reachable (CI starts one with ../shared/pulse-rig.sh up)"
    if "pulseaudio" not in subprocess.run(["sox", "-h"], capture_output=True, text=True).stdout:
        return "this sox has no PulseAudio driver (apt-get install libsox-fmt-pulse)"
    return None


def speech(text: str, path: Path, voice: str = "en-us") -> bytes:
    """Synthesised speech as 24 kHz raw PCM, the same bytes every run (`sox -R`): an espeak-ng
    voice ("en-gb", "en-us+f3"), or a flite one ("flite:slt", "flite:kal"): two synthesisers,
    so that no one kind of voice is what the echo guard is tuned on."""
    if voice.startswith("flite:"):
        wav = path.with_suffix(".wav")
        subprocess.run(["flite", "-voice", voice[6:], "-t", text, "-o", str(wav)], check=True)
        spoken = wav.read_bytes()
    else:
        spoken = subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "--stdout", text],
                                capture_output=True, check=True).stdout
    subprocess.run(["sox", "-R", "-t", "wav", "-", *PCM[2:], "--type", "raw", str(path)],
                   input=spoken, check=True)
    return path.read_bytes()


def rms(pcm: bytes) -> float:
    count = len(pcm) // 2
    if not count:
        return 0.0
    samples = memoryview(pcm[:count * 2]).cast("h")
    return math.sqrt(sum(s * s for s in samples) / count) / 32768


def loud_windows(pcm: bytes, threshold: float = 0.01) -> list[int]:
    """Indexes of the 10 ms windows whose level is above `threshold` (dither is ~0.00002)."""
    return [i for i in range(len(pcm) // WINDOW) if rms(pcm[i * WINDOW:(i + 1) * WINDOW]) > threshold]


class Monitor:
    """Records the default source with the real sox, noting when each read arrived, so a 10 ms
    window's sound can be placed in time (its read's arrival, less what followed it)."""

    def __init__(self) -> None:
        self.reads: list[tuple[float, bytes]] = []
        self.process = subprocess.Popen(
            ["sox", "--buffer", "960", "--default-device", "--no-show-progress", "--rate", "24000",
             "--channels", "1", "--encoding", "signed-integer", "--bits", "16", "--type", "raw",
             "-"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 5
        while not self.reads and time.monotonic() < deadline:
            time.sleep(0.01)

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while data := os.read(fd, 65536):
            self.reads.append((time.monotonic(), data))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self._thread.join(2)

    def loud_moments(self, threshold: float = 0.01) -> list[float]:
        """When each loud 10 ms window was sounding (monotonic seconds)."""
        moments = []
        carry = b""
        for arrived, data in self.reads:
            data = carry + data
            whole = len(data) // WINDOW * WINDOW
            for i in loud_windows(data[:whole], threshold):
                moments.append(arrived - (whole - i * WINDOW) / BPS)
            carry = data[whole:]
        return moments


def play_into_default_sink(path: Path) -> subprocess.Popen[bytes]:
    """The person speaking: the article's player command, fed from a file."""
    return subprocess.Popen(["sox", *PCM, "-", "--no-show-progress", "--default-device"],
                            stdin=path.open("rb"), stderr=subprocess.DEVNULL)


def sox_processes() -> list[int]:
    """Running sox processes that use the default device (ours, the script's), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if argv and argv[0].endswith(b"sox") and b"--default-device" in argv and state != "Z":
                found.append(int(entry.name))
    return found
