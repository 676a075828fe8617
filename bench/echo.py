"""The echo guard (--duplex auto) beside full and half duplex, in the same rooms, in one run.

    .venv/bin/python bench/echo.py              (about 35 minutes; needs ../shared/pulse-rig.sh up,
                                                 and nothing else playing on it)
    .venv/bin/python bench/echo.py --minutes 1  (a quicker look: 1 minute of speech per row)
    .venv/bin/python bench/echo.py --cpu        (only the CPU of the three modes; 4 minutes)

Each room (tests/room.py) is a laptop's speaker-to-microphone path on the real PulseAudio rig; the
real script and the real sox run against the fake API, whose VAD hears what the script appends.
For each room and mode:
- the assistant speaks for minutes with the person silent: the turns the server's VAD started
  (each would be a billed response answering the assistant's own voice), the script's own stops
  (false ones: nobody spoke), and the CPU of the whole script;
- then the person speaks over the assistant, in `--trials` trials at different moments: whether
  it stopped, how soon after the first word the sound stopped and the server's speech_started
  came, how much of the first word the server never got, and whether the answer came.
Prints one Markdown table for the README.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path as FilePath

ROOT = FilePath(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import echo_trial  # noqa: E402
from real_audio import why_no_real_audio  # noqa: E402
from room import Path  # noqa: E402

ROOMS = [("-12 dB, RT60 300 ms", Path(gain_db=-12), 5.0),
         ("-20 dB, RT60 300 ms", Path(gain_db=-20), 5.0),
         ("-6 dB, RT60 300 ms", Path(gain_db=-6), 2.0),
         ("-12 dB, RT60 900 ms", Path(gain_db=-12, rt60_ms=900), 2.0)]
MODES = ("auto", "full", "half")
REPLY_SECONDS = 33.6  # the trial's long reply


def silent_person(mode: str, path: Path, minutes: float) -> echo_trial.Result:
    return echo_trial.run(mode, path, replies=max(1, round(minutes * 60 / REPLY_SECONDS)))


def barge_ins(mode: str, path: Path, trials: int) -> list[echo_trial.Result]:
    """The person speaks at a different moment of the reply each time (5.5 s to 11 s in)."""
    return [echo_trial.run(mode, path, person_at=5.5 + 5.5 * n / max(trials - 1, 1), seconds=14)
            for n in range(trials)]


def spread(values: list[float | None], unit: str = " ms") -> str:
    known = [value for value in values if value is not None]
    if not known:
        return "–"
    return f"{statistics.median(known):.0f} / {max(known):.0f}{unit}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=None,
                        help="minutes of assistant speech per row (default: 5 for the -12 and -20 "
                             "dB rooms with auto, 2 for the others, 1 for full and half)")
    parser.add_argument("--cpu", action="store_true",
                        help="only the script's CPU in the -12 dB room, each mode for 1 minute")
    parser.add_argument("--trials", type=int, default=6,
                        help="barge-in trials per room for auto (half as many for full and half)")
    args = parser.parse_args()
    reason = why_no_real_audio()
    if reason:
        print(f"bench/echo.py needs real audio: {reason}", file=sys.stderr)
        return 1
    if args.cpu:
        print("| --duplex | CPU of the whole script, 1 minute of the assistant talking in the "
              "-12 dB room |\n|---|---|")
        for mode in MODES:
            print(f"| {mode} | {silent_person(mode, ROOMS[0][1], 1.0).cpu_percent:.2f} % of a "
                  "core |", flush=True)
        return 0
    print("| room | --duplex | assistant speech, person silent | turns it triggered itself | "
          "false stops | person heard over it | sound stopped after the first word "
          "(median / max) | server's speech_started (median / max) | first word missing (max) "
          "| answered | CPU, whole script |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, path, auto_minutes in ROOMS:
        for mode in MODES:
            minutes = args.minutes or (auto_minutes if mode == "auto" else 1.0)
            quiet = silent_person(mode, path, minutes)
            tries = barge_ins(mode, path, args.trials if mode == "auto" else max(args.trials // 2, 1))
            heard = sum(1 for trial in tries if trial.local_stops or (
                trial.speech_started_ms is not None and trial.speech_started_ms < 1500))
            missing = [trial.onset_missing_ms for trial in tries]
            print(f"| {label} | {mode} | {quiet.assistant_seconds / 60:.1f} min | "
                  f"{quiet.self_triggered} | {quiet.local_stops if mode == 'auto' else '–'} | "
                  f"{heard} of {len(tries)} | {spread([t.stop_ms for t in tries])} | "
                  f"{spread([t.speech_started_ms for t in tries])} | "
                  f"{max((m for m in missing if m is not None), default=float('nan')):.0f} ms | "
                  f"{sum(t.answered for t in tries)} of {len(tries)} | "
                  f"{quiet.cpu_percent:.1f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
