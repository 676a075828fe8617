"""Opening a connection never freezes the script: Ctrl-C ends it at once in every phase (name
lookup, TCP, TLS, the upgrade, the session's start, a reconnect's backoff), each way it can fail
has its own line and exit code, and wss:// works end to end through the loop's own TLS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import API_KEY, SCRIPT
from test_failures import assert_one_clean_line


class Stub:
    """A TCP server on loopback that misbehaves in one way. It records what it received."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.received = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        if behaviour == "tcp never answers":  # a full backlog: the next SYN goes unanswered
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self.held.append(filler)
        else:
            threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        scheme = "https" if self.behaviour == "tls never finishes" else "http"
        return f"{scheme}://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        self.held.append(connection)
        while b"\r\n\r\n" not in self.received and self.behaviour != "tls never finishes":
            data = connection.recv(65536)
            if not data:
                return
            self.received += data
        if self.behaviour == "tls never finishes":
            self.received += connection.recv(65536)  # the ClientHello, never answered
        elif self.behaviour == "upgrade dripped":  # each byte would restart a socket timeout
            for byte in self._accept_answer():
                time.sleep(0.5)
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return
        elif self.behaviour == "no session":
            connection.sendall(self._accept_answer())
        elif self.behaviour == "web page":
            page = b"<!DOCTYPE html><html><body>Welcome to Hotel WiFi. Sign in.</body></html>"
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: "
                               + str(len(page)).encode() + b"\r\n\r\n" + page)

    def _accept_answer(self) -> bytes:
        key = [line.split(b":", 1)[1].strip() for line in self.received.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:")][0]
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
                                  .digest())
        return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
                b"\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")

    def close(self) -> None:
        self.listener.close()
        for sock in self.held:
            sock.close()


@pytest.fixture
def stub():
    stubs: list[Stub] = []

    def start(behaviour: str) -> Stub:
        stubs.append(Stub(behaviour))
        return stubs[-1]

    yield start
    for one in stubs:
        one.close()


def reached(stub: Stub, behaviour: str) -> bool:
    """The client got as far as the phase the stub holds it in."""
    if behaviour == "tls never finishes":
        return stub.received[:1] == b"\x16"  # a TLS handshake record
    if behaviour in ("upgrade never answered", "upgrade dripped", "no session"):
        return b"\r\n\r\n" in stub.received
    return True


def ends_at_once(client, sig=signal.SIGINT) -> float:
    started = time.monotonic()
    client.process.send_signal(sig)
    code = client.finish()
    took = time.monotonic() - started
    assert code == 0, client.stderr
    assert "session: 0 responses" in client.stdout
    assert "Traceback" not in client.stderr and "error:" not in client.stderr
    return took


@pytest.mark.parametrize("behaviour", ["tcp never answers", "tls never finishes",
                                       "upgrade never answered", "upgrade dripped", "no session"])
def test_ctrl_c_ends_at_once_in_each_phase_of_opening(stub, run_client, behaviour):
    server = stub(behaviour)
    client = run_client(None, env={"OPENAI_BASE_URL": server.url})
    deadline = time.monotonic() + 5
    while not reached(server, behaviour) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well into the phase, waiting in it
    assert reached(server, behaviour) and client.process.poll() is None
    assert ends_at_once(client) < 1.0


