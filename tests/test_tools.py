"""Tools by voice: real MCP servers (tests/mcp_tools.py, built with the official `mcp` package)
called by the model through the fake Realtime server's GA function-call events."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import API_KEY, BYTES_PER_SECOND, assert_no_orphans, noise
from test_resilience import replayed
from test_sox import longest_gap_ms
from test_terminal import Terminal

TOOLS = Path(__file__).parent / "mcp_tools.py"


def mcp(directory: Path, mode: str = "normal") -> str:
    return f"{sys.executable} {TOOLS} {mode} {directory}"


def mcp_processes(directory: Path) -> list[int]:
    """Live MCP test servers started for this test (found by the directory in their command)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if b"mcp_tools.py" in command and str(directory).encode() in command:
            found.append(int(proc.name))
    return found


def calls(directory: Path) -> list[str]:
    path = directory / "calls"
    return path.read_text().splitlines() if path.exists() else []


async def tools_ready(session, update, *names: str) -> list[dict]:
    """The tools declared once the MCP servers are up (the first session.update may not have them)."""
    tools = update["session"].get("tools") or []
    while not set(names) <= {tool["name"] for tool in tools}:
        tools = (await session.expect("session.update", timeout=15))["session"].get("tools") or []
    return tools


def test_a_tool_result_reaches_the_model_and_its_reply_follows_the_commentary(
        serve, run_client, sox_log, tmp_path):
    commentary, answer = noise(1.0, seed=81), noise(0.5, seed=82)
    seen: dict = {}

    async def script(session):
        update = await session.handshake()
        if session.number == 2:  # a new session is told, as text, what the tool returned
            await asyncio.sleep(3600)
        seen["tools"] = await tools_ready(session, update, "lookup_word", "delete_note")
        missing = await session.call_tool("no_such_tool", {})
        seen["missing"] = await session.tool_output(missing)
        await session.expect("response.create")
        call_id = await session.call_tool("lookup_word", {"word": "lighthouse"},
                                          commentary=commentary)
        seen["output"] = await session.tool_output(call_id)
        await session.expect("response.create")
        await session.reply(answer, "A lighthouse guides ships", speed=10)
        await asyncio.sleep(1.8)  # the words come before the sound: both play to their end
        await session.ws.close(1001, "going away")

    server = serve(script)
    client = run_client(server, "--mcp", mcp(tmp_path), "--log", str(tmp_path / "talk.jsonl"))
    client.wait_for("the model was told the last", timeout=20)
    assert client.stop() == 0
    assert mcp_processes(tmp_path) == []  # Ctrl-C: the server is gone with the script

    lookup = next(tool for tool in seen["tools"] if tool["name"] == "lookup_word")
    assert lookup["type"] == "function" and "dictionary" in lookup["description"]
    assert lookup["parameters"]["properties"]["word"]["type"] == "string"
    assert "no tool named 'no_such_tool'" in seen["missing"]
    assert "a tower with a bright light" in seen["output"]
    assert calls(tmp_path) == ["lookup_word lighthouse"]
    assert len(server.events("response.create")) == 2  # one per answered response, no more
    assert ("system", "input_text", 'Earlier, the tool call lookup_word(word="lighthouse") '
            'returned: {"result": "lighthouse: a tower with a bright light that guides ships"}'
            ) in replayed(server, 2)
    assert 'tool: lookup_word(word="lighthouse")' in client.stdout
    # The commentary played in full, and the reply after it, not over it.
    heard = sox_log.heard()
    start = heard.find(commentary)
    assert start >= 0 and heard.find(answer[:4800]) >= start + len(commentary)
    logged = [json.loads(line) for line in (tmp_path / "talk.jsonl").read_text().splitlines()]
    tool = next(r for r in logged if r.get("event") == "tool" and r["name"] == "lookup_word")
    assert tool["arguments"] == {"word": "lighthouse"} and tool["approved_by"] == "read-only"
    assert "bright light" in tool["result"]
    # The API key is for the API host only: the tool's process never had it.
    environ = next(tmp_path.glob("environ-*.json")).read_text()
    assert "OPENAI_API_KEY" not in environ and API_KEY not in environ


