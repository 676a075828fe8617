"""Nothing a server sends can crash the script, stall its loop, or reach the terminal as control:
schema-valid events with odd values (tests/hostile.py), frames that break the protocol, floods,
numbers no usage has, a clock that is off, audio split at odd bytes."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import time

import pytest
from conftest import API_KEY, assert_no_orphans, noise
from hostile import BROKEN_FRAMES, Generator, dumps, flood, storm
from realtime_server import SERVER_EVENTS
from test_terminal import Terminal

# What must never reach the screen from a server: C0 controls but tab and newline, DEL, C1 (as
# UTF-8), bidi embeddings, overrides and isolates, and surrogates (which UTF-8 cannot hold).
UNSAFE = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xaa-\xae]"
                    rb"|\xe2\x81[\xa6-\xa9]|\xed[\xa0-\xbf]")
ROUNDS = list(BROKEN_FRAMES.items())  # a session each: odd events, skipped frames, a broken frame
EVENTS_PER_ROUND = 250


def strict_json(line: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def ends_within(client, seconds: float) -> int:
    started = time.monotonic()
    client.process.send_signal(signal.SIGINT)
    code = client.finish()
    assert time.monotonic() - started < seconds, "Ctrl-C took too long"
    return code


def assert_nothing_unsafe_shown(client):
    shown = b"".join(client.out + client.err)
    found = UNSAFE.findall(shown)
    assert not found, f"control characters on the screen: {found[:10]}"
    assert b"Traceback" not in shown and b"internal error" not in shown
    assert API_KEY.encode() not in shown


def test_a_hostile_server_can_neither_crash_nor_stall_nor_take_over_the_screen(
        serve, run_client, tmp_path):
    log = tmp_path / "talk.jsonl"
    client = run_client(serve(storm(seed=0, events=EVENTS_PER_ROUND)), "--log", str(log),
                        "--duplex", "full")
    client.wait_for("connected again", count=len(ROUNDS), timeout=60)
    client.type("hello after the storm")
    client.wait_for("assistant: All is well after the storm.")
    assert ends_within(client, 1.0) == 0
    assert_nothing_unsafe_shown(client)
    assert "ignoring unknown server event" not in client.stderr  # every kind sent is a real one
    for name in ("a continuation frame with no message before it", "an unknown frame type 3",
                 "reserved bits set, with no extension agreed",
                 "a control frame in pieces, or longer than 125 bytes",
                 "a new message before the last one ended"):
        assert f"the API broke the WebSocket protocol ({name}); reconnecting in" in client.stderr
    assert "nested more than 64 levels deep" in client.stderr
    records = [strict_json(line) for line in log.read_text().splitlines()]
    assert records and all(record["time"].endswith("Z") for record in records)
    # The log keeps a server's text as it came: escapes and all, as JSON strings.
    assert any("\x1b[2J" in str(record.get("text")) for record in records)


def test_every_kind_of_server_event_is_known(serve, run_client):
    """The API's events that a terminal client has no use for are still not 'unknown'."""
    async def script(session):
        await session.handshake()
        for kind in sorted(SERVER_EVENTS):
            event = Generator(seed=7).event(kind, 0)
            await session.ws.send(dumps(event))
        await session.reply(noise(0.2), "Still here.")
        await asyncio.sleep(3600)

    client = run_client(serve(script))
    client.wait_for("assistant: Still here.")
    assert client.stop() == 0
    assert "ignoring unknown server event" not in client.stderr


