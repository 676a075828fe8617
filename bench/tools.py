"""The script's own overhead per tool call, beside the floor of the pipes alone, in one run.

    .venv/bin/python bench/tools.py   (about 10 seconds)

The fake Realtime server of the tests asks for 100 calls of a read-only tool, one after the
other. The tool is a bare MCP server (JSON-RPC on stdin/stdout, no SDK, so that its own time is
nil) that notes when each `tools/call` arrived and when it answered.
- in: the fake server sends `response.output_item.done` with the call → the MCP server has read
  `tools/call`. This is the loopback WebSocket, the script's handling, and the pipe.
- out: the MCP server writes its answer → the fake server has the `function_call_output`.
The floor is the same MCP server called by this benchmark directly through a pipe. Prints one
Markdown table for the README (p50 / p95 / max, in ms).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import Client  # noqa: E402
from realtime_server import FakeRealtime, Session  # noqa: E402
from run import environment, pct  # noqa: E402

CALLS = 100
BARE_SERVER = r"""
import json, sys, time
log = open(sys.argv[1], "a")
for line in sys.stdin:
    arrived = time.monotonic()
    message = json.loads(line)
    if "id" not in message:
        continue
    result = {}
    if message["method"] == "initialize":
        result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                  "serverInfo": {"name": "bare", "version": "1"}}
    elif message["method"] == "tools/list":
        result = {"tools": [{"name": "echo", "description": "Say it back.",
                             "inputSchema": {"type": "object"},
                             "annotations": {"readOnlyHint": True}}]}
    elif message["method"] == "tools/call":
        result = {"content": [{"type": "text", "text": "ok"}]}
    answered = time.monotonic()
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}) + "\n")
    sys.stdout.flush()
    if message["method"] == "tools/call":
        log.write(json.dumps([arrived, answered]) + "\n")
        log.flush()
"""


def through_the_script(server_file: Path, log: Path) -> tuple[list[float], list[float]]:
    item_done: list[float] = []

    async def script(session: Session) -> None:
        original = session.send

        async def timed_send(type: str, checked: bool = True, **fields: Any) -> None:
            if type == "response.output_item.done":
                item_done.append(time.monotonic())
            await original(type, checked, **fields)
        session.send = timed_send  # type: ignore[method-assign]
        update = await session.handshake()
        while not (update["session"].get("tools")):
            update = await session.expect("session.update")
        for n in range(CALLS):
            await session.call_tool("echo", {"n": n})
            await session.expect("response.create")
        await asyncio.sleep(3600)

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    env, _ = environment(work, {})
    server = FakeRealtime(script)
    env["OPENAI_BASE_URL"] = server.url
    client = Client(work, server, ["--mcp", f"{sys.executable} {server_file} {log}"], env)
    client.wait_for("→ ok", timeout=30, count=CALLS)
    time.sleep(0.2)
    client.stop()
    server.stop()
    outputs = [moment for moment, event in server.received
               if event["type"] == "conversation.item.create"
               and event["item"]["type"] == "function_call_output"]
    times = [json.loads(line) for line in log.read_text().splitlines()]
    calls_in = [(arrived - sent) * 1000 for sent, (arrived, _) in zip(item_done, times, strict=True)]
    calls_out = [(got - answered) * 1000 for (_, answered), got in zip(times, outputs, strict=True)]
    return calls_in, calls_out


def through_a_pipe(server_file: Path, log: Path) -> tuple[list[float], list[float]]:
    process = subprocess.Popen([sys.executable, str(server_file), str(log)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    sent, got = [], []
    for n in range(CALLS):
        line = json.dumps({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                           "params": {"name": "echo", "arguments": {}}}) + "\n"
        sent.append(time.monotonic())
        os.write(process.stdin.fileno(), line.encode())
        process.stdout.readline()
        got.append(time.monotonic())
    process.stdin.close()
    process.wait()
    times = [json.loads(line) for line in log.read_text().splitlines()]
    return ([(arrived - moment) * 1000 for moment, (arrived, _) in zip(sent, times, strict=True)],
            [(back - answered) * 1000 for (_, answered), back in zip(times, got, strict=True)])


def cell(values: list[float]) -> str:
    return f"{pct(values, .5):.2f} / {pct(values, .95):.2f} / {max(values):.2f} ms"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-tools-"))
    server_file = work / "bare_server.py"
    server_file.write_text(BARE_SERVER)
    script_in, script_out = through_the_script(server_file, work / "script.jsonl")
    pipe_in, pipe_out = through_a_pipe(server_file, work / "pipe.jsonl")
    print(f"| per tool call ({CALLS} calls), p50 / p95 / max | through realtime_sox.py | the pipe "
          "alone |")
    print("|---|---|---|")
    print(f"| in: call item sent → `tools/call` read by the server | {cell(script_in)} | "
          f"{cell(pipe_in)} |")
    print(f"| out: result written → `function_call_output` at the API | {cell(script_out)} | "
          f"{cell(pipe_out)} |")


if __name__ == "__main__":
    main()