@pytest.mark.parametrize("behaviour, code, line", [
    ("tcp never answers", 9, "cannot reach 127.0.0.1:{port}: no answer within 1 s; check your "
                             "network or OPENAI_BASE_URL"),
    ("tls never finishes", 10, "TLS with 127.0.0.1 did not finish within 1 s: something between "
                               "you and the API holds the connection"),
    ("upgrade never answered", 9, "127.0.0.1 accepted the connection but did not answer the "
                                  "WebSocket upgrade within 1 s"),
    ("upgrade dripped", 9, "127.0.0.1 accepted the connection but did not answer the WebSocket "
                           "upgrade within 1 s"),
    ("no session", 11, "127.0.0.1 accepted the WebSocket but started no session within 2 s"),
    ("web page", 9, "127.0.0.1 answered with a web page (HTTP 200), not the Realtime API: a "
                    "captive portal, proxy or firewall is in the way"),
])
def test_each_way_opening_fails_has_its_own_line(stub, run_client, behaviour, code, line):
    server = stub(behaviour)
    started = time.monotonic()
    client = run_client(None, "--connect-timeout", "1", env={"OPENAI_BASE_URL": server.url})
    assert_one_clean_line(client, code, line.format(port=server.port))
    assert time.monotonic() - started < 5  # one deadline for the whole opening
    assert "Hotel" not in client.stderr and "<html" not in client.stderr  # named, not dumped
    assert "session: 0 responses" in client.stdout


def test_ctrl_c_ends_at_once_during_a_reconnects_backoff(serve, run_client):
    async def script(session):
        await session.handshake()
        await session.ws.close(1011, "internal server error")

    server = serve(script)
    client = run_client(server)
    client.wait_for("connected")
    server.refuse = (503, '{"error": {"message": "The server is overloaded."}}')
    client.wait_for("(try 3 of 6)")  # a backoff of 1 to 2 s has just begun
    assert ends_at_once(client) < 1.0


def test_ctrl_c_ends_at_once_while_a_rollover_waits_for_the_upgrade(serve, run_client):
    async def script(session):
        await session.handshake()
        if session.number == 1:
            await session.send("error", error={"type": "invalid_request_error",
                                               "code": "session_expired", "message": "60 minutes"})
            await session.ws.close(1001, "session expired")
        await asyncio.sleep(3600)

    server = serve(script)
    server.upgrade_delay = [0, 30]
    client = run_client(server)
    client.wait_for("starting a new session")
    deadline = time.monotonic() + 5
    while len(server.request_headers) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert len(server.request_headers) == 2  # the new session's upgrade is being held back
    assert ends_at_once(client, signal.SIGTERM) < 1.0


