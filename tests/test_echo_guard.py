"""--duplex auto, the echo guard, in a room where the speaker leaks into the microphone the way a
laptop's does (tests/room.py): the real script and the real sox, the fake API with a VAD.

The long runs (5 minutes of assistant speech per room, false stops per 10 minutes, CPU, and full
and half duplex in the same rooms) are in bench/echo.py; these are the short ones CI runs.
"""

from __future__ import annotations

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


def test_the_guard_holds_the_assistant_back_and_hears_the_person(tmp_path):
    result = echo_trial.run("auto", Path(gain_db=-12), person_at=5.0, seconds=9, work=tmp_path)
    print(result)
    assert result.assistant_seconds > 3.5  # of the assistant's voice, with the person silent...
    assert result.self_triggered == 0  # ...and the server heard none of it
    assert result.local_stops == 1
    # The goal is 300 ms; it is met unless the first word falls on a loud syllable of the
    # assistant, which no loudness can tell apart (bench/echo.py times many onsets). This bound
    # catches a guard that got slower.
    assert result.stop_ms is not None and result.stop_ms <= 500
    assert result.speech_started_ms is not None and result.speech_started_ms <= 600
    assert result.onset_missing_ms is not None and result.onset_missing_ms <= 100
    assert result.answered


def test_a_quieter_echo_is_held_back_too(tmp_path):
    """-20 dB: the server hears none of the assistant (bench/echo.py: the person, and minutes)."""
    result = echo_trial.run("auto", Path(gain_db=-20), seconds=6, work=tmp_path)
    print(result)
    assert result.assistant_seconds > 4.5
    assert result.self_triggered == 0
    assert result.local_stops == 0


def test_with_headphones_auto_sends_everything_as_full_duplex_does(tmp_path):
    result = echo_trial.run("auto", Path(echo=False), person_at=5.0, seconds=8, work=tmp_path)
    print(result)
    assert result.self_triggered == 0
    assert result.local_stops == 0  # nothing to guard against: the server's VAD hears the person
    assert result.speech_started_ms is not None and result.speech_started_ms <= 300
    assert result.onset_missing_ms == 0
    assert result.answered
