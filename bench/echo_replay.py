"""The echo guard of two versions of realtime_sox.py on exactly the same sound: every microphone
frame and every played sample of bench/echo.py's trials, recorded once, then fed to each guard.

    .venv/bin/python bench/echo_replay.py --record DIR           (the matrix of bench/echo.py, seed
                                                                 1, 60 + 10 trials: about 25 min;
                                                                 needs ../shared/pulse-rig.sh up)
    .venv/bin/python bench/echo_replay.py --record DIR --headphones 12   (its --headphones trials)
    .venv/bin/python bench/echo_replay.py --record DIR --speakers-up 8   (--speakers-up trials)
    .venv/bin/python bench/echo_replay.py --replay DIR --baseline REV    (seconds: this code beside
                                                                 realtime_sox.py at git revision REV)

Recording runs the real script, the real sox and the room of tests/room.py, as bench/echo.py
does, but with the guard held open: it decides as usual, and what it decides is recorded, but
the microphone is held back while the assistant is audible and nothing stops the reply. So the
recording holds each whole reply with the person talking over it, whatever a guard would have
done, and any guard can be replayed on it: how soon it would have said "the person", whether it
would have said so before they spoke, whether it would have let three loud frames of the echo
through (a turn). The closed loop (the reply stopping, the server answering) is bench/echo.py's;
this is for telling two guards apart on the same sound, which a second closed-loop run cannot,
since no two runs of the room sound the same.

The guard is fed as the script feeds it (played audio with the time it is heard, microphone
frames with the time they were captured). Its first "person" after the person's first word
(the room's note of it, the first 20 ms above -40 dBFS) is the detection; the sound stops about
30 ms later (the player's stop and PulseAudio's buffer), so "within 270 ms" stands for
bench/echo.py's "sound stopped within 300 ms".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pickle
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path as FilePath
from types import ModuleType
from typing import Any

ROOT = FilePath(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

# Appended to a copy of realtime_sox.py for the recording: every input of the guard is pickled,
# and the guard is held open (see above). Never part of the script itself.
RECORDER = '''
import atexit as _atexit, pickle as _pickle
_out = open(os.path.join(os.environ["ECHO_RECORD"], f"{os.getpid()}.pkl"), "wb")
_atexit.register(_out.close)
_init, _played, _silenced, _hear = (EchoGuard.__init__, EchoGuard.played, EchoGuard.silenced,
                                     EchoGuard.hear)
def _recorded_init(self, remembered=None):
    _pickle.dump(("init", time.monotonic()), _out)
    _init(self, remembered)
def _recorded_played(self, audio, at):
    _pickle.dump(("played", bytes(audio), at), _out)
    _played(self, audio, at)
def _recorded_silenced(self, now):
    _pickle.dump(("silenced", now), _out)
    _silenced(self, now)
def _recorded_hear(self, frame, captured):
    now = time.monotonic()
    verdict = _hear(self, frame, captured)
    _pickle.dump(("hear", bytes(frame), captured, now), _out)
    if verdict == EchoGuard.PERSON:  # held open: the reply goes on, guarded
        self.person, self.interrupted_at = False, -math.inf
    return EchoGuard.HOLD if captured < self.audible_until + 0.5 else verdict
EchoGuard.__init__, EchoGuard.played, EchoGuard.silenced, EchoGuard.hear = (
    _recorded_init, _recorded_played, _recorded_silenced, _recorded_hear)
'''


def record(into: FilePath, args: argparse.Namespace) -> None:
    """Records the trials bench/echo.py would run with the same flags (echo.trials_asked)."""
    import echo
    import echo_trial
    from real_audio import why_no_real_audio
    reason = why_no_real_audio()
    if reason:
        sys.exit(f"bench/echo_replay.py --record needs real audio: {reason}")
    echo.pulse_over_its_socket()
    source = (ROOT / "realtime_sox.py").read_text()
    cut = source.index('\nif __name__ == "__main__":')
    program = FilePath(tempfile.mkdtemp(prefix="recorder-")) / "realtime_sox.py"
    program.write_text(source[:cut] + "\n" + RECORDER + source[cut:])
    rooms: list[Any] = []

    class NotedRoom(echo_trial.Room):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            rooms.append(self)

    echo_trial.Room = NotedRoom
    for trial in echo.trials_asked(args)[0]:
        folder = into / f"t{trial.number:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["ECHO_RECORD"] = str(folder)
        rooms.clear()
        echo.run("auto@recorder", trial, program)
        said = rooms[-1].said if rooms and trial.onset is not None else []
        (folder / "trial.json").write_text(json.dumps(
            {"trial": dataclasses.asdict(trial), "said": said[-1] if said else None}))
        print(f"  trial {trial.number} recorded", file=sys.stderr, flush=True)


def events(recording: FilePath) -> Iterator[tuple[Any, ...]]:
    with recording.open("rb") as file:
        while True:
            try:
                yield pickle.load(file)
            except EOFError:
                return


def feed(script: ModuleType, recording: FilePath, remembered: Any,
         heard: Callable[[Any, bytes, float, str], None] | None = None) -> Any:
    """The recorded run through `script`'s EchoGuard; `heard(guard, frame, now, verdict)`."""
    guard = None
    for event in events(recording):
        if event[0] == "init":
            guard = script.EchoGuard(remembered)
        elif event[0] == "played":
            guard.played(event[1], event[2])
        elif event[0] == "silenced":
            guard.silenced(event[1])
        elif event[0] == "hear":
            verdict = guard.hear(event[1], event[2])
            if heard:
                heard(guard, event[1], event[3], verdict)
    return guard


