"""The script on a real (pseudo-)terminal: the hidden key prompt, saving the key to .env, and the
assistant's words streaming as they arrive."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

import pyte
from conftest import API_KEY, SCRIPT, assert_no_orphans, noise


class Terminal:
    """The script on a 100×20 pseudo-terminal; `rendered()` is the screen a person would see."""

    def __init__(self, cwd, env, args=()):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, str(SCRIPT), *args], env)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 100, 0, 0))
        self.screen = b""
        self.emulator = pyte.Screen(100, 20)
        self.stream = pyte.ByteStream(self.emulator)

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.05)[0]:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    return
                self.screen += data
                self.stream.feed(data)

    def close(self) -> None:
        """Make sure the script is gone, whatever the test did."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def rendered(self) -> list[str]:
        return [line.rstrip() for line in self.emulator.display]

    def wait_for(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.screen:
            assert time.monotonic() < deadline, f"{text!r} never showed:\n{self.screen.decode()}"
            self.read(0.1)

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def stop(self) -> int:
        os.kill(self.pid, signal.SIGINT)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.wait_for("session:", timeout=1)
                return os.waitstatus_to_exitcode(status)
            self.read(0.05)
        raise AssertionError("the script did not stop")


def test_key_prompt_saves_to_dotenv_and_words_stream(serve, base_env, sox_log, tmp_path):
    async def script(session):
        await session.handshake()
        await session.reply(noise(0.5), "Hello from the terminal", speed=1, chunk_ms=100)
        await asyncio.sleep(3600)

    server = serve(script)
    env = {k: v for k, v in base_env.items() if k != "OPENAI_API_KEY"}
    env.update(OPENAI_BASE_URL=server.url, TERM="xterm-256color", COLUMNS="120")
    terminal = Terminal(tmp_path, env)
    try:
        terminal.wait_for("OpenAI API key (input hidden): ")
        terminal.type(API_KEY + "\n")
        terminal.wait_for("readable only by you)? [y/N]")
        terminal.type("y\n")
        terminal.wait_for("tokens in")
        assert terminal.stop() == 0
    finally:
        terminal.close()
    dotenv = tmp_path / ".env"
    assert dotenv.read_text() == f"OPENAI_API_KEY={API_KEY}\n"
    assert dotenv.stat().st_mode & 0o777 == 0o600
    screen = terminal.screen.decode()
    assert API_KEY not in screen  # hidden while typed, never shown
    assert server.request_headers[0]["Authorization"] == f"Bearer {API_KEY}"
    # Streamed word by word onto one line, in colour, as it arrived.
    assert "Hello from the terminal" in screen.replace("\x1b[0m", "")
    assert "\x1b[" in screen
    assert_no_orphans(sox_log)


def test_typing_is_never_garbled_by_the_conversation(serve, base_env, sox_log, tmp_path):
    words = "Once upon a time there was a terminal that kept what you typed in one piece"

    async def script(session):
        await session.handshake()
        await session.send("input_audio_buffer.committed", item_id="u1", previous_item_id=None)
        await session.user_said("u1", "Tell me a story")
        await session.reply(noise(3.0), words, speed=1)
        await session.expect("conversation.item.create")
        await asyncio.sleep(3600)

    server = serve(script)
    env = {**base_env, "OPENAI_BASE_URL": server.url, "TERM": "xterm-256color"}
    terminal = Terminal(tmp_path, env, ["--max-cost", "5"])
    try:
        terminal.read(1.2)
        for char in "hello wor":  # typed while the assistant's words stream in
            os.write(terminal.fd, char.encode())
            terminal.read(0.12)
        screen = terminal.rendered()
        bottom = [line for line in screen if line][-3:]
        assert bottom[0].startswith("assistant: Once upon")  # still streaming, live
        # The microphone hears nothing of the speaker: the echo guard learns that there is no echo.
        assert re.match(r"● assistant speaking · echo guard: (learning|no echo) · \$0\.0000 so far "
                        r"of \$5\.00 · 60 min left", bottom[1]), bottom[1]
        assert bottom[2] == "› hello wor"
        assert "you: Tell me a story" in screen
        os.write(terminal.fd, b"\x7f\x7forld\r")  # two backspaces, then Enter
        terminal.read(2.5)
        screen = terminal.rendered()
        # A line typed over the assistant interrupts it, like speaking would.
        (cut,) = [line for line in screen if line.startswith("  interrupted, heard: Once upon")]
        assert screen.index(cut) < screen.index("you: hello world")
        assert not any(line.startswith("assistant:") for line in screen)
        assert [line for line in screen if line][-1] == "›"
        assert terminal.stop() == 0
        terminal.read(0.3)
    finally:
        terminal.close()
    (typed,) = server.events("conversation.item.create")
    assert typed["item"]["content"][0]["text"] == "hello world"
    screen = terminal.rendered()
    assert not any(line.startswith(("●", "›")) for line in screen)  # the live lines are gone
    assert screen[[i for i, line in enumerate(screen) if line][-1]].startswith("session: 1 responses")
    assert_no_orphans(sox_log)
