"""The echo guard (--duplex auto) beside full and half duplex, a WebRTC echo canceller and an energy
gate, over a randomised matrix of rooms, voices, levels and moments, in one run.

    .venv/bin/python bench/echo.py                     (60 trials a mode, 5 modes: about 90 min;
                                                        needs ../shared/pulse-rig.sh up, flite,
                                                        and nothing else playing on the rig)
    .venv/bin/python bench/echo.py --trials 12 --modes auto,gate   (a quicker look)
    .venv/bin/python bench/echo.py --anchor-trials 24  (the other modes on the first 24 trials)
    .venv/bin/python bench/echo.py --seed 7            (another matrix; the seed is printed)
    .venv/bin/python bench/echo.py --cpu               (only the CPU of each mode; 4 minutes)
    .venv/bin/python bench/echo.py --headphones 12 --modes auto --baseline REV
                                                       (only headphones: unplugged mid-reply with
                                                        the person silent, and worn with a room
                                                        remembered while the person talks over it)
    .venv/bin/python bench/echo.py --speakers-up 8 --modes auto --baseline REV
                                                       (only the speakers turned up 6 dB mid-reply:
                                                        with the person silent, and talking 2 s
                                                        after)
    .venv/bin/python bench/echo.py --modes auto --baseline REV   (auto beside realtime_sox.py
                                                        at git revision REV, on the same trials)

Each trial is a conversation in its natural order, on the real PulseAudio rig with the real sox,
the real script and the fake API (whose VAD hears what the script appends): most start with the
person's question and the reply follows it half a second later; some start with the assistant's
greeting. The person talks over the first reply 1, 2.5, 4.5 or 8 s into it, or into the second
reply; a quarter of the trials follow a run in the same room, so that the room is remembered
(onsets from 0.5 s). Drawn per trial, from the seed: the room (tests/room.py: echo -24 to -6 dB,
delay 5 to 60 ms, RT60 150 to 900 ms, noise -60 or -45 dBFS), the voices (espeak-ng and flite,
male and female both ways) and the person's level (-26 to -14 dBFS). A few long runs with the
person silent add minutes of the assistant's speech. Every mode gets the same trials:

- auto: the echo guard; full and half: --duplex full and half;
- webrtc: --duplex full behind PulseAudio's module-echo-cancel (aec_method=webrtc), a real
  echo canceller fed the same played audio and microphone;
- auto@REV (with --baseline REV): the echo guard of realtime_sox.py at that git revision;
- gate: --duplex full behind the openai-agents demo's energy gate, applied in the room: while the
  assistant plays, the microphone passes only when its RMS >= max(0.015, 0.6 x the playback's
  smoothed RMS + 0.002), and then the playback is stopped (Enter, as the demo stops its player).

Prints the seed, then Markdown tables for the README: per mode, the turns the assistant's own
voice started and the false stops (per 10 minutes of its speech with the person silent), and for
the person talking over it, how often and how soon the sound stopped, how soon the server's
speech_started came, how much of the first word was lost, whether the answer came; then the same
by kind of room, where each mode wins and loses.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path as FilePath

ROOT = FilePath(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import echo_trial  # noqa: E402
from real_audio import why_no_real_audio  # noqa: E402
from room import Path  # noqa: E402
from run import checkout  # noqa: E402

MODES = ("auto", "full", "half", "webrtc", "gate")
# Mid-reply: (the path before, the path after), from the trial's room.
CHANGES = {
    "speakers up 6 dB": lambda room: (room, dataclasses.replace(room, gain_db=room.gain_db + 6)),
    "speakers down 10 dB": lambda room: (room, dataclasses.replace(room, gain_db=room.gain_db - 10)),
    "headphones in": lambda room: (room, Path(echo=False)),
    "headphones out": lambda room: (Path(echo=False), room),
}
WORN = "headphones on, a room remembered"  # --headphones: a run with the speakers came first
# (assistant, person): male and female both ways, from two synthesisers.
PAIRS = [("en-gb", "flite:slt"), ("flite:slt", "en-us"), ("en-us+f3", "flite:kal"),
         ("flite:rms", "en-us+f2")]


@dataclasses.dataclass(frozen=True)
class Trial:
    number: int
    path: Path
    pair: tuple[str, str]
    person_dbfs: float
    question: bool  # the person asks first (else the assistant greets first)
    onset: float | None  # s into the reply the person talks over it; None: silent throughout
    replies: int  # the person talks over the last of them
    remembered: bool  # a run in the same room comes first: the room is remembered
    seconds: float  # of each reply
    change: str = ""  # the path changes 2 s before the person speaks (see CHANGES), or WORN
    change_at: float = 0.0  # s into the reply it changes, if not 2 s before the person speaks

    @property
    def room(self) -> str:
        if self.change == WORN:
            return WORN
        if self.change:
            return f"path changes: {self.change}"
        loud = "-12 to -6 dB" if self.path.gain_db > -12 else (
            "-18 to -12 dB" if self.path.gain_db > -18 else "-24 to -18 dB")
        return loud + (", RT60 > 600 ms" if self.path.rt60_ms > 600 else "")


def draw_room(rng: random.Random) -> Path:
    """A room from the matrix's ranges: echo -24 to -6 dB, delay 5 to 60 ms, RT60 150 to 900 ms,
    noise -60 or -45 dBFS."""
    return Path(gain_db=round(rng.uniform(-24, -6), 1), delay_ms=round(rng.uniform(5, 60)),
                rt60_ms=round(rng.uniform(150, 900)), noise_dbfs=rng.choice([-60.0, -45.0]))


def matrix(seed: int, trials: int, silent_runs: int) -> list[Trial]:
    rng = random.Random(seed)
    found = []
    for number in range(trials + silent_runs):
        path = draw_room(rng)
        remembered = number < trials and rng.random() < 0.25
        change = rng.choice(sorted(CHANGES)) if number < trials and not remembered and \
            rng.random() < 0.2 else ""
        onset = rng.choice([0.5, 1.0, 2.5] if remembered else [4.5, 8.0] if change else
                           [1.0, 2.5, 4.5, 8.0])
        replies = 2 if number < trials and not remembered and rng.random() < 0.25 else 1
        found.append(Trial(
            number, path, rng.choice(PAIRS), round(rng.uniform(-26, -14), 1),
            rng.random() < 0.75, onset if number < trials else None, replies, remembered,
            12.0 if number < trials else 30.0, change))
    return found


def changed_mid_reply(seed: int, count: int, change: str, onsets: list[float], seconds: float,
                      talking_change: str) -> list[Trial]:
    """`count` replies of 8 s with the person silent and `change` 2 to 4.1 s into them, then
    `count` replies of `seconds` with `talking_change` and the person talking over them at one of
    `onsets`."""
    rng = random.Random(seed)
    found = []
    for number in range(2 * count):
        path = draw_room(rng)
        pair, level, question = rng.choice(PAIRS), round(rng.uniform(-26, -14), 1), rng.random() < 0.5
        if number < count:
            found.append(Trial(number, path, pair, level, question, None, 1, False, 8.0,
                               change, round(rng.uniform(2.0, 4.1), 1)))
        else:
            found.append(Trial(number, path, pair, level, question, rng.choice(onsets), 1, False,
                               seconds, talking_change))
    return found


def headphones(seed: int, count: int) -> list[Trial]:
    """`count` replies of 8 s with the person silent and the headphones unplugged 2 to 4.1 s
    into them, and `count` with the headphones on throughout and the person talking over the
    first reply, each after a run with the speakers in the same room (so that its path is
    remembered: the one that tells an unplugged echo from the person)."""
    return changed_mid_reply(seed, count, "headphones out", [1.0, 1.5, 2.5, 4.5], 7.0, WORN)


def speakers_up(seed: int, count: int) -> list[Trial]:
    """`count` replies of 8 s with the person silent and the speakers turned up 6 dB 2 to 4.1 s
    into them, and `count` with the person talking over the reply 2 s after the speakers went
    up: the echo, suddenly louder than the guard learned it, is not the person; the person is."""
    return changed_mid_reply(seed, count, "speakers up 6 dB", [4.5, 6.0], 9.0, "speakers up 6 dB")


def trials_asked(args: argparse.Namespace) -> tuple[list[Trial], str]:
    """The trials of --headphones N, --speakers-up N or else the matrix, and what they are (shared
    with bench/echo_replay.py, which takes the same flags)."""
    if args.headphones:
        return headphones(args.seed, args.headphones), (
            f"headphones, {args.headphones} unplugged mid-reply with the person silent, "
            f"{args.headphones} worn with the person talking")
    if args.speakers_up:
        return speakers_up(args.seed, args.speakers_up), (
            f"speakers up 6 dB mid-reply, {args.speakers_up} with the person silent, "
            f"{args.speakers_up} with the person talking")
    return matrix(args.seed, args.trials, args.silent_runs), (
        f"{args.trials} trials with the person talking, {args.silent_runs} with the person silent")


def run(mode: str, trial: Trial, baseline: FilePath | None = None) -> echo_trial.Result:
    """`mode` is one of MODES, or auto@REV: auto of `baseline`, realtime_sox.py at REV."""
    work = FilePath(tempfile.mkdtemp(prefix=f"echo-{mode.replace('@', '-')}-"))
    script = baseline if mode.startswith("auto@") and baseline else echo_trial.SCRIPT
    mode = mode.split("@")[0]
    duplex = mode if mode in ("auto", "full", "half") else "full"
    anchor = None if duplex == mode else mode
    if trial.remembered or trial.change in ("headphones out", WORN):  # a run before, in the room
        # (with the speakers): only its memory counts. Unplugged headphones need it: with no
        # path ever known, nothing tells the echo from the person.
        echo_trial.run(duplex, trial.path, seconds=4, question=trial.question, cache=work / "cache",
                       work=work / "before", pair=trial.pair, anchor=anchor, program=script)
    seconds = max(trial.seconds, (trial.onset or 0) + 4)
    path, changes = trial.path, ()
    if trial.change == WORN:
        path = Path(echo=False)
    elif trial.change:  # with headphones out, the room is learned before: the remembered one
        before, after = CHANGES[trial.change](trial.path)
        path, changes = before, ((trial.change_at or (trial.onset or 6) - 2, after),)
    return echo_trial.run(duplex, path, replies=trial.replies, person_at=trial.onset, changes=changes,
                          seconds=seconds, question=trial.question, cache=work / "cache",
                          work=work / "trial", person_dbfs=trial.person_dbfs, pair=trial.pair,
                          anchor=anchor, program=script)


def pulse_over_its_socket() -> None:
    """PulseAudio 16 can abort (memblock.c: "n_imported > 0" failed) after hours of clients
    coming and going with shared memory; through the socket, every client of the run is safe."""
    client_conf = FilePath(tempfile.mkdtemp(prefix="echo-pulse-")) / "client.conf"
    client_conf.write_text("enable-shm = no\n")
    os.environ["PULSE_CLIENTCONFIG"] = str(client_conf)


def share(found: list[bool]) -> str:
    return f"{sum(found)} of {len(found)}" if found else "–"


def median(values: list[float | None], unit: str = " ms") -> str:
    known = [value for value in values if value is not None]
    return f"{statistics.median(known):.0f}{unit}" if known else "–"


def stop_ms(result: echo_trial.Result) -> float | None:
    """The last sound of the reply after the person's first word. Before it (negative), the
    reply was stopped for nobody, if its truncation came before the word too; if it came after
    (the person spoke in a pause of the reply, which never sounded again), the sound stopped
    as they began: 0."""
    if result.stop_ms is not None and result.stop_ms < 0 and \
            result.detect_ms is not None and result.detect_ms >= 0:
        return 0.0
    return result.stop_ms


def rows(label: str, mode: str, results: list[tuple[Trial, echo_trial.Result]]) -> str:
    minutes = sum(result.assistant_seconds for _, result in results) / 60
    triggered = sum(result.self_triggered for _, result in results)
    silent_stops = sum(result.local_stops for trial, result in results if trial.onset is None)
    # Before the onset, a stop is false too: the person had not spoken yet.
    talked = [(trial, result) for trial, result in results if trial.onset is not None]
    stops = [stop_ms(result) for _, result in talked]
    early = sum(1 for stop in stops if stop is not None and stop < -50)
    per_ten = (silent_stops + early) * 10 / minutes if minutes else float("nan")
    return (f"| {label} | {mode} | {minutes:.1f} min | {triggered} | {silent_stops + early} "
            f"({per_ten:.1f} per 10 min) "
            f"| {share([s is not None and 0 <= s <= 300 for s in stops])} | {median(stops)} "
            f"| {share([r.speech_started_ms is not None and r.speech_started_ms <= 600 for _, r in talked])} "
            f"| {share([r.onset_missing_ms is not None and r.onset_missing_ms <= 100 for _, r in talked])} "
            f"| {share([r.answered for _, r in talked])} "
            f"| {median([r.cpu_percent for _, r in results], ' %')} |")


HEADER = ("| trials | mode | assistant speech, person silent | turns its own voice started "
          "| false stops | sound stopped within 300 ms of the first word | median stop "
          "| speech_started within 600 ms | first word lost ≤ 100 ms | answered | CPU |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=60, help="trials with the person talking")
    parser.add_argument("--silent-runs", type=int, default=10,
                        help="30 s runs with the person silent, added to the matrix")
    parser.add_argument("--anchor-trials", type=int, default=None,
                        help="the modes other than auto run only the first N trials of the "
                             "matrix (and one silent run): the same rooms, fewer of them")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--baseline", metavar="REV",
                        help="also run auto of realtime_sox.py at this git revision (auto@REV)")
    parser.add_argument("--headphones", type=int, metavar="N",
                        help="only headphones: N unplugged mid-reply, N worn (see headphones())")
    parser.add_argument("--speakers-up", type=int, metavar="N",
                        help="only the speakers turned up 6 dB mid-reply: N with the person "
                             "silent, N talking (see speakers_up())")
    parser.add_argument("--cpu", action="store_true",
                        help="only the CPU of each mode, 1 minute of the assistant in a -12 dB room")
    args = parser.parse_args()
    pulse_over_its_socket()
    reason = why_no_real_audio()
    if reason:
        print(f"bench/echo.py needs real audio: {reason}", file=sys.stderr)
        return 1
    modes = args.modes.split(",")
    baseline = None
    if args.baseline:
        baseline = checkout(args.baseline)
        modes.insert(modes.index("auto") + 1 if "auto" in modes else 0, f"auto@{args.baseline}")
    if args.cpu:
        print("| --duplex | CPU of the whole script, 1 minute of the assistant talking in the "
              "-12 dB room |\n|---|---|")
        for mode in modes:
            result = echo_trial.run(mode, Path(gain_db=-12), replies=2)
            print(f"| {mode} | {result.cpu_percent:.2f} % of a core |", flush=True)
        return 0
    trials, what = trials_asked(args)
    print(f"seed {args.seed}: {what}", flush=True)
    for trial in trials:
        print(f"  {trial}", file=sys.stderr, flush=True)
    def chosen(mode: str) -> list[Trial]:
        if mode.startswith("auto") or args.anchor_trials is None:
            return trials
        return trials[:args.anchor_trials] + trials[args.trials:args.trials + 1]

    results: dict[str, list[tuple[Trial, echo_trial.Result]]] = {}
    for mode in modes:
        results[mode] = []
        for trial in chosen(mode):
            result = run(mode, trial, baseline)
            results[mode].append((trial, result))
            print(f"  {mode} trial {trial.number}: {result.self_triggered} turns, "
                  f"{result.local_stops} stops, stop {result.stop_ms} ms, truncate "
                  f"{result.detect_ms} ms, speech_started {result.speech_started_ms} ms",
                  file=sys.stderr, flush=True)
    print(HEADER)
    for mode in modes:
        print(rows(f"{len(results[mode])}", mode, results[mode]), flush=True)
    print("\nBy kind of room:\n")
    print(HEADER.replace("| trials |", "| room |"))
    if args.anchor_trials is not None:
        print(f"(the modes other than auto: the first {args.anchor_trials} trials)\n")
    for room in sorted({trial.room for trial in trials}):
        for mode in modes:
            picked = [(t, r) for t, r in results[mode] if t.room == room]
            if picked:
                print(rows(room, mode, picked))
    print("\nBy moment (the person talking over the reply):\n")
    print(HEADER.replace("| trials |", "| onset |"))
    for onset in sorted({t.onset for t in trials if t.onset is not None}):
        for mode in modes:
            picked = [(t, r) for t, r in results[mode] if t.onset == onset]
            label = f"{onset:g} s" + (" (remembered rooms)" if onset < 1 else "")
            if picked:
                print(rows(label, mode, picked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