def test_ctrl_c_ends_at_once_while_the_name_is_looked_up(base_env, tmp_path, sox_log):
    """In a network namespace of its own whose DNS server (on its loopback) never answers."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rnm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare with user, network and mount namespaces")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    silent_dns = ("import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                  "s.bind(('127.0.0.1', 53)); time.sleep(60)")
    inside = (f'mount --bind "{tmp_path / "resolv.conf"}" /etc/resolv.conf && ip link set lo up '
              f'&& ("{sys.executable}" -c "{silent_dns}" >/dev/null 2>&1 &) && sleep 0.3 '
              f'&& exec "{sys.executable}" "{SCRIPT}"')
    env = {**base_env, "OPENAI_BASE_URL": "https://api.example.invalid/v1"}
    process = subprocess.Popen(["unshare", "-rnm", "sh", "-c", inside], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(2.5)  # a lookup that gets no answer takes 5 s or more
        assert process.poll() is None
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
        took = time.monotonic() - started
    finally:
        process.kill()
        subprocess.run(["pkill", "-f", "s.bind\\(\\('127.0.0.1', 53\\)\\)"], check=False)
    assert process.returncode == 0, err
    assert took < 1.0
    assert b"session: 0 responses" in out and b"Traceback" not in err
    resolver = subprocess.run(["pgrep", "-f", "found = socket.getaddrinfo"], capture_output=True)
    assert resolver.returncode == 1, "the name-lookup child outlived the script"


def tls_server(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for localhost and api.realtime.test, and a server context."""
    cert, key = make_certificate(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return cert, context


async def answer_a_typed_line(session, audio: bytes, words: str):
    await session.handshake()
    await session.expect("response.create")
    await session.reply(audio, words)
    await asyncio.sleep(3600)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,DNS:api.realtime.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_a_whole_turn_over_wss_with_a_certificate_trusted_through_ssl_cert_file(
        serve, run_client, tmp_path):
    cert, context = tls_server(tmp_path)
    server = serve(lambda session: answer_a_typed_line(
        session, b"\x01\x02" * 24000, "Hello over TLS " + "x" * 20000), tls=context)
    assert server.url.startswith("https://localhost:")  # a name: the resolver child looks it up
    client = run_client(server, env={"SSL_CERT_FILE": str(cert)})
    client.wait_for("connected")
    client.type("Hello?")
    client.wait_for("tokens in")
    assert client.stop() == 0
    assert "assistant: Hello over TLS" in client.stdout
    assert server.request_headers[0]["Authorization"] == f"Bearer {API_KEY}"

    # The same server, not trusted: verification is never switched off.
    untrusted = run_client(server)
    assert_one_clean_line(untrusted, 10, "TLS with localhost failed (CERTIFICATE_VERIFY_FAILED)")


def test_a_reconnect_keeps_the_screen_and_the_microphone_alive(serve, base_env, sox_log, tmp_path):
    """The old blocking handshake froze everything for as long as the server held the upgrade."""
    from test_terminal import Terminal

    async def script(session):
        await session.handshake()
        if session.number == 1:
            await asyncio.sleep(1.0)
            await session.ws.close(1011, "internal server error")
        await asyncio.sleep(3600)

    server = serve(script)
    server.upgrade_delay = [0, 3.0]  # the reconnect's upgrade is answered after 3 s
    terminal = Terminal(tmp_path, {**base_env, "OPENAI_BASE_URL": server.url,
                                   "TERM": "xterm-256color"})
    try:
        terminal.wait_for("reconnecting in")
        statuses, typed = set(), False
        deadline = time.monotonic() + 6
        while b"connected again" not in terminal.screen and time.monotonic() < deadline:
            terminal.read(0.2)
            statuses |= {line.split(" · ")[0] for line in terminal.rendered()
                         if line.startswith("● waiting for 127.0.0.1")}
            if statuses and not typed:
                terminal.type("hello\r")
                typed = True
        terminal.wait_for("connected again")
        assert terminal.stop() == 0
    finally:
        terminal.close()
    assert {"● waiting for 127.0.0.1… 1 s", "● waiting for 127.0.0.1… 2 s"} <= statuses
    assert "not connected yet; type again in a moment" in terminal.screen.decode()
    # The recorder was read all along: sox never waited on a full pipe.
    (recorder,) = sox_log.runs("recorder")
    moments = [moment for moment, _, _ in recorder["times"]]
    assert max(b - a for a, b in zip(moments, moments[1:], strict=False)) < 0.3


class ConnectProxy:
    """An HTTP proxy on loopback that tunnels every CONNECT to one local port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.requests: list[bytes] = []
        self.seen = bytearray()  # everything the client sent through the tunnel
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        self.requests.append(head)
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 30)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        self.seen += data
                    (upstream if sock is client else client).sendall(data)
        except OSError:  # the script went away: a reset is the end of the tunnel too
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.listener.close()


def test_https_proxy_tunnels_the_connection_and_never_sees_the_key(serve, run_client, tmp_path):
    cert, context = tls_server(tmp_path)
    server = serve(lambda session: answer_a_typed_line(session, b"\x01\x02" * 4800,
                                                       "Through the tunnel"), tls=context)
    proxy = ConnectProxy(server.port)
    try:
        client = run_client(server, env={"OPENAI_BASE_URL": "https://api.realtime.test/v1",
                                         "https_proxy": f"http://127.0.0.1:{proxy.port}",
                                         "SSL_CERT_FILE": str(cert)})
        client.wait_for("connected")
        client.type("Hello?")
        client.wait_for("tokens in")
        assert client.stop() == 0
    finally:
        proxy.close()
    assert proxy.requests[0].startswith(b"CONNECT api.realtime.test:443 HTTP/1.1\r\n")
    assert API_KEY.encode() not in bytes(proxy.seen)  # inside TLS, end to end
    assert "assistant: Through the tunnel" in client.stdout
