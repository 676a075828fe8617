"""Keeping the bill in check (--max-cost, prices for new models) and the transcript log."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from conftest import noise


def turns(count: int, speed: float = 10):
    async def script(session):
        await session.handshake()
        for n in range(1, count + 1):
            await session.send("input_audio_buffer.committed", item_id=f"item_u{n}",
                               previous_item_id=None)
            await session.user_said(f"item_u{n}", f"question {n}")
            await session.reply(noise(0.3, seed=n), f"answer {n}", speed=speed)
            await asyncio.sleep(0.6)
        await asyncio.sleep(3600)
    return script


def test_max_cost_warns_at_80_percent_and_ends_at_100(serve, run_client):
    server = serve(turns(5))
    client = run_client(server, "--max-cost", "0.0016")  # each answer costs $0.0014
    assert client.finish(20) == 0
    assert "warning: 90% of --max-cost $0.0016 used ($0.0014)" in client.stderr
    assert "stopped: this session has cost $0.0029, reaching --max-cost $0.0016" in client.stdout
    assert "session: 2 responses" in client.stdout
    assert "answer 3" not in client.stdout
    assert server.closed_with == [1000]


def test_unknown_model_cost_is_unknown_unless_prices_are_given(serve, run_client):
    client = run_client(serve(turns(1)), "--model", "gpt-realtime-9")
    client.wait_for("tokens in")
    assert client.stop() == 0
    assert "cost unknown for this model" in client.stdout
    priced = run_client(serve(turns(1)), "--model", "gpt-realtime-9",
                        env={"REALTIME_PRICES": "10,0.3,20,0.6,0.06,2.4"})
    priced.wait_for("tokens in")
    assert priced.stop() == 0
    # 102 text in × 0.60 + 16 audio in × 10 + 22 text out × 2.40 per million
    assert "$0.0003" in priced.stdout
    refused = run_client(None, "--model", "gpt-realtime-9", "--max-cost", "1")
    assert refused.finish() == 2
    assert "--max-cost needs the prices of gpt-realtime-9" in refused.stderr


def test_log_holds_every_finished_turn_after_kill_9(serve, run_client, tmp_path):
    log = tmp_path / "talk.jsonl"
    client = run_client(serve(turns(2)), "--log", str(log))
    client.wait_for("answer 2")
    client.wait_for("tokens in 118", timeout=5)
    time.sleep(0.5)
    client.process.send_signal(signal.SIGKILL)
    client.finish()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    spoken = [(r.get("speaker"), r.get("text")) for r in records if "speaker" in r]
    assert spoken == [("user", "question 1"), ("assistant", "answer 1"),
                      ("user", "question 2"), ("assistant", "answer 2")]
    answer = records[1]
    assert answer["heard"] == "full" and answer["cost_usd"] == pytest.approx(0.001448)
    assert answer["usage"]["input_tokens"] == 118 and answer["time"].endswith("Z")


@pytest.mark.parametrize("where", ["directory", "unwritable"])
def test_log_path_is_checked_at_start(run_client, tmp_path, where):
    path = tmp_path if where == "directory" else tmp_path / "missing" / "dir" / "log.jsonl"
    client = run_client(None, "--log", str(path))
    assert client.finish() == 2
    expected = "is a directory" if where == "directory" else "cannot write --log"
    assert expected in client.stderr and "Traceback" not in client.stderr