@dataclasses.dataclass
class Outcome:
    trial: dict[str, Any]
    detect_ms: float | None = None  # the first "person" after the first word
    false_stops: int = 0  # "person" before it (or with the person silent), a second apart
    turns: int = 0  # three loud frames of the echo in a row let through
    speech_seconds: float = 0.0  # the assistant audible, the person silent


def replay(script: ModuleType, folder: FilePath) -> Outcome:
    noted = json.loads((folder / "trial.json").read_text())
    outcome, said = Outcome(noted["trial"]), noted["said"]
    runs = sorted(folder.glob("*.pkl"), key=lambda file: (file.stat().st_mtime, file.name))
    remembered = None
    if len(runs) > 1:  # the run before, in the same room: what it learnt is remembered
        before = feed(script, runs[0], None)
        remembered = before.path if before is not None and before.learned else None
    people: list[float] = []
    loud_run = [0]

    def heard(guard: Any, frame: bytes, now: float, verdict: str) -> None:
        silent = said is None or now < said - 0.05
        audible = guard.sound_from > -math.inf and now < guard.audible_until + 1.0
        if verdict == "person" and (not people or now - people[-1] > 1.0):
            people.append(now)
        if audible and silent:
            outcome.speech_seconds += len(frame) / 48_000
        loud = verdict == "pass" and audible and silent and script.frame_power(frame) > 1e-4
        loud_run[0] = loud_run[0] + 1 if loud else 0
        outcome.turns += loud_run[0] == 3

    feed(script, runs[-1], remembered, heard)
    outcome.false_stops = sum(1 for at in people if said is None or at < said - 0.05)
    after = [at for at in people if said is not None and at >= said - 0.05]
    outcome.detect_ms = (after[0] - said) * 1000 if after else None
    return outcome


def load(path: FilePath, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def row(label: str, outcomes: list[Outcome]) -> str:
    talked = [o for o in outcomes if o.trial["onset"] is not None]
    known = [o.detect_ms for o in talked if o.detect_ms is not None]
    minutes = sum(o.speech_seconds for o in outcomes) / 60
    false = sum(o.false_stops for o in outcomes)
    return (f"| {label} | {minutes:.1f} min | {sum(o.turns for o in outcomes)} "
            f"| {false} ({false * 10 / minutes if minutes else math.nan:.1f} per 10 min) "
            f"| {sum(1 for d in known if d <= 270)} of {len(talked)} "
            f"| {statistics.median(known) if known else math.nan:.0f} ms "
            f"| {len(talked) - len(known)} |")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", metavar="DIR", type=FilePath)
    parser.add_argument("--headphones", type=int, metavar="N", help="bench/echo.py --headphones N")
    parser.add_argument("--speakers-up", type=int, metavar="N",
                        help="bench/echo.py --speakers-up N")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trials", type=int, default=60, help="as bench/echo.py's")
    parser.add_argument("--silent-runs", type=int, default=10, help="as bench/echo.py's")
    parser.add_argument("--replay", metavar="DIR", type=FilePath)
    parser.add_argument("--baseline", metavar="REV", help="also replay realtime_sox.py at REV")
    args = parser.parse_args()
    if args.record:
        record(args.record, args)
        return 0
    if not args.replay:
        parser.error("--record DIR or --replay DIR")
    versions = {"this code": ROOT / "realtime_sox.py"}
    if args.baseline:
        from run import checkout
        versions[args.baseline] = checkout(args.baseline)
    folders = sorted(f for f in args.replay.glob("t*") if (f / "trial.json").exists())
    results = {label: [replay(load(path, f"guard{n}"), f) for f in folders]
               for n, (label, path) in enumerate(versions.items())}
    print("| guard | assistant speech, person silent | turns its own voice would start "
          "| false stops | person told within 270 ms of the first word | median | never told |\n"
          "|---|---|---|---|---|---|---|")
    for label, outcomes in results.items():
        print(row(label, outcomes))
    print("\nTrials where they differ (ms to the person; ! false stops / turns):")
    for n, folder in enumerate(folders):
        cells = []
        for outcomes in results.values():
            o = outcomes[n]
            cell = "–" if o.detect_ms is None else f"{o.detect_ms:.0f}"
            cells.append(cell + (f" !{o.false_stops}/{o.turns}" if o.false_stops or o.turns else ""))
        if len(set(cells)) > 1:
            trial = results["this code"][n].trial
            print(f"  {folder.name}: {trial['path']['gain_db']} dB, {trial['change'] or 'no change'}, "
                  f"onset {trial['onset']}: " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
