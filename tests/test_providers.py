"""The endpoints people use besides OpenAI's, each against its own fake (tests/realtime_server.py):
Azure OpenAI (the GA path, the `api-key` header, a deployment's name for the model) and xAI's Grok
voice (a flat session, `conversation.created` first, no truncate, billed by the minute); and the
warnings about models that are going away, from a fake models listing."""

from __future__ import annotations

import asyncio
import datetime
import re
import time

from conftest import API_KEY, noise

AZURE_KEY = "azure-key-7f3a9c"
XAI_KEY = "xai-key-51b2e8"


def voice_then_typed(answers: list[str], reply_seconds: float = 0.4):
    """The person speaks first (the fake's VAD is played by hand: 1.2 s of appends), the reply
    follows; then a typed line and its reply."""
    async def script(session):
        session.server.update = await session.handshake()
        while len(session.server.events("input_audio_buffer.append")) < 60:
            await asyncio.sleep(0.02)
        await session.send("input_audio_buffer.speech_started", audio_start_ms=0, item_id="item_u")
        await session.send("input_audio_buffer.committed", item_id="item_u")
        await session.user_said("item_u", "What is the tallest mountain?")
        await session.reply(noise(reply_seconds, seed=5), answers[0])
        await session.expect("conversation.item.create")
        await session.expect("response.create")
        await session.reply(noise(3.0, seed=6), answers[1], speed=10)
        await asyncio.sleep(3600)
    return script