def test_escape_sequences_from_the_server_are_shown_as_text_on_a_terminal(
        serve, base_env, sox_log, tmp_path):
    evil = "A\x1b[31;1mRED\x1b[0m B\x1b[2J C\x1b]2;TITLE\x1b\\ D\x1b[6n \u202eE\ud800"

    async def script(session):
        await session.handshake()
        await session.send("input_audio_buffer.committed", item_id="u1", previous_item_id=None)
        await session.user_said("u1", "before " + evil)
        await session.reply(noise(0.5), "reply " + evil, speed=1, chunk_ms=100)
        await session.send("error", error={"type": "invalid_request_error", "code": "odd",
                                           "message": "error " + evil})
        await asyncio.sleep(3600)

    server = serve(script)
    terminal = Terminal(tmp_path, {**base_env, "OPENAI_BASE_URL": server.url,
                                   "TERM": "xterm-256color"})
    try:
        terminal.wait_for("error A[31;1mRED")
        terminal.read(0.3)
        screen = terminal.rendered()
        assert terminal.stop() == 0
    finally:
        terminal.close()
    shown = "\n".join(screen)
    # Nothing cleared the screen: the first lines are still there, the words readable.
    assert "connected: gpt-realtime-2.1" in shown
    assert "you: before A[31;1mRED[0m B[2J C]2;TITLE\\ D[6n E" in shown
    assert "assistant: reply A[31;1mRED[0m B[2J" in shown
    assert "warning: the API reported odd: error A[31;1mRED[0m B[2J" in shown
    assert terminal.emulator.title == ""  # the title was not set
    assert b"\x1b]2;TITLE" not in terminal.screen and b"\x1b[6n" not in terminal.screen
    assert_no_orphans(sox_log)


def test_a_flood_of_small_events_never_holds_the_loop(serve, run_client, tmp_path):
    """Bursts of 10,000 events at once, as a server could send them: 1 KB transcript deltas of
    one item (10 MB of words), then deltas, response.done and transcripts. A ping behind the
    first burst is answered soon, the microphone still goes out, and Ctrl-C acts at once in the
    middle of the second."""
    pings: list[float] = []
    bursts = asyncio.Event()

    async def script(session):
        await session.handshake()
        await session.send("response.created", response={"id": "resp_f"})
        await bursts.wait()
        session.ws.transport.write(flood(1, mixed=False, response="resp_f"))  # 10 MB in one go
        started = time.monotonic()
        await asyncio.wait_for(await session.ws.ping(), 10)  # behind the whole burst
        pings.append(time.monotonic() - started)
        session.ws.transport.write(flood(2, mixed=True, response="resp_f"))
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server, "--duplex", "full")
    client.wait_for("connected")
    time.sleep(0.2)
    appended, since = len(server.events("input_audio_buffer.append")), time.monotonic()
    server._loop.call_soon_threadsafe(bursts.set)
    started = time.monotonic()
    while not pings and time.monotonic() < started + 10:
        time.sleep(0.05)
    client.wait_for("you: flood", count=100)  # the second burst is being handled
    assert pings and pings[0] < 1.5, pings  # the whole burst, handled, before the pong
    appended, since = len(server.events("input_audio_buffer.append")) - appended, \
        time.monotonic() - since
    assert ends_within(client, 1.0) == 0  # in the middle of the second burst
    # The microphone went out all along: an append every 20 ms, give or take the bursts.
    assert appended >= since / 0.02 * 0.6, (appended, since)


def test_what_came_before_a_broken_frame_is_handled_before_the_next_session(serve, run_client):
    """20,000 small events, the person's words, a `session.updated`, then a frame that breaks the
    protocol, in one write: the client handles a burst in slices, and it reconnects only once it
    has handled every event that came before the break, so none is taken for the next session's
    (the `session.updated` would say that it started, with no session behind it)."""
    burst = flood(3, mixed=False, response="resp_f", count=20_000, delta=".")

    async def script(session):
        update = await session.handshake()
        if session.number == 1:
            await session.send("response.created", response={"id": "resp_f"})
            session.ws.transport.write(burst)
            await session.user_said("u1", "the last words")
            await session.send("session.updated", session=update["session"])
            session.ws.transport.write(BROKEN_FRAMES["an unknown opcode"])
        else:
            await session.reply(noise(0.2), "Still here.")
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server, "--duplex", "full")
    client.wait_for("assistant: Still here.", timeout=20)
    assert ends_within(client, 1.0) == 0
    assert client.stdout.count("connected again") == 1 == len(server.sessions_received) - 1
    before, _, after = client.stdout.partition("connected again")
    assert "you: the last words" in before and "the last words" not in after


