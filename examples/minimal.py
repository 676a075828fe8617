#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = ["websocket-client==1.9.2", "python-dotenv==1.2.4", "rich==15.0.0"]
# ///
"""Talk to the OpenAI Realtime API with SoX as microphone and speaker: the smallest whole client.

The article's CLI in Python, on today's GA interface, in its order: connect, configure, record,
type, play. Kept: each reply's end is heard, the microphone is muted while the assistant is
audible (else it answers its own voice from your speakers), Enter interrupts and tells the model
how much you heard, server text is shown as text, each response's usage and cost.

Left out, and in ../realtime_sox.py: an echo guard to talk over the assistant on laptop
speakers, playback paced to the millisecond, reconnecting, the 60-minute rollover, a budget cap,
a transcript log, tools, an audio check, a live status line, a connection that never blocks.
Run: `uv run examples/minimal.py`, with OPENAI_API_KEY in the environment or in .env.
"""

import base64
import json
import os
import re
import selectors
import subprocess
import sys
import time
import urllib.parse

import websocket
from dotenv import load_dotenv
from rich.console import Console
from rich.text import Text

# The article's sox commands, verbatim.
RECORDER = ["sox", "--default-device", "--no-show-progress", "--rate", "24000", "--channels", "1",
            "--encoding", "signed-integer", "--bits", "16", "--type", "raw", "-"]
PLAYER = ["sox", "--type", "raw", "--rate", "24000", "--encoding", "signed-integer", "--bits",
          "16", "--channels", "1", "-", "--no-show-progress", "--default-device"]
BYTES_PER_SECOND = 48_000  # 24 kHz, 16-bit mono
SOX_BLOCK = 16_384  # sox plays whole blocks of 8192 samples: a reply's last one must be filled
ECHO_TAIL = 0.3  # s the room still rings after the speaker stops: the microphone stays muted
PRICES = {"audio_in": 32, "audio_cached": 0.4, "audio_out": 64, "text_in": 4, "text_cached": 0.4,
          "text_out": 24}  # USD per million tokens of gpt-realtime-2.1
# Control characters (ESC starts sequences that clear the screen), bidi overrides, lone surrogates.
UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
console = Console(highlight=False)


def say(label: str, text: str, style: str = "bold") -> None:
    """A server's text, shown as text: nothing in it may act on the terminal."""
    console.print(Text.assemble((label, style), UNSAFE.sub("", str(text))))


def connect() -> websocket.WebSocket:
    """The WebSocket, with the key only inside TLS (plain ws:// only to this machine)."""
    load_dotenv()
    key = os.environ.get("OPENAI_API_KEY") or sys.exit("error: set OPENAI_API_KEY (or .env)")
    base = urllib.parse.urlsplit(os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"))
    if base.scheme != "https" and base.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"error: refusing to send the API key in clear text to {base.hostname}")
    model = os.environ.get("REALTIME_MODEL", "gpt-realtime-2.1")
    url = (f"{'wss' if base.scheme == 'https' else 'ws'}://{base.netloc}"
           f"{base.path.rstrip('/')}/realtime?model={urllib.parse.quote(model)}")
    try:
        return websocket.create_connection(url, header=[f"Authorization: Bearer {key}"],
                                           timeout=10)
    except (OSError, websocket.WebSocketException) as error:
        sys.exit(f"error: cannot connect to {base.hostname}: {error}")


def configure(ws: websocket.WebSocket) -> None:
    """GA session: PCM16 at 24 kHz both ways; the server detects the end of your turns."""
    pcm = {"type": "audio/pcm", "rate": 24000}
    send(ws, "session.update", session={
        "type": "realtime", "output_modalities": ["audio"],
        "instructions": "You are a friendly voice assistant. Keep answers short.",
        "audio": {"input": {"format": pcm, "turn_detection": {"type": "server_vad"},
                            "transcription": {"model": "gpt-transcribe"}},
                  "output": {"format": pcm, "voice": "echo"}}})


