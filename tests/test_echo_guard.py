"""--duplex auto, the echo guard, in a room where the speaker leaks into the microphone the way a
laptop's does (tests/room.py): the real script and the real sox, the fake API with a VAD.

Conversations in their natural order: the person asks first, the reply follows, and the person
talks over it. The long runs (a randomised matrix of rooms, voices, levels and moments; minutes
of assistant speech; full and half duplex in the same rooms) are in bench/echo.py; these are the
short ones CI runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import echo_trial
import pytest
from real_audio import why_no_real_audio
from room import Path

REASON = why_no_real_audio()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"needs real audio: {REASON}"),
    pytest.mark.skipif("pulse-ci" not in os.environ.get("PULSE_SERVER", ""),
                       reason="the room adds its own microphone to ../shared/pulse-rig.sh's server"),
]


def assert_interrupted_in_time(result, stop_ms=500, asked=True):
    assert result.question_heard == asked  # the person spoke first, and the server heard them
    assert result.self_triggered == 0  # the server heard none of the assistant's own voice
    # Once, for the person (the person may talk on over the answer, and stop that too).
    assert result.stops_before_answer == 1
    # The goal is 300 ms; it is met unless the first word falls on a loud syllable of the
    # assistant, which no loudness can tell apart (bench/echo.py times many onsets). This bound
    # catches a guard that got slower.
    assert result.stop_ms is not None and result.stop_ms <= stop_ms
    assert result.speech_started_ms is not None and result.speech_started_ms <= 600
    assert result.onset_missing_ms is not None and result.onset_missing_ms <= 100
    assert result.answered


def test_the_person_asks_talks_over_the_first_reply_and_the_next_runs_remember_the_room(
        tmp_path):
    """The natural order: the question first (whose sound the guard must not learn the room
    from), the reply half a second after it, the person talking over it 2.5 s in. The next run
    remembers the room (a file in XDG_CACHE_HOME), so its first reply can be talked over 1 s in.
    The run after starts with headphones on (no echo: everything is sent) and 1.5 s into the
    reply they come out: the echo that comes back follows the remembered path, and is held back
    from its first frame (sent, its first 150 ms would be a turn)."""
    cache = tmp_path / "cache"
    first = echo_trial.run("auto", Path(gain_db=-12), question=True, person_at=2.5, seconds=5,
                           cache=cache, work=tmp_path / "first")
    print(first)
    assert_interrupted_in_time(first)
    room = json.loads((cache / "realtime-sox" / "rooms.json").read_text())["default → default"]
    # The echo's whole energy, its direct path and its tail, as the status line's dB.
    assert -15 < 10 * math.log10(room["direct"] + room["tail"] / (1 - room["decay"])) < -8
    second = echo_trial.run("auto", Path(gain_db=-12), question=True, person_at=1.0, seconds=4,
                            cache=cache, work=tmp_path / "second")
    print(second)
    assert_interrupted_in_time(second)
    unplugged = echo_trial.run("auto", Path(echo=False), changes=((1.5, Path(gain_db=-12)),),
                               seconds=4, cache=cache, work=tmp_path / "unplugged")
    print(unplugged)
    assert unplugged.self_triggered == 0
    assert unplugged.local_stops == 0  # the reply played to its end


def test_a_quieter_echo_the_person_asks_then_talks_over_the_first_reply(tmp_path):
    result = echo_trial.run("auto", Path(gain_db=-20), question=True, person_at=2.5, seconds=5,
                            work=tmp_path)
    print(result)
    assert_interrupted_in_time(result)


def test_an_echo_too_faint_to_learn_beside_a_fan_the_person_talks_over_the_first_reply_1_s_in(
        tmp_path):
    """A quiet room (-22 dB) with a fan (-45 dBFS): the echo stays too near the fan's noise for
    the guard to learn a path from, so when the person talks over the first reply 1 s in,
    nothing is learnt yet, and their voice was the loudest thing in the window: learnt as the
    echo (19 dB too loud), it left them unheard for 0.8 to 3 s. What the assistant's first
    half second sounded like at the microphone still bounds its echo, and the person is far above."""
    result = echo_trial.run("auto", Path(gain_db=-22, noise_dbfs=-45), question=True,
                            person_at=1.0, seconds=4, pair=("flite:rms", "en-us+f2"),
                            person_dbfs=-18, work=tmp_path)
    print(result)
    assert_interrupted_in_time(result, stop_ms=400)


def test_with_headphones_auto_sends_everything_as_full_duplex_does(tmp_path):
    result = echo_trial.run("auto", Path(echo=False), person_at=1.5, seconds=3.5, work=tmp_path)
    print(result)
    assert result.self_triggered == 0
    assert result.local_stops == 0  # nothing to guard against: the server's VAD hears the person
    assert result.speech_started_ms is not None and result.speech_started_ms <= 300
    assert result.onset_missing_ms == 0
    assert result.answered


def test_a_microphone_that_wakes_up_silent_a_reply_that_ends_in_silence_is_not_the_person(
        tmp_path):
    """A Mac's microphone gives exact zeros while it wakes up, and a reply's audio may end in a
    second of silence: the assistant greets first, and its echo fades into the room's own hiss
    (a fan's, -45 dBFS), which is not the person, though it is louder than the zeros before.
    The next run remembers the room from that short one, and the person talks over its greeting
    half a second in: the fan must not make the echo look louder than remembered (the guard
    would drop the memory and hold while it learns: the person unheard while the greeting plays)."""
    fan = Path(gain_db=-18, delay_ms=40, rt60_ms=200, noise_dbfs=-45)
    pair = ("en-gb", "flite:slt")
    result = echo_trial.run("auto", dataclasses.replace(fan, wakes_ms=1000), seconds=2,
                            pause=(2.0, 1.0), pair=pair, cache=tmp_path / "cache",
                            work=tmp_path / "first")
    print(result)
    assert result.local_stops == 0  # the reply played to its end
    assert result.self_triggered == 0
    greeted = echo_trial.run("auto", fan, person_at=0.5, seconds=3, person_dbfs=-22, pair=pair,
                             cache=tmp_path / "cache", work=tmp_path / "greeted")
    print(greeted)
    assert_interrupted_in_time(greeted, asked=False)
