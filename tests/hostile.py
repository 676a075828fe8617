"""A hostile Realtime server's material: server events built from the openai package's own types,
filled with odd values (control characters and escape sequences, lone surrogates, bidi
overrides, huge and non-finite numbers, deep nesting, unknown ids), and WebSocket frames that
break the protocol. Seeded: the same seed makes the same events. Used by the tests and by
bench/fuzz.py, which runs many more seeds."""

from __future__ import annotations

import asyncio
import json
import random
import re
import types
import typing
from typing import Any, Literal, Union

from conftest import noise
from pydantic import BaseModel
from realtime_server import SERVER_EVENTS, Script, Session

# What a server's text may try on a terminal: colours, clearing the screen, the window title, a
# query the terminal answers into stdin, C1 controls, NUL and DEL, reversed text, a lone
# surrogate (valid JSON, no valid UTF-8), and plain words.
ODD_TEXTS = [
    "A\x1b[31;1mRED\x1b[0m B\x1b[2J C\x1b]2;TITLE\x1b\\ D\x1b[6n",
    "\x00nul\x7fdel\x9bc1\x85nel\x07bel\x08bs\r\x0bvt",
    "\u202egnirts desrever\u202c and \u2066isolate\u2069",
    "lone \ud800 surrogate \udfff",
    "\x1b[?1049h\x1b[H\x1b[J",
    "fine words", "", " ", "ünïcødé 漢字 🎉",
]
# Whole numbers and floats that no real usage, time or count has.
ODD_NUMBERS: list[Any] = [10 ** 400, -1, 0, 2 ** 63, float("inf"), float("-inf"), float("nan"),
                          1e308, 0.5, 7]
IDS = ["item_1", "item_unknown", "resp_1", "call_1", "", "item_\x1b[2J"]


def nested(depth: int) -> str:
    """A stand-in for lists nested `depth` deep, which dumps() writes out (Python's own json
    cannot write what nests a thousand deep)."""
    return f"@@nested {depth}@@"


def dumps(event: dict[str, Any]) -> str:
    text = json.dumps(event)  # NaN and Infinity as JavaScript writes them, 10**400 in full
    return re.sub(r'"@@nested (\d+)@@"', lambda m: "[" * int(m[1]) + "]" * int(m[1]), text)