def test_a_slow_tool_never_stalls_the_audio_and_speech_over_it_adds_its_result_quietly(
        serve, run_client, sox_log, tmp_path):
    commentary = noise(1.4, seed=83)
    moments: dict = {}

    async def script(session):
        update = await session.handshake()
        await tools_ready(session, update, "slow_lookup")
        moments["call"] = time.monotonic()
        call_id = await session.call_tool("slow_lookup", {"word": "albatross"},
                                          commentary=commentary)
        await asyncio.sleep(1.5)  # the commentary has played; the person starts talking
        await session.send("input_audio_buffer.speech_started", audio_start_ms=3000,
                           item_id="item_person")
        moments["output"] = (await session.tool_output(call_id), time.monotonic())
        await asyncio.sleep(1.0)
        moments["end"] = time.monotonic()
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server, "--mcp", mcp(tmp_path), env={"MCP_SLOW": "2.5"})
    client.wait_for("found in the big dictionary", timeout=20)
    time.sleep(1.2)
    assert client.stop() == 0
    output, answered_at = moments["output"]
    assert "found in the big dictionary" in output
    # The person spoke over it: its result joined the conversation, and no reply of its own.
    assert server.events("response.create") == []
    # While it ran, the speaker played the commentary without a gap over 30 ms …
    start = sox_log.heard().find(commentary)
    assert start >= 0
    assert longest_gap_ms(sox_log.heard_times(), start, start + len(commentary)) <= 30
    # … and the microphone went on reaching the server at the real-time rate.
    appended = sum(len(base64.b64decode(event["audio"])) for moment, event in server.received
                   if event["type"] == "input_audio_buffer.append"
                   and moments["call"] <= moment <= answered_at)
    assert appended / BYTES_PER_SECOND >= (answered_at - moments["call"]) - 0.25


def test_enter_cancels_a_running_tool_and_a_timeout_tells_the_model(serve, run_client, tmp_path):
    outputs: list[str] = []

    async def script(session):
        update = await session.handshake()
        await tools_ready(session, update, "slow_lookup")
        first = await session.call_tool("slow_lookup", {"word": "first"})
        outputs.append(await session.tool_output(first))
        second = await session.call_tool("slow_lookup", {"word": "second"})
        outputs.append(await session.tool_output(second))
        await session.expect("response.create")
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server, "--mcp", mcp(tmp_path), "--tool-timeout", "1.5",
                        env={"MCP_SLOW": "5"})
    client.wait_for('tool: slow_lookup(word="first")', timeout=20)
    time.sleep(0.3)
    client.type("")  # Enter: the explicit interrupt
    client.wait_for("timed out", timeout=10)
    time.sleep(0.3)
    assert client.stop() == 0
    assert outputs[0] == "Cancelled: the person interrupted."
    assert "timed out: no answer within 1.5 s" in outputs[1]
    assert len(server.events("response.create")) == 1  # for the timeout only


