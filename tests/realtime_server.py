"""A fake OpenAI Realtime API: a real WebSocket server on loopback, scripted per test.

Each connection runs `script(session)`. The server records every client event with its arrival
time and checks it against the openai package's `RealtimeClientEvent` (unknown keys included:
the SDK's models accept them silently, the API rejects them).

`provider` makes it another endpoint that speaks the protocol: "azure" (the GA path
/openai/v1/realtime, the key in an `api-key` header, refused without it) or "xai" (Grok voice: the
first event `conversation.created`, a flat session checked against xAI's documented fields,
`ping` events, no usage in `response.done`, and no `conversation.item.truncate` accepted). It
also answers GET /v1/models/{id} from `models` (id → shutdown date), as openai's `Model`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import itertools
import json
import math
import ssl
import threading
import time
import typing
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from openai.types import Model
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import BaseModel, TypeAdapter
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

CLIENT_EVENT = TypeAdapter(RealtimeClientEvent)
# Each server event type's own model, so a complaint names the fields that are wrong.
SERVER_EVENTS = {typing.get_args(model.model_fields["type"].annotation)[0]: model
                 for model in typing.get_args(typing.get_args(RealtimeServerEvent)[0])}
BYTES_PER_SECOND = 48_000
_ids = itertools.count(1)


XAI_SESSION = {"instructions", "voice", "turn_detection", "audio", "tools"}
XAI_VOICES = {"Eve", "Ara", "Rex", "Sal", "Leo"}


def problems_with(event: dict[str, Any], provider: str = "openai") -> list[str]:
    """Why the real API would reject this client event (empty when it would not)."""
    if provider == "xai" and event.get("type") == "conversation.item.truncate":
        return ["xAI's Grok voice does not take conversation.item.truncate"]
    if provider == "xai" and event.get("type") == "session.update":
        return xai_session_problems(event.get("session"))
    try:
        model = CLIENT_EVENT.validate_python(event)
    except Exception as error:  # pydantic.ValidationError, with the whole union's complaints
        return [f"{event.get('type')}: not a valid client event: {str(error)[:300]}"]
    found = [f"{event['type']}: unknown key {path}" for path in unknown_keys(model, "")]
    for path, fmt in audio_formats(event):
        if fmt.get("type") == "audio/pcm" and fmt.get("rate") != 24000:
            found.append(f"{event['type']}: {path} is audio/pcm without rate 24000")
    return found


def xai_session_problems(session: Any) -> list[str]:
    """xAI's session: flat (no `type`, the voice and turn detection at the top), PCM at 24 kHz
    asked for both ways."""
    if not isinstance(session, dict):
        return ["session.update: no session"]
    found = [f"session.update: {key} is not an xAI session field"
             for key in sorted(set(session) - XAI_SESSION)]
    if "voice" in session and session["voice"] not in XAI_VOICES:
        found.append(f"session.update: xAI has no voice {session['voice']!r}")
    pcm = {"type": "audio/pcm", "rate": 24000}
    audio = session.get("audio", {})
    if "audio" in session and audio != {"input": {"format": pcm}, "output": {"format": pcm}}:
        found.append(f"session.update: audio {audio!r} is not 24 kHz PCM both ways")
    detection = session.get("turn_detection")
    if detection is not None and detection.get("type") != "server_vad":
        found.append(f"session.update: turn_detection {detection!r}")
    return found


def unknown_keys(value: Any, path: str) -> list[str]:
    if isinstance(value, BaseModel):
        found = [f"{path}.{key}" for key in (value.model_extra or {})]
        for name in type(value).model_fields:
            found += unknown_keys(getattr(value, name), f"{path}.{name}")
        return found
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in unknown_keys(v, f"{path}[{i}]")]
    return []


def audio_formats(event: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    audio = (event.get("session") or {}).get("audio") or {}
    return [(f"session.audio.{side}.format", audio[side]["format"])
            for side in ("input", "output") if isinstance(audio.get(side), dict)
            and isinstance(audio[side].get("format"), dict)]


class Vad:
    """The server's voice activity detection, as a loudness gate on the appended audio: speech
    starts after 60 ms above -40 dBFS (a real server's VAD hears an echoed voice just as well) and
    stops after 500 ms below it; `audio_start_ms` includes 300 ms of prefix, as the API's does."""

    WINDOW = 960  # 20 ms
    LOUD = 0.01

    def __init__(self) -> None:
        self.held = b""
        self.ms = 0  # audio received so far
        self.loud_run = self.quiet_run = 0
        self.speaking = False

    def hear(self, audio: bytes) -> list[str]:
        """"started" and "stopped" as they happen in this audio."""
        found = []
        self.held += audio
        while len(self.held) >= self.WINDOW:
            window, self.held = self.held[:self.WINDOW], self.held[self.WINDOW:]
            self.ms += 20
            samples = memoryview(window).cast("h")
            loud = math.hypot(*samples) / math.sqrt(len(samples)) / 32768 > self.LOUD
            self.loud_run = self.loud_run + 1 if loud else 0
            self.quiet_run = 0 if loud else self.quiet_run + 1
            if not self.speaking and self.loud_run == 3:
                self.speaking = True
                found.append("started")
            elif self.speaking and self.quiet_run == 25:
                self.speaking = False
                found.append("stopped")
        return found


class Session:
    """One client connection, as a script sees it."""

    def __init__(self, server: FakeRealtime, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.vad = Vad()
        self.turns: asyncio.Queue[str] = asyncio.Queue()  # the person's committed items
        self.turn_id = ""
        server.sessions_received.append([])
        self.number = len(server.sessions_received)  # 1 for the first connection, 2 for the next
        self.received = server.sessions_received[-1]

    async def send(self, type: str, checked: bool = True, **fields: Any) -> None:
        """Send a server event, checked against the openai package's `RealtimeServerEvent`
        (`checked=False` for the malformed ones a test sends on purpose)."""
        event = {"type": type, "event_id": f"event_{next(_ids)}", **fields}
        if checked:
            try:
                SERVER_EVENTS[type].model_validate(event)
            except Exception as error:  # KeyError or pydantic.ValidationError
                self.server.problems.append(f"the fake sent an invalid {type}: {error!r:.500}")
        await self.ws.send(json.dumps(event))

    async def expect(self, type: str, timeout: float = 10) -> dict[str, Any]:
        """The next client event of this type (others are skipped; all are recorded)."""
        async def next_of_type() -> dict[str, Any]:
            while True:
                event = await self.inbox.get()
                if event["type"] == type:
                    return event
        return await asyncio.wait_for(next_of_type(), timeout)  # asyncio.timeout needs 3.11

    async def handshake(self, expires_in: int = 3600) -> dict[str, Any]:
        if self.server.provider == "xai":  # its first event; its session events are not OpenAI's
            await self.send("conversation.created", conversation={"id": "conv_1",
                                                                  "object": "realtime.conversation"})
            await self.send("ping", checked=False, timestamp=int(time.time()))
            update = await self.expect("session.update")
            await self.send("session.updated", checked=False, session=update["session"])
            return update
        await self.send("session.created", session={
            "type": "realtime", "id": "sess_1", "object": "realtime.session",
            "model": "gpt-realtime-2.1", "expires_at": int(time.time()) + expires_in})
        update = await self.expect("session.update")
        await self.send("session.updated", session=update["session"])
        return update

    async def user_said(self, item_id: str, transcript: str) -> None:
        """The transcript of the person's words, as the API reports it."""
        await self.send("conversation.item.input_audio_transcription.completed", item_id=item_id,
                        content_index=0, transcript=transcript,
                        usage={"type": "duration", "seconds": 1.0})

    async def reply(self, audio: bytes, transcript: str, speed: float = 10.0,
                    chunk_ms: int = 100, usage: dict[str, Any] | None = None,
                    stop: asyncio.Event | None = None, first_ms: int | None = None) -> str:
        """A whole GA response: deltas of `chunk_ms` audio (the first one `first_ms`) at `speed`
        times real time. Returns the assistant item id. Stops early (as a cancelled response)
        when `stop` is set."""
        response_id, item_id = f"resp_{next(_ids)}", f"item_{next(_ids)}"
        ids = {"response_id": response_id, "item_id": item_id, "output_index": 0}
        await self.send("response.created", response={"id": response_id, "status": "in_progress"})
        await self.send("response.output_item.added", response_id=response_id, output_index=0,
                        item={"id": item_id, "type": "message", "role": "assistant",
                              "content": []})
        await self.send("response.content_part.added", **ids, content_index=0,
                        part={"type": "audio"})
        bounds = [0, min(BYTES_PER_SECOND * (first_ms or chunk_ms) // 1000, len(audio))]
        while bounds[-1] < len(audio):
            bounds.append(min(bounds[-1] + BYTES_PER_SECOND * chunk_ms // 1000, len(audio)))
        words = transcript.split(" ")
        pieces = len(bounds) - 1
        start = time.monotonic()
        status = "completed"
        for n in range(pieces):
            if stop is not None and stop.is_set():
                status = "cancelled"
                break
            first_word = n * len(words) // pieces
            share = words[first_word:(n + 1) * len(words) // pieces]
            if share:
                await self.send("response.output_audio_transcript.delta", **ids, content_index=0,
                                delta=(" " if first_word else "") + " ".join(share))
            await self.send("response.output_audio.delta", **ids, content_index=0,
                            delta=base64.b64encode(audio[bounds[n]:bounds[n + 1]]).decode())
            await asyncio.sleep(max(start + bounds[n + 1] / BYTES_PER_SECOND / speed
                                    - time.monotonic(), 0))
        await self.send("response.output_audio.done", **ids, content_index=0)
        await self.send("response.output_audio_transcript.done", **ids, content_index=0,
                        transcript=transcript)
        message = {"id": item_id, "type": "message", "role": "assistant",
                   "status": "completed" if status == "completed" else "incomplete",
                   "content": [{"type": "output_audio", "transcript": transcript}]}
        await self.send("response.output_item.done", response_id=response_id, output_index=0,
                        item=message)
        done: dict[str, Any] = {"id": response_id, "status": status, "output": [message]}
        if self.server.provider != "xai":  # xAI bills by the minute
            done["usage"] = usage or {
                "total_tokens": 140, "input_tokens": 118, "output_tokens": 22,
                "input_token_details": {"cached_tokens": 0, "text_tokens": 102, "audio_tokens": 16},
                "output_token_details": {"text_tokens": 22, "audio_tokens": 0}}
        await self.send("response.done", response=done)
        return item_id

    async def call_tool(self, name: str, arguments: dict[str, Any], commentary: bytes = b"",
                        status: str = "completed") -> str:
        """A GA response that calls a function, as gpt-realtime-2.1 sends one: optionally a
        spoken message first (`phase: "commentary"`, "let me check…"), then the function_call
        item, its arguments in two deltas, and `response.done`. `status` other than completed
        is a call that was interrupted or cancelled. Returns the call_id."""
        response_id, call_id = f"resp_{next(_ids)}", f"call_{next(_ids)}"
        await self.send("response.created", response={"id": response_id, "status": "in_progress",
                                                      "object": "realtime.response"})
        output: list[dict[str, Any]] = []
        if commentary:
            item_id = f"item_{next(_ids)}"
            ids = {"response_id": response_id, "item_id": item_id, "output_index": 0,
                   "content_index": 0}
            await self.send("response.output_item.added", response_id=response_id,
                            output_index=0, item={"id": item_id, "type": "message",
                                                  "role": "assistant", "content": [],
                                                  "phase": "commentary"})
            for start in range(0, len(commentary), 4800):
                await self.send("response.output_audio.delta", **ids, delta=base64.b64encode(
                    commentary[start:start + 4800]).decode())
                await asyncio.sleep(0.01)
            await self.send("response.output_audio.done", **ids)
            await self.send("response.output_audio_transcript.done", **ids,
                            transcript="Let me check that.")
            message = {"id": item_id, "type": "message", "role": "assistant",
                       "status": "completed", "phase": "commentary",
                       "content": [{"type": "output_audio", "transcript": "Let me check that."}]}
            await self.send("response.output_item.done", response_id=response_id, output_index=0,
                            item=message)
            output.append(message)
        item_id, index, text = f"item_{next(_ids)}", len(output), json.dumps(arguments)
        item = {"id": item_id, "type": "function_call", "name": name, "call_id": call_id,
                "arguments": "", "status": "in_progress"}
        await self.send("response.output_item.added", response_id=response_id,
                        output_index=index, item=item)
        ids = {"response_id": response_id, "item_id": item_id, "output_index": index,
               "call_id": call_id}
        for piece in (text[:len(text) // 2], text[len(text) // 2:]):
            await self.send("response.function_call_arguments.delta", **ids, delta=piece)
        await self.send("response.function_call_arguments.done", **ids, name=name, arguments=text)
        item = {**item, "arguments": text,
                "status": "completed" if status == "completed" else "incomplete"}
        await self.send("response.output_item.done", response_id=response_id, output_index=index,
                        item=item)
        await self.send("response.done", response={
            "id": response_id, "object": "realtime.response",
            "status": "completed" if status == "completed" else "cancelled",
            "output": [*output, item], "usage": {
                "total_tokens": 60, "input_tokens": 50, "output_tokens": 10,
                "input_token_details": {"cached_tokens": 0, "text_tokens": 50, "audio_tokens": 0},
                "output_token_details": {"text_tokens": 10, "audio_tokens": 0}}})
        return call_id

    async def tool_output(self, call_id: str, timeout: float = 10) -> str:
        """The output the client sends for this call."""
        while True:
            event = await self.expect("conversation.item.create", timeout)
            item = event["item"]
            if item.get("type") == "function_call_output" and item.get("call_id") == call_id:
                return item["output"]


Script = Callable[[Session], Awaitable[None]]


class FakeRealtime:
    """The server, on its own thread and event loop; `url` is an OPENAI_BASE_URL for it."""

    def __init__(self, script: Script, refuse: tuple[int, str] | None = None,
                 tls: ssl.SSLContext | None = None, vad: bool = False, provider: str = "openai",
                 models: dict[str, str | None] | None = None) -> None:
        self.script = script
        self.provider = provider
        self.models = models or {}  # what GET /models/{id} knows: id → shutdown date
        self.models_asked: list[tuple[str, dict[str, str]]] = []  # (path, headers)
        self.vad = vad  # detect speech in the appended audio, like turn_detection server_vad
        self.speech_started: list[float] = []  # when the VAD heard speech (monotonic)
        self.refuse = refuse  # (HTTP status, body) to fail the handshake with
        self.tls = tls  # serve wss:// on localhost with this context
        self.upgrade_delay: list[float] = []  # seconds to hold the n-th upgrade answer back
        self.clock_offset = 0.0  # s the Date header of the upgrade is ahead of the real time
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.problems: list[str] = []
        self.request_headers: list[dict[str, str]] = []
        self.request_paths: list[str] = []
        self.closed_with: list[int | None] = []
        self.sessions_received: list[list[dict[str, Any]]] = []
        self.sessions_done = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def url(self) -> str:
        path = "/openai/v1" if self.provider == "azure" else "/v1"
        if self.tls:
            return f"https://localhost:{self.port}{path}"
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self, type: str) -> list[dict[str, Any]]:
        return [event for _, event in self.received if event["type"] == type]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", 0, process_request=self._check_request,
                         process_response=self._date, max_size=None, ssl=self.tls) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _check_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if "/models/" in request.path:
            return self._model(ws, request)
        self.request_headers.append(dict(request.headers.raw_items()))
        self.request_paths.append(request.path)
        if self.provider == "azure" and (
                not request.path.startswith("/openai/v1/realtime?model=")
                or "api-key" not in request.headers or "Authorization" in request.headers):
            return ws.respond(401, '{"error": {"code": "401", "message": "Access denied due to '
                                   'invalid subscription key or wrong API endpoint."}}')
        if len(self.upgrade_delay) >= len(self.request_headers):
            with contextlib.suppress(asyncio.TimeoutError):  # held, until the server stops
                await asyncio.wait_for(self._stop.wait(), self.upgrade_delay[
                    len(self.request_headers) - 1])
        if self.refuse:
            status, body = self.refuse
            response = ws.respond(status, body)
            response.headers["Content-Type"] = "application/json"
            return response
        return None

    def _model(self, ws: ServerConnection, request: Request) -> Response:
        """GET /models/{id}, as the API answers it."""
        self.models_asked.append((request.path, dict(request.headers.raw_items())))
        model = urllib.parse.unquote(request.path.rsplit("/", 1)[1])
        if model not in self.models:
            return ws.respond(404, json.dumps({"error": {"code": "model_not_found",
                                                         "message": f"no model {model}"}}))
        body = {"id": model, "object": "model", "created": 1_756_339_200, "owned_by": "system",
                "shutdown_date": self.models[model]}
        try:
            Model.model_validate(body)
        except Exception as error:
            self.problems.append(f"the fake sent an invalid model: {error!r:.300}")
        response = ws.respond(200, json.dumps(body))
        response.headers["Content-Type"] = "application/json"
        return response

    def _date(self, ws: ServerConnection, request: Request, response: Response) -> None:
        if self.clock_offset:  # a server whose clock differs from this computer's
            del response.headers["Date"]
            response.headers["Date"] = email.utils.formatdate(time.time() + self.clock_offset,
                                                              usegmt=True)

    async def _handle(self, ws: ServerConnection) -> None:
        session = Session(self, ws)
        reader = asyncio.create_task(self._read(session))
        script = asyncio.create_task(self.script(session))
        # A script ends when the client goes away; its own failures fail the test.
        await asyncio.wait({script, reader}, return_when=asyncio.FIRST_COMPLETED)
        script.cancel()
        reader.cancel()
        try:
            await script
        except asyncio.CancelledError:
            pass
        except Exception as error:
            self.problems.append(f"the fake server's script failed: {error!r}")
        self.sessions_done.set()

    async def _read(self, session: Session) -> None:
        try:
            async for message in session.ws:
                event = json.loads(message)
                self.received.append((time.monotonic(), event))
                session.received.append(event)
                self.problems += problems_with(event, self.provider)
                if self.vad and event["type"] == "input_audio_buffer.append":
                    await self._detect_speech(session, base64.b64decode(event["audio"]))
                await session.inbox.put(event)
        finally:
            self.closed_with.append(session.ws.close_code)

    async def _detect_speech(self, session: Session, audio: bytes) -> None:
        for change in session.vad.hear(audio):
            item_id = f"item_user_{session.vad.ms}"
            if change == "started":
                self.speech_started.append(time.monotonic())
                session.turn_id = item_id
                await session.send("input_audio_buffer.speech_started", item_id=item_id,
                                   audio_start_ms=max(session.vad.ms - 360, 0))
            else:
                await session.send("input_audio_buffer.speech_stopped", item_id=session.turn_id,
                                   audio_end_ms=session.vad.ms - 500)
                await session.send("input_audio_buffer.committed", item_id=session.turn_id)
                await session.turns.put(session.turn_id)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