def test_azure_openai_deployment_voice_and_typed_turns(serve, run_client, tmp_path):
    (tmp_path / "mic.raw").write_bytes(noise(2.0, seed=4))
    server = serve(voice_then_typed(["Everest, at 8,849 metres.", "K2 is the second."]),
                   provider="azure")
    client = run_client(server, "--provider", "azure", "--deployment", "team-realtime",
                        "--price-model", "gpt-realtime-2.1", "--duplex", "full",
                        env={"AZURE_OPENAI_API_KEY": AZURE_KEY, "OPENAI_API_KEY": None,
                             "FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    client.wait_for("tokens in 118")
    time.sleep(0.6)  # the first reply plays to its end (a typed line would interrupt it)
    client.type("And the second?")
    client.wait_for("tokens in 118", count=2)
    client.type("")  # Enter: the reply (3 s) is still playing; Azure takes the truncate
    client.wait_for("interrupted, heard")
    assert client.stop() == 0

    # The GA path with the deployment's name, and the key in api-key only.
    assert server.request_paths == ["/openai/v1/realtime?model=team-realtime"]
    (headers,) = server.request_headers
    assert headers["api-key"] == AZURE_KEY and "Authorization" not in headers
    session = server.update["session"]
    assert session["type"] == "realtime" and session["audio"]["input"]["transcription"] is None
    assert len(server.events("conversation.item.truncate")) == 1
    assert server.models_asked == []  # deployments are not models: no listing to ask
    out = client.stdout
    assert "you: What is the tallest mountain?" in out and "assistant: Everest" in out
    assert "you: And the second?" in out
    # gpt-realtime-2.1's prices, as --price-model says.
    assert "out 22 (text 22, audio 0) · $0.0014" in out
    assert "session: 2 responses · 236 tokens in · 44 out · $0.0029" in out
    assert AZURE_KEY not in out + client.stderr


def test_xai_grok_voice_and_typed_turns(serve, run_client, tmp_path):
    (tmp_path / "mic.raw").write_bytes(noise(2.0, seed=4))
    server = serve(voice_then_typed(["Everest.", "K2, in the Karakoram."]), provider="xai")
    client = run_client(server, "--provider", "xai", "--duplex", "full",
                        env={"XAI_API_KEY": XAI_KEY, "OPENAI_API_KEY": None,
                             "FAKE_SOX_MIC": str(tmp_path / "mic.raw")})
    client.wait_for("a minute")
    time.sleep(0.6)
    client.type("And the second?")
    client.wait_for("a minute", count=2)
    client.type("")  # Enter: the sound stops; xAI takes no truncate, so none is sent
    client.wait_for("interrupted, heard")
    stopped = time.monotonic()
    assert client.stop() == 0

    assert server.request_paths == ["/v1/realtime?model=grok-voice-latest"]
    (headers,) = server.request_headers
    assert headers["Authorization"] == f"Bearer {XAI_KEY}"
    # The flat session (the fake checks it field by field against xAI's) and Grok's voice.
    session = server.update["session"]
    assert session["voice"] == "Eve" and session["turn_detection"] == {"type": "server_vad"}
    assert server.events("conversation.item.truncate") == []
    assert server.models_asked == []
    out, err = client.stdout, client.stderr
    assert "you: What is the tallest mountain?" in out and "assistant: Everest." in out
    assert "assistant: K2, in the Karakoram." in out or "interrupted, heard" in out
    # Billed by the minute: no tokens in response.done, the time is what costs.
    assert "so far · 0.0 min connected, at $0.05 a minute" in out
    assert "session: 2 responses · 0 tokens in · 0 out · $0.00" in out
    assert "unknown server event" not in err  # conversation.created and ping are expected
    assert XAI_KEY not in out + err
    assert time.monotonic() - stopped < 5


def test_models_going_away_are_named_with_their_replacements(serve, run_client):
    today = datetime.date.today()  # the warning counts days from the UTC date; a test may run
    soon, later = today + datetime.timedelta(days=30), today + datetime.timedelta(days=200)

    async def script(session):
        await session.handshake()
        await session.expect("conversation.item.create")
        await session.reply(noise(0.2), "Still here")
        await asyncio.sleep(3600)

    server = serve(script, models={"gpt-realtime": soon.isoformat(),
                                   "gpt-4o-transcribe": later.isoformat()})
    client = run_client(server, "--model", "gpt-realtime", "--transcription-model",
                        "gpt-4o-transcribe")
    client.wait_for("connected")
    client.wait_for("shuts down")  # asked beside the talk, not before it
    client.type("Hello")
    client.wait_for("tokens in")
    assert client.stop() == 0
    err = client.stderr
    days = (soon - datetime.date(*time.gmtime()[:3])).days  # by the UTC date, as the script counts
    assert f"gpt-realtime shuts down on {soon}, in {days} days: use --model gpt-realtime-2.1" \
        in err
    assert "gpt-4o-transcribe" not in err  # 200 days away: not yet worth a word
    assert [path for path, _ in server.models_asked] == ["/v1/models/gpt-realtime",
                                                        "/v1/models/gpt-4o-transcribe"]
    assert all(headers["Authorization"] == f"Bearer {API_KEY}"
               for _, headers in server.models_asked)

    # The default models: not going away (a null date, or not listed), so nothing is said.
    quiet = serve(script, models={"gpt-realtime-2.1": None})
    client = run_client(quiet)
    client.wait_for("connected")
    deadline = time.monotonic() + 10
    while len(quiet.models_asked) < 2 and time.monotonic() < deadline:  # it asks beside the talk
        time.sleep(0.02)
    client.type("Hello")
    client.wait_for("tokens in")
    assert client.stop() == 0
    assert "shut" not in client.stderr
    assert len(quiet.models_asked) == 2


def test_gpt_live_models_and_an_azure_without_an_endpoint_are_refused(run_client):
    client = run_client(None, "--model", "gpt-live-1")
    assert client.finish() == 2
    assert "gpt-live-1 is served by OpenAI's GPT-Live API" in client.stderr
    assert len(client.stderr.strip().splitlines()) == 1
    client = run_client(None, "--provider", "azure", env={"OPENAI_BASE_URL": None})
    assert client.finish() == 2
    assert "Azure needs your resource's endpoint: set AZURE_OPENAI_ENDPOINT" in client.stderr


def test_xai_minutes_count_against_max_cost_while_nobody_talks(serve, run_client):
    async def script(session):
        await session.handshake()
        await asyncio.sleep(3600)

    server = serve(script, provider="xai")
    # $0.001 is 1.2 s of connection at $0.05 a minute.
    client = run_client(server, "--provider", "xai", "--max-cost", "0.001",
                        env={"XAI_API_KEY": XAI_KEY})
    client.wait_for("connected")
    started = time.monotonic()
    assert client.finish(timeout=10) == 0
    assert 0.9 < time.monotonic() - started < 3
    # The loop wakes when the budget is reached; a busy machine may wake it 30 ms late ($0.00003).
    assert re.search(r"stopped: this session has cost \$0\.001[01], reaching --max-cost \$0\.0010",
                     client.stdout), client.stdout
    assert "of --max-cost $0.0010 used" in client.stderr  # the warning at 80 %
