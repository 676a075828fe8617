"""Fixtures: the fake Realtime server, a fake `sox` first on PATH, and the script as a subprocess."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from realtime_server import FakeRealtime, Script  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "realtime_sox.py"
API_KEY = "sk-test-" + "k" * 40
BYTES_PER_SECOND = 48_000


def noise(seconds: float, seed: int = 1, level: int = 8000) -> bytes:
    """Loud, recognisable PCM: every byte position differs, so order and exactness show."""
    rng = random.Random(seed)
    samples = [rng.randint(-level, level) for _ in range(int(seconds * 24_000))]
    return b"".join(s.to_bytes(2, "little", signed=True) for s in samples)


class SoxLog:
    """What the fake sox processes of one test did (see fake_sox.py)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def runs(self, role: str) -> list[dict[str, Any]]:
        found = []
        for path in glob.glob(str(self.dir / f"{role}-*.json")):
            info = json.loads(Path(path).read_text())
            stem = path[:-5]
            info["raw"] = Path(stem + ".raw").read_bytes() if os.path.exists(stem + ".raw") else b""
            info["times"] = [(float(t), int(o), int(n)) for t, o, n in (
                line.split() for line in Path(stem + ".times").read_text().splitlines())] \
                if os.path.exists(stem + ".times") else []
            found.append(info)
        return sorted(found, key=lambda run: run["times"][0][0] if run["times"] else 0)

    def heard(self) -> bytes:
        return b"".join(run["raw"] for run in self.runs("player"))

    def heard_times(self) -> list[tuple[float, int]]:
        """(moment, bytes) of every 10 ms slice any player made audible."""
        return sorted((t, n) for run in self.runs("player") for t, _, n in run["times"])

    def pids(self) -> list[int]:
        return [json.loads(Path(p).read_text())["pid"] for p in glob.glob(str(self.dir / "*.json"))]


class Client:
    """realtime_sox.py running against the fake server and fake sox, as a person would run it."""

    def __init__(self, tmp_path: Path, server: FakeRealtime | None, args: list[str],
                 env: dict[str, str], stdin: int | None = subprocess.PIPE,
                 script: Path = SCRIPT) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(script), *args], cwd=tmp_path, env=env, stdin=stdin,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._readers = [threading.Thread(target=self._drain, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.process.stdout, self.out),
                                              (self.process.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream: Any, sink: list[bytes]) -> None:
        for line in iter(stream.readline, b""):
            sink.append(line)

    @property
    def stdout(self) -> str:
        return b"".join(self.out).decode()

    @property
    def stderr(self) -> str:
        return b"".join(self.err).decode()

    def wait_for(self, text: str, timeout: float = 10, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while (self.stdout + self.stderr).count(text) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                time.sleep(0.1)
                if (self.stdout + self.stderr).count(text) >= count:
                    return
                raise AssertionError(f"{text!r} never showed.\nstdout:\n{self.stdout}\n"
                                     f"stderr:\n{self.stderr}")
            time.sleep(0.02)

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.process.send_signal(sig)
        return self.finish()

    def finish(self, timeout: float = 10) -> int:
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:  # stdin data the script never read
                    pass
        return code


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used so far (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def sox_log(tmp_path: Path) -> SoxLog:
    directory = tmp_path / "sox"
    directory.mkdir()
    return SoxLog(directory)


@pytest.fixture
def base_env(tmp_path: Path, sox_log: SoxLog) -> dict[str, str]:
    """A clean environment with the fake sox first on PATH and a fake key."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sox = bin_dir / "sox"
    sox.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_sox.py"}" "$@"\n')
    sox.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "REALTIME_", "FAKE_SOX_", "PULSE_LATENCY", "AZURE_OPENAI_",
                                "XAI_")) and k not in ("COLUMNS", "LINES")}  # xdist sets 80×24
    # A dead loopback port unless a test names its fake server: no test may reach a real API.
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", FAKE_SOX_DIR=str(sox_log.dir),
               OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL="http://127.0.0.1:9/v1",
               PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(tmp_path / "cache"))  # rooms remembered
    return env


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(script, refuse=None, tls=None, vad=False, provider="openai", models=None) starts a
    fake Realtime server; all are checked and stopped."""
    servers: list[FakeRealtime] = []

    def start(script: Script, refuse: tuple[int, str] | None = None,
              tls: ssl.SSLContext | None = None, vad: bool = False, provider: str = "openai",
              models: dict[str, str | None] | None = None) -> FakeRealtime:
        servers.append(FakeRealtime(script, refuse, tls, vad, provider, models))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
        assert server.problems == [], "the client sent events the API would reject"


@pytest.fixture
def run_client(tmp_path: Path, base_env: dict[str, str], sox_log: SoxLog) -> Iterator[Any]:
    """run_client(server, *args, env=..., stdin=...) starts realtime_sox.py; it is killed and its
    sox processes checked for orphans after the test."""
    clients: list[Client] = []

    def start(server: FakeRealtime | None, *args: str, env: dict[str, str | None] | None = None,
              stdin: int | None = subprocess.PIPE, script: Path = SCRIPT) -> Client:
        """`env` adds to the base environment; a None value removes the variable. `script`
        runs another client, examples/minimal.py, in the same harness."""
        full_env = dict(base_env)
        if server is not None:
            full_env["OPENAI_BASE_URL"] = server.url
        for name, value in (env or {}).items():
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        clients.append(Client(tmp_path, server, list(args), full_env, stdin, script))
        return clients[-1]

    yield start
    for client in clients:
        if client.process.poll() is None:
            client.process.kill()
            client.finish()
    assert_no_orphans(sox_log)


def assert_no_orphans(sox_log: SoxLog) -> None:
    deadline = time.monotonic() + 3
    alive = sox_log.pids()
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if running(pid)]
        time.sleep(0.05)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"sox processes outlived the script: {alive}"


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; its parent just has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return sys.platform != "linux"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_audio: plays or records on the real audio server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that play or record on the real audio server, which they share (one sink, one
    monitor; one test restarts it) and which wants the machine quiet: `make test` runs them one
    after another, after the rest."""
    for item in items:
        reasons = " ".join(str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))
        fixtures = set(getattr(item, "fixturenames", ()))
        if "real audio" in reasons or "pulse-rig" in reasons or fixtures & {"real_env", "real_env_path"}:
            item.add_marker(pytest.mark.real_audio)