def send(ws: websocket.WebSocket, kind: str, **fields: object) -> None:
    ws.send(json.dumps({"type": kind, **fields}))


class Speaker:
    """The sox player, fed without blocking (a reply arrives faster than it plays), and what it
    has played: when this stretch of sound started, and where the current reply item begins."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.sox = subprocess.Popen(PLAYER, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.sox.stdin is not None
        self.pipe = self.sox.stdin.fileno()
        os.set_blocking(self.pipe, False)
        self.queue, self.since, self.written = bytearray(), 0.0, 0
        self.item, self.item_at = "", 0

    def play(self, item: str, audio: bytes) -> None:
        if time.monotonic() > self.audible_until():  # after silence, a new stretch starts
            self.since, self.written, self.queue = time.monotonic(), 0, bytearray()
        if item != self.item:
            self.item, self.item_at = item, self.written + len(self.queue)
        self.queue += audio

    def finish(self) -> None:
        """Silence to the end of sox's block: the reply's last words play instead of waiting."""
        self.queue += bytes(-(self.written + len(self.queue)) % SOX_BLOCK)

    def pump(self) -> None:
        try:
            count = os.write(self.pipe, self.queue) if self.queue else 0
        except BlockingIOError:  # the pipe is full: the rest waits for the next turn
            return
        self.written += count
        del self.queue[:count]

    def audible_until(self) -> float:
        """When what was written ends playing (sox starts a stretch after its first block)."""
        total = self.written + len(self.queue)
        return self.since + (SOX_BLOCK + total) / BYTES_PER_SECOND if total else 0.0

    def heard_ms(self) -> int:
        """How much of the current item was heard, by the clock: honest rather than flattering."""
        elapsed = time.monotonic() - self.since - (SOX_BLOCK + self.item_at) / BYTES_PER_SECOND
        end = (self.written + len(self.queue) - self.item_at) / BYTES_PER_SECOND
        return int(max(0.0, min(elapsed, end)) * 1000)

    def stop(self) -> None:
        """Silence now: kill sox (a gentle stop would play its buffer) and start a new one."""
        self.sox.kill()
        self.sox.wait()
        self.start()


class Conversation:
    """One handler per server event (HANDLERS below), and what you do: speak, type, Enter."""

    def __init__(self, ws: websocket.WebSocket, speaker: Speaker) -> None:
        self.ws, self.speaker, self.responding, self.cost = ws, speaker, False, 0.0
        self.cut: set[str] = set()  # items interrupted: their late audio is dropped

    def microphone(self, audio: bytes) -> None:
        """Silence while the assistant is audible, and as the room rings after: half duplex."""
        if time.monotonic() < self.speaker.audible_until() + ECHO_TAIL:
            audio = bytes(len(audio))
        send(self.ws, "input_audio_buffer.append", audio=base64.b64encode(audio).decode())

    def typed(self, line: str) -> None:
        self.interrupt()  # Enter alone only interrupts; a line is a message, answered aloud
        if line.strip():
            send(self.ws, "conversation.item.create", item={"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": line.strip()}]})
            send(self.ws, "response.create")

    def interrupt(self) -> None:
        if self.responding:
            send(self.ws, "response.cancel")
        if time.monotonic() < self.speaker.audible_until() and self.speaker.item:
            send(self.ws, "conversation.item.truncate", item_id=self.speaker.item,
                 content_index=0, audio_end_ms=self.speaker.heard_ms())
            self.cut.add(self.speaker.item)
            self.speaker.stop()

    def on_audio_delta(self, event: dict) -> None:
        if event["item_id"] not in self.cut:
            self.speaker.play(event["item_id"], base64.b64decode(event["delta"]))

    def on_audio_done(self, event: dict) -> None:
        if event["item_id"] not in self.cut:
            self.speaker.finish()

    def on_response_done(self, event: dict) -> None:
        self.responding = False
        usage = event["response"].get("usage") or {}
        inputs, outputs = usage.get("input_token_details", {}), usage.get("output_token_details", {})
        cached = inputs.get("cached_tokens_details") or {}
        tokens = {"audio_in": inputs.get("audio_tokens", 0) - cached.get("audio_tokens", 0),
                  "text_in": inputs.get("text_tokens", 0) - cached.get("text_tokens", 0),
                  "audio_cached": cached.get("audio_tokens", 0),
                  "text_cached": cached.get("text_tokens", 0),
                  "audio_out": outputs.get("audio_tokens", 0), "text_out": outputs.get("text_tokens", 0)}
        cost = sum(count * PRICES[kind] for kind, count in tokens.items()) / 1_000_000
        self.cost += cost
        say("", f"  tokens in {usage.get('input_tokens', 0)} · out {usage.get('output_tokens', 0)}"
                f" · ${cost:.4f} (session ${self.cost:.4f})", "dim")


HANDLERS = {
    "session.updated": lambda talk, e: say("", "connected: speak, or type a line; Enter alone "
                                               "interrupts; Ctrl-C quits", "dim"),
    "error": lambda talk, e: say("error from the API: ", e["error"].get("message"), "bold red"),
    # You spoke over it: the server cancels its response, the sound is ours to stop.
    "input_audio_buffer.speech_started": lambda talk, e: talk.interrupt(),
    "conversation.item.input_audio_transcription.completed":
        lambda talk, e: say("you: ", e["transcript"].strip(), "bold cyan"),
    "response.created": lambda talk, e: setattr(talk, "responding", True),
    "response.output_audio.delta": Conversation.on_audio_delta,
    "response.output_audio.done": Conversation.on_audio_done,
    "response.output_audio_transcript.done":
        lambda talk, e: say("assistant: ", e["transcript"], "bold green"),
    "response.done": Conversation.on_response_done,
}


def main() -> None:
    ws = connect()
    configure(ws)
    recorder = subprocess.Popen(RECORDER, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert recorder.stdout is not None
    speaker = Speaker()
    talk = Conversation(ws, speaker)
    selector = selectors.DefaultSelector()  # one loop: the socket, the microphone, your keys
    selector.register(ws.fileno(), selectors.EVENT_READ, "server")
    selector.register(recorder.stdout, selectors.EVENT_READ, "microphone")
    try:
        selector.register(sys.stdin, selectors.EVENT_READ, "keys")
    except (ValueError, OSError):  # a file or /dev/null cannot be watched: no typing, then
        pass
    try:
        while True:
            for key, _ in selector.select(timeout=0.02):  # 20 ms: the player is fed in time
                if key.data == "server":  # a frame; TLS may hold more that select cannot see
                    while handle(talk, ws.recv()) and getattr(ws.sock, "pending", int)():
                        pass
                elif key.data == "microphone":
                    talk.microphone(os.read(recorder.stdout.fileno(), 65536))
                elif line := sys.stdin.readline():
                    talk.typed(line)
                else:  # stdin ended: no more typing; the voice goes on
                    selector.unregister(sys.stdin)
            speaker.pump()
    except KeyboardInterrupt:
        pass
    except (websocket.WebSocketException, OSError) as error:
        say("", f"error: the connection ended ({error})", "bold red")
    finally:
        recorder.kill()
        speaker.sox.kill()
        ws.close()  # status 1000
        say("", f"session: ${talk.cost:.4f}", "dim")


def handle(talk: Conversation, message: str | bytes) -> bool:
    """One server event to its handler; what is not one is skipped, never a crash."""
    try:
        event = json.loads(message)
        HANDLERS.get(event["type"], lambda talk, e: None)(talk, event)
    except (ValueError, KeyError, TypeError, AttributeError):
        say("", "skipping a malformed event from the API", "yellow")
    return True


if __name__ == "__main__":
    main()
