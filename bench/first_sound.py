"""How soon a reply is heard, and whether it then stutters: this code beside a baseline, one run.

    .venv/bin/python bench/first_sound.py                 (about 1 minute)
    .venv/bin/python bench/first_sound.py --baseline REV  (default: 5889d05, a fixed 40 ms cushion)

Each run is one session with three replies of 1.5 s, delivered the same way, each starting from
silence: at 10x, at exactly real time (100 ms deltas), and as recorded GA sessions deliver them
(a 100 ms first delta, then 300 ms deltas at 3x). Against the fake Realtime server and the fake
sox of the tests (a player that plays whole sox blocks at the real-time rate and logs when each
10 ms is heard). Prints one Markdown table for the README: the first reply's first delta → heard,
the later replies' (median), and the longest gap inside any reply.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402
from conftest import Client, noise  # noqa: E402
from realtime_server import FakeRealtime, Session  # noqa: E402
from run import checkout, environment  # noqa: E402

REPLY_SECONDS = 1.5
REPLIES = 3
DELIVERIES = {"10x": (100, 100, 10.0), "real time": (100, 100, 1.0), "as the API sends": (100, 300, 3.0)}


def heard_at(heard_times: list[tuple[float, int]], position: int) -> float | None:
    for moment, length in heard_times:
        if position < length:
            return moment
        position -= length
    return None


def measure(script_path: Path, first_ms: int, chunk_ms: int, speed: float) -> tuple[float, float, float]:
    replies = [noise(REPLY_SECONDS, seed=70 + n) for n in range(REPLIES)]
    sent_at: list[float] = []

    async def script(session: Session) -> None:
        await session.handshake()
        await asyncio.sleep(0.5)
        for reply in replies:
            sent_at.append(time.monotonic())
            await session.reply(reply, "a reply", speed=speed, chunk_ms=chunk_ms, first_ms=first_ms)
            await asyncio.sleep(REPLY_SECONDS + 0.5)  # heard to its end: the next starts from silence
        await asyncio.sleep(3600)

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    env, sox_log = environment(work, {})
    server = FakeRealtime(script)
    env["OPENAI_BASE_URL"] = server.url
    conftest.SCRIPT = script_path  # the Client runs this file
    client = Client(work, server, [], env)
    client.wait_for("tokens in", timeout=30, count=REPLIES)
    time.sleep(REPLY_SECONDS + 0.5)
    client.stop()
    server.stop()
    heard, times = sox_log.heard(), sox_log.heard_times()
    waits, gaps = [], [0.0]
    for reply, moment in zip(replies, sent_at, strict=True):
        start = heard.find(reply[:4800])
        slices = [heard_at(times, start + offset) for offset in range(0, len(reply), 480)]
        if start < 0 or None in slices:
            raise SystemExit(f"{script_path}: a reply was not heard in full")
        moments = [moment_ for moment_ in slices if moment_ is not None]
        waits.append((moments[0] - moment) * 1000)
        gaps += [(b - a) * 1000 - 10 for a, b in zip(moments, moments[1:], strict=False)]
    return waits[0], statistics.median(waits[1:]), max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="5889d05", help="a commit of realtime_sox.py to compare")
    args = parser.parse_args()
    baseline = checkout(args.baseline)
    print("| delivery | first reply: delta → heard | later replies | longest gap | "
          f"{args.baseline}: first | later | gap |")
    print("|---|---|---|---|---|---|---|")
    for name, delivery in DELIVERIES.items():
        now = measure(ROOT / "realtime_sox.py", *delivery)
        before = measure(baseline, *delivery)
        cells = [f"{value:.0f} ms" for value in (*now, *before)]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
