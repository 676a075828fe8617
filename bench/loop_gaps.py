"""How long the loop can be stuck, under each fault: the keystroke echo on a real terminal.

    .venv/bin/python bench/loop_gaps.py                 (about 3 minutes)
    .venv/bin/python bench/loop_gaps.py --baseline REV  (the same faults on realtime_sox.py at REV)
    .venv/bin/python bench/loop_gaps.py --only events   (only the faults whose name holds "events")

The script runs on a pseudo-terminal, where the loop itself draws the line you type (cbreak mode,
our own line editor). A key is typed every 25 ms; its echo appears at the loop's next turn, so the
slowest echo bounds the longest time the loop did not turn (plus drawing and scheduling). Each
fault runs for 5 s against the fake Realtime server and the fake sox of the tests. Prints one
Markdown table for the README: p50, p99 and max echo in ms, this code beside the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import pty
import select
import signal
import struct
import sys
import tempfile
import termios
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import noise  # noqa: E402
from hostile import flood  # noqa: E402
from realtime_server import FakeRealtime, Session  # noqa: E402
from run import checkout, environment, pct  # noqa: E402
from test_connecting import Stub  # noqa: E402

SECONDS = 5.0
NEVER = 6.0  # s: an echo this late is reported as never


async def talk(session: Session) -> None:
    await session.handshake()
    while True:
        await session.reply(noise(3.0, seed=61), "a reply at real-time speed", speed=1.0)


async def drop_then_hold(session: Session) -> None:
    await session.handshake()
    if session.number == 1:
        await asyncio.sleep(0.5)
        await session.ws.close(1011, "internal server error")
    await asyncio.sleep(3600)


async def floods(session: Session) -> None:
    """Every 2 s, 10,000 events in one write (hostile.flood: 1 KB transcript deltas of one item,
    every tenth a response.done or a transcript of the person's)."""
    await session.handshake()
    for burst in range(100):
        await session.send("response.created", response={"id": f"r{burst}"})
        session.ws.transport.write(flood(burst, mixed=True, response=f"r{burst}"))
        await asyncio.sleep(2)


async def idle(session: Session) -> None:
    await session.handshake()
    await asyncio.sleep(3600)


def fake(script: Any, delays: list[float] | None = None) -> Callable[[], tuple[str, Any]]:
    def start() -> tuple[str, Any]:
        server = FakeRealtime(script)
        server.upgrade_delay = delays or []
        return server.url, server
    return start


def stub(behaviour: str) -> Callable[[], tuple[str, Any]]:
    def start() -> tuple[str, Any]:
        server = Stub(behaviour)
        return server.url, server
    return start


def by_name() -> Callable[[], tuple[str, Any]]:
    def start() -> tuple[str, Any]:
        server = FakeRealtime(idle)
        return server.url.replace("127.0.0.1", "localhost"), server
    return start


# fault → (server, extra environment for the fake sox)
FAULTS: dict[str, tuple[Callable[[], tuple[str, Any]], dict[str, str]]] = {
    "connected, a reply streaming at 1x": (fake(talk), {}),
    "TCP connect never answered": (stub("tcp never answers"), {}),
    "TLS handshake never finished": (stub("tls never finishes"), {}),
    "WebSocket upgrade never answered": (stub("upgrade never answered"), {}),
    "upgrade answered a byte every 0.5 s": (stub("upgrade dripped"), {}),
    "reconnect whose upgrade is held 3 s": (fake(drop_then_hold, [0, 3.0]), {}),
    "name looked up (localhost)": (by_name(), {}),
    "recorder dies and is restarted": (fake(idle), {"FAKE_SOX_DIE_RECORDER": "1.5",
                                                   "FAKE_SOX_DIE_ONCE": "1"}),
    "player's device vanishes (watchdog restart)": (fake(talk), {"FAKE_SOX_STALL_PLAYER": "0.5",
                                                                 "FAKE_SOX_DIE_ONCE": "1"}),
    "sox warns every 2 ms on stderr": (fake(idle), {"FAKE_SOX_WARN_FLOOD": "1"}),
    "10,000 events in one write, every 2 s": (fake(floods), {}),
}


def echo_latencies(script: Path, url: str, extra: dict[str, str]) -> list[float]:
    work = Path(tempfile.mkdtemp(prefix="loop-gaps-"))
    env, _ = environment(work, {"OPENAI_BASE_URL": url, "TERM": "xterm-256color", **extra})
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(work)
        os.execve(sys.executable, [sys.executable, str(script)], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 100, 0, 0))
    seen = bytearray()

    def read(until: float) -> None:
        while time.monotonic() < until:
            if select.select([fd], [], [], max(until - time.monotonic(), 0))[0]:
                try:
                    seen.extend(os.read(fd, 65536))
                except OSError:
                    return
                return

    read(time.monotonic() + 1.0)  # start-up
    latencies, typed, letters = [], "", "QXZJVKWY"  # seen nowhere else on the screen
    started = time.monotonic()
    while time.monotonic() - started < SECONDS:
        if len(typed) >= 30:
            os.write(fd, b"\x15")  # Ctrl-U: a fresh line
            typed = ""
            read(time.monotonic() + 0.05)
        typed += letters[len(typed) % len(letters)]
        mark, sent = len(seen), time.monotonic()
        os.write(fd, typed[-1].encode())
        while typed.encode() not in seen[mark:] and time.monotonic() - sent < NEVER:
            read(time.monotonic() + 0.005)
        latencies.append((time.monotonic() - sent) * 1000)
        if latencies[-1] >= NEVER * 1000:
            break  # the loop is not running
        time.sleep(max(sent + 0.025 - time.monotonic(), 0))
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not os.waitpid(pid, os.WNOHANG)[0]:
        read(time.monotonic() + 0.05)
    os.close(fd)
    return latencies


def measure(script: Path, only: str) -> dict[str, str]:
    rows = {}
    for fault, (start, extra) in FAULTS.items():
        if only not in fault:
            continue
        url, server = start()
        try:
            values = echo_latencies(script, url, extra)
        finally:
            (server.close if isinstance(server, Stub) else server.stop)()
        if max(values) >= NEVER * 1000:
            rows[fault] = f"no echo within {NEVER:g} s: the loop is stuck"
        else:
            rows[fault] = (f"{pct(values, 0.5):.0f} / {pct(values, 0.99):.0f} / {max(values):.0f} ms "
                           f"({len(values)} keys)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="21afa7d",
                        help="git revision of realtime_sox.py to measure beside this one")
    parser.add_argument("--only", default="", help="only the faults whose name holds this")
    args = parser.parse_args()
    baseline = checkout(args.baseline)
    now, before = measure(ROOT / "realtime_sox.py", args.only), measure(baseline, args.only)
    print(f"| keystroke echo under each fault, p50 / p99 / max | this code | {args.baseline} |")
    print("|---|---|---|")
    for fault in now:
        print(f"| {fault} | {now[fault]} | {before[fault]} |")


if __name__ == "__main__":
    main()