@pytest.mark.parametrize("approve, runs", [(None, False), ("delete_note", True)])
def test_a_tool_that_changes_things_never_runs_from_a_pipe_unless_approved(
        serve, run_client, tmp_path, approve, runs):
    outputs: list[str] = []

    async def script(session):
        update = await session.handshake()
        await tools_ready(session, update, "delete_note")
        outputs.append(await session.tool_output(
            await session.call_tool("delete_note", {"name": "groceries"})))
        await asyncio.sleep(3600)

    server = serve(script)
    args = ["--mcp", mcp(tmp_path)] + (["--approve-tools", approve] if approve else [])
    client = run_client(server, *args)
    client.wait_for("→", timeout=20)
    if runs:  # the script crashes (SIGKILL): the server still ends, at the end of its input
        deadline = time.monotonic() + 10
        while not outputs and time.monotonic() < deadline:  # once the result reached the model
            time.sleep(0.05)
        client.process.send_signal(signal.SIGKILL)
        client.finish()
        deadline = time.monotonic() + 3
        while mcp_processes(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mcp_processes(tmp_path) == []
        assert "deleted the note groceries" in outputs[0]
        assert (tmp_path / "deleted-groceries").exists()
    else:
        assert client.stop(signal.SIGTERM) == 0
        assert mcp_processes(tmp_path) == []
        assert "did not allow" in outputs[0] and "no terminal" in outputs[0]
        assert not (tmp_path / "deleted-groceries").exists() and calls(tmp_path) == []


def test_on_a_terminal_a_tool_that_changes_things_asks_first(serve, base_env, sox_log, tmp_path):
    outputs: list[str] = []

    async def script(session):
        update = await session.handshake()
        await tools_ready(session, update, "delete_note")
        for name in ("groceries", "diary"):
            outputs.append(await session.tool_output(
                await session.call_tool("delete_note", {"name": name}), timeout=20))
        await asyncio.sleep(3600)

    server = serve(script)
    terminal = Terminal(tmp_path, {**base_env, "OPENAI_BASE_URL": server.url},
                        ["--mcp", mcp(tmp_path)])
    try:
        terminal.wait_for('run delete_note(name="groceries")? [y/N]', timeout=20)
        terminal.wait_for("press y or n")  # the status line, while the talk goes on
        terminal.type("n")
        terminal.wait_for('run delete_note(name="diary")? [y/N]')
        terminal.type("y")
        terminal.wait_for("deleted the note diary")
        assert terminal.stop() == 0
    finally:
        terminal.close()
    assert outputs[0] == "The person refused to run this."
    assert "deleted the note diary" in outputs[1]
    assert calls(tmp_path) == ["delete_note diary"]
    assert mcp_processes(tmp_path) == []
    assert_no_orphans(sox_log)


def test_failing_servers_are_reported_and_the_talk_goes_on(serve, run_client, tmp_path):
    outputs: list[str] = []

    async def script(session):
        update = await session.handshake()
        await tools_ready(session, update, "crash", "mcp_tools-4_lookup_word")
        outputs.append(await session.tool_output(await session.call_tool("crash", {})))
        await session.expect("response.create")
        await session.reply(noise(0.3, seed=84), "Sorry, the dictionary crashed", speed=10)
        await asyncio.sleep(3600)

    server = serve(script)
    dirs = {mode: tmp_path / mode for mode in ("normal", "crash-at-start", "silent", "noisy")}
    args = ["--mcp", "no-such-mcp-server --stdio"]
    for mode, directory in dirs.items():
        directory.mkdir()
        args += ["--mcp", mcp(directory, mode)]
    client = run_client(server, *args, "--mcp-start-timeout", "3")
    client.wait_for("assistant: Sorry, the dictionary crashed", timeout=20)
    client.wait_for("failed its handshake", timeout=7)  # the silent one
    assert client.stop() == 0
    err = client.stderr.replace("\n", " ")
    assert "'no-such-mcp-server' did not start (no-such-mcp-server: No such file or directory)" in err
    assert ("'mcp_tools-2' stopped (exit code 3): sqlite3.OperationalError: unable to open "
            "database file; going on without its tools") in err
    assert "'mcp_tools-3' failed its handshake (timed out: no answer within 3 s)" in err
    assert err.count("not JSON-RPC") == 1  # the noisy one: reported once, and it still works
    assert "'mcp_tools' stopped (exit code 1): fatal: out of dictionary pages" in err
    assert "the MCP server mcp_tools stopped" in outputs[0]
    # The crashed server's tools were withdrawn; the noisy one's stayed, under their names.
    declared = [[tool["name"] for tool in event["session"]["tools"]]
                for event in server.events("session.update") if "tools" in event["session"]]
    assert "crash" in declared[-2] and "crash" not in declared[-1]
    assert "mcp_tools-4_lookup_word" in declared[-2] and "mcp_tools-4_lookup_word" in declared[-1]
    assert all(a != b for a, b in zip(declared, declared[1:], strict=False))  # only changes are sent
    for directory in dirs.values():
        assert mcp_processes(directory) == []


def test_remote_servers_are_called_by_the_api_with_the_same_consent(serve, run_client):
    approvals: list[dict] = []

    async def script(session):
        update = await session.handshake()
        (remote,) = update["session"]["tools"]
        session.server.declared = remote
        listing = "mcpl_1"
        await session.send("mcp_list_tools.in_progress", item_id=listing)
        await session.send("conversation.item.done", item={
            "id": listing, "type": "mcp_list_tools", "server_label": "dict", "tools": [
                {"name": "define", "input_schema": {"type": "object"},
                 "annotations": {"readOnlyHint": True}},
                {"name": "delete_page", "input_schema": {"type": "object"}},
                {"name": "wipe_all", "input_schema": {"type": "object"}}]})
        await session.send("mcp_list_tools.completed", item_id=listing)
        call = {"id": "mcp_1", "type": "mcp_call", "name": "define", "server_label": "dict",
                "arguments": '{"word": "lighthouse"}'}
        await session.send("response.output_item.added", response_id="resp_r", output_index=0,
                           item=call)
        await session.send("response.mcp_call.in_progress", item_id="mcp_1", output_index=0)
        await session.send("response.mcp_call.completed", item_id="mcp_1", output_index=0)
        await session.send("response.output_item.done", response_id="resp_r", output_index=0,
                           item={**call, "output": "a tower with a light"})
        for name in ("delete_page", "wipe_all"):
            await session.send("response.output_item.done", response_id="resp_r", output_index=0,
                               item={"id": f"mcpr_{name}", "type": "mcp_approval_request",
                                     "name": name, "server_label": "dict", "arguments": "{}"})
            approvals.append((await session.expect("conversation.item.create"))["item"])
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server, "--mcp-url", "https://dict.example.com/mcp", "--mcp-header",
                        "Authorization: Bearer t0k", "--approve-tools", "delete_page")
    client.wait_for("wipe_all() on dict", timeout=10)
    time.sleep(0.3)
    assert client.stop() == 0
    assert server.declared == {"type": "mcp", "server_label": "dict",
                               "server_url": "https://dict.example.com/mcp",
                               "headers": {"Authorization": "Bearer t0k"},
                               "require_approval": {"never": {"read_only": True}}}
    assert "tools from dict (through the API): define, delete_page, wipe_all" in client.stdout
    assert 'tool: define({"word": "lighthouse"}) on dict (through the API)' in client.stdout
    assert "→ a tower with a light" in client.stdout
    assert [(a["approval_request_id"], a["approve"]) for a in approvals] == [
        ("mcpr_delete_page", True), ("mcpr_wipe_all", False)]  # no terminal: refused
    assert server.events("response.create") == []  # the API goes on by itself