class Generator:
    """Server events of every type the API has, with odd values in their fields."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def events(self, count: int) -> list[dict[str, Any]]:
        kinds = sorted(SERVER_EVENTS)
        return [self.event(self.rng.choice(kinds), n) for n in range(count)]

    def event(self, kind: str, n: int) -> dict[str, Any]:
        event = self.model(SERVER_EVENTS[kind], 0)
        event["type"], event["event_id"] = kind, f"event_fuzz_{n}_{self.rng.random()}"
        return event

    def model(self, model: type[BaseModel], depth: int) -> dict[str, Any]:
        fields = {}
        for name, field in model.model_fields.items():
            if field.is_required() or self.rng.random() < 0.6:
                fields[field.alias or name] = self.value(field.annotation, name, depth + 1)
        return fields

    def value(self, annotation: Any, name: str, depth: int) -> Any:
        rng = self.rng
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is Literal:
            return rng.choice(args)
        if origin in (Union, types.UnionType):
            arms = [arm for arm in args if arm is not type(None)] or [type(None)]
            return None if rng.random() < 0.1 else self.value(rng.choice(arms), name, depth)
        if origin in (list, typing.List):  # noqa: UP006 - the openai types use both
            return [self.value(args[0] if args else Any, name, depth + 1)
                    for _ in range(rng.randint(0, 3 if depth < 6 else 0))]
        if origin in (dict, typing.Dict):  # noqa: UP006
            return nested(rng.choice([3, 40, 80, 3000])) if rng.random() < 0.2 else {
                "key\x1b[2J": self.value(args[1] if len(args) > 1 else Any, name, depth + 1)}
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return self.model(annotation, depth) if depth < 8 else {}
        if annotation is bool:
            return rng.random() < 0.5
        if annotation in (int, float):
            return rng.choice(ODD_NUMBERS)
        if annotation is str:
            if name.endswith("id"):
                return rng.choice(IDS)
            if name == "arguments":
                return rng.choice(['{"a": 1}', "not json", "[" * 10_000 + "]" * 10_000])
            if name == "delta" and rng.random() < 0.5:
                return rng.choice(["AAE=", "AA==", "////", "not base64!"])
            return rng.choice(ODD_TEXTS) * rng.choice([1, 1, 1, 200])
        if annotation is object or annotation is Any:
            return rng.choice([nested(3), nested(40), nested(2000), rng.choice(ODD_TEXTS),
                               10 ** 400])
        return None


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    """A raw server-to-client WebSocket frame (unmasked)."""
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    if len(payload) < 126:
        return head + bytes([len(payload)]) + payload
    if len(payload) < 65536:
        return head + bytes([126]) + len(payload).to_bytes(2, "big") + payload
    return head + bytes([127]) + len(payload).to_bytes(8, "big") + payload


# Frames that break the protocol or are no event: each ends its connection, or is skipped.
BROKEN_FRAMES = {
    "a lone continuation, empty": frame(0x0, b""),
    "a lone continuation": frame(0x0, b'{"type": "error"}'),
    "an unknown opcode": frame(0x3, b"x"),
    "reserved bits": frame(0x1, b'{"type": "x"}', rsv=0x40),
    "a ping of 126 bytes": frame(0x9, b"p" * 126),
    "a text frame in pieces, then a new message": frame(0x1, b'{"ty', fin=False) + frame(
        0x1, b"{}"),
}
SKIPPED_FRAMES = {
    "a frame nested 100,000 deep": frame(0x1, b"[" * 100_000 + b"]" * 100_000),
    "not UTF-8": frame(0x1, b"\xff\xfe\xfd"),
    "binary": frame(0x2, b"\x00\x01"),
    "JSON without a type": frame(0x1, b'{"event_id": "e"}'),
    "an empty text frame": frame(0x1, b""),
    "Infinity alone": frame(0x1, b"Infinity"),
}


def storm(seed: int, events: int) -> Script:
    """A fake API's script: each session gets `events` odd events (Generator(seed * 100 + its
    number)), the frames that are no event, and one that breaks the protocol, so the client hangs
    up and reconnects; the session after the last of BROKEN_FRAMES answers "hello after the
    storm" with "All is well after the storm."."""
    rounds = list(BROKEN_FRAMES.values())

    async def script(session: Session) -> None:
        await session.handshake()
        if session.number > len(rounds):
            while True:
                item = (await session.expect("conversation.item.create", 60))["item"]
                if item.get("content", [{}])[0].get("text") == "hello after the storm":
                    break
            await session.expect("response.create")
            await session.reply(noise(0.3), "All is well after the storm.")
            await asyncio.sleep(3600)
        for event in Generator(seed * 100 + session.number).events(events):
            await session.ws.send(dumps(event))
        for raw in SKIPPED_FRAMES.values():
            session.ws.transport.write(raw)
        session.ws.transport.write(rounds[session.number - 1])  # the client must hang up
        await asyncio.sleep(3600)
    return script


def flood(burst: int, mixed: bool, response: str = "r", count: int = 10_000,
          delta: str = "word " * 200) -> bytes:
    """`count` events as raw frames, for one write: transcript deltas of `response`'s item
    `item_<response>`, of 1 KB unless `delta` says (10 MB of words in 10,000); with `mixed`,
    every tenth is instead a response.done, every twentieth a transcript of the person's
    ("flood"). `burst` keeps the event ids apart from another burst's."""
    ids = f'"response_id": "{response}", "item_id": "item_{response}", "output_index": 0, ' \
          '"content_index": 0'
    events = [f'{{"type": "response.output_audio_transcript.delta", "event_id": "d{burst}_{i}", '
              f'{ids}, "delta": "{delta}"}}' if not mixed or i % 10 else
              f'{{"type": "response.done", "event_id": "r{burst}_{i}", "response": {{"id": "x", '
              f'"status": "completed", "usage": {{"input_tokens": 1, "output_tokens": 1}}}}}}'
              if i % 20 else
              f'{{"type": "conversation.item.input_audio_transcription.completed", '
              f'"event_id": "t{burst}_{i}", "item_id": "u", "content_index": 0, '
              f'"transcript": "flood"}}' for i in range(count)]
    return b"".join(frame(0x1, event.encode()) for event in events)
