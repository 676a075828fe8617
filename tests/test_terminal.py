"""The script on a real (pseudo-)terminal: the hidden key prompt, saving the key to .env, and the
assistant's words streaming as they arrive."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import sys
import time

from conftest import API_KEY, SCRIPT, assert_no_orphans, noise


class Terminal:
    def __init__(self, cwd, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, str(SCRIPT)], env)
        self.screen = b""

    def wait_for(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.screen:
            assert time.monotonic() < deadline, f"{text!r} never showed:\n{self.screen.decode()}"
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.screen += os.read(self.fd, 65536)
                except OSError:
                    break

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
            select.select([self.fd], [], [], 0.05)
            try:
                self.screen += os.read(self.fd, 65536)
            except OSError:
                pass
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
        try:
            os.kill(terminal.pid, signal.SIGKILL)
            os.waitpid(terminal.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
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