@pytest.mark.parametrize("figure", ["Infinity", "1e400", "NaN", "1" + "0" * 400, "-5", "1.5"])
def test_usage_that_is_no_count_is_reported_once_and_never_counted(serve, run_client, tmp_path,
                                                                   figure):
    log = tmp_path / "talk.jsonl"

    async def script(session):
        await session.handshake()
        for n in range(2):
            await session.ws.send(json.dumps({
                "type": "response.done", "event_id": f"e{n}", "response": {
                    "id": f"r{n}", "status": "completed", "output": [],
                    "usage": {"input_tokens": "@", "output_tokens": 3}}}).replace('"@"', figure))
        await session.reply(noise(0.2), "Counted.")
        await asyncio.sleep(3600)

    client = run_client(serve(script), "--log", str(log), "--max-cost", "1")
    client.wait_for("assistant: Counted.")
    client.wait_for("tokens in 118")
    assert client.stop() == 0
    assert client.stderr.count("usage figures that are not token counts") == 1
    assert "session: 1 responses · 118 tokens in · 22 out · $0.0014" in client.stdout
    assert "Traceback" not in client.stderr
    records = [strict_json(line) for line in log.read_text().splitlines()]
    assert len(records) == 3


def test_prices_that_are_no_prices_are_refused(run_client):
    client = run_client(None, "--model", "gpt-realtime-9", env={
        "REALTIME_PRICES": "nan,0.3,20,0.6,0.06,2.4"})
    assert client.finish() == 2
    assert "REALTIME_PRICES must be 6 or 7 numbers from 0 to 10000" in client.stderr


@pytest.mark.parametrize("clock", ["ours an hour fast", "a session that claims to end now"])
def test_a_clock_that_is_off_makes_no_storm_of_sessions(serve, run_client, clock):
    async def script(session):
        # This computer's clock an hour ahead of the server's: the server's expires_at, an hour
        # after the server's now, is now by ours.
        await session.handshake(expires_in=3600 if clock == "ours an hour fast" else 20)
        while True:
            await session.expect("response.create", timeout=3600)
            await session.reply(noise(0.3), "Still the first session.")

    server = serve(script)
    if clock == "ours an hour fast":
        server.clock_offset = -3600.0
    client = run_client(server)
    client.wait_for("connected")
    time.sleep(0.5)  # a storm would have opened a hundred sessions by now
    client.type("are you there")
    client.wait_for("assistant: Still the first session.")
    assert client.stop() == 0
    assert len(server.sessions_received) == 1
    if clock == "ours an hour fast":
        # (the Date header has whole seconds)
        assert re.search(r"this computer's clock is 36(00|01) s ahead of the API's", client.stderr)
    else:
        assert "the API says this session ends in 20 s; using it until the API ends it" in \
            client.stderr


def test_a_server_that_ends_each_session_at_once_is_retried_with_backoff(serve, run_client):
    async def script(session):
        await session.handshake()
        await session.ws.close(1001, "going away")

    server = serve(script)
    client = run_client(server)
    client.wait_for("a minute or less after it started; starting a new session in", count=2,
                    timeout=20)
    assert client.stop() == 0
    # One new session at once, then the backoff: 0.25-0.5 s, 0.5-1 s, …
    assert len(server.sessions_received) <= 4


def test_audio_split_at_odd_bytes_or_sent_twice_plays_each_sample_once(serve, run_client,
                                                                       sox_log):
    audio = noise(0.6, seed=5)

    async def script(session):
        await session.handshake()
        ids = {"response_id": "r1", "item_id": "item_odd", "output_index": 0,
               "content_index": 0}
        await session.send("response.created", response={"id": "r1"})
        await session.send("response.output_item.added", response_id="r1", output_index=0,
                           item={"id": "item_odd", "type": "message", "role": "assistant",
                                 "content": []})
        cuts = [0, 1, 4801, 4802, 9999, 20001, len(audio)]  # odd lengths, one a single byte
        for n, (start, end) in enumerate(zip(cuts, cuts[1:], strict=False)):
            event = json.dumps({"type": "response.output_audio.delta", "event_id": f"d{n}",
                                **ids, "delta": base64.b64encode(audio[start:end]).decode()})
            await session.ws.send(event)
            await session.ws.send(event)  # the same event again: played once
        await session.send("response.output_audio.done", **ids)
        await session.send("response.done", response={"id": "r1", "status": "completed"})
        await asyncio.sleep(3600)

    client = run_client(serve(script), "--duplex", "full")
    client.wait_for("connected")
    deadline = time.monotonic() + 5
    while audio not in sox_log.heard() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.stop() == 0
    heard = sox_log.heard().strip(b"\x00")
    assert audio.strip(b"\x00") in heard and len(heard) < len(audio) + 4
