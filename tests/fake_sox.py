"""A stand-in for the `sox` binary, put first on PATH by the tests and the benchmarks.

It behaves as `../shared/sox-rig.md` measured the real one on Linux:
- recorder (last argument `-`): writes PCM to stdout in 8192-byte pieces (4096 with `--buffer`)
  at the real-time rate
  (the file in FAKE_SOX_MIC, then silence, like a quiet microphone);
- player (`-` before `--default-device`): plays only whole blocks of `--buffer` samples (8192 by
  default), the rest of stdin waits for more input or EOF; each 10 ms slice is "heard" at its
  real-time moment;
- failures: FAKE_SOX_FAIL_<ROLE>=message fails at once like a missing device (exit 1);
  FAKE_SOX_DIE_<ROLE>=seconds makes it lose the audio server mid-stream (exit 0, FAIL on stderr);
  FAKE_SOX_STALL_<ROLE>=seconds makes its device vanish without a word (no more bytes, no exit),
  as CoreAudio does when a Bluetooth headset goes away; FAKE_SOX_DIE_ONCE=1 lets only the first
  process of each role die or stall;
- FAKE_SOX_COREAUDIO=1: the player resamples as sox does for CoreAudio (44.1/48 kHz devices): its
  `rate` effect hands on ~830-sample blocks (34.6 ms) only when 40 ms more input has arrived (or
  at EOF), so a reply's last ~75 ms waits for input that may never come;
- FAKE_SOX_WARN_FLOOD=1: it writes CoreAudio's "buffer overrun" warning every 2 ms, and, like sox
  (which writes it while holding its audio lock), stops when nobody reads its stderr.

Everything it does is logged in FAKE_SOX_DIR: `<role>-<pid>.json` (argv, env), `<role>-<pid>.raw`
(bytes written or heard, in order) and `<role>-<pid>.times` (one "monotonic offset length" line
per write or heard slice). FAKE_SOX_SPEED > 1 runs the clock faster, for long simulated sessions.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

BYTES_PER_SECOND = 48_000
SLICE = 480  # 10 ms


def main() -> int:
    argv = sys.argv[1:]
    role = "player" if "-" in argv and argv.index("-") < len(argv) - 1 else "recorder"
    log_dir = os.environ["FAKE_SOX_DIR"]
    stem = os.path.join(log_dir, f"{role}-{os.getpid()}")
    with open(stem + ".json.tmp", "w") as f:  # renamed into place: readers never see half
        json.dump({"argv": argv, "pid": os.getpid(), **{name: os.environ.get(name) for name in (
            "PULSE_LATENCY_MSEC", "PULSE_SINK", "PULSE_SOURCE", "AUDIODEV", "AUDIODRIVER",
            "SOX_OPTS")}}, f)
    os.replace(stem + ".json.tmp", stem + ".json")
    fail = os.environ.get(f"FAKE_SOX_FAIL_{role.upper()}")
    if fail:
        sys.stderr.write("ALSA lib confmisc.c:855:(parse_card) cannot find card '0'\n"
                         f"sox FAIL sox: {fail}\n")
        return 1
    speed = float(os.environ.get("FAKE_SOX_SPEED", "1"))
    die_after = float(os.environ.get(f"FAKE_SOX_DIE_{role.upper()}", "inf"))
    stall_after = float(os.environ.get(f"FAKE_SOX_STALL_{role.upper()}", "inf"))
    if os.environ.get("FAKE_SOX_DIE_ONCE"):  # only the first process of each role dies
        marker = os.path.join(log_dir, f"{role}.died")
        if os.path.exists(marker):
            die_after = stall_after = float("inf")
        open(marker, "a").close()
    global STALL_AT, FLOOD
    STALL_AT = time.monotonic() + stall_after / speed
    FLOOD = bool(os.environ.get("FAKE_SOX_WARN_FLOOD"))
    raw = os.open(stem + ".raw", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    times = os.open(stem + ".times", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    run = record if role == "recorder" else play
    if run(argv, raw, times, speed, time.monotonic() + die_after / speed):
        direction = "reading from" if role == "recorder" else "writing to"
        sys.stderr.write(f"sox FAIL sox: `default' error {direction} pulse audio device: "
                         "Connection terminated: Operation not permitted\n")
    return 0


STALL_AT = float("inf")
FLOOD = False
_last_warning = 0.0


def device_checks() -> None:
    """A vanished device: wait forever. A warning flood: write it, blocking on a full pipe."""
    global _last_warning
    if time.monotonic() >= STALL_AT:
        while True:
            time.sleep(3600)
    if FLOOD and time.monotonic() - _last_warning >= 0.002:
        _last_warning = time.monotonic()
        os.write(2, b"sox WARN coreaudio: coreaudio: unhandled buffer overrun.  Data discarded.\n")


def log(raw: int, times: int, at: float, offset: int, data: bytes) -> None:
    os.write(raw, data)
    os.write(times, f"{at:.6f} {offset} {len(data)}\n".encode())


def record(argv: list[str], raw: int, times: int, speed: float, die_at: float) -> bool:
    """Emit the microphone file then silence, 4096 bytes at a time at the real-time rate."""
    source = os.environ.get("FAKE_SOX_MIC")
    mic = open(source, "rb").read() if source else b""
    # glibc writes the pipe in 4096-byte pieces with --buffer; the exact command reads 8192 at once.
    chunk, offset, start = 4096 if "--buffer" in argv else 8192, 0, time.monotonic()
    while True:
        due = start + (offset + chunk) / BYTES_PER_SECOND / speed
        if due >= die_at:
            time.sleep(max(die_at - time.monotonic(), 0))
            return True
        while time.monotonic() < due:
            device_checks()
            time.sleep(min(max(due - time.monotonic(), 0), 0.002 if FLOOD else 1))
        device_checks()
        data = mic[offset:offset + chunk]
        data += bytes(chunk - len(data))
        # The log holds exactly what went out: a SIGTERM between the two writes waits for both.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            os.write(1, data)
        except BrokenPipeError:
            return False
        log(raw, times, time.monotonic(), offset, data)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        offset += chunk


def play(argv: list[str], raw: int, times: int, speed: float, die_at: float) -> bool:
    """Read whole blocks from stdin and 'hear' them slice by slice at the real-time rate."""
    block = 2 * (int(argv[argv.index("--buffer") + 1]) if "--buffer" in argv else 8192)
    hold = 0  # input the player must have beyond a block before it plays that block
    if os.environ.get("FAKE_SOX_COREAUDIO"):
        block, hold = 1660, 1920
    pending, offset, clock, eof = b"", 0, 0.0, False
    while not eof:
        while len(pending) < block + hold:
            device_checks()
            wait = min(die_at, STALL_AT) - time.monotonic()
            if not select.select([0], [], [], None if wait == float("inf") else max(wait, 0))[0]:
                if time.monotonic() >= STALL_AT:
                    continue  # device_checks() waits forever
                return True  # the audio server went away while we waited for input
            data = os.read(0, block + hold - len(pending))
            if not data:
                eof = True
                break
            pending += data
        playable, pending = (pending, b"") if eof else (pending[:block], pending[block:])
        clock = max(clock, time.monotonic())  # an idle device starts again from now
        for start in range(0, len(playable), SLICE):
            if clock >= die_at:
                return True
            time.sleep(max(clock - time.monotonic(), 0))
            piece = playable[start:start + SLICE]
            log(raw, times, clock, offset, piece)
            offset += len(piece)
            clock += len(piece) / BYTES_PER_SECOND / speed
    return False


if __name__ == "__main__":
    sys.exit(main())
