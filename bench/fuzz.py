"""A hostile server, at length: many seeds of tests/hostile.py's odd events and broken frames,
and a 10 MB burst of transcript deltas, against this code and, side by side, a baseline.

    .venv/bin/python bench/fuzz.py                      (40 seeds: ~125,000 frames; ~3 minutes)
    .venv/bin/python bench/fuzz.py --seeds 5 --baseline REV

Each seed is one run of the real script against the fake API: six sessions of 500 schema-valid
events with odd values, each followed by frames that are no event and one that breaks the
protocol (the script must hang up and reconnect), then a typed line that must get its answer,
then Ctrl-C. A run passes when it exits 0 within 1 s of Ctrl-C, with no traceback, no control
character on its screen, a log of strict JSON lines, and the answer shown. Then the burst: 10,000
deltas of 1 KB for one item in one write, and a ping behind them: how long until the pong, and
the script's CPU for it. Prints one Markdown table for the README.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import Client, cpu_seconds  # noqa: E402
from hostile import BROKEN_FRAMES, SKIPPED_FRAMES, flood, storm  # noqa: E402
from realtime_server import FakeRealtime, Session  # noqa: E402
from run import checkout, environment  # noqa: E402
from test_hostile_server import UNSAFE, strict_json  # noqa: E402

ROUNDS = list(BROKEN_FRAMES.values())
EVENTS = 500


class Run(Client):
    """The script against the fake API in the suite's harness, its screen kept as it ran."""

    def __init__(self, script_path: Path, server: FakeRealtime, *args: str) -> None:
        work = Path(tempfile.mkdtemp(prefix="fuzz-"))
        env, _ = environment(work, {"OPENAI_BASE_URL": server.url, "PYTHONUNBUFFERED": "1"})
        super().__init__(work, server, list(args), env, script=script_path)
        self.work = work

    def seen(self, text: str, count: int = 1, timeout: float = 30) -> bool:
        try:
            self.wait_for(text, timeout, count)
        except AssertionError:
            return False
        return True

    def interrupt(self) -> tuple[int, float]:
        started = time.monotonic()
        self.process.send_signal(signal.SIGINT)
        try:
            code = self.finish(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.finish()
        return code, (time.monotonic() - started) * 1000


def one_seed(script_path: Path, seed: int) -> dict[str, Any]:
    server = FakeRealtime(storm(seed, EVENTS))
    run = Run(script_path, server, "--log", "talk.jsonl", "--duplex", "full")
    log = run.work / "talk.jsonl"
    result: dict[str, Any] = {"reconnected": run.seen("connected again", len(ROUNDS), 60)}
    try:
        run.type("hello after the storm")
    except BrokenPipeError:
        pass
    result["answered"] = run.seen("All is well after the storm.", timeout=20)
    result["code"], result["ctrl_c_ms"] = run.interrupt()
    shown = b"".join(run.out + run.err)
    result["traceback"] = b"Traceback" in shown or b"internal error" in shown
    result["unsafe"] = len(UNSAFE.findall(shown))
    try:
        for line in log.read_text().splitlines():
            strict_json(line)
        result["log_ok"] = True
    except (ValueError, OSError):
        result["log_ok"] = False
    result["frames"] = len(ROUNDS) * (EVENTS + len(SKIPPED_FRAMES) + 1)
    result["ok"] = (result["reconnected"] and result["answered"] and result["code"] == 0
                    and result["ctrl_c_ms"] < 1000 and not result["traceback"]
                    and not result["unsafe"] and result["log_ok"])
    server.stop()
    return result


def burst(script_path: Path) -> tuple[float, float]:
    """(ms until the pong behind 10,000 deltas of 1 KB, CPU ms of the script meanwhile)."""
    took: list[float] = []
    go = asyncio.Event()

    async def script(session: Session) -> None:
        await session.handshake()
        await session.send("response.created", response={"id": "r"})
        await go.wait()
        session.ws.transport.write(flood(0, mixed=False))
        started = time.monotonic()
        try:
            await asyncio.wait_for(await session.ws.ping(), 60)
            took.append((time.monotonic() - started) * 1000)
        except asyncio.TimeoutError:  # noqa: UP041 - not the same as TimeoutError before 3.11
            took.append(float("inf"))
        await asyncio.sleep(3600)

    server = FakeRealtime(script)
    run = Run(script_path, server, "--duplex", "full")
    run.seen("connected")
    cpu = cpu_seconds(run.process.pid)
    server._loop.call_soon_threadsafe(go.set)
    deadline = time.monotonic() + 70
    while not took and time.monotonic() < deadline:
        time.sleep(0.05)
    cpu = cpu_seconds(run.process.pid) - cpu if run.process.poll() is None else float("nan")
    run.interrupt()
    server.stop()
    return (took or [float("inf")])[0], cpu * 1000  # NaN CPU: the script had ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--baseline", default="", help="a git revision to run beside this code")
    args = parser.parse_args()
    codes = [("this code", ROOT / "realtime_sox.py")]
    if args.baseline:
        codes.append((args.baseline, checkout(args.baseline)))
    print("| code | seeds passed | frames sent | crashed (exit 70 or traceback) | no answer after "
          "| control characters shown | log not strict JSON | Ctrl-C, max | pong behind a 10 MB "
          "burst | CPU for the burst |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, path in codes:
        results = [one_seed(path, seed) for seed in range(1, args.seeds + 1)]
        pong_ms, cpu_ms = burst(path)
        print(f"| {name} | {sum(r['ok'] for r in results)} of {len(results)} "
              f"| {sum(r['frames'] for r in results):,} "
              f"| {sum(r['traceback'] or r['code'] == 70 for r in results)} "
              f"| {sum(not r['answered'] for r in results)} "
              f"| {sum(r['unsafe'] > 0 for r in results)} "
              f"| {sum(not r['log_ok'] for r in results)} "
              f"| {max(r['ctrl_c_ms'] for r in results):.0f} ms "
              f"| {pong_ms:.0f} ms | {cpu_ms:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
