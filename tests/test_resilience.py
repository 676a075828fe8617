"""Keeping the conversation alive: reconnecting after drops, rolling over before the 60-minute
limit, telling the new session what was said, and noticing a connection that went silent."""

from __future__ import annotations

import asyncio
import re
import select
import socket
import threading
import time

from conftest import noise


def replayed(server, connection: int):
    """The conversation.item.create events sent on the n-th connection (1-based), as text."""
    items = []
    for event in server.sessions_received[connection - 1]:
        if event["type"] == "conversation.item.create":
            (part,) = event["item"]["content"]
            items.append((event["item"]["role"], part["type"], part["text"]))
    return items


async def first_turn(session):
    await session.handshake()
    await session.send("input_audio_buffer.committed", item_id="item_u1", previous_item_id=None)
    await session.user_said("item_u1", "What is a haiku?")
    await session.reply(noise(0.4, seed=1), "A haiku is a short poem", speed=10)


def test_a_dropped_connection_reconnects_and_replays_the_conversation(serve, run_client, sox_log):
    cut_off = noise(0.8, seed=9)

    async def script(session):
        if session.number == 1:
            await first_turn(session)
            await asyncio.sleep(0.8)
            stop = asyncio.Event()
            partial = asyncio.create_task(session.reply(cut_off + noise(2.0, seed=10),
                                                        "Five seven five syllables and more",
                                                        speed=1, stop=stop))
            await asyncio.sleep(0.85)
            session.ws.transport.abort()  # no close frame: a network drop
            partial.cancel()
        else:
            await session.handshake()
            await asyncio.sleep(0.5)
            await session.reply(noise(0.3, seed=11), "As I was saying", speed=10)
            await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server)
    client.wait_for("the model was told the last")
    client.wait_for("assistant: As I was saying")
    time.sleep(0.5)
    assert client.stop() == 0
    # Seen first as a read that ends or a write that fails, depending on timing.
    assert ("the connection dropped without a close frame; reconnecting in" in client.stderr
            or "the connection broke" in client.stderr)
    told = replayed(server, 2)
    assert told[:2] == [("user", "input_text", "What is a haiku?"),
                        ("assistant", "output_text", "A haiku is a short poem")]
    (role, kind, partial), = told[2:]  # the cut-off reply, as far as it had come
    assert (role, kind) == ("assistant", "output_text")
    assert partial and "Five seven five syllables and more".startswith(partial)
    out = client.stdout
    assert out.count("you: What is a haiku?") == 1
    assert out.count("A haiku is a short poem") == 1
    assert out.count("As I was saying") == 1
    # What had arrived of the cut-off reply still played to its end. It came at real time after
    # a fast reply, so it started without a cushion and may have stuttered once: silence aside.
    assert cut_off[:19200] in re.sub(rb"(\0\0){240,}", b"", sox_log.heard())


def test_session_expired_rolls_over_with_replay(serve, run_client):
    async def script(session):
        if session.number == 1:
            await first_turn(session)
            await asyncio.sleep(0.8)
            await session.send("error", error={
                "type": "invalid_request_error", "code": "session_expired",
                "message": "Your session hit the maximum duration of 60 minutes."})
            await session.ws.close(1001, "Your session hit the maximum duration of 60 minutes.")
        else:
            await session.handshake()
            await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server)
    client.wait_for("the model was told the last 2 turns")
    assert client.stop() == 0
    assert "starting a new session (the 60-minute limit)" in client.stdout
    assert "reconnecting" not in client.stderr and "warning" not in client.stderr
    assert replayed(server, 2) == [("user", "input_text", "What is a haiku?"),
                                   ("assistant", "output_text", "A haiku is a short poem")]


def test_rolls_over_at_a_pause_before_the_limit(serve, run_client):
    async def script(session):
        if session.number == 1:
            await session.handshake(expires_in=63)  # the 60 s margin is reached in 3 s
            await session.reply(noise(0.3), "Before the limit", speed=10)
        else:
            await session.handshake()
        await asyncio.sleep(3600)

    server = serve(script)
    client = run_client(server)
    client.wait_for("the model was told the last 1 turns", timeout=15)
    assert client.stop() == 0
    assert server.closed_with[0] == 1000  # the old session was closed politely
    assert replayed(server, 2) == [("assistant", "output_text", "Before the limit")]


class FreezingProxy:
    """Forwards TCP to the fake server until `freeze()`; then the path goes silent, like a
    network that died without resetting anything. New connections are forwarded again."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen: list[socket.socket] = []
        self.live: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.live.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            self._forward(a, b)
        except (OSError, ValueError):  # closed by close()
            pass

    def _forward(self, a: socket.socket, b: socket.socket) -> None:
        while True:
            ready, _, _ = select.select([a, b], [], [], 0.1)
            for sock in ready:
                if sock in self.frozen:
                    continue
                data = sock.recv(65536)
                if not data:
                    return
                (b if sock is a else a).sendall(data)
            if a in self.frozen:
                time.sleep(0.05)

    def freeze(self) -> None:
        for pair in self.live:
            self.frozen.extend(pair)

    def close(self) -> None:
        self.listener.close()
        for pair in self.live:
            for sock in pair:
                sock.close()


def test_a_silent_connection_is_detected_and_replaced(serve, run_client):
    async def script(session):
        await session.handshake()
        await asyncio.sleep(3600)

    server = serve(script)
    proxy = FreezingProxy(server.port)
    client = run_client(server, "--keepalive", "1",
                        env={"OPENAI_BASE_URL": f"http://127.0.0.1:{proxy.port}/v1"})
    client.wait_for("connected")
    proxy.freeze()
    client.wait_for("connected again", timeout=10)
    assert client.stop() == 0
    proxy.close()
    assert "the API did not answer for 1 s; reconnecting in" in client.stderr
    assert len(server.request_headers) == 2
