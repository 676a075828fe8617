#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "websocket-client==1.9.2",
#     "python-dotenv==1.2.4",
#     "rich==15.0.0",
# ]
# ///
"""Talk to the OpenAI Realtime API from a terminal, with SoX as microphone and speaker.

A Python port of the TypeScript CLI in "Conversing with AI Using the Newly Released OpenAI Realtime
API" (noboru-kudo, 2024), moved onto today's GA interface. One thread, one `selectors` loop:

    sox recorder --stdout--> 20 ms frames --> input_audio_buffer.append --> WebSocket
    WebSocket --> response.output_audio.delta --> our queue --paced--> sox player --stdin

Read top to bottom: the configuration; the core, which is the conversation (one handler per
server event) and the loop; then what the core calls: the sox processes, the reply (its sound,
its words, how much was heard), talking over the assistant (--duplex, the echo guard), what
servers may send, the connection (opened step by step by the loop), staying connected, models
going away, tools (MCP servers), the screen and costs; the audio check; `main`.
"""

from __future__ import annotations

import argparse
import base64
import codecs
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import fcntl
import getpass
import ipaddress
import json
import math
import operator
import os
import random
import re
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import time
import tty
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import websocket
from dotenv import load_dotenv
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

# --- Configuration -------------------------------------------------------------------------------

SAMPLE_RATE = 24_000
BYTES_PER_SECOND = SAMPLE_RATE * 2  # 16-bit mono
FRAME_BYTES = BYTES_PER_SECOND * 20 // 1000  # one 20 ms append (960 bytes)

# The article's sox commands, verbatim and in order. Global options may go in front (see Plumbing).
RECORDER_ARGS = ["--default-device", "--no-show-progress", "--rate", "24000", "--channels", "1",
                 "--encoding", "signed-integer", "--bits", "16", "--type", "raw", "-"]
PLAYER_ARGS = ["--type", "raw", "--rate", "24000", "--encoding", "signed-integer", "--bits", "16",
               "--channels", "1", "-", "--no-show-progress", "--default-device"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-realtime-2.1"
XAI_MODEL = "grok-voice-latest"
DEFAULT_VOICE = "echo"  # the article's voice
DEFAULT_TRANSCRIPTION_MODEL = "gpt-transcribe"  # the gpt-4o transcribers shut down 2027-02-26
DEFAULT_INSTRUCTIONS = ("You are a friendly voice assistant in a terminal. Keep answers short and "
                        "conversational; the person hears you rather than reads you.")
VOICES = ["alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"]

# USD per million tokens: audio in, audio cached, audio out, text in, text cached, text out, image in.
# REALTIME_PRICES="a,b,c,d,e,f[,g]" gives the same for a model this table does not know.
Prices = tuple[float, float, float, float, float, float, float]
PRICES: dict[str, Prices] = {
    "gpt-realtime-2.1": (32.00, 0.40, 64.00, 4.00, 0.40, 24.00, 5.00),
    "gpt-realtime-2.1-mini": (10.00, 0.30, 20.00, 0.60, 0.06, 2.40, 0.80),
    "gpt-realtime-2": (32.00, 0.40, 64.00, 4.00, 0.40, 24.00, 5.00),
    "gpt-realtime-1.5": (32.00, 0.40, 64.00, 4.00, 0.40, 16.00, 5.00),
    "gpt-realtime": (32.00, 0.40, 64.00, 4.00, 0.40, 16.00, 5.00),
    "gpt-realtime-mini": (10.00, 0.30, 20.00, 0.60, 0.06, 2.40, 0.80),
}


@dataclasses.dataclass(frozen=True)
class Provider:
    """What differs between the endpoints that speak this protocol: where they are, how the key
    is sent, the session's shape, and what they support."""
    name: str
    base_url: str  # "" when each customer has their own (Azure)
    key_variables: tuple[str, ...]  # where the key is looked for, first to last
    key_header: str  # "Authorization" (a Bearer token) or "api-key"
    voices: tuple[str, ...]
    default_voice: str
    flat_session: bool = False  # xAI: the session's fields at the top, not under "audio"
    truncates: bool = True  # takes conversation.item.truncate: what was heard of a reply
    lists_models: bool = True  # GET /models/{id} tells a model's shutdown date
    per_minute: float | None = None  # USD a minute of connection, where tokens are not billed
    default_transcription: str = DEFAULT_TRANSCRIPTION_MODEL
    title: str = "OpenAI"


PROVIDERS = {
    "openai": Provider("openai", DEFAULT_BASE_URL, ("OPENAI_API_KEY",), "Authorization",
                       tuple(VOICES), DEFAULT_VOICE),
    # Azure OpenAI's GA path: /openai/v1/realtime?model=<deployment>, no api-version. The model
    # is the deployment's name, and so is the transcription model (none unless one is named).
    "azure": Provider("azure", "", ("AZURE_OPENAI_API_KEY", "OPENAI_API_KEY",
                                    "AZURE_OPENAI_AD_TOKEN"), "api-key",
                      tuple(VOICES), DEFAULT_VOICE, lists_models=False,
                      default_transcription="none", title="Azure OpenAI"),
    # xAI's Grok voice: the same events, a flat session, no truncate, $0.05 a minute.
    "xai": Provider("xai", "https://api.x.ai/v1", ("XAI_API_KEY", "OPENAI_API_KEY"),
                    "Authorization", ("Eve", "Ara", "Rex", "Sal", "Leo"), "Eve",
                    flat_session=True, truncates=False, lists_models=False, per_minute=0.05,
                    default_transcription="none", title="xAI"),
}
AZURE_HOSTS = (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com")
# Announced replacements, named when a model's shutdown is near (the API gives only the date).
REPLACEMENTS = {"gpt-realtime": "gpt-realtime-2.1", "gpt-realtime-mini": "gpt-realtime-2.1-mini",
                "whisper-1": "gpt-transcribe", "gpt-4o-transcribe": "gpt-transcribe",
                "gpt-4o-mini-transcribe": "gpt-transcribe"}
SHUTDOWN_WARNING_DAYS = 90

# Keeping a conversation alive (see Link).
CONNECT_TIMEOUT = 10  # s to open a connection (all its steps), and as long again for the session
RECONNECT_TRIES = 6  # with jittered backoff 0.5, 1, 2, 4, 8, 8 s: about 20 s in all
ROLLOVER_MARGIN = 60  # s before the 60-minute limit: start a new session at the next pause
REPLAY_TURNS, REPLAY_CHARS = 40, 16_000  # how much of the conversation a new session is told


class Exit:
    """Exit codes, one per kind of failure (listed in the README)."""
    OK, USAGE, NO_KEY, NO_SOX, AUDIO, AUTH, NOT_FOUND, RATE_LIMIT, NETWORK, TLS, CLOSED = (
        0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
    BUG = 70


# Errors no retry can fix, and the exit code each one gets.
FATAL_ERRORS = {"invalid_api_key": Exit.AUTH, "account_deactivated": Exit.AUTH,
                "insufficient_quota": Exit.RATE_LIMIT, "billing_hard_limit_reached": Exit.RATE_LIMIT,
                "beta_api_shape_disabled": Exit.CLOSED, "model_not_found": Exit.NOT_FOUND}


class Fatal(Exception):
    """A failure the person can act on: one line of text and an exit code, never a traceback."""

    def __init__(self, message: str, code: int, retry: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retry = retry  # worth trying again later (a network fault, not a refusal)


@dataclasses.dataclass(frozen=True)
class Plumbing:
    """How audio moves. `tuned` is this project's; `article` reproduces the article for comparison."""
    sox_options: tuple[str, ...]  # global options put in front of the article's arguments
    player_lead_ms: float | None  # how far ahead of the speaker we may write; None: all at once
    startup_ms: float  # the most a reply's first audio waits before playing: a cushion for jitter
    block_bytes: int | None  # the player plays whole blocks only: pad reply ends to this size
    tail_pad_ms: float  # silence beyond the whole block, for a resampler that holds audio back
    frame_bytes: int | None  # re-frame the microphone into appends of this size; None: as read
    barge_in: bool
    pulse_latency_ms: str | None  # PULSE_LATENCY_MSEC for the player, unless the user set one
    input_device: str = ""  # "" is the article's --default-device
    output_device: str = ""


# --buffer 960: the player plays 40 ms blocks and starts in ~10 ms (with PULSE_LATENCY_MSEC=20)
# instead of waiting for a 341 ms block; the recorder delivers 4096 B reads, not 8192 B.
TUNED = Plumbing(("--buffer", "960"), 60, 40, 960 * 2, 0, FRAME_BYTES, True, "20")
PLUMBING = {
    "tuned": TUNED,
    # macOS. CoreAudio runs the device at its own rate (44.1 or 48 kHz), so sox adds its `rate`
    # effect, which hands a block of ~830 samples on only when more input arrives: a reply's end
    # would wait up to 77 ms (80 ms of silence beyond the block frees it), and a 60 ms lead starves
    # at each reply's start (120 ms does not). Read from sox 14.4.2's src/rate.c and coreaudio.c,
    # checked through the same resampler here; the cost is a heard_ms 40-60 ms optimistic.
    "coreaudio": dataclasses.replace(TUNED, player_lead_ms=120, tail_pad_ms=80,
                                     pulse_latency_ms=None),
    "article": Plumbing((), None, 0, None, 0, None, False, None),
}
DEFAULT_PLUMBING = "coreaudio" if sys.platform == "darwin" else "tuned"
# Bluetooth outputs force a larger I/O buffer than --buffer 960 fills (a constant crackle).
BLUETOOTH_NAMES = ("airpods", "bluetooth", "beats", "buds")
BLUETOOTH_BUFFER = 4096


@dataclasses.dataclass(frozen=True)
class Config:
    api_key: str
    url: str
    provider: Provider
    model: str
    voice: str
    instructions: str
    transcription_model: str
    turn_detection: str
    vad_threshold: float | None
    noise_reduction: str
    duplex: str
    keepalive: float
    connect_timeout: float
    prices: Prices | None
    max_cost: float | None
    log: TranscriptLog
    plumbing: Plumbing
    mcp: tuple[McpCommand, ...] = ()
    approve_tools: str = ""  # "" (ask on a terminal), "none", "all", or "name,name"
    tool_timeout: float = 30.0
    mcp_start_timeout: float = 10.0
    mcp_urls: tuple[tuple[str, str], ...] = ()  # (label, URL): remote servers the API calls itself
    mcp_headers: tuple[tuple[str, str], ...] = ()
    reconnect_tries: int = RECONNECT_TRIES


def env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Talk with an OpenAI Realtime model through sox. Type a line and press Enter to "
                    "send text; an empty line interrupts the assistant. Ctrl-C quits.")
    add = parser.add_argument
    add("--provider", choices=["auto", *PROVIDERS], default=env("REALTIME_PROVIDER", "auto"),
        help="whose API: 'auto' tells it by the base URL's host (*.openai.azure.com is azure, "
             "api.x.ai is xai) [env REALTIME_PROVIDER; default %(default)s]")
    add("--base-url", default=os.environ.get("OPENAI_BASE_URL", ""),
        help=f"API base URL [env OPENAI_BASE_URL, or AZURE_OPENAI_ENDPOINT; default "
             f"{DEFAULT_BASE_URL}, or xai's {PROVIDERS['xai'].base_url}]")
    add("--model", "--deployment", default=env("REALTIME_MODEL", ""),
        help=f"Realtime model; on Azure, the deployment's name [env REALTIME_MODEL; default "
             f"{DEFAULT_MODEL}, or xai's {XAI_MODEL}]")
    add("--price-model", default=env("REALTIME_PRICE_MODEL", ""), metavar="MODEL",
        help="whose prices the costs are counted at, when --model is a name this script does "
             "not know, such as an Azure deployment's [env REALTIME_PRICE_MODEL; default: "
             "--model]")
    add("--voice", default=env("REALTIME_VOICE", ""),
        help=f"assistant voice, one of {', '.join(VOICES)} (xai: "
             f"{', '.join(PROVIDERS['xai'].voices)}) [env REALTIME_VOICE; default "
             f"{DEFAULT_VOICE}, xai's {PROVIDERS['xai'].default_voice}]")
    add("--instructions", default=env("REALTIME_INSTRUCTIONS", DEFAULT_INSTRUCTIONS),
        help="system instructions [env REALTIME_INSTRUCTIONS]")
    add("--transcription-model", default=env("REALTIME_TRANSCRIPTION_MODEL", ""),
        help="model that transcribes your speech, or 'none'; on Azure, a transcription "
             "deployment's name [env REALTIME_TRANSCRIPTION_MODEL; default "
             f"{DEFAULT_TRANSCRIPTION_MODEL}, none on azure and xai]")
    add("--turn-detection", choices=["server_vad", "semantic_vad", "none"],
        default=env("REALTIME_TURN_DETECTION", "server_vad"),
        help="who decides when you stopped talking; with 'none', Enter ends your turn "
             "[env REALTIME_TURN_DETECTION; default %(default)s]")
    add("--vad-threshold", type=float, default=env("REALTIME_VAD_THRESHOLD", "") or None,
        help="server_vad loudness threshold 0..1, higher ignores more background noise "
             "[env REALTIME_VAD_THRESHOLD; default: the API's 0.5]")
    add("--noise-reduction", choices=["near_field", "far_field", "none"],
        default=env("REALTIME_NOISE_REDUCTION", "none"),
        help="the API's input noise reduction: near_field for headsets, far_field for laptop "
             "microphones [env REALTIME_NOISE_REDUCTION; default %(default)s]")
    add("--duplex", choices=["auto", "full", "half"], default=env("REALTIME_DUPLEX", "auto"),
        help="'auto' learns how your speakers reach the microphone and holds back the assistant's "
             "own voice, yet hears you speak over it; 'half' mutes the microphone while the "
             "assistant speaks; 'full' sends everything (headphones) [env REALTIME_DUPLEX; "
             "default %(default)s]")
    add("--max-cost", type=float, default=env("REALTIME_MAX_COST", "") or None, metavar="USD",
        help="warn at 80%% of this spend and end the session at 100%% [env REALTIME_MAX_COST]")
    add("--log", default=env("REALTIME_LOG", ""), metavar="PATH",
        help="append every turn (time, speaker, words, usage, cost) to this JSON Lines file "
             "[env REALTIME_LOG]")
    add("--keepalive", type=float, default=env("REALTIME_KEEPALIVE", "15"),
        help="ping the API after this many silent seconds, and reconnect when it does not answer "
             "within as many more [env REALTIME_KEEPALIVE; default %(default)s]")
    add("--connect-timeout", type=float, default=env("REALTIME_CONNECT_TIMEOUT", str(CONNECT_TIMEOUT)),
        metavar="SECONDS",
        help="give up opening a connection after this long: name lookup, TCP, TLS and the "
             "WebSocket upgrade together [env REALTIME_CONNECT_TIMEOUT; default %(default)s]")
    add("--reconnect-tries", type=int, default=env("REALTIME_RECONNECT_TRIES",
                                                   str(RECONNECT_TRIES)), metavar="N",
        help="tries to restore a dropped connection, with backoff up to 8 s between them, before "
             "giving up [env REALTIME_RECONNECT_TRIES; default %(default)s]")
    add("--input-device", default=env("REALTIME_INPUT_DEVICE", ""),
        help="microphone to use instead of the default: a PulseAudio source name on Linux "
             "(pactl list short sources), a CoreAudio device name on macOS "
             "[env REALTIME_INPUT_DEVICE]")
    add("--output-device", default=env("REALTIME_OUTPUT_DEVICE", ""),
        help="speaker to use instead of the default: a PulseAudio sink name on Linux "
             "(pactl list short sinks), a CoreAudio device name on macOS [env REALTIME_OUTPUT_DEVICE]")
    add("--check-audio", action="store_true",
        help="check the microphone and speakers (no API key needed), then exit")
    add("--sox-buffer", type=int, default=env("REALTIME_SOX_BUFFER", "") or None, metavar="SIZE",
        help="sox's --buffer for both processes; 4096 stops the crackle of Bluetooth outputs "
             "[env REALTIME_SOX_BUFFER; default 960, or 4096 for an --output-device named like "
             "AirPods, Beats, Buds or Bluetooth]")
    add("--list-devices", action="store_true",
        help="list the microphones and speakers sox can use, then exit")
    add("--mcp", action="append", metavar='"COMMAND ARGS"',
        default=[line for line in env("REALTIME_MCP", "").splitlines() if line.strip()],
        help="start this local MCP server and let the model use its tools; repeatable "
             "[env REALTIME_MCP, one command per line]")
    add("--mcp-url", action="append", metavar="URL",
        default=[line for line in env("REALTIME_MCP_URL", "").split() if line],
        help="a remote MCP server that the API itself calls; repeatable [env REALTIME_MCP_URL, "
             "separated by spaces]")
    add("--mcp-header", action="append", default=[], metavar='"NAME: VALUE"',
        help="an HTTP header for the --mcp-url servers (an Authorization token, say); repeatable")
    add("--mcp-config", default=env("REALTIME_MCP_CONFIG", ""), metavar="FILE",
        help='MCP servers from a {"mcpServers": {…}} file, the format of desktop MCP clients '
             "[env REALTIME_MCP_CONFIG]")
    add("--approve-tools", default=env("REALTIME_APPROVE_TOOLS", ""), metavar="all|none|NAMES",
        help="tools that change things and may run without asking: 'all', 'none', or tool names "
             "separated by commas; read-only tools always run [env REALTIME_APPROVE_TOOLS; "
             "default: ask on the terminal, refuse without one]")
    add("--tool-timeout", type=float, default=env("REALTIME_TOOL_TIMEOUT", "30"), metavar="SECONDS",
        help="cancel a tool call that takes longer [env REALTIME_TOOL_TIMEOUT; default %(default)s]")
    add("--mcp-start-timeout", type=float, default=env("REALTIME_MCP_START_TIMEOUT", "10"),
        metavar="SECONDS",
        help="give up on an MCP server that has not listed its tools by then (npx -y and uvx "
             "may need longer the first time) [env REALTIME_MCP_START_TIMEOUT; default "
             "%(default)s]")
    add("--plumbing", choices=sorted(PLUMBING), default=env("REALTIME_PLUMBING", DEFAULT_PLUMBING),
        help="'article' moves audio exactly as the article did, for comparison; 'coreaudio' "
             "is macOS's [env REALTIME_PLUMBING; default %(default)s]")
    args = parser.parse_args(argv)
    for action in parser._actions:  # argparse does not check defaults, which come from env
        if action.choices and getattr(args, action.dest) not in action.choices:
            parser.error(f"{action.option_strings[0]} (or its environment variable) must be one "
                         f"of {', '.join(map(str, action.choices))}")
    if args.vad_threshold is not None and not 0 <= args.vad_threshold <= 1:
        parser.error("--vad-threshold must be between 0 and 1")
    if args.sox_buffer is not None and not 256 <= args.sox_buffer <= 65536:
        parser.error("--sox-buffer must be between 256 and 65536")
    if min(args.connect_timeout, args.keepalive, args.tool_timeout, args.mcp_start_timeout) <= 0:
        parser.error("--connect-timeout, --keepalive, --tool-timeout and --mcp-start-timeout "
                     "must be more than 0 seconds")
    if not 0 <= args.reconnect_tries <= 100:
        parser.error("--reconnect-tries must be from 0 to 100")
    args.provider, args.base_url = provider_and_base_url(args.provider, args.base_url)
    provider = PROVIDERS[args.provider]
    args.model = args.model or (XAI_MODEL if provider.name == "xai" else DEFAULT_MODEL)
    args.voice = args.voice or provider.default_voice
    args.transcription_model = args.transcription_model or provider.default_transcription
    if args.voice not in provider.voices:
        parser.error(f"--voice must be one of {', '.join(provider.voices)}"
                     f"{'' if provider.name == 'openai' else ' on ' + provider.name}")
    if args.model.startswith("gpt-live"):
        raise Fatal(f"{args.model} is served by OpenAI's GPT-Live API (/v1/live/sessions), not "
                    f"the Realtime API this script speaks: use --model {DEFAULT_MODEL}", Exit.USAGE)
    return args


def provider_and_base_url(chosen: str, base_url: str) -> tuple[str, str]:
    """The provider (told by the base URL's host unless chosen) and its base URL."""
    if not base_url and chosen in ("auto", "azure"):
        base_url = os.environ.get("AZURE_OPENAI_ENDPOINT", "")
    host = (urllib.parse.urlsplit(base_url).hostname or "").lower()
    if chosen == "auto":
        chosen = "azure" if host.endswith(AZURE_HOSTS) else "xai" if host == "api.x.ai" \
            else "openai"
    base_url = base_url or PROVIDERS[chosen].base_url
    if not base_url:
        raise Fatal("Azure needs your resource's endpoint: set AZURE_OPENAI_ENDPOINT (or "
                    "--base-url) to https://<resource>.openai.azure.com", Exit.USAGE)
    parts = urllib.parse.urlsplit(base_url)
    if chosen == "azure" and parts.path.strip("/") in ("", "openai"):
        base_url = urllib.parse.urlunsplit((*parts[:2], "/openai/v1", "", ""))  # the GA path
    return chosen, base_url


def realtime_url(base_url: str, model: str) -> str:
    """wss://host/v1/realtime?model=… from an SDK-style base URL; plain ws:// only to loopback."""
    parts = urllib.parse.urlsplit(base_url)
    scheme = {"https": "wss", "wss": "wss", "http": "ws", "ws": "ws"}.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise Fatal(f"OPENAI_BASE_URL {base_url!r} is not an http(s) URL; "
                    f"use something like {DEFAULT_BASE_URL}", Exit.USAGE)
    if scheme == "ws" and not is_loopback(parts.hostname):
        raise Fatal(f"refusing to send the API key in clear text to {parts.hostname}: "
                    "use https:// (plain http is only allowed to this machine)", Exit.USAGE)
    query = urllib.parse.urlencode({"model": model})
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/realtime",
                                    query, ""))


def auth_header(config: Config) -> str:
    """The key as its provider takes it: Azure's `api-key`, or a Bearer token (as an Entra ID
    token in AZURE_OPENAI_AD_TOKEN is sent to Azure)."""
    entra_token = os.environ.get("AZURE_OPENAI_AD_TOKEN", "").strip()
    if config.provider.key_header == "api-key" and config.api_key != entra_token:
        return f"api-key: {config.api_key}"
    return f"Authorization: Bearer {config.api_key}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(env_file: Path, provider: Provider) -> str:
    """The key from the environment or .env; asked for (and optionally saved) on a terminal."""
    for name in provider.key_variables:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    variable = provider.key_variables[0]
    if not sys.stdin.isatty():
        raise Fatal(f"{variable} is not set: copy .env.example to .env and put your key in it, "
                    f"or export {variable}", Exit.NO_KEY)
    try:
        key = getpass.getpass(f"{provider.title} API key (input hidden): ").strip()
        if key and input(f"Save it to {env_file} (readable only by you)? [y/N] ").lower() == "y":
            with os.fdopen(os.open(env_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as f:
                f.write(f"{variable}={key}\n")
            os.chmod(env_file, 0o600)
    except (EOFError, KeyboardInterrupt):
        key = ""
    if not key:
        raise Fatal(f"no API key given; set {variable}", Exit.NO_KEY)
    return key


def plumbing_for(args: argparse.Namespace) -> Plumbing:
    plumbing = dataclasses.replace(PLUMBING[args.plumbing], input_device=args.input_device,
                                   output_device=args.output_device)
    size = args.sox_buffer
    if size is None and any(name in args.output_device.lower() for name in BLUETOOTH_NAMES):
        size = BLUETOOTH_BUFFER
    if size is None or plumbing.block_bytes is None:  # the article's plumbing stays as it was
        return plumbing
    return dataclasses.replace(plumbing, sox_options=("--buffer", str(size)), block_bytes=size * 2)


def load_config(args: argparse.Namespace, env_file: Path) -> Config:
    provider = PROVIDERS[args.provider]
    url = realtime_url(args.base_url, args.model)
    prices = prices_for(args.price_model or args.model)
    if args.max_cost is not None and prices is None and provider.per_minute is None:
        raise Fatal(f"--max-cost needs the prices of {args.price_model or args.model}, which this "
                    "script does not know: name a model it knows with --price-model, or set "
                    "REALTIME_PRICES (see the README)", Exit.USAGE)
    return Config(
        api_key=api_key(env_file, provider), url=url, model=args.model, voice=args.voice,
        provider=provider,
        instructions=args.instructions, transcription_model=args.transcription_model,
        turn_detection=args.turn_detection, vad_threshold=args.vad_threshold,
        noise_reduction=args.noise_reduction, duplex=duplex_for(args), keepalive=args.keepalive,
        connect_timeout=args.connect_timeout, reconnect_tries=args.reconnect_tries,
        prices=prices, max_cost=args.max_cost,
        log=TranscriptLog(args.log), plumbing=plumbing_for(args),
        mcp=tuple(mcp_commands(args.mcp, args.mcp_config)), approve_tools=args.approve_tools,
        tool_timeout=args.tool_timeout, mcp_start_timeout=args.mcp_start_timeout,
        mcp_urls=tuple(remote_servers(args.mcp_url)), mcp_headers=tuple(mcp_headers(args.mcp_header)))


def duplex_for(args: argparse.Namespace) -> str:
    """The echo guard times the played audio by the Player's ledger: the article's plumbing, which
    writes a reply all at once and cannot stop it, gets half duplex instead."""
    if args.duplex == "auto" and not PLUMBING[args.plumbing].barge_in:
        return "half"
    return str(args.duplex)


def prices_for(model: str) -> Prices | None:
    override = os.environ.get("REALTIME_PRICES", "").strip()
    if not override:
        return PRICES.get(model)
    try:
        values = [float(value) for value in override.split(",")]
        if len(values) not in (6, 7) or not all(0 <= value <= 10_000 for value in values):
            raise ValueError  # NaN fails the comparison too
    except ValueError:
        raise Fatal("REALTIME_PRICES must be 6 or 7 numbers from 0 to 10000, USD per million "
                    "tokens: audio in, "
                    "audio cached, audio out, text in, text cached, text out[, image in]",
                    Exit.USAGE) from None
    audio_in, audio_cached, audio_out, text_in, text_cached, text_out = values[:6]
    image_in = values[6] if len(values) == 7 else 0.0
    return audio_in, audio_cached, audio_out, text_in, text_cached, text_out, image_in


# Written as JSON escapes: characters that some readers take for the end of a line (NEL, the
# Unicode line and paragraph separators), and the other C1 controls and DEL with them.
LOG_ESCAPES = {code: f"\\u{code:04x}" for code in (*range(0x7F, 0xA0), 0x2028, 0x2029)}


class TranscriptLog:
    """--log: one JSON object per line, flushed per turn, so a crash loses at most the turn in
    progress. Checked at start: a directory or an unwritable path is refused."""

    def __init__(self, path: str) -> None:
        self.file = None
        if not path:
            return
        if os.path.isdir(path):
            raise Fatal(f"--log {path} is a directory: give a file name", Exit.USAGE)
        try:
            # A lone surrogate from a server is written as its JSON escape, \udXXX.
            self.file = open(path, "a", encoding="utf-8",  # noqa: SIM115 - open for the session
                             errors="backslashreplace")
        except OSError as error:
            raise Fatal(f"cannot write --log {path}: {error.strerror}", Exit.USAGE) from None

    def write(self, **record: Any) -> None:
        if self.file is not None:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
            try:  # strict JSON: a NaN from a server would make the line unreadable elsewhere
                line = json.dumps(record, ensure_ascii=False, allow_nan=False)
            except ValueError:
                line = json.dumps(finite(record), ensure_ascii=False, allow_nan=False)
            self.file.write(line.translate(LOG_ESCAPES) + "\n")
            self.file.flush()


def session_config(config: Config, tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The GA `session.update` body: PCM16 at 24 kHz both ways (the API insists on `rate`), and
    the tools when there are MCP servers."""
    pcm = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    audio_in: dict[str, Any] = {"format": pcm, "turn_detection": None, "transcription": None,
                                "noise_reduction": None}
    if config.turn_detection != "none":
        audio_in["turn_detection"] = {"type": config.turn_detection}
        if config.vad_threshold is not None and config.turn_detection == "server_vad":
            audio_in["turn_detection"]["threshold"] = config.vad_threshold
    if config.transcription_model != "none":
        audio_in["transcription"] = {"model": config.transcription_model}
    if config.noise_reduction != "none":
        audio_in["noise_reduction"] = {"type": config.noise_reduction}
    body = {"type": "realtime", "instructions": config.instructions,
            "output_modalities": ["audio"],
            "audio": {"input": audio_in, "output": {"format": pcm, "voice": config.voice}}}
    if config.provider.flat_session:  # xAI's: the fields at the top, 24 kHz asked for both ways
        body = {"instructions": config.instructions, "voice": config.voice,
                "turn_detection": audio_in["turn_detection"],
                "audio": {"input": {"format": pcm}, "output": {"format": pcm}}}
    return body if tools is None else {**body, "tools": tools}


def session_update(config: Config, fields: dict[str, Any]) -> dict[str, Any]:
    """A later `session.update` that changes only `fields`."""
    session = fields if config.provider.flat_session else {"type": "realtime", **fields}
    return {"type": "session.update", "session": session}


# --- The conversation: one handler per server event ----------------------------------------------

@dataclasses.dataclass
class Turn:
    """One turn as text, in conversation order: what a new session is told."""
    role: str  # "user", "assistant", or "tool" (what a tool returned)
    item_id: str
    text: str = ""


class History:
    """The conversation as text, turn by turn, in order: what a new session is told, since a
    session starts empty. Kept flat in long sessions."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.typed = 0

    def remember(self, role: str, item_id: str, text: str = "") -> Turn:
        """The turn for this item, added at the end if new."""
        for turn in reversed(self.turns[-50:]):
            if turn.item_id == item_id and turn.role == role:
                break
        else:
            turn = Turn(role, item_id)
            self.turns.append(turn)
            del self.turns[:-REPLAY_TURNS * 5]
        turn.text = text.strip() or turn.text
        return turn

    def typed_line(self, line: str) -> None:
        self.typed += 1
        self.remember("user", f"typed-{self.typed}", line)

    def cut_off(self, transcripts: Words) -> None:
        """The connection dropped: a reply cut off mid-way keeps the words it had."""
        for turn in self.turns[-5:]:
            if turn.role == "assistant" and not turn.text:
                turn.text = transcripts.get(turn.item_id).strip()

    def replay(self) -> list[dict[str, Any]]:
        """The last turns (up to REPLAY_TURNS and REPLAY_CHARS) as items for a new session."""
        turns = [turn for turn in self.turns if turn.text][-REPLAY_TURNS:]
        while sum(len(turn.text) for turn in turns) > REPLAY_CHARS:
            turns.pop(0)
        return [{"type": "conversation.item.create", "item": {
            "type": "message", "role": "system" if turn.role == "tool" else turn.role,
            "content": [{"type": "output_text" if turn.role == "assistant" else "input_text",
                         "text": turn.text}]}} for turn in turns]  # a tool's call_id means nothing now


class Conversation:
    """The talk's state and a handler per server event (HANDLERS, below). It delegates the reply's
    sound and words (Reply), the microphone (FullDuplex, HalfDuplex or Guarded), staying connected
    (Link), tools (Toolbox), the cost (Spend) and what a new session is told (History)."""

    def __init__(self, config: Config, recorder: Sox, player: Player, display: Display,
                 tools: Toolbox, echo: EchoGuard | None) -> None:
        self.config, self.display, self.tools, self.player = config, display, tools, player
        self.link = Link(config, display)
        self.history = History()
        self.reply = Reply(config, player, display, self.history, self.send)
        self.gate = microphone_gate(config, player, echo, lambda: self.interrupt(cancel=True))
        self.sox = SoxPair(config.plumbing, recorder, player, display)
        self.spend = Spend(config, display)
        self.ending: str | None = None  # why we stop once the received audio has played
        self.mic_ms_uncommitted = 0.0
        self.response_active = self.user_speaking = False

    def connect(self, now: float) -> None:
        self.link.open(now)

    def watch(self, selector: selectors.BaseSelector) -> None:
        """The conversation's pipes: both sox processes' and the MCP servers'."""
        self.sox.watch(selector, self.on_microphone)
        self.tools.watch(selector)

    def close(self) -> None:
        self.sox.close()
        self.link.close()

    def send(self, event: dict[str, Any]) -> None:
        self.link.send(event)

    def connection(self) -> Connection | None:
        """The connection the loop watches: it changes with each step of the opening and each
        reconnect."""
        return self.link.current()

    def tick(self, now: float, all_handled: bool) -> None:
        """Timers: the end after the last words, the link's (see Link.tick), sox's, the tools'.
        `all_handled`: no message of the connection waits in the inbox."""
        if self.ending and not self.player.busy(now):  # the last words play to their end
            raise Stop(self.ending)
        self.end_if_over_budget(now)  # by the minute (xAI), the cost grows with the time
        if self.link.tick(now, self.at_turn_boundary(now), all_handled) is not None:
            self.on_connection_lost()
        self.sox.tick(now)
        self.tools.tick(now)
        if self.link.is_ready() and self.tools.take_changed():
            self.send(session_update(self.config, {"tools": self.tools.declarations()}))
        self.tools.deliver(self.send, self.history, may_reply=self.link.is_ready() and not (
            self.response_active or self.user_speaking))
        self.player.pump(now)

    def next_timer(self, now: float) -> float | None:
        """When tick() has something to do next."""
        timers = [self.player.next_wakeup(now)]
        if self.ending:
            timers.append(self.player.audible_until())
        else:
            timers += [self.link.next_timer(now), self.tools.next_timer(), self.sox.next_timer()]
        return min((timer for timer in timers if timer is not None), default=None)

    def on_connection_lost(self) -> None:
        """The link reconnects; what was said so far is kept for the next session."""
        self.reply.connection_lost()
        self.display.end_line()
        self.response_active = self.user_speaking = False
        self.sox.drop_partial_frame()
        self.tools.cancel_all("the connection to the API dropped")

    def status(self, now: float) -> str:
        """The status line: what is happening, what it cost, how long this session has left."""
        state = (self.link.status(now) or self.tools.status(now) or self.gate.status(now)
                 or ("hearing you" if self.user_speaking else "listening"))
        left = self.link.minutes_left(now)
        return " · ".join([state, self.spend.status()] + (
            [f"{left:.0f} min left in this session"] if left is not None else []))

    def at_turn_boundary(self, now: float) -> bool:
        return not (self.response_active or self.user_speaking or self.player.busy(now)
                    or self.tools.busy())

    def handle(self, message: dict[str, Any]) -> None:
        handler = HANDLERS.get(message["type"])
        if handler is not None:
            try:
                handler(self, message)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError,
                    OverflowError) as error:
                self.display.warn(f"skipping a malformed {message['type']!r} event ({error!r})",
                                  once="malformed " + message["type"])
        elif message["type"] not in QUIET_EVENTS:
            self.display.warn(f"ignoring unknown server event {message['type']!r}",
                              once=message["type"])

    # Session
    def on_session_created(self, event: dict[str, Any]) -> None:
        """session.created; xAI's first event is conversation.created instead."""
        if event["type"] == "conversation.created" and not self.config.provider.flat_session:
            return
        self.link.session_created((event.get("session") or {}).get("expires_at"))
        tools = self.tools.declarations() if self.tools.configured else None
        self.tools.take_changed()  # they are all in this one
        self.send({"type": "session.update", "session": session_config(self.config, tools)})

    def on_session_updated(self, event: dict[str, Any]) -> None:
        if not self.link.configured():
            return
        if not self.link.is_again():
            self.display.connected(self.config)
            return
        items = self.history.replay()
        for item in items:
            self.send(item)
        self.display.info(f"connected again; the model was told the last {len(items)} turns")

    def on_error(self, event: dict[str, Any]) -> None:
        error = event.get("error") or {}
        code = error.get("code")
        if code in FATAL_ERRORS:
            raise Fatal(f"the API ended the session: {error.get('message')} ({code})",
                        FATAL_ERRORS[code])
        if code == "session_expired":
            self.link.expiring()
            return
        self.display.warn(f"the API reported {code or error.get('type')}: {error.get('message')}")

    # The person
    def on_speech_started(self, event: dict[str, Any]) -> None:
        self.user_speaking = True
        self.tools.person_spoke()
        self.interrupt(cancel=False)  # the server cancels its response itself on a VAD turn

    def on_speech_stopped(self, event: dict[str, Any]) -> None:
        self.user_speaking = False

    def on_committed(self, event: dict[str, Any]) -> None:
        self.history.remember("user", event.get("item_id", ""))  # its words arrive later

    def on_user_transcript(self, event: dict[str, Any]) -> None:
        said = event.get("transcript", "").strip()
        self.history.remember("user", event.get("item_id", ""), said)
        self.config.log.write(speaker="user", item_id=event.get("item_id"), text=said)
        self.display.user(said)

    def on_user_transcript_failed(self, event: dict[str, Any]) -> None:
        self.display.warn(f"could not transcribe what you said: "
                          f"{(event.get('error') or {}).get('message')}")

    # The assistant
    def on_response_created(self, event: dict[str, Any]) -> None:
        self.response_active = True

    def on_output_item(self, event: dict[str, Any]) -> None:
        item = event.get("item") or {}
        if item.get("type") == "message":
            self.history.remember("assistant", item.get("id", ""))
        self.tools.item_added(item)

    def on_audio_delta(self, event: dict[str, Any]) -> None:
        self.reply.audio(event.get("item_id", ""), event.get("delta"))

    def on_audio_done(self, event: dict[str, Any]) -> None:
        self.reply.audio_done(event.get("item_id", ""))

    def on_transcript_delta(self, event: dict[str, Any]) -> None:
        self.reply.transcript_delta(event.get("item_id", ""), event.get("delta", ""))

    def on_transcript_done(self, event: dict[str, Any]) -> None:
        self.reply.transcript_done(event.get("item_id", ""), event.get("transcript", ""))

    def on_response_done(self, event: dict[str, Any]) -> None:
        self.response_active = False
        response = event.get("response") or {}
        usage = response.get("usage") or {}
        now = time.monotonic()
        self.reply.done(response, usage, self.spend.response(usage, self.link.minutes(now)))
        self.end_if_over_budget(now)

    def end_if_over_budget(self, now: float) -> None:
        reason = None if self.ending else self.spend.over_budget(self.link.minutes(now))
        if reason is not None:
            self.ending = reason
            if self.response_active:
                self.send({"type": "response.cancel"})

    def final_spend(self, now: float) -> Spend:
        self.spend.connected(self.link.minutes(now))
        return self.spend

    # Tools
    def on_tool_event(self, event: dict[str, Any]) -> None:
        self.tools.on_event(event, self.history)

    def on_keys(self, chunk: bytes) -> bytes:
        return self.tools.on_keys(chunk, time.monotonic())

    # Actions of ours
    def interrupt(self, cancel: bool) -> None:
        """Barge-in: silence the player and tell the server exactly how much was heard."""
        self.reply.stop(time.monotonic())
        if cancel and self.response_active:
            self.send({"type": "response.cancel"})

    def on_microphone(self, frames: list[tuple[bytes, float]], now: float) -> None:
        """20 ms frames, dated by the recorder's sample clock, become appends, each one screened
        for the assistant's own voice coming back from the speakers (--duplex)."""
        if not self.link.is_ready() or self.ending:
            return  # no session configured (yet, or while reconnecting): the audio is dropped
        for frame, captured in frames:
            for sent in self.gate.screen(frame, captured, now):
                self.send({"type": "input_audio_buffer.append",
                           "audio": base64.b64encode(sent).decode()})
                self.mic_ms_uncommitted += len(sent) * 1000 / BYTES_PER_SECOND

    def on_typed_line(self, line: str) -> None:
        if not self.link.is_ready():
            self.display.warn("not connected yet; type again in a moment")
            return
        text = line.strip()
        if text:
            self.tools.person_spoke()
            self.history.typed_line(text)
            self.config.log.write(speaker="user", typed=True, text=text)
            self.interrupt(cancel=True)
            self.send({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
            self.send({"type": "response.create"})
            self.display.user(line)
        elif self.config.turn_detection == "none" and not self.player.busy(time.monotonic()):
            self.end_manual_turn()
        else:
            self.interrupt(cancel=True)
            self.tools.cancel_all("the person interrupted")
            if self.config.turn_detection == "none":
                self.send({"type": "input_audio_buffer.clear"})
                self.mic_ms_uncommitted = 0

    def end_manual_turn(self) -> None:
        if self.mic_ms_uncommitted < 100:  # the API rejects commits of less than 100 ms
            self.display.warn("nothing recorded yet: speak, then press Enter")
            return
        self.send({"type": "input_audio_buffer.commit"})
        self.send({"type": "response.create"})
        self.mic_ms_uncommitted = 0


Handler = Callable[[Conversation, dict[str, Any]], None]
HANDLERS: dict[str, Handler] = {
    "session.created": Conversation.on_session_created,
    "session.updated": Conversation.on_session_updated,
    "conversation.created": Conversation.on_session_created,
    "error": Conversation.on_error,
    "input_audio_buffer.speech_started": Conversation.on_speech_started,
    "input_audio_buffer.speech_stopped": Conversation.on_speech_stopped,
    "input_audio_buffer.committed": Conversation.on_committed,
    "conversation.item.input_audio_transcription.completed": Conversation.on_user_transcript,
    "conversation.item.input_audio_transcription.failed": Conversation.on_user_transcript_failed,
    "response.created": Conversation.on_response_created,
    "response.output_item.added": Conversation.on_output_item,
    "response.output_item.done": Conversation.on_tool_event,
    "response.output_audio.delta": Conversation.on_audio_delta,
    "response.output_audio.done": Conversation.on_audio_done,
    "response.output_audio_transcript.delta": Conversation.on_transcript_delta,
    "response.output_audio_transcript.done": Conversation.on_transcript_done,
    "response.done": Conversation.on_response_done,
    "conversation.item.done": Conversation.on_tool_event,
    "mcp_list_tools.in_progress": Conversation.on_tool_event,
    "mcp_list_tools.completed": Conversation.on_tool_event,
    "mcp_list_tools.failed": Conversation.on_tool_event,
}
# Events that need nothing from a terminal client (still valid, so not reported as unknown).
QUIET_EVENTS = {
    "input_audio_buffer.cleared",
    "input_audio_buffer.timeout_triggered", "ping", "conversation.item.added",
    "conversation.item.created", "conversation.item.truncated",
    "conversation.item.deleted", "conversation.item.retrieved",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.segment",
    "response.content_part.added", "response.content_part.done",
    "response.output_text.delta", "response.output_text.done",
    "response.function_call_arguments.delta", "response.function_call_arguments.done",
    "rate_limits.updated", "response.mcp_call_arguments.delta", "response.mcp_call_arguments.done",
    "response.mcp_call.in_progress", "response.mcp_call.completed", "response.mcp_call.failed",
    # Only on WebRTC and SIP connections, but valid events all the same.
    "input_audio_buffer.dtmf_event_received", "output_audio_buffer.started",
    "output_audio_buffer.stopped", "output_audio_buffer.cleared",
}


def decode_event(opcode: int, payload: bytes, display: Display) -> dict[str, Any] | None:
    """A server message as an event, or None (reported once per kind) when it is not one."""
    if opcode != websocket.ABNF.OPCODE_TEXT:
        display.warn("ignoring a binary frame from the API", once="binary")
        return None
    try:
        event = parse_json(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        display.warn("ignoring a message from the API that is not JSON", once="json")
        return None
    except ValueError as error:
        display.warn(f"ignoring a message from the API {error}", once="deep")
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        display.warn("ignoring a message from the API without a type", once="type")
        return None
    return event


# --- The loop -------------------------------------------------------------------------------------

EVENT_SLICE = 0.02  # s of handling events before the loop turns to everything else again
INBOX_LIMIT = 5_000  # messages waiting: past this the socket waits (TCP slows the server down)


class Inbox:
    """The server's messages that are not handled yet. The loop handles them in slices of
    EVENT_SLICE, so that a flood of events cannot hold it: the microphone, the player and
    Ctrl-C get their turn between slices. An event that comes twice (its event_id) counts once."""

    def __init__(self, display: Display) -> None:
        self.display = display
        self.messages: collections.deque[tuple[int, bytes]] = collections.deque()
        self.recent: dict[str, None] = {}  # event ids, oldest first

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, messages: list[tuple[int, bytes]]) -> None:
        self.messages.extend(messages)

    def full(self) -> bool:
        return len(self.messages) >= INBOX_LIMIT

    def events(self, until: float) -> Iterator[dict[str, Any]]:
        while self.messages and time.monotonic() < until:
            event = decode_event(*self.messages.popleft(), self.display)
            if event is not None and not self._repeated(event.get("event_id")):
                yield event

    def _repeated(self, event_id: Any) -> bool:
        if not isinstance(event_id, str):
            return False
        if event_id in self.recent:
            return True
        self.recent[event_id] = None
        if len(self.recent) > 256:
            del self.recent[next(iter(self.recent))]
        return False


class Stop(Exception):
    """A normal, clean end: Ctrl-C, SIGTERM, SIGHUP, or the --max-cost budget (with a reason)."""


EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignore_exit_signals() -> None:
    """Once the script is on its way out, a second Ctrl-C must not cut the way short. SIG_IGN,
    unlike a Python handler, also stays in force while the interpreter shuts down."""
    for sig in EXIT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_starting_up(signum: int, frame: Any) -> None:
    """Before the loop runs, a signal ends start-up the ordinary way, once."""
    ignore_exit_signals()
    raise KeyboardInterrupt


def run(config: Config, display: Display) -> None:
    tools = Toolbox(config, sys.stdin.isatty(), display)
    try:
        memory = RoomMemory(config.plumbing)
        recorder = start_recorder(config.plumbing)
        echo = EchoGuard(memory.recall()) if config.duplex == "auto" else None
        try:
            player = Player(config.plumbing, echo)
        except BaseException:
            recorder.kill(signal.SIGTERM)  # a player that cannot start leaves no recorder behind
            raise
        conversation = Conversation(config, recorder, player, display, tools, echo)
        check = ModelCheck(config, display) if config.provider.lists_models else None
        try:
            conversation.connect(time.monotonic())  # the loop takes each step of the opening
            try:
                loop(conversation, display, [check] if check else [])
            finally:
                display.totals(conversation.final_spend(time.monotonic()))
        finally:
            if check is not None:
                check.close()
            conversation.close()
            if echo is not None:
                memory.keep(echo)
    finally:
        tools.close()  # no MCP server outlives the script


def loop(conversation: Conversation, display: Display, others: list[ModelCheck]) -> None:
    """One selectors loop over the WebSocket, the recorder, the player, stdin, signals, MCP
    servers and others; each registers its own pipes with a callback, as in the selectors
    documentation's example."""
    selector = selectors.DefaultSelector()
    wakeup_r, wakeup_w = socket.socketpair()
    wakeup_r.setblocking(False)
    wakeup_w.setblocking(False)
    # Signals only write a byte to this socket (like asciinema's pty loop); the loop does the rest.
    signal.set_wakeup_fd(wakeup_w.fileno())
    for sig in EXIT_SIGNALS:
        signal.signal(sig, lambda signum, frame: None)

    def on_signal(fd: int) -> None:
        if wakeup_r.recv(64):
            ignore_exit_signals()  # the way out must not be cut short by another
            raise Stop

    def on_keys(fd: int) -> None:
        chunk = read_available(fd)
        if chunk == b"":  # EOF ends typing, not the voice session
            selector.unregister(fd)
        for line in display.typed(conversation.on_keys(chunk or b"")):
            conversation.on_typed_line(line)

    ready: list[bool] = []  # the connection's socket (or resolver) is ready this turn

    selector.register(wakeup_r, selectors.EVENT_READ, on_signal)
    conversation.watch(selector)
    for other in others:
        other.watch(selector)
    try:
        selector.register(sys.stdin.fileno(), selectors.EVENT_READ, on_keys)
    except (ValueError, OSError):  # a regular file or /dev/null cannot be watched: no typing
        pass
    terminal = termios.tcgetattr(sys.stdin) if display.live and sys.stdin.isatty() else None
    if terminal:
        tty.setcbreak(sys.stdin, termios.TCSANOW)  # no echo, no line editing; Ctrl-C still works
    display.start()
    # What the connection waits on changes with each step (resolver, socket, TLS socket) and with
    # each new connection: (connection, phase, fd, events), registered again whenever it changes.
    watched: tuple[Connection, str, int, int] | None = None
    inbox = Inbox(display)
    try:
        while True:
            connection = conversation.connection()
            fileobj = connection.fileobj() if connection is not None else None
            wanted = None if connection is None or fileobj is None else \
                (connection, connection.phase, fileobj.fileno(), connection.events())
            if wanted != watched:
                if watched is not None:
                    selector.unregister(watched[2])
                if wanted is not None:
                    selector.register(wanted[2], wanted[3], lambda fd: ready.append(True))
                watched = wanted
            now = time.monotonic()
            timer = conversation.next_timer(now)
            timers = [] if timer is None else [timer]
            if display.live:
                timers.append(display.next_redraw() or now + 1)  # or the status line's clock
            if inbox or (connection is not None and connection.buffered()):
                timers.append(now)  # more to handle: look at the rest, then go on at once
            events = selector.select(max(min(timers) - now, 0) if timers else None)
            ready.clear()
            for key, _ in events:  # each owner registered its own pipes, with its callback
                if selector.get_map().get(key.fd) is key:  # not a sox replaced in this round
                    key.data(key.fd)
            if connection is not None and (ready or connection.buffered()) and not inbox.full() \
                    and not connection.dropped:  # (what came before the drop is still handled)
                inbox.add(connection.on_ready())
            for event in inbox.events(until=time.monotonic() + EVENT_SLICE):
                conversation.handle(event)
            now = time.monotonic()
            conversation.tick(now, all_handled=not inbox)
            display.refresh(conversation.status(now), now)
    finally:
        display.stop()
        if terminal:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, terminal)
        signal.set_wakeup_fd(-1)
        selector.close()
        wakeup_r.close()
        wakeup_w.close()


def read_available(fd: int) -> bytes | None:
    """What the pipe holds now: b"" at EOF, None when a wake-up found nothing after all."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


# --- The sox processes ---------------------------------------------------------------------------

# Variables of the user's environment that would change what the article's commands do.
SOX_OVERRIDES = ("AUDIODEV", "AUDIODRIVER", "SOX_OPTS")
SOX_WATCHDOG = 4.0  # s without microphone bytes, or with a player taking none: the device is gone
MICROPHONE_WAKE = 6.0  # s more before a new recorder's first bytes (Apple Silicon: 2-5 s)
UNKNOWN_DEVICE = ("can not open audio device", "No such entity")  # CoreAudio's, PulseAudio's


def sox_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name not in SOX_OVERRIDES}


class StderrTail:
    """The last lines a child wrote to stderr, kept for the day it fails. Only the last ones:
    CoreAudio's "buffer overrun" warnings can come every few ms, and a tool's log never ends."""

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=20)
        self.partial = b""

    def feed(self, chunk: bytes) -> list[str]:
        """The complete lines this chunk ends."""
        *complete, partial = (self.partial + chunk).split(b"\n")
        self.partial = partial[-4096:] if chunk else b""
        new = [text for line in complete if (text := line.decode(errors="replace").strip())]
        self.lines.extend(new)
        return new


class Sox:
    """One sox child. Its stderr is read by the loop: sox exits 0 when the audio server goes away,
    and its `sox FAIL …` line is the only account of why."""

    def __init__(self, role: str, args: list[str], env_extra: dict[str, str]) -> None:
        self.role, self.args, self.env_extra = role, args, env_extra
        self.selector: selectors.BaseSelector | None = None
        self.on_death: Callable[[Sox], None] = lambda sox: None
        self.on_audio: Callable[[bytes], None] | None = None
        self.stderr = StderrTail()
        self.failed: str | None = None  # the last `sox FAIL` line
        # Own session: the terminal's Ctrl-C reaches us only, and we stop sox in our own order.
        self.process = subprocess.Popen(
            ["sox", *args], stdin=subprocess.PIPE if role == "player" else subprocess.DEVNULL,
            stdout=subprocess.PIPE if role == "recorder" else subprocess.DEVNULL,
            stderr=subprocess.PIPE, env={**sox_environment(), **env_extra},
            start_new_session=True)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                os.set_blocking(stream.fileno(), False)
        if self.process.stdin is not None:
            shrink_pipe(self.process.stdin.fileno())

    def restart(self) -> Sox:
        """Kill this one and start the same command again, watched as this one was."""
        selector = self.selector
        self.kill(signal.SIGKILL)
        again = Sox(self.role, self.args, self.env_extra)
        if selector:
            again.watch(selector, self.on_death, self.on_audio)
        return again

    def watch(self, selector: selectors.BaseSelector, on_death: Callable[[Sox], None],
              on_audio: Callable[[bytes], None] | None = None) -> None:
        """The loop calls back: `on_audio` with the recorder's bytes, `on_death` when sox stops
        (its stderr says FAIL, or ends as it exits)."""
        self.selector, self.on_death, self.on_audio = selector, on_death, on_audio
        assert self.process.stderr is not None
        selector.register(self.process.stderr, selectors.EVENT_READ, self._stderr_ready)
        if self.process.stdout:
            selector.register(self.process.stdout, selectors.EVENT_READ, self._audio_ready)

    def _stderr_ready(self, fd: int) -> None:
        if not self.read_stderr() or self.failed:
            self.on_death(self)

    def _audio_ready(self, fd: int) -> None:
        audio = read_available(fd)
        if audio == b"":
            self.on_death(self)
        elif audio and self.on_audio is not None:
            self.on_audio(audio)

    def unwatch(self) -> None:
        for stream in (self.process.stdout, self.process.stderr):
            if self.selector and stream:
                try:
                    self.selector.unregister(stream)
                except (KeyError, ValueError):
                    pass
        self.selector = None

    def read_stderr(self) -> bool:
        """Collect complete stderr lines; False at EOF (sox has exited or is exiting)."""
        assert self.process.stderr is not None
        try:
            chunk = os.read(self.process.stderr.fileno(), 4096)
        except BlockingIOError:
            return True
        for text in self.stderr.feed(chunk):
            if "FAIL" in text:  # only FAIL is fatal; WARN and INFO lines are sox talking
                self.failed = text
        return bool(chunk)

    def failure(self) -> str:
        """sox's own reason, without the ALSA probing noise that precedes it."""
        self.read_stderr_to_end()
        reason = self.failed or ([line for line in self.stderr.lines
                                  if not line.startswith("ALSA lib")]
                                 or [f"exited with code {self.process.poll()}"])[-1]
        return f"the sox {self.role} stopped: {reason}"

    def read_stderr_to_end(self) -> None:
        if self.process.stderr and not self.process.stderr.closed:
            deadline = time.monotonic() + 0.05  # sox has exited: its last words are written
            while self.read_stderr() and time.monotonic() < deadline:
                time.sleep(0.005)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.unwatch()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:  # a player stdin we could not flush: the audio is dropped anyway
                    pass


def start_recorder(plumbing: Plumbing) -> Sox:
    args, env_extra = on_device(RECORDER_ARGS, plumbing.input_device, "PULSE_SOURCE")
    return Sox("recorder", [*plumbing.sox_options, *args], env_extra)


def start_player(plumbing: Plumbing) -> Sox:
    args, env_extra = on_device(PLAYER_ARGS, plumbing.output_device, "PULSE_SINK")
    if plumbing.pulse_latency_ms:  # PulseAudio's default 250 ms buffer would undo the small block
        env_extra["PULSE_LATENCY_MSEC"] = os.environ.get("PULSE_LATENCY_MSEC",
                                                         plumbing.pulse_latency_ms)
    return Sox("player", [*plumbing.sox_options, *args], env_extra)


def on_device(args: list[str], device: str, pulse_variable: str) -> tuple[list[str], dict[str, str]]:
    """The article's arguments for a chosen device: macOS names a CoreAudio device in place of
    --default-device; on Linux sox keeps --default-device and libpulse reads the device from env."""
    if not device:
        return list(args), {}
    if sys.platform == "darwin":
        at = args.index("--default-device")
        return [*args[:at], "--type", "coreaudio", device, *args[at + 1:]], {}
    return list(args), {pulse_variable: device}


def shrink_pipe(fd: int) -> None:
    """A 64 KiB pipe holds 1.4 s of audio nobody can take back; paced writes never need more."""
    set_pipe_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if set_pipe_size:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, set_pipe_size, 4096)


@dataclasses.dataclass
class HeardItem:
    """The ledger of one assistant audio item: what arrived, what went to the player, when."""
    item_id: str
    received: int = 0  # bytes
    written: int = 0
    start_offset: int | None = None  # position of its first byte in the player's stream
    complete: bool = False  # `response.output_audio.done` arrived
    odd_byte: bytes = b""  # a delta of odd length leaves half a sample for the next one


class Cushion:
    """How long a reply's first audio waits before it plays.

    Audio that arrives at real time needs a cushion against jitter, or each delta lands just as
    the last one runs out and the reply stutters. Audio that arrives well ahead of real time, as
    the API sends it, needs none, and the wait only delays the first word. A reply's first delta
    cannot tell the two apart, so the wait is learned from the reply before: the full cushion,
    less how far ahead of real time its audio always was."""

    def __init__(self, most_ms: float) -> None:
        self.most_ms = most_ms
        self.wait_ms = most_ms  # until a reply has shown how its audio arrives
        self.item_id = ""
        self.first_at = 0.0
        self.received_ms = 0.0
        self.latest_ms: float | None = None  # how late, at worst, audio came against real time

    def arrived(self, item_id: str, duration_ms: float, now: float) -> None:
        if item_id != self.item_id:
            self._learn()
            self.item_id, self.first_at, self.received_ms, self.latest_ms = item_id, now, 0.0, None
        else:
            late_ms = (now - self.first_at) * 1000 - self.received_ms
            self.latest_ms = late_ms if self.latest_ms is None else max(self.latest_ms, late_ms)
        self.received_ms += duration_ms

    def _learn(self) -> None:
        if self.latest_ms is not None:  # a single delta says nothing about the pace
            self.wait_ms = min(self.most_ms, max(0.0, self.most_ms + self.latest_ms))


class Player:
    """Feeds the sox player from our own queue, paced to real time, so we always know what was
    heard and can stop the sound at once. The player's clock starts when audio is written to an
    idle player; after that it consumes BYTES_PER_SECOND until it runs dry."""

    def __init__(self, plumbing: Plumbing, echo: EchoGuard | None = None) -> None:
        self.plumbing = plumbing
        self.echo = echo  # told what plays when: its reference
        self.sox = start_player(plumbing)
        self.queue: collections.deque[tuple[HeardItem | None, memoryview]] = collections.deque()
        self.queued_bytes = 0
        self.items: dict[str, HeardItem] = {}
        self.written = 0  # bytes given to this sox process
        self.clock_start = 0.0
        self.cushion = Cushion(plumbing.startup_ms)
        self.waiting_since: float | None = None  # start-up buffer: first audio of an idle player
        self.startup_wait = 0.0  # seconds
        self.blocked_since: float | None = None  # the pipe has been full since
        self.padded = True  # the last audio is followed by its padding

    def played(self, now: float) -> int:
        return min(self.written, int((now - self.clock_start) * BYTES_PER_SECOND) & ~1)

    def audible_until(self) -> float:
        """When the audio written so far will have finished playing."""
        return self.clock_start + self.written / BYTES_PER_SECOND

    def watch(self, selector: selectors.BaseSelector, on_death: Callable[[Sox], None]) -> None:
        self.sox.watch(selector, on_death)

    def close(self) -> None:
        self.sox.kill(signal.SIGKILL)

    def playing(self) -> list[HeardItem]:
        """The replies in the queue or the speaker now."""
        return list(self.items.values())

    def item_ids(self) -> list[str]:
        return list(self.items)

    def busy(self, now: float) -> bool:
        return bool(self.queue) or now < self.audible_until()

    def add(self, item_id: str, audio: bytes, now: float) -> None:
        played = self.played(now)
        self.items = {key: old for key, old in self.items.items() if not old.complete
                      or old.start_offset is None or old.start_offset + old.written > played}
        item = self.items.setdefault(item_id, HeardItem(item_id))
        if item.odd_byte or len(audio) % 2:  # whole samples only, or the rest of it is noise
            audio = item.odd_byte + audio
            audio, item.odd_byte = audio[:len(audio) & ~1], audio[len(audio) & ~1:]
        if not audio:
            return
        item.received += len(audio)
        self.cushion.arrived(item_id, len(audio) * 1000 / BYTES_PER_SECOND, now)
        if not self.busy(now):  # the first audio after silence: wait for the cushion
            self.waiting_since, self.startup_wait = now, self.cushion.wait_ms / 1000
        self._enqueue(item, audio)

    def finish(self, item_id: str) -> None:
        """The item's audio is complete: pad with silence so sox plays its last partial block."""
        item = self.items.get(item_id)
        if item is None or item.complete:
            return
        item.complete = True
        self._pad_to_block()

    def _pad_to_block(self) -> None:
        """Silence after the last audio: to the whole block, plus the resampler's tail."""
        if self.padded:
            return
        padding = -(self.written + self.queued_bytes) % (self.plumbing.block_bytes or 1)
        padding += int(self.plumbing.tail_pad_ms * BYTES_PER_SECOND / 1000) & ~1
        if padding:
            self._enqueue(None, bytes(padding))
        self.padded = True

    def _enqueue(self, item: HeardItem | None, audio: bytes) -> None:
        self.queue.append((item, memoryview(audio)))
        self.queued_bytes += len(audio)
        self.padded = self.padded and item is None

    def heard_ms(self, item: HeardItem, now: float) -> int:
        if item.start_offset is None:
            return 0
        heard = min(max(self.played(now) - item.start_offset, 0), item.written)
        return heard * 1000 // BYTES_PER_SECOND

    def pump(self, now: float) -> None:
        """Write what is due; never blocks (a full pipe just leaves the rest queued)."""
        lead = self.plumbing.player_lead_ms
        if not self.queue and self.played(now) >= self.written - self._partial_block():
            self._pad_to_block()  # starved mid-reply: play the held-back partial block now
        if self._starting_up(now):
            return
        budget = (self.queued_bytes if lead is None
                  else int(lead * BYTES_PER_SECOND / 1000) - (self.written - self.played(now)))
        assert self.sox.process.stdin is not None
        fd = self.sox.process.stdin.fileno()
        while budget > 0 and self.queue:
            item, audio = self.queue[0]
            try:
                count = os.write(fd, audio[:budget])
            except BlockingIOError:
                self.blocked_since = self.blocked_since or now
                return
            self.blocked_since = None
            if self.played(now) >= self.written:  # the player ran dry: its clock restarts now
                self.clock_start = now - self.written / BYTES_PER_SECOND
            if self.echo is not None:
                self.echo.played(audio[:count], self.clock_start + self.written / BYTES_PER_SECOND)
            if item is not None:
                if item.start_offset is None:
                    item.start_offset = self.written
                item.written += count
            self.written += count
            self.queued_bytes -= count
            budget -= count
            if count == len(audio):
                self.queue.popleft()
            else:
                self.queue[0] = (item, audio[count:])

    def _partial_block(self) -> int:
        return self.written % self.plumbing.block_bytes if self.plumbing.block_bytes else 0

    def _starting_up(self, now: float) -> bool:
        if self.waiting_since is None:
            return False
        head = self.queue[0][0] if self.queue else None
        enough = ((head is not None and head.complete)
                  or now - self.waiting_since >= self.startup_wait)
        if enough:
            self.waiting_since = None
        return not enough

    def next_wakeup(self, now: float) -> float | None:
        """When the loop should call pump() again."""
        if not self.queue:
            if self.padded:
                return None
            return self.clock_start + (self.written - self._partial_block()) / BYTES_PER_SECOND
        if self.waiting_since is not None:
            return self.waiting_since + self.startup_wait
        if self.plumbing.player_lead_ms is None:
            return now + 0.05  # a full pipe: try again shortly
        ahead = (self.written - self.played(now)) / BYTES_PER_SECOND
        return now + max(ahead - self.plumbing.player_lead_ms / 2000, 0.005)

    def stalled(self, now: float) -> Sox | None:
        """Its sox, when all it was given should have played, yet its pipe has stayed full."""
        stuck = self.blocked_since is not None and self.played(now) >= self.written \
            and now - self.blocked_since > SOX_WATCHDOG
        return self.sox if stuck else None

    def stop(self) -> None:
        """Silence now: SIGKILL (SIGTERM lets sox play ~220 ms more), drop the queue, respawn."""
        if self.echo is not None:
            self.echo.silenced(time.monotonic())
        self.sox = self.sox.restart()
        self.queue.clear()
        self.queued_bytes = self.written = 0
        self.items.clear()
        self.waiting_since = self.blocked_since = None
        self.padded = True


class SoxPair:
    """The recorder and the player, kept going. A device that goes away may leave sox waiting
    without a word, or sox exits (with 0, when the audio server goes away: its stderr says why).
    Each is restarted once; the second time, the script ends with sox's reason."""

    def __init__(self, plumbing: Plumbing, recorder: Sox, player: Player,
                 display: Display) -> None:
        self.plumbing, self.recorder, self.player, self.display = plumbing, recorder, player, display
        self.microphone = Microphone(plumbing.frame_bytes)
        # For the watchdog (a device that vanished is silent); a microphone may take seconds to wake.
        self.heard_at = time.monotonic() + MICROPHONE_WAKE
        self.restarted: set[str] = set()  # sox roles restarted once already
        self.on_frames: Callable[[list[tuple[bytes, float]], float], None] = lambda frames, now: None

    def watch(self, selector: selectors.BaseSelector,
              on_frames: Callable[[list[tuple[bytes, float]], float], None]) -> None:
        """`on_frames` gets the recorder's audio as 20 ms frames, each with when it was captured
        (sox delivers 4096-byte pieces on Linux)."""
        self.on_frames = on_frames
        self.recorder.watch(selector, self.died, self._audio)
        self.player.watch(selector, self.died)

    def _audio(self, audio: bytes) -> None:
        now = self.heard_at = time.monotonic()
        self.on_frames(self.microphone.frames(audio, now), now)

    def drop_partial_frame(self) -> None:
        self.microphone.drop()

    def tick(self, now: float) -> None:
        """No microphone bytes, or a player that takes none, for a while: a death."""
        if now - self.heard_at > SOX_WATCHDOG:
            self.heard_at = now
            self.died(self.recorder, f"the sox recorder gave no audio for {SOX_WATCHDOG:g} s (did "
                                     "the microphone go away?)")
        stalled = self.player.stalled(now)
        if stalled is not None:
            self.died(stalled, f"the sox player took no audio for {SOX_WATCHDOG:g} s (did the "
                               "speaker go away?)")

    def next_timer(self) -> float:
        return self.heard_at + SOX_WATCHDOG + 0.01

    def died(self, sox: Sox, reason: str = "") -> None:
        """Restart it once; if it fails again, give up with its reason."""
        reason = reason or sox.failure()
        device = self.plumbing.input_device if sox is self.recorder \
            else self.plumbing.output_device
        if device and any(sign in (sox.failed or "") for sign in UNKNOWN_DEVICE):
            raise Fatal(f"{reason}: no {'microphone' if sox is self.recorder else 'speaker'} is "
                        f"named {device!r}; see --list-devices", Exit.USAGE)
        if sox.role in self.restarted:
            raise Fatal(reason, Exit.AUDIO)
        self.restarted.add(sox.role)
        self.display.warn(f"{reason}; restarting it")
        if sox is self.recorder:
            self.recorder = sox.restart()
            self.microphone = Microphone(self.plumbing.frame_bytes)  # a new sample clock
            self.heard_at = time.monotonic() + MICROPHONE_WAKE
        else:
            self.player.stop()

    def close(self) -> None:
        """The recorder stopped, the player at once (what it holds is not wanted)."""
        self.recorder.kill(signal.SIGTERM)
        self.player.close()


# --- The reply: its sound, its words, and how much of it was heard -------------------------------

class Reply:
    """The assistant's replies as the person gets them: the sound into the player, the words onto
    the screen, and when the person cuts one short, how much was heard (conversation.item.truncate,
    the struck-through words); the rest of such an item, still arriving, is dropped."""

    def __init__(self, config: Config, player: Player, display: Display, history: History,
                 send: Callable[[dict[str, Any]], None]) -> None:
        self.player, self.display, self.history, self.send = player, display, history, send
        self.log, self.truncates = config.log, config.provider.truncates
        self.barge_in = config.plumbing.barge_in
        self.words = Words()
        self.interrupted: set[str] = set()  # items whose late audio and words we drop

    def audio(self, item_id: str, delta: Any) -> None:
        if item_id in self.interrupted:
            return
        try:
            audio = base64.b64decode(delta, validate=True)
        except (ValueError, TypeError):  # binascii.Error is a ValueError
            self.display.warn("skipping audio that is not valid base64", once="base64")
            return
        self.player.add(item_id, audio, time.monotonic())  # the loop pumps it next

    def audio_done(self, item_id: str) -> None:
        if item_id not in self.interrupted:
            self.player.finish(item_id)

    def transcript_delta(self, item_id: str, delta: str) -> None:
        if item_id not in self.interrupted:
            self.words.add(item_id, delta)
            self.display.assistant_delta(item_id, delta)

    def transcript_done(self, item_id: str, transcript: str) -> None:
        if item_id not in self.interrupted:
            self.words.set(item_id, transcript)
            self.history.remember("assistant", item_id, self.words.get(item_id))
            self.display.assistant_done(item_id, self.words.get(item_id))

    def done(self, response: dict[str, Any], usage: dict[str, Any], cost: float | None) -> None:
        """response.done: into the log, with its words, whether all was heard, and its cost."""
        if response.get("status") == "failed":
            error = (response.get("status_details") or {}).get("error") or {}
            self.display.warn(f"the response failed: {error.get('code')} {error.get('message', '')}")
        ids = [item.get("id", "") for item in response.get("output") or []
               if item.get("type") == "message"]
        self.log.write(
            speaker="assistant", item_ids=ids, status=response.get("status"),
            text=" ".join(self.words.get(item_id) for item_id in ids).strip(),
            heard="truncated" if set(ids) & self.interrupted else "full", usage=usage,
            cost_usd=cost)
        self.words.keep(self.player.item_ids())

    def stop(self, now: float) -> None:
        """The person interrupted: silence the player, and say how much of each item was heard."""
        if self.barge_in and self.player.busy(now):
            for item in self.player.playing():
                self._truncate(item, now)
            self.player.stop()

    def _truncate(self, item: HeardItem, now: float) -> None:
        heard_ms = self.player.heard_ms(item, now)
        received_ms = item.received * 1000 // BYTES_PER_SECOND
        if item.complete and heard_ms >= received_ms:
            return  # heard to the end: nothing to take back
        if self.truncates:  # else the model remembers the whole reply
            self.send({"type": "conversation.item.truncate", "item_id": item.item_id,
                       "content_index": 0, "audio_end_ms": min(heard_ms, received_ms)})
        self.interrupted.add(item.item_id)
        words = self.words.get(item.item_id)
        heard = words[:round(len(words) * heard_ms / max(received_ms, 1))]
        self.history.remember("assistant", item.item_id).text = heard
        self.log.write(event="truncated", item_id=item.item_id, heard_ms=heard_ms,
                       heard_text=heard)
        self.display.interrupted(words, heard_ms / max(received_ms, 1))

    def connection_lost(self) -> None:
        """What the person heard stays in what the next session is told."""
        self.history.cut_off(self.words)


# --- Talking over the assistant: --duplex full, half and auto (the echo guard) -------------------

# Laptop speakers reach the laptop's microphone: the model would hear its own voice and answer it.
# Each microphone frame passes a gate on its way to the server: full (headphones) lets all through,
# half mutes while the assistant is audible, auto (the default) asks the echo guard. Without an
# echo canceller, the guard uses what only this script knows: what was played, and when (the
# Player's ledger). It learns how the room returns that sound to the microphone, holds back what
# is only the echo, and lets through the person speaking over it.

class FullDuplex:
    """--duplex full (headphones): every microphone frame goes to the server. The other two ways
    are the classes after it, each overriding `screen` and `status`."""

    def __init__(self, player: Player) -> None:
        self.player = player

    def screen(self, frame: bytes, captured: float, now: float) -> list[bytes]:
        """What the server gets of this frame, captured at `captured` (the sample clock)."""
        return [frame]

    def status(self, now: float) -> str | None:
        return "assistant speaking" if self.player.busy(now) else None


class HalfDuplex(FullDuplex):
    """--duplex half: silence in place of every frame while the assistant is audible, and for the
    room's echo after it: the model must not hear its own voice, and cannot be talked over."""

    TAIL = 0.3  # s of room echo after the speaker stops

    def screen(self, frame: bytes, captured: float, now: float) -> list[bytes]:
        if self.player.busy(now) or now < self.player.audible_until() + self.TAIL:
            return [bytes(len(frame))]
        return [frame]

    def status(self, now: float) -> str | None:
        speaking = super().status(now)
        return speaking and speaking + " (microphone muted)"


class Guarded(FullDuplex):
    """--duplex auto: the echo guard (below) screens each frame. Its own voice is held back (as
    silence); when the person speaks over it, `barge_in` stops it, and the server gets the frames
    held since just before they started."""

    def __init__(self, player: Player, echo: EchoGuard, log: TranscriptLog,
                 barge_in: Callable[[], None]) -> None:
        super().__init__(player)
        self.echo, self.log, self.barge_in = echo, log, barge_in

    def screen(self, frame: bytes, captured: float, now: float) -> list[bytes]:
        verdict = self.echo.hear(frame, captured)
        if verdict == EchoGuard.PERSON:
            self.log.write(event="barge-in", by="voice", **self.echo.logged_path())
            self.barge_in()
            return self.echo.preroll()
        return [bytes(len(frame)) if verdict == EchoGuard.HOLD else frame]

    def status(self, now: float) -> str | None:
        if self.echo.interrupted_since(now - 2):
            return "you interrupted"
        speaking = super().status(now)
        return speaking and f"{speaking} · {self.echo.status()}"


def microphone_gate(config: Config, player: Player, echo: EchoGuard | None,
                    barge_in: Callable[[], None]) -> FullDuplex:
    """The microphone's way to the server, by --duplex (see duplex_for)."""
    if echo is not None:
        return Guarded(player, echo, config.log, barge_in)
    return HalfDuplex(player) if config.duplex == "half" else FullDuplex(player)


ECHO_BIN = 0.010  # s: both envelopes are 10 ms bins
ECHO_MAX_DELAY = 50  # bins: the longest speaker-to-microphone delay it looks for (500 ms)
ECHO_WINDOW = 400  # bins (4 s) it learns from, relearning every ECHO_RELEARN bins
ECHO_RELEARN = 100
ECHO_FIRST_RELEARN = 20  # ...and this often until it has learned the room from this run
ECHO_LEARN_FROM = 50  # bins of the assistant's sound it needs before it trusts what it learned
ECHO_TAIL = 1.0  # s after the assistant's sound in which the microphone may still hear it
ECHO_RECENT = 100  # bins (1 s) kept: whether the echo came back (headphones), or got quieter
ECHO_DECAYS = (100, 200, 300, 450, 650, 900)  # ms: the room tails (RT60) it tries
ECHO_SLOWEST = 10 ** (-6 * ECHO_BIN * 1000 / 900)  # a bin's fall in the longest-ringing room
ECHO_MARGIN = 10 ** 0.45  # power: the person is 4.5 dB above the (calibrated) echo...
ECHO_FRAMES = 3  # ...over this many 20 ms frames in a row, each above it (or two, each 9 dB above)
ECHO_ABOVE_NOISE = 10.0  # ...and 10 dB above the room's noise
ECHO_SOUNDING = 1e-5  # power (-50 dBFS) the assistant plays above while it speaks, not pauses
ECHO_DIGITAL_SILENCE = 1e-8  # power (-80 dBFS): quieter than any microphone's own hiss
# A remembered room no longer holds when this run's echo is louder than it says, half the time, by
# 4 dB: where it held, the first verdict ranged 0.6 to 1.7 (bench/echo_replay.py's matrix), and
# 3 dB dropped a right one now and then, leaving the first reply deaf to the person.
ECHO_LOUDER = 10 ** 0.4
# ...and it is lowered at once when 8 dB quieter, half the time: speakers turned down 10 dB came
# out 9.3 to 11.4 dB quieter, headphones 17 dB, and no half second of a reply with nothing changed
# more than 7 dB (the same recordings).
ECHO_QUIETER = 10 ** -0.8
ECHO_DOUBT = 10, 12  # with headphones: loud 20 ms frames held before asking if it is the echo, at most
ECHO_CALIBRATION = 0.99  # the share of echo-only frames the prediction must cover
ECHO_PREROLL = 0.36  # s of microphone audio sent at a barge-in: the words before it was sure


def frame_power(pcm: bytes | bytearray | memoryview) -> float:
    """Mean square of 16-bit PCM, 0..1 full scale. math.hypot takes all the samples in one call,
    so 20 ms cost ~8 µs: no Python loop per sample."""
    samples = memoryview(pcm[:len(pcm) // 2 * 2]).cast("h")
    return (math.hypot(*samples) / 32768) ** 2 / len(samples) if len(samples) else 0.0


class SampleClock:
    """When a recorder's sample was captured, from how many samples it has delivered: sox hands
    them on in 4096-byte pieces, each arriving some ms late, but never early. The earliest
    arrival (less its audio's length) is the clock's start; it may creep later by 100 ppm, as a
    device clock that runs slow does."""

    DRIFT = 1e-4

    def __init__(self) -> None:
        self.received = 0  # bytes
        self.start: float | None = None
        self.updated = 0.0

    def arrived(self, count: int, now: float) -> None:
        self.received += count
        earliest = now - self.received / BYTES_PER_SECOND
        if self.start is None:
            self.start = earliest
        else:
            self.start = min(self.start + (now - self.updated) * self.DRIFT, earliest)
        self.updated = now

    def time_of(self, offset: int) -> float:
        assert self.start is not None
        return self.start + offset / BYTES_PER_SECOND


class Microphone:
    """The recorder's bytes cut into appends (20 ms frames), each dated by the sample clock."""

    def __init__(self, frame_bytes: int | None) -> None:
        self.frame_bytes = frame_bytes
        self.clock = SampleClock()
        self.held = bytearray()
        self.offset = 0  # bytes of the recorder's stream cut so far

    def frames(self, audio: bytes, now: float) -> list[tuple[bytes, float]]:
        self.clock.arrived(len(audio), now)
        self.held += audio
        size = self.frame_bytes or len(self.held)
        cut = []
        while self.held and len(self.held) >= size:
            cut.append((bytes(self.held[:size]), self.clock.time_of(self.offset)))
            del self.held[:size]
            self.offset += size
        return cut

    def drop(self) -> None:
        """Forget a partial frame (nobody is listening now), keeping the clock."""
        self.offset += len(self.held)
        self.held.clear()


@dataclasses.dataclass(frozen=True)
class EchoPath:
    """The learned speaker-to-microphone path, on 10 ms power envelopes: what was played comes
    back `delay` bins later, `direct` times as strong, followed by the room's tail (`tail` times
    the sound before, fading by `decay` a bin). `margin` lifts the prediction so that 99% of the
    echo stays under it."""
    delay: int
    direct: float  # power ratios
    tail: float
    decay: float
    margin: float
    match: float  # how well the envelopes correlate, 0..1
    frames: int = 0  # how many 20 ms frames the margin was calibrated on
    level: float = 0.0  # their median of heard / predicted (0: not known, an older memory)

    @property
    def gain_db(self) -> float:
        """The echo's level against what was played: all its energy, direct and tail."""
        return 10 * math.log10(max(self.direct + self.tail / (1 - self.decay), 1e-12))


class EchoGuard:
    """--duplex auto. Fed what the player plays (`played`, `silenced`) and every microphone frame
    (`hear`), it answers for each frame: PASS it on, HOLD it back (it is the assistant's own
    voice), or PERSON (the person is speaking over the assistant: stop it, send `preroll()`).

    Before it has learned the room it holds everything while the assistant is audible (as safe as
    --duplex half); once it knows there is no echo (headphones) it passes everything (as --duplex
    full), but for a moment's doubt, if it knows the speakers' path, whether a sound is their
    echo come back. When in doubt it holds: a self-triggered turn costs money, a late barge-in
    100 ms."""

    PASS, HOLD, PERSON = "pass", "hold", "person"

    def __init__(self, remembered: EchoPath | None = None) -> None:
        self.reference: dict[int, float] = {}  # bin → power the speaker plays then (ledger time)
        self.pending = bytearray()  # played audio not yet a whole bin, starting at pending_at
        self.pending_at = 0.0
        # (bin, microphone power, maybe more than the echo, may hold the echo at all)
        self.heard: collections.deque[tuple[int, float, bool, bool]] = collections.deque(
            maxlen=ECHO_WINDOW)
        self.quiet_means: collections.deque[float] = collections.deque(maxlen=100)
        self.noise = 1e-6  # the room's own power: the lowest 100 ms mean of the last 10 s
        self.path = remembered  # a room remembered from an earlier run, until this one's is learned
        self.learned = False  # the path was learned in this run
        self.fits: list[float] = []  # a remembered path: this run's echo against it, per frame
        self.no_echo = False
        self.direct = self.room = 0.0  # the delayed reference now, and its tail in the room
        self.ring = 0.0  # the echo the microphone heard, fading as slowly as any room rings
        # (heard, expected, the assistant's sound and not the person's) of the last bins
        self.recent: collections.deque[tuple[float, float, bool]] = collections.deque(
            maxlen=ECHO_RECENT)
        self.above: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=ECHO_FRAMES)  # (heard, expected) of the frames in a row above the prediction
        self.bins_heard = 0
        self.predicted = 0  # of the recent bins, how many the path in use predicted
        self.learn_from = -math.inf  # the first bin to learn from: the echo's level changed there
        self.kept_margin = 0.0  # the margin from before that change, for fits too young for theirs
        self.unscaled: EchoPath | None = None  # the path from before it, until one is learnt after
        self.doubt = self.doubt_quiet = 0  # with headphones: loud frames held, quiet ones since
        # Before the first path: what the microphone heard against the loudest just played, while
        # the assistant spoke, and how many frames in a row were far beyond it
        self.bound_ratios: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=ECHO_WINDOW)
        self.beyond_run = 0
        self.person = False  # speaking over the assistant, until the next reply plays
        self.interrupted_at = -math.inf
        self.audible_until = -math.inf  # the end of the last played audio (ledger time)
        self.sound_from = self.sound_until = -math.inf  # the latest stretch of sound, not silence
        # The frames of the last ECHO_PREROLL s and this one (auto always has 20 ms frames).
        self.preroll_frames: collections.deque[bytes] = collections.deque(
            maxlen=int(ECHO_PREROLL * BYTES_PER_SECOND) // FRAME_BYTES + 1)

    # What the player plays
    def played(self, audio: bytes | memoryview, at: float) -> None:
        """`audio` was written to the player and becomes audible at `at` (the ledger's clock)."""
        if abs(at - (self.pending_at + len(self.pending) / BYTES_PER_SECOND)) > 0.002:
            self._bin_pending()  # not contiguous with the last write: a new stretch of sound
            self.pending_at = at
        if frame_power(audio) > 0:
            self.person = False  # a new reply: guard it
            if at > self.sound_until + ECHO_TAIL:
                self.sound_from = at
            self.sound_until = max(self.sound_until, at + len(audio) / BYTES_PER_SECOND)
        self.pending += audio
        self.audible_until = max(self.audible_until, at + len(audio) / BYTES_PER_SECOND)
        while len(self.pending) >= ECHO_BIN * BYTES_PER_SECOND:
            self._bin_pending(int(ECHO_BIN * BYTES_PER_SECOND))

    def _bin_pending(self, size: int | None = None) -> None:
        size = len(self.pending) if size is None else size
        if size:
            key = round(self.pending_at / ECHO_BIN)
            self.reference[key] = max(self.reference.get(key, 0.0),
                                      frame_power(self.pending[:size]))
            del self.pending[:size]
            self.pending_at += size / BYTES_PER_SECOND

    def silenced(self, now: float) -> None:
        """The player was stopped: what it was going to play never will be."""
        self.pending.clear()
        cut = round(now / ECHO_BIN)
        self.reference = {key: power for key, power in self.reference.items() if key < cut}
        self.audible_until = min(self.audible_until, now)

    # What the microphone hears
    def hear(self, frame: bytes, captured: float) -> str:
        """PASS, HOLD or PERSON for this frame, captured at `captured` (the sample clock)."""
        self.preroll_frames.append(frame)
        size = int(ECHO_BIN * BYTES_PER_SECOND)
        powers = [frame_power(frame[start:start + size]) for start in range(0, len(frame), size)]
        first = round(captured / ECHO_BIN)
        heard = sum(powers)
        expectations, sounding = [], []  # ...and whether the assistant's sound reaches it now
        for n in range(len(powers)):
            expectations.append(self._expected(first + n))
            sounding.append(self.direct > ECHO_SOUNDING)
        expected = sum(expectations)
        # Louder than the echo may be the person: the echo is not learned from it. Nor from what
        # the microphone hears before the assistant's sound, or long after: the person's question.
        may_echo = self.sound_from <= captured + 0.02 and captured < self.sound_until + ECHO_TAIL
        beyond = self.path is None and not self.no_echo and self._beyond_bound(powers, first,
                                                                               may_echo)
        self.beyond_run = self.beyond_run + 1 if beyond else 0
        suspect = self.person or beyond or (
            self.path is not None and heard > ECHO_MARGIN * expected)
        for n, power in enumerate(powers):
            self.heard.append((first + n, power, suspect, may_echo))
            self.recent.append((power, expectations[n], sounding[n] and not suspect))
            self.predicted += 1
            self.bins_heard += 1
            # Every 100 ms in the first second: a remembered room is checked against the room's
            # noise before the first reply (against the -60 dBFS assumed at the start, a fan's
            # -45 dBFS reads as a louder echo, and the memory is dropped).
            if self.bins_heard % (ECHO_RELEARN if self.bins_heard > ECHO_RELEARN else 10) == 0:
                self._track_noise()
            if self.learned and self.bins_heard % ECHO_RELEARN == ECHO_RELEARN // 2:
                self._follow_volume(first + n)
            if self.bins_heard % (ECHO_RELEARN if self.learned else ECHO_FIRST_RELEARN) == 0:
                self._learn()
        # However the path was learned, the echo heard a moment ago (as much of it as the path
        # explains) still rings at least as in the longest-ringing room: a pause is not the person.
        ringing = sum(self.ring * ECHO_SLOWEST ** (n + 1) for n in range(len(powers)))
        verdict = self._verdict(heard, expected, ringing, len(powers) * self.noise, captured)
        if verdict == self.PASS:
            self.preroll_frames.clear()  # sent: a barge-in later must not send it twice
        for power, most in zip(powers, expectations, strict=True):
            self.ring = max(self.ring * ECHO_SLOWEST, min(power, most))
        return verdict

    def _beyond_bound(self, powers: list[float], first: int, may_echo: bool) -> bool:
        """Before the first path: whether this frame is far louder (9 dB) than the echo can be,
        by what the microphone heard back of the loudest sound just played (its 95th percentile)
        over at least half a second of the assistant's sound. An echo too near the room's noise
        to learn a path from (a fan) still bounds it: louder than that is the person. What was
        heard in the last 100 ms does not count yet: a voice grows for a while before it is
        clearly louder than the echo, and its first sounds would raise the bound."""
        if not may_echo:
            return False
        keys = range(first, first + len(powers))
        played = [max(self.reference.get(past, 0.0)
                      for past in range(key - ECHO_MAX_DELAY - 2, key + 2)) for key in keys]
        if min(played) <= ECHO_SOUNDING:
            return False
        settled = sorted(ratio for key, ratio in self.bound_ratios if key < first - 10)
        heard, beyond = sum(powers), False
        if len(settled) >= ECHO_LEARN_FROM:
            most = len(powers) * self.noise + settled[len(settled) * 95 // 100] * sum(played)
            beyond = heard > ECHO_MARGIN ** 2 * most and \
                heard > ECHO_ABOVE_NOISE * len(powers) * self.noise
        if beyond:  # ...and the 100 ms before were its first sounds
            while self.bound_ratios and self.bound_ratios[-1][0] >= first - 10:
                self.bound_ratios.pop()
        else:
            self.bound_ratios.extend((key, max(power - self.noise, 0.0) / loudest)
                                     for key, power, loudest in zip(keys, powers, played,
                                                                    strict=True))
        return beyond

    def _expected(self, key: int) -> float:
        """The echo this bin should carry, at its loudest (slack of 10 ms later and 20 ms sooner:
        a new player may start a little sooner or later)."""
        if self.path is None:
            return 0.0
        self.room, self.direct, expected = self._step(self.path, self.room, self.direct, key)
        return expected

    def _step(self, path: EchoPath, room: float, direct: float, key: int
              ) -> tuple[float, float, float]:
        """The path's prediction one bin on: the room's tail (fed by the bin before), the
        reference `delay` bins back, and the echo they make with the margin and the noise."""
        room = room * path.decay + direct
        direct = max(self.reference.get(key - path.delay + shift, 0.0) for shift in (-1, 0, 1, 2))
        return room, direct, self.noise + path.margin * (path.direct * direct + path.tail * room)

    def _verdict(self, heard: float, expected: float, ringing: float, noise: float,
                 captured: float) -> str:
        audible = captured < self.audible_until + 0.5  # 0.5 s: the longest delay and tail
        if self.person or not audible or (self.no_echo and self.path is None):
            self.above.clear()
            self.doubt = self.doubt_quiet = 0
            return self.PASS
        if self.no_echo:
            return self._headphones(heard, expected, ringing, noise, captured)
        learning = self.path is None or (  # the microphone is the assistant's until it knows
            not self.learned and not self._fits_remembered(heard, expected, noise))
        if learning:
            self.above.clear()  # frames above a path since dropped are not above the next one
            return self._person(captured) if self.beyond_run >= ECHO_FRAMES else self.HOLD
        if self._louder(heard, expected, ringing, noise):
            return self._person(captured)
        # After the last word, a room that rings may still be heard after the path's tail has
        # faded (measured while the assistant spoke, its noise is the tail's own floor): what
        # still rings is held too, or the server hears the end of the reply as a turn.
        echo_left = max(expected, ringing) > 2 * noise or captured < self.audible_until
        return self.HOLD if echo_left else self.PASS

    def _louder(self, heard: float, expected: float, ringing: float, noise: float) -> bool:
        """Whether this frame, with the ones before it, is the person over the echo. A voice is
        louder than the echo for a while; the prediction's misses are short. So it takes three
        frames above the prediction, together a margin above it (a first word often starts
        under a loud syllable of the assistant's), or two far above it."""
        if heard > expected and heard > ECHO_ABOVE_NOISE * noise and heard > ringing:
            self.above.append((heard, expected))
        else:
            self.above.clear()
        louder = len(self.above) == ECHO_FRAMES and \
            sum(heard for heard, _ in self.above) > ECHO_MARGIN * sum(most for _, most in self.above)
        far_louder = len(self.above) >= 2 and all(
            heard > ECHO_MARGIN ** 2 * most for heard, most in list(self.above)[-2:])
        return louder or far_louder

    def _person(self, captured: float) -> str:
        self.beyond_run = 0
        self.above.clear()
        self.doubt = self.doubt_quiet = 0  # a reply that starts before the next frame starts afresh
        self.person = True
        self.interrupted_at = captured
        return self.PERSON

    def _headphones(self, heard: float, expected: float, ringing: float, noise: float,
                    captured: float) -> str:
        """With no echo (headphones) but a path known from before, while the assistant is
        audible: a sound is held until it tells whether the headphones came out (it follows the
        path) or it is the person (louder than the path's echo, or not following it). Sent at
        once, the echo's first 150 ms would start a turn. Silence passes; a click or a breath,
        followed by 100 ms of silence, is dropped."""
        if heard <= ECHO_ABOVE_NOISE * noise:
            self.above.clear()
            self.doubt_quiet = self.doubt_quiet + 1 if self.doubt else 0
            if self.doubt_quiet >= 5:
                self.doubt = self.doubt_quiet = 0
            return self.HOLD if self.doubt else self.PASS
        self.doubt, self.doubt_quiet = self.doubt + 1, 0
        if self._louder(heard, expected, ringing, noise):
            return self._person(captured)
        look, most = ECHO_DOUBT
        if self.doubt >= look and self._echo_is_back(2 * self.doubt, self.doubt >= most):
            self.no_echo, self.learned, self.fits = False, False, []  # a path to prove again
            self.heard.clear()  # learnt afresh from the echo as it is now, not the silence before
            self.doubt = self.doubt_quiet = 0  # what it held was the echo: it is never sent
            return self.HOLD
        return self._person(captured) if self.doubt >= most else self.HOLD

    def _echo_is_back(self, bins: int, last_chance: bool) -> bool:
        """Whether the sound of the last `bins` follows what the path known before (learned
        before the headphones, or remembered) says the echo would be, as the person's voice
        would not: correlated by 0.85 (0.75 at the `last_chance`). A voice that starts as the
        assistant's grows can follow it for 100 ms, hence 200 ms to tell. The echo may come up
        to 30 ms later than the path says: another run's devices."""
        recent = list(self.recent)[-bins:]
        heard = [math.sqrt(power) for power, _, _ in recent]
        expected = [math.sqrt(max(most - self.noise, 0.0)) for _, most, _ in recent]
        best = max(correlation(heard[lag:], expected[:len(expected) - lag]) for lag in range(4))
        if best > (0.75 if last_chance else 0.85):
            return True
        if not last_chance:
            return False
        # A steady stretch of the assistant's voice has too little envelope to correlate: the
        # echo then shows in its level, every bin under what the path says and near it.
        ratios = sorted(power / most if most > 0 else math.inf for power, most, _ in recent)
        return ratios[-1] <= 1.0 and ratios[len(ratios) // 2] > 0.1

    def _remembered_fit(self) -> float | None:
        """This run's echo against the remembered path (1: as loud as it says), the median of
        its loud frames; None until 8 of them tell."""
        return sorted(self.fits)[len(self.fits) // 2] if len(self.fits) >= 8 else None

    def _fits_remembered(self, heard: float, expected: float, noise: float) -> bool:
        """Whether a room remembered from an earlier run still holds, by the echo's first loud
        frames in this one. Louder than it says (the speakers turned up, another room): it is
        dropped at once, and the guard holds while it learns. Until 8 frames tell, it holds too:
        a first word within 200 ms of the first reply waits for the learning."""
        assert self.path is not None
        if expected > 2 * ECHO_ABOVE_NOISE * noise:  # the model says: clearly some echo here
            self.fits.append((heard - noise) * self.path.margin / (expected - noise))
            del self.fits[:-50]
        fit = self._remembered_fit()
        if fit is not None and fit > ECHO_LOUDER:
            self.path, self.fits = None, []
            return False
        return fit is not None

    def preroll(self) -> list[bytes]:
        """The frames up to this one: the person's first words, which were held back."""
        frames = list(self.preroll_frames)
        self.preroll_frames.clear()
        return frames

    # Learning the room
    def _follow_volume(self, key: int) -> None:
        """When the echo of the last half second is far quieter than the path says (the speakers
        turned down, headphones plugged in), the path is scaled down at once, and learnt again
        only from what comes after. Relearnt from a window that straddles the change, its margin
        would cover the louder echo before it: deaf to the person for 4 s. Once no echo is found
        (headphones), the path from before is put back (see _learn)."""
        path = self.path
        if path is None or self.no_echo or not path.level or path.frames < 50:
            return  # (with headphones, the path is the speakers' for when they come out)
        ratios = []
        predicted = list(self.recent)[-self.predicted:] if self.predicted else []
        for heard, expected, sounding in predicted:
            echo = (expected - self.noise) / path.margin
            if sounding and echo > 2 * ECHO_ABOVE_NOISE * self.noise:
                ratios.append(heard / (self.noise + echo))
        if len(ratios) < 20:
            return
        change = sorted(ratios)[len(ratios) // 2] / path.level
        if change < ECHO_QUIETER:
            change = max(change, 0.01)
            self.path = dataclasses.replace(path, direct=path.direct * change,
                                            tail=path.tail * change)
            self.learn_from, self.kept_margin = key, path.margin  # none of the echo before it
            self.unscaled = self.unscaled or path
            self.predicted = 0

    def _track_noise(self) -> None:
        """Speech always pauses for 100 ms somewhere: the quietest 100 ms is the room alone."""
        recent = [power for _, power, _, _ in list(self.heard)[-ECHO_RELEARN:]]
        chunks = [recent[n:n + 10] for n in range(0, len(recent), 10)]
        # Digital silence is not the room's noise: a microphone waking up, muted or gated gives
        # zeros, and against a noise of zero every pause of the assistant would be the person.
        self.quiet_means.extend(sum(chunk) / len(chunk) for chunk in chunks
                                if min(chunk) > ECHO_DIGITAL_SILENCE)
        if self.quiet_means:
            self.noise = min(self.quiet_means)

    def _learn(self) -> None:
        """From the last 4 s: the delay that best lines up the envelopes, then the gain and decay
        that best predict what the microphone heard while only the assistant spoke."""
        path = self._fit_window()
        if self.no_echo and self.unscaled is not None:  # headphones: if they come out, the echo
            self.path, self.unscaled = self.unscaled, None  # is the speakers' as it was before
        if path is None:
            return
        fit = self._remembered_fit()
        if not self.learned and self.path is not None and path.frames < 100 and \
                fit is not None and fit <= ECHO_LOUDER:
            return  # a remembered room this run's echo agrees with beats a young fit
        self.no_echo = False
        old = self.path if self.learned else None  # a remembered room gives way at once
        if old is not None and path.margin * path.direct < old.margin * old.direct:
            path = dataclasses.replace(path, margin=(path.margin + old.margin) / 2)  # slowly
        if path.frames >= 100:
            self.kept_margin, self.unscaled = 0.0, None
        elif self.kept_margin and path.margin > self.kept_margin:  # the same room, quieter
            path = dataclasses.replace(path, margin=self.kept_margin)
        self.predicted = 0
        first, self.path, self.learned = not self.learned, path, True
        if self._settle() and first:  # the person spoke before there was a path: without them
            path = self._fit_window() or path
            self.path = path
            self._settle()

    def _fit_window(self) -> EchoPath | None:
        heard = self._echo_only()
        if len(heard) < ECHO_LEARN_FROM + 10:
            return None
        first, last = heard[0][0], heard[-1][0]
        self.reference = {key: power for key, power in self.reference.items()
                          if key > first - ECHO_MAX_DELAY - 100}
        played = [self.reference.get(key, 0.0) for key in range(first - ECHO_MAX_DELAY - 2,
                                                                 last + 3)]
        sounding = sum(1 for power in played if power > 1e-7)
        if sounding < ECHO_LEARN_FROM:
            return None  # too little of the assistant to learn from
        keys = [key - first + ECHO_MAX_DELAY + 2 for key, _ in heard]
        mic = [math.sqrt(power) for _, power in heard]
        envelope = [math.sqrt(power) for power in played]
        best = max(range(ECHO_MAX_DELAY + 1),
                   key=lambda lag: correlation(mic, later(envelope, keys, lag)))
        match = correlation(mic, later(envelope, keys, best))
        # Reverb smears the microphone's envelope later than the direct sound: of the lags up to
        # the best-correlated one, the path that needs the smallest margin is the one to trust.
        powers = [power for _, power in heard]
        echo = [max(power - self.noise, 0.0) for power in powers]
        fits = []
        for lag in range(max(best - 3, 0), best + 1):
            direct = list(map(max, *(later(played, keys, lag - shift) for shift in (-1, 0, 1, 2))))
            fits += [dataclasses.replace(self._fit(powers, echo, direct, rt60_ms), delay=lag)
                     for rt60_ms in ECHO_DECAYS]
        path = dataclasses.replace(min(fits, key=lambda fit: fit.margin), match=match)
        if match < 0.5:
            if path.margin == math.inf or (path.direct + path.tail) * max(played) < self.noise:
                self.no_echo = True  # the speaker does not reach the microphone
            return None
        return None if path.margin == math.inf else path  # inf: nothing above the noise yet

    def _settle(self) -> int:
        """The window heard again under the new path: the room's tail as it stands now (begun
        from zero, it would take a whole RT60 to grow, and meanwhile the echo would read as the
        person), the ring of the echo heard, and the bins louder than the path can explain,
        which are kept out of the learning from now on (before the first path, none were).
        Returns how many such bins it found that were not kept out yet."""
        path = self.path
        assert path is not None and self.heard
        room = direct = ring = 0.0
        for key in range(self.heard[0][0] - 150, self.heard[0][0]):
            room, direct, _ = self._step(path, room, direct, key)
        found, bins = 0, list(self.heard)
        for index, (key, power, suspect, may_echo) in enumerate(bins):
            room, direct, expected = self._step(path, room, direct, key)
            louder = power > ECHO_MARGIN * max(expected, ring * ECHO_SLOWEST) and \
                power > ECHO_ABOVE_NOISE * self.noise
            if louder and not suspect:
                bins[index], found = (key, power, True, may_echo), found + 1
            ring = max(ring * ECHO_SLOWEST, min(power, expected))
        self.heard = collections.deque(bins, maxlen=ECHO_WINDOW)
        self.room, self.direct, self.ring = room, direct, ring
        return found

    def _echo_only(self) -> list[tuple[int, float]]:
        """The window's bins that are only the echo: none within 100 ms of a suspect one (a
        voice grows for a while before it is clearly louder than the echo)."""
        held_out = [False] * len(self.heard)
        for index, (_, _, suspect, _) in enumerate(self.heard):
            if suspect:
                start, end = max(index - 10, 0), min(index + 11, len(held_out))
                held_out[start:end] = [True] * (end - start)
        return [(key, power) for (key, power, _, may_echo), out
                in zip(self.heard, held_out, strict=True)
                if may_echo and not out and key >= self.learn_from]

    def _fit(self, heard: list[float], echo: list[float], direct: list[float], rt60_ms: float
             ) -> EchoPath:
        """The path for one room tail: direct and tail gains by least squares on the power
        envelopes (`echo` is `heard` less the room's noise), then the margin that 99% of the
        20 ms frames stay under (of those loud enough to be taken for the person: the rest are
        too close to the room's noise)."""
        decay = 10 ** (-6 * ECHO_BIN * 1000 / rt60_ms)
        room, tails = 0.0, []
        for power in direct:
            tails.append(room)
            room = room * decay + power
        dd, dt, tt = dot(direct, direct), dot(direct, tails), dot(tails, tails)
        de, te = dot(direct, echo), dot(tails, echo)
        determinant = dd * tt - dt * dt
        gain_direct = (de * tt - te * dt) / determinant if determinant > 0 else 0.0
        gain_tail = (te * dd - de * dt) / determinant if determinant > 0 else 0.0
        if gain_direct < 0 or gain_tail < 0:  # one term alone: the one that explains more
            direct_alone = max(de / dd, 0.0) if dd else 0.0
            tail_alone = max(te / tt, 0.0) if tt else 0.0
            if direct_alone * de >= tail_alone * te:
                gain_direct, gain_tail = direct_alone, 0.0
            else:
                gain_direct, gain_tail = 0.0, tail_alone
        predicted = [self.noise + gain_direct * d + gain_tail * t
                     for d, t in zip(direct, tails, strict=True)]
        frames = [(heard[n] + heard[n + 1]) / (predicted[n] + predicted[n + 1])
                  for n in range(0, len(heard) - 1, 2)
                  if heard[n] + heard[n + 1] > 2 * ECHO_ABOVE_NOISE * self.noise]
        if len(frames) < 25 or gain_direct + gain_tail <= 0:
            return EchoPath(0, 0.0, 0.0, decay, math.inf, 0.0)
        # Too few frames for a 99th percentile (the first second of a reply): the loudest, and
        # 2 dB on top, until there are more.
        frames.sort()
        margin = max(frames[int(len(frames) * ECHO_CALIBRATION)] if len(frames) >= 100
                     else frames[-1] * 10 ** 0.2, 1.0)
        return EchoPath(0, gain_direct, gain_tail, decay, margin, 0.0, len(frames),
                        frames[len(frames) // 2])

    def interrupted_since(self, since: float) -> bool:
        """The person spoke over the assistant at `since` or later."""
        return self.interrupted_at >= since

    def logged_path(self) -> dict[str, Any]:
        """The echo path in use, as the log has it."""
        path = self.path
        return {"echo_gain_db": round(path.gain_db, 1) if path else None,
                "echo_delay_ms": round(path.delay * ECHO_BIN * 1000) if path else None}

    def status(self) -> str:
        if self.no_echo:
            return "echo guard: no echo"
        if self.path is None:
            return "echo guard: learning"
        return f"echo guard {self.path.gain_db:.0f} dB{'' if self.learned else ' (remembered)'}"


class RoomMemory:
    """The echo path learned in a run, kept for the next one in a small JSON file in the user's
    cache directory, per microphone and speaker: the next run's first reply is guarded, and
    interruptible, from its first words. Forgetting it is deleting the file."""

    def __init__(self, plumbing: Plumbing) -> None:
        cache = os.environ.get("XDG_CACHE_HOME") or str(
            Path.home() / ("Library/Caches" if sys.platform == "darwin" else ".cache"))
        self.file = Path(cache) / "realtime-sox" / "rooms.json"
        self.key = f"{plumbing.input_device or 'default'} → {plumbing.output_device or 'default'}"

    def _rooms(self) -> dict[str, Any]:
        try:
            rooms = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return rooms if isinstance(rooms, dict) else {}

    def recall(self) -> EchoPath | None:
        """The path remembered for these devices, if there is one that makes sense."""
        room: Any = self._rooms().get(self.key)
        try:
            path = EchoPath(int(room["delay"]), float(room["direct"]), float(room["tail"]),
                            float(room["decay"]), float(room["margin"]), float(room["match"]),
                            int(room.get("frames", 0)), float(room.get("level", 0.0)))
        except (TypeError, KeyError, ValueError, OverflowError):
            return None
        sane = 0 <= path.delay <= ECHO_MAX_DELAY and 0 <= path.direct <= 10 and \
            0 <= path.tail <= 10 and 0 < path.decay < 1 and 1 <= path.margin <= 1000 and \
            path.direct + path.tail > 0 and 0 <= path.level <= 1000
        return path if sane else None

    def keep(self, guard: EchoGuard) -> None:
        """What this run learned. Headphones, or a run too short to learn in, leave what was
        remembered as it was: the speakers' path is what the next run needs if they are back."""
        if not guard.learned or guard.path is None:
            return
        rooms = self._rooms()
        rooms[self.key] = {**dataclasses.asdict(guard.path),
                           "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:  # written whole, then renamed: a run that dies meanwhile leaves the old file
            self.file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.file.with_suffix(".partial")
            partial.write_text(json.dumps(rooms, indent=1, ensure_ascii=False), encoding="utf-8")
            partial.replace(self.file)
        except OSError:
            pass  # a read-only cache: the next run learns the room again


def later(values: list[float], keys: list[int], lag: int) -> list[float]:
    """values[key - lag] for each key: a slice when the keys follow one another, as they do
    unless bins were held out."""
    if keys[-1] - keys[0] == len(keys) - 1:
        return values[keys[0] - lag:keys[-1] - lag + 1]
    return [values[key - lag] for key in keys]


def dot(a: list[float], b: list[float]) -> float:
    return float(sum(map(operator.mul, a, b)))


def correlation(a: list[float], b: list[float]) -> float:
    """Pearson's r of two equally long lists (0 when either is flat); sums at C speed."""
    count = len(a)
    mean_a, mean_b = sum(a) / count, sum(b) / count
    cross = dot(a, b) - count * mean_a * mean_b
    spread = (dot(a, a) - count * mean_a ** 2) * (dot(b, b) - count * mean_b ** 2)
    return cross / math.sqrt(spread) if spread > 0 else 0.0


# --- What servers send ---------------------------------------------------------------------------
# The API and the MCP servers are trusted with the conversation, not with the terminal or the loop:
# their JSON nests only so deep, their numbers are checked before use, and their text is shown as
# text (see Display.clean). Each check is one line of warning at most, never a crash.

MAX_JSON_DEPTH = 64  # no event or tool call nests deeper; the parser's own limit is a crash
MAX_COUNT = 10 ** 9  # tokens in one response: more is not a real figure


def parse_json(data: str | bytes | bytearray) -> Any:
    """json.loads that refuses, with ValueError, what nests deeper than MAX_JSON_DEPTH (Python's
    parser raises RecursionError near 1,000 levels; what it returns can crash any code that walks
    it). Counting brackets first is an upper bound that costs nothing for an audio delta."""
    raw = data.encode(errors="surrogatepass") if isinstance(data, str) else data
    brackets = raw.count(b"[") + raw.count(b"{")
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    if brackets > MAX_JSON_DEPTH and nesting(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def nesting(value: Any) -> int:
    """How deep lists and objects nest in a parsed value (without recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level + 1)
            if deepest > MAX_JSON_DEPTH:
                break
            stack.extend((child, level + 1) for child in (
                item.values() if isinstance(item, dict) else item))
    return deepest


def count_of(value: Any) -> int | None:
    """A server's count as a whole number from 0 to MAX_COUNT; None for anything else (a
    fraction, a negative, 10**400, NaN, Infinity, a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if 0 <= value <= MAX_COUNT else None


def checked_usage(usage: Any) -> dict[str, Any] | None:
    """A response's usage with every figure a checked count (absent ones are 0), in the API's
    shape; None when any figure is not a count, so that no cost or total is made of it."""
    if not isinstance(usage, dict):
        return None

    def counts(part: Any, names: tuple[str, ...]) -> dict[str, Any]:
        part = part if isinstance(part, dict) else {}
        return {name: count_of(part.get(name, 0)) for name in names}

    details = usage.get("input_token_details")
    details = details if isinstance(details, dict) else {}
    checked = counts(usage, ("input_tokens", "output_tokens"))
    inputs = counts(details, ("text_tokens", "audio_tokens", "image_tokens", "cached_tokens"))
    if isinstance(details.get("cached_tokens_details"), dict):  # absent: all cached are text
        inputs["cached_tokens_details"] = counts(details["cached_tokens_details"],
                                                 ("text_tokens", "audio_tokens", "image_tokens"))
    checked["input_token_details"] = inputs
    checked["output_token_details"] = counts(usage.get("output_token_details"),
                                             ("text_tokens", "audio_tokens"))
    figures = [*checked.values(), *inputs.values(), *checked["output_token_details"].values(),
               *(inputs.get("cached_tokens_details") or {}).values()]
    return None if None in figures else checked


def finite(value: Any) -> dict[str, Any] | list[Any] | Any:
    """A copy of a parsed value with NaN and infinities as None: what strict JSON can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


# --- The connection ------------------------------------------------------------------------------

# getaddrinfo() can neither be interrupted nor made non-blocking with the standard library, and a
# slow DNS server would hold the loop (and Ctrl-C) for seconds: it runs in a child process.
RESOLVER = """\
import json, socket, sys
try:
    found = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), type=socket.SOCK_STREAM)
except OSError as error:
    sys.exit(str(error.strerror or error))
print(json.dumps([[family, *address[:2]] for family, _, _, _, address in found]))
"""

Address = tuple[int, str, int]  # socket family, host, port


class Connection:
    """A WebSocket that never blocks the loop, from the first DNS query to the last frame.

    Opening it is a state machine of the loop: each time `fileobj()` is ready for `events()`,
    `on_ready()` takes the next step, and one deadline covers them all:

        resolving → connecting (TCP) → proxy (CONNECT, with https_proxy) → tls → upgrading → open

    websocket-client supplies the pieces that do not block: URL and proxy settings, the upgrade
    request and the check of `Sec-WebSocket-Accept`. Its socket I/O (`create_connection`,
    `read_headers`) blocks, so reading the HTTP answers and the frames is ours: a half-received
    answer or frame just waits in `inbox` for the rest. The TLS context is made once, before the
    loop runs: loading the CA certificates takes ~35 ms, too long for a turn of the loop."""

    MAX_MESSAGE = 32 * 1024 * 1024
    MAX_ANSWER = 64 * 1024  # an HTTP answer's head and error body; a portal's page can be long

    def __init__(self, url: str, auth: str, tls: ssl.SSLContext | None,
                 addresses: list[Address], timeout: float, now: float) -> None:
        self.url, self.auth, self.tls, self.timeout = url, auth, tls, timeout
        self.host, self.port, self.resource, secure = websocket._url.parse_url(url)
        proxy_host, proxy_port, self.proxy_auth = (None, 0, None) if is_loopback(self.host) \
            else websocket._url.get_proxy_info(self.host, secure)  # https_proxy, no_proxy
        self.proxy = (proxy_host, int(proxy_port or 80)) if proxy_host else None
        self.phase = "resolving"
        self.started = now
        self.deadline = now + timeout
        self.resolver: subprocess.Popen[bytes] | None = None
        self.addresses = list(addresses)  # still to try
        self.resolved = list(addresses)  # for the next connection: DNS once, not per reconnect
        self.tcp_error = "no address"
        self.sock: socket.socket | None = None
        self.tls_wants = selectors.EVENT_READ
        self.key = ""
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.fragments: list[bytes] = []  # a message that came in several frames
        self.unread = False  # _recv stopped at its limit with bytes still in the socket
        self.fragmented_opcode = 0  # what kind of message they are, while they come
        self.clock_offset = 0.0  # s the server's clock is ahead of ours, by its Date header
        self.failure: Fatal | None = None  # why the opening failed, if it did
        self.close_code: int | None = None
        self.close_reason = ""
        self.dropped: str | None = None  # why the connection is gone, once it is
        self.last_heard = now
        self.ping_sent: float | None = None
        self._step(self._connect_next if self.addresses else self._resolve)

    # What the loop watches, and the next step when it is ready
    def fileobj(self) -> Any:
        if self.dropped:
            return None
        if self.phase == "resolving":
            return self.resolver.stdout if self.resolver else None
        return self.sock

    def events(self) -> int:
        if self.phase == "connecting":
            return selectors.EVENT_WRITE
        if self.phase == "tls":
            return self.tls_wants
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)

    def on_ready(self) -> list[tuple[int, bytes]]:
        """Take the next step of the opening; once open, the messages that have arrived."""
        if self.phase == "open":
            return self.receive()
        steps = {"resolving": self._read_resolver, "connecting": self._tcp_connected,
                 "tls": self._tls_step}
        self._step(steps.get(self.phase, self._read_answer))
        return self._messages() if self.phase == "open" and not self.dropped else []

    def check_deadline(self, now: float) -> None:
        if self.phase != "open" and not self.dropped and now > self.deadline:
            self.fail(self._timed_out())

    def _step(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Fatal as failure:
            self.fail(failure)

    def fail(self, failure: Fatal) -> None:
        self.failure, self.dropped = failure, str(failure)
        self.close(wait=False)

    # resolving
    def _resolve(self) -> None:
        host, port = self.proxy or (self.host, self.port)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # a name: ask the resolver process
            self.resolver = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", RESOLVER, host, str(port)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
            return
        self.resolved = self.addresses = [
            (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip), port)]
        self._connect_next()

    def _read_resolver(self) -> None:
        assert self.resolver is not None and self.resolver.stdout and self.resolver.stderr
        chunk = read_available(self.resolver.stdout.fileno())
        if chunk:
            self.inbox += chunk
            return
        if chunk is None:
            return
        self.resolver.wait()  # its stdout is closed: it has exited or is exiting
        error = self.resolver.stderr.read().decode(errors="replace").strip()
        self.resolver = None
        try:
            found = [(int(family), str(host), int(port))
                     for family, host, port in json.loads(self.inbox)]
        except (ValueError, TypeError):
            found = []
        self.inbox.clear()
        if not found:
            name = self.proxy[0] if self.proxy else self.host
            raise Fatal(f"cannot resolve {name} ({error or 'no address'}): check your network "
                        "or OPENAI_BASE_URL", Exit.NETWORK, retry=True)
        self.resolved, self.addresses = found, list(found)
        self._connect_next()

    # connecting
    def _connect_next(self) -> None:
        if not self.addresses:
            where = "the proxy {}:{}".format(*self.proxy) if self.proxy else \
                f"{self.host}:{self.port}"
            raise Fatal(f"cannot reach {where} ({self.tcp_error}): check your network or "
                        "OPENAI_BASE_URL", Exit.NETWORK, retry=True)
        family, host, port = self.addresses.pop(0)
        self.phase = "connecting"
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # 20 ms frames go at once
        error = self.sock.connect_ex((host, port))
        if error not in (0, errno.EINPROGRESS):
            self._tcp_failed(error)

    def _tcp_connected(self) -> None:
        assert self.sock is not None
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._tcp_failed(error)
        elif self.proxy:
            self._ask_proxy()
        else:
            self._start_tls()

    def _tcp_failed(self, error: int) -> None:
        assert self.sock is not None
        self.tcp_error = os.strerror(error)
        self.sock.close()
        self._connect_next()  # the next address, if the name had several

    # proxy: an HTTP CONNECT tunnel, as websocket-client's own _tunnel() sends it
    def _ask_proxy(self) -> None:
        self.phase = "proxy"
        request = f"CONNECT {self.host}:{self.port} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        user, password = self.proxy_auth or ("", "")
        if user:
            credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
            request += f"Proxy-Authorization: Basic {credentials}\r\n"
        self.outbox += (request + "\r\n").encode()
        self.flush()

    # tls
    def _start_tls(self) -> None:
        if self.tls is None:
            return self._start_upgrade()
        self.phase = "tls"
        assert self.sock is not None
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.host,
                                         do_handshake_on_connect=False)
        self._tls_step()

    def _tls_step(self) -> None:
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.tls_wants = selectors.EVENT_READ
            return
        except ssl.SSLWantWriteError:
            self.tls_wants = selectors.EVENT_WRITE
            return
        except ssl.SSLError as error:
            raise Fatal(f"TLS with {self.host} failed ({error.reason or error}); on macOS with "
                        "python.org's Python, run 'Install Certificates.command'",
                        Exit.TLS) from None
        except OSError as error:
            raise Fatal(f"TLS with {self.host} failed: the connection broke "
                        f"({error.strerror or error})", Exit.TLS, retry=True) from None
        self._start_upgrade()

    # upgrading
    def _start_upgrade(self) -> None:
        """The HTTP upgrade with only the key's header (never the retired OpenAI-Beta)."""
        self.phase = "upgrading"
        lines, self.key = websocket._handshake._get_handshake_headers(
            self.resource, self.url, self.host, self.port, {"header": [self.auth]})
        self.outbox += "\r\n".join(lines).encode()
        self.flush()

    def _read_answer(self) -> None:
        """The proxy's or the server's HTTP answer, once its head (and any body) is in."""
        self.flush()
        ended = not self._recv()
        head_end = self.inbox.find(b"\r\n\r\n")
        if head_end < 0:
            if ended or len(self.inbox) > self.MAX_ANSWER:
                raise self._no_answer()
            return
        status, headers = parse_http_head(bytes(self.inbox[:head_end]))
        body = bytes(self.inbox[head_end + 4:])
        if status in (101, 200) and (self.phase == "proxy") == (status == 200):
            del self.inbox[:head_end + 4]
            if self.phase == "proxy":
                return self._start_tls()
            if not websocket._handshake._validate(headers, self.key, None)[0]:
                raise Fatal(f"{self.host} answered the upgrade without a valid WebSocket "
                            "handshake: check OPENAI_BASE_URL", Exit.CLOSED)
            self.phase, self.last_heard = "open", time.monotonic()
            self.clock_offset = clock_offset(headers.get("date", ""))
            return None
        try:
            length = min(int(headers.get("content-length", self.MAX_ANSWER)), self.MAX_ANSWER)
        except ValueError:
            length = self.MAX_ANSWER
        if len(body) < length and not ended:
            return None  # the rest of the error body is on its way
        if self.phase == "proxy":
            raise Fatal("the proxy {}:{} refused to connect to {} (HTTP {}): check https_proxy"
                        .format(*self.proxy or ("", ""), self.host, status), Exit.NETWORK,
                        retry=status != 407)
        raise refused(self.host, status, headers, body)

    def _no_answer(self) -> Fatal:
        who = "the proxy" if self.phase == "proxy" else self.host
        return Fatal(f"{who} closed the connection without answering the WebSocket upgrade: "
                     "check OPENAI_BASE_URL", Exit.NETWORK, retry=True)

    def _timed_out(self) -> Fatal:
        seconds = f"within {self.timeout:g} s"
        name = self.proxy[0] if self.proxy and self.phase == "resolving" else self.host
        if self.phase == "tls":
            return Fatal(f"TLS with {self.host} did not finish {seconds}: something between "
                         "you and the API holds the connection", Exit.TLS, retry=True)
        reason = {
            "resolving": f"cannot resolve {name}: no answer {seconds}; check your network",
            "connecting": f"cannot reach {self.host}:{self.port}: no answer {seconds}; check "
                          "your network or OPENAI_BASE_URL",
            "proxy": f"the proxy did not answer {seconds}: check https_proxy",
            "upgrading": f"{self.host} accepted the connection but did not answer the WebSocket "
                         f"upgrade {seconds}: try again later, or check OPENAI_BASE_URL",
        }[self.phase]
        return Fatal(reason, Exit.NETWORK, retry=True)

    # open: frames both ways
    def send(self, event: dict[str, Any]) -> None:
        self._queue_frame(json.dumps(event), websocket.ABNF.OPCODE_TEXT)

    def _queue_frame(self, payload: str | bytes, opcode: int) -> None:
        self.outbox += websocket.ABNF.create_frame(payload, opcode).format()
        self.flush()

    def flush(self) -> None:
        while self.outbox and self.sock is not None and not self.dropped \
                and self.phase in ("proxy", "upgrading", "open"):
            try:
                sent = self.sock.send(self.outbox)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            except OSError as error:
                self.dropped = f"the connection broke ({error})"
                return
            del self.outbox[:sent]

    def ping(self) -> None:
        self.ping_sent = time.monotonic()
        self._queue_frame(b"keepalive", websocket.ABNF.OPCODE_PING)

    def receive(self) -> list[tuple[int, bytes]]:
        """The complete messages that have arrived, as (opcode, payload). A frame that breaks
        the protocol ends the connection, as a drop does: the link reconnects."""
        if not self._recv():
            self.dropped = self.dropped or "the connection dropped without a close frame"
        return self._messages()

    def buffered(self) -> bool:
        """Bytes that select() cannot see: decrypted ones inside the SSL socket, or what _recv
        left unread this turn."""
        return self.phase == "open" and not self.dropped and self.sock is not None and (
            self.unread or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0))

    def _recv(self, most: int = 1024 * 1024) -> bool:
        """Read until the socket would block, which also drains what the SSL layer holds
        decrypted (`pending()`), bytes that select() cannot see; at most `most` bytes a turn of
        the loop, so that a flood cannot hold it. False at the end of the stream."""
        assert self.sock is not None
        self.unread = False
        for _ in range(most // 65536):
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return True
            except OSError as error:
                self.dropped = self.dropped or f"the connection broke ({error})"
                return False
            if not chunk:
                return False
            self.inbox += chunk
            self.last_heard, self.ping_sent = time.monotonic(), None
        self.unread = True
        return True

    def _messages(self) -> list[tuple[int, bytes]]:
        """The complete messages in what was read; those before a frame that breaks the
        protocol too (they came from the API: shown, logged, counted), the break then ends it."""
        messages: list[tuple[int, bytes]] = []
        try:
            self._parse(messages)
        except Fatal as failure:
            self.fail(failure)
        return messages

    def _parse(self, messages: list[tuple[int, bytes]]) -> None:
        while (frame := self._next_frame()) is not None:
            fin, opcode, payload = frame
            if opcode == websocket.ABNF.OPCODE_PING:
                self._queue_frame(payload, websocket.ABNF.OPCODE_PONG)
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                self._on_close(payload)
            elif opcode == websocket.ABNF.OPCODE_PONG:
                pass
            elif (opcode == websocket.ABNF.OPCODE_CONT) != bool(self.fragmented_opcode):
                raise self._broken("a continuation frame with no message before it"
                                   if self.fragmented_opcode == 0 else
                                   "a new message before the last one ended")
            else:
                self.fragments.append(payload)
                self.fragmented_opcode = self.fragmented_opcode or opcode
                if sum(map(len, self.fragments)) > self.MAX_MESSAGE:
                    raise Fatal(f"the API sent a message of more than {self.MAX_MESSAGE} bytes, "
                                "more than any event should be", Exit.CLOSED)
                if fin:
                    messages.append((self.fragmented_opcode, b"".join(self.fragments)))
                    self.fragments.clear()
                    self.fragmented_opcode = 0

    def _broken(self, what: str) -> Fatal:
        return Fatal(f"the API broke the WebSocket protocol ({what})", Exit.CLOSED, retry=True)

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        buf = self.inbox
        if len(buf) < 2:
            return None
        fin, opcode = bool(buf[0] & 0x80), buf[0] & 0x0F
        if buf[0] & 0x70:
            raise self._broken("reserved bits set, with no extension agreed")
        if opcode not in (0, 1, 2, 8, 9, 10):
            raise self._broken(f"an unknown frame type {opcode}")
        if opcode >= 8 and (not fin or buf[1] & 0x7F > 125):
            raise self._broken("a control frame in pieces, or longer than 125 bytes")
        length, start = buf[1] & 0x7F, 2
        if length >= 126:
            start = 4 if length == 126 else 10
            if len(buf) < start:
                return None
            length = int.from_bytes(buf[2:start], "big")
        masked = buf[1] & 0x80
        if length > self.MAX_MESSAGE:
            raise Fatal(f"the API sent a {length}-byte frame, more than any event should be",
                        Exit.CLOSED)
        end = start + (4 if masked else 0) + length
        if len(buf) < end:
            return None
        payload = bytes(buf[end - length:end])
        if masked:  # servers must not mask, but undoing it costs nothing
            payload = websocket.ABNF.mask(bytes(buf[start:start + 4]), payload)
        del buf[:end]
        return fin, opcode, payload

    def _on_close(self, payload: bytes) -> None:
        self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        self.close_reason = payload[2:].decode(errors="replace")
        self.dropped = f"the API closed the session ({self.close_code}, " \
                       f"{self.close_reason or 'no reason given'})"
        self._queue_frame(payload[:2], websocket.ABNF.OPCODE_CLOSE)

    def close(self, wait: bool = True) -> None:
        """Say goodbye with 1000 if open (waiting up to 0.5 s for the reply: only at exit, when
        the loop has ended); anything else just stops."""
        if self.resolver is not None:
            self.resolver.kill()
            self.resolver.wait()
            for stream in (self.resolver.stdout, self.resolver.stderr):
                if stream is not None:
                    stream.close()
            self.resolver = None
        if self.sock is None:
            return
        try:
            if self.phase == "open" and self.dropped is None:
                self._queue_frame(struct.pack("!H", 1000), websocket.ABNF.OPCODE_CLOSE)
                if wait:
                    self.sock.settimeout(0.5)
                    self.sock.sendall(self.outbox)
                    self.sock.recv(4096)
                self.flush()
        except (OSError, ValueError):
            pass
        finally:
            self.sock.close()


def clock_offset(date: str) -> float:
    """How far the server's clock (an HTTP Date header) is ahead of ours; 0 when unknown."""
    try:
        return email.utils.parsedate_to_datetime(date).timestamp() - time.time()
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0


def parse_http_head(head: bytes) -> tuple[int, dict[str, str]]:
    """An HTTP answer's status and headers (lower-case names, as websocket-client keeps them)."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(status_line.split(" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def refused(host: str, status: int, headers: dict[str, str], body: bytes) -> Fatal:
    """An HTTP answer other than the upgrade, as one line: the API's own error message when it
    sent one; a web page (a captive portal, a proxy's block page) named as such, never dumped."""
    text = body.decode(errors="replace")
    if "html" in headers.get("content-type", "") or text.lstrip()[:1] == "<":
        return Fatal(f"{host} answered with a web page (HTTP {status}), not the Realtime API: a "
                     "captive portal, proxy or firewall is in the way; sign in to the network, "
                     "or check OPENAI_BASE_URL and https_proxy", Exit.NETWORK, retry=True)
    try:
        error = parse_json(text)["error"]
        message, code = error["message"], error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = text.strip()[:200] or "no details", None
    hints = {401: ("check OPENAI_API_KEY", Exit.AUTH),
             403: ("your key or project has no access to the Realtime API", Exit.AUTH),
             404: ("check --model and OPENAI_BASE_URL", Exit.NOT_FOUND),
             429: ("rate limit or quota reached; wait, or check your billing", Exit.RATE_LIMIT)}
    hint, exit_code = hints.get(status, ("try again later", Exit.CLOSED))
    retry = (status == 429 and code not in FATAL_ERRORS) or status >= 500
    return Fatal(f"the API refused the connection (HTTP {status}): {message} — {hint}", exit_code,
                 retry)


# --- Staying connected ---------------------------------------------------------------------------

class Link:
    """The line to the API across sessions. It opens each connection, retries with jittered
    backoff when one drops, pings a quiet one, and rolls over to a new session before the
    60-minute limit. The conversation sends through it, tells it when a session is configured,
    and hears from `tick()` when a connection was lost."""

    def __init__(self, config: Config, display: Display) -> None:
        self.url, self.auth, self.keepalive = config.url, auth_header(config), config.keepalive
        self.timeout, self.most_tries = config.connect_timeout, config.reconnect_tries
        # Certificate checks as everywhere (SSL_CERT_FILE is honoured), never switched off.
        self.tls = ssl.create_default_context() if config.url.startswith("wss:") else None
        self.display = display
        self.connection: Connection | None = None
        self.addresses: list[Address] = []  # resolved once, reused by reconnects
        self.sessions = 0  # how many sessions were configured; a failure before the first is final
        self.ready = False  # this session is configured: the microphone may go to it
        self.expires_at: float | None = None  # monotonic deadline of the 60-minute limit
        self.reconnect_at: float | None = None
        self.tries = 0
        self.quick_ends = 0  # sessions in a row that ended within a minute: the 2nd backs off
        self.rolling_over = False
        self.seconds_before = 0.0  # the earlier sessions' time, billed by the minute on xAI
        self.session_since: float | None = None

    def open(self, now: float) -> None:
        self.connection = Connection(self.url, self.auth, self.tls, self.addresses,
                                     self.timeout, now)
        self.ready = False

    def send(self, event: dict[str, Any]) -> None:
        if self.connection is not None and self.connection.phase == "open" \
                and not self.connection.dropped:
            self.connection.send(event)

    def session_created(self, expires_at: Any) -> None:
        """The session's time limit, read by the server's clock (the upgrade's Date header): a
        computer whose clock is off must neither roll over at once, again and again, nor late.
        A limit that no session has (already past, or hours away) is not acted on: the API's
        own notice, `session_expired` or a close with 1001, starts the next session then."""
        offset = self.connection.clock_offset if self.connection is not None else 0.0
        if abs(offset) > 30:
            self.display.warn(f"this computer's clock is {abs(offset):.0f} s "
                              f"{'behind' if offset > 0 else 'ahead of'} the API's; the "
                              "session's time limit is read by the API's clock", once="clock")
        if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) \
                or not 0 < expires_at < 1e11:  # absent, or not a time (NaN fails too)
            return
        left = expires_at - (time.time() + offset)
        if not ROLLOVER_MARGIN < left < 4 * 3600:
            self.display.warn(f"the API says this session ends in {left:.0f} s; using it until "
                              "the API ends it", once="expires")
            return
        self.expires_at = time.monotonic() + left

    def current(self) -> Connection | None:
        return self.connection

    def is_ready(self) -> bool:
        """The session is configured: the microphone and the conversation may go to it."""
        return self.ready

    def is_again(self) -> bool:
        """This is not the first session: the conversation so far must be told."""
        return self.sessions > 1

    def minutes_left(self, now: float) -> float | None:
        """Of this session, where the API said when it ends."""
        return None if self.expires_at is None else max(self.expires_at - now, 0) / 60

    def expiring(self) -> None:
        """The API said the session expires: the server closes next; a new one follows at once."""
        self.rolling_over = True

    def configured(self) -> bool:
        """session.updated arrived; True the first time for this connection."""
        if self.ready:
            return False
        self.ready, self.tries = True, 0
        self.sessions += 1
        self.session_since = time.monotonic()
        if self.connection is not None:
            self.addresses = self.connection.resolved
        return True

    def tick(self, now: float, at_pause: bool, all_handled: bool) -> str | None:
        """Deadlines, reconnecting, keepalive pings and the rollover. Returns why the connection
        was lost, when it was: once the messages that came before the drop are all handled (a
        busy loop may hold some in its inbox), so that none of them is taken for the next
        session's (a `session.updated` would say it started)."""
        connection = self.connection
        if connection is None:
            if self.reconnect_at is not None and now >= self.reconnect_at:
                self.reconnect_at = None
                self.open(now)
            return None
        connection.check_deadline(now)
        if connection.phase == "open" and not connection.dropped:
            self._keep_alive(connection, now, at_pause)
        connection.flush()
        return self._lost(now) if connection.dropped and all_handled else None

    def _keep_alive(self, connection: Connection, now: float, at_pause: bool) -> None:
        if not self.ready and now - connection.started > 2 * self.timeout:
            connection.fail(Fatal(f"{connection.host} accepted the WebSocket but started no "
                                  f"session within {2 * self.timeout:g} s: try again later",
                                  Exit.CLOSED, retry=True))
        elif connection.ping_sent is not None:
            if now - connection.ping_sent > self.keepalive:
                connection.dropped = f"the API did not answer for {self.keepalive:.0f} s"
        elif now - connection.last_heard > self.keepalive:
            connection.ping()
        if self.expires_at is not None and self.ready and (
                now > self.expires_at - 5 or (now > self.expires_at - ROLLOVER_MARGIN and at_pause)):
            self.rolling_over = True
            connection.close(wait=False)  # politely, with 1000
            connection.dropped = "the session is about to expire"

    def minutes(self, now: float) -> float:
        """Of sessions, so far."""
        since = self.session_since
        return (self.seconds_before + (now - since if since is not None else 0.0)) / 60

    def _session_ended(self, now: float) -> None:
        self.seconds_before = self.minutes(now) * 60
        self.session_since = None

    def _lost(self, now: float) -> str:
        assert self.connection is not None
        self._session_ended(now)
        connection, self.connection, self.ready = self.connection, None, False
        connection.close(wait=False)
        reason = connection.dropped or ""
        if connection.failure is not None:
            self.addresses = []  # resolve again: the name may point elsewhere now
            if self.sessions == 0 or not connection.failure.retry:
                raise connection.failure
        if self.rolling_over or connection.close_code == 1001:
            self.rolling_over = False
            self.expires_at = None
            self.quick_ends = self.quick_ends + 1 if now - connection.started < 60 else 0
            if self.quick_ends > 1:  # no storm of sessions that end as they start: back off
                self._back_off(f"{reason}, a minute or less after it started", now,
                               self.quick_ends - 1, ("start a new session",
                                                     "starting a new session"))
                return reason
            self.reconnect_at = now
            self.display.info("starting a new session (the 60-minute limit); the model keeps "
                              "the conversation")
        else:
            self._retry_later(reason, now)
        return reason

    def _retry_later(self, reason: str, now: float) -> None:
        self.tries += 1
        self._back_off(reason, now, self.tries, ("reconnect", "reconnecting"))

    def _back_off(self, reason: str, now: float, tries: int, what: tuple[str, str]) -> None:
        if tries > self.most_tries:
            raise Fatal(f"{reason}; gave up after {self.most_tries} tries to {what[0]}",
                        Exit.CLOSED)
        delay = min(0.5 * 2 ** (tries - 1), 8.0) * random.uniform(0.5, 1.0)
        self.reconnect_at = now + delay
        self.display.warn(f"{reason}; {what[1]} in {delay:.1f} s (try {tries} of "
                          f"{self.most_tries}); the microphone is paused")

    def next_timer(self, now: float) -> float | None:
        """When tick() has something to do next."""
        connection = self.connection
        if connection is None:
            return self.reconnect_at
        if connection.phase != "open":
            return connection.deadline
        heard = connection.ping_sent or connection.last_heard
        timers = [heard + self.keepalive]
        if not self.ready:
            timers.append(connection.started + 2 * self.timeout)
        if self.expires_at is not None:
            rollover = self.expires_at - ROLLOVER_MARGIN
            timers.append(rollover if now < rollover else now + 0.25)
        return min(timers)

    def status(self, now: float) -> str | None:
        """What the status line says while there is no configured session."""
        connection = self.connection
        if connection is None:
            wait = max((self.reconnect_at or now) - now, 0)
            if self.tries:
                return f"reconnecting in {wait:.0f} s (try {self.tries} of {self.most_tries})"
            return f"starting a new session in {wait:.0f} s" if wait else "starting a new session"
        if self.ready:
            return None
        what = {"resolving": "looking up", "connecting": "connecting to", "proxy": "via proxy to",
                "tls": "TLS with", "upgrading": "waiting for", "open": "starting a session with"}
        return f"{what[connection.phase]} {connection.host}… {now - connection.started:.0f} s"

    def close(self) -> None:
        self._session_ended(time.monotonic())
        if self.connection is not None:
            self.connection.close()


# --- Models going away ---------------------------------------------------------------------------

# OpenAI's GET /models/{id} gives a model's shutdown date. Asked once at start-up, by a child
# process as the name lookup is: an HTTP request would hold the loop. The key goes to the API's
# host only: redirects are not followed.
MODELS_CHECK = """\
import sys, urllib.parse, urllib.request
class Stay(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None
opener = urllib.request.build_opener(Stay)
name, _, value = sys.stdin.readline().rstrip("\\n").partition(": ")
for model in sys.argv[2:]:
    url = sys.argv[1] + "/models/" + urllib.parse.quote(model, safe="")
    try:
        with opener.open(urllib.request.Request(url, headers={name: value}), timeout=5) as answer:
            print(answer.read(65536).decode("utf-8", "replace").replace("\\n", " "), flush=True)
    except Exception:
        print("{}", flush=True)
"""


class ModelCheck:
    """One line of warning when the model or the transcription model shuts down within 90 days
    (or has), naming its replacement. Nothing when the API does not say, or cannot be asked."""

    def __init__(self, config: Config, display: Display) -> None:
        self.display = display
        self.models = [config.model] + ([config.transcription_model]
                                        if config.transcription_model != "none" else [])
        self.answer = bytearray()
        self.selector: selectors.BaseSelector | None = None
        base = urllib.parse.urlsplit(config.url)
        api = urllib.parse.urlunsplit(({"wss": "https", "ws": "http"}[base.scheme], base.netloc,
                                       base.path.removesuffix("/realtime"), "", ""))
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", MODELS_CHECK, api, *self.models],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):  # a few bytes: the pipe takes them at once
            self.process.stdin.write(auth_header(config).encode() + b"\n")
        with contextlib.suppress(OSError):
            self.process.stdin.close()

    def watch(self, selector: selectors.BaseSelector) -> None:
        assert self.process.stdout is not None
        self.selector = selector
        selector.register(self.process.stdout, selectors.EVENT_READ, self.on_readable)

    def on_readable(self, fd: int) -> None:
        chunk = read_available(fd)
        if chunk:
            self.answer += chunk[:256 * 1024 - len(self.answer)]
            return
        if chunk is None:
            return
        assert self.selector is not None
        self.selector.unregister(fd)
        self.close()
        for model, line in zip(self.models, self.answer.decode("utf-8", "replace").splitlines(),
                               strict=False):
            self._warn(model, line, model != self.models[0])

    def _warn(self, model: str, answer: str, transcription: bool) -> None:
        try:
            date = datetime.date.fromisoformat(str((parse_json(answer) or {})["shutdown_date"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return  # no date (null, absent, not JSON): nothing announced
        days = (date - datetime.date(*time.gmtime()[:3])).days
        if days > SHUTDOWN_WARNING_DAYS:
            return
        when = f"shut down on {date}" if days < 0 else f"shuts down on {date}, in {days} days"
        flag = "--transcription-model" if transcription else "--model"
        instead = REPLACEMENTS.get(model)
        self.display.warn(f"{model} {when}" + (f": use {flag} {instead}" if instead else ""))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdout, self.process.stdin):
            if pipe is not None:
                pipe.close()


# --- Tools: MCP servers, by voice -----------------------------------------------------------------

# A tool is an MCP server: a child process that speaks JSON-RPC, one message per line, on its stdin
# and stdout. The script starts each one, lists its tools, declares them to the model as functions,
# and runs the model's calls, all from the loop. Tools that only read run at once; anything else
# asks the person first, because a misheard word must not delete a file.

MCP_PROTOCOL = "2025-11-25"
TOOL_OUTPUT_CHARS = 20_000  # of a result, for the model
LOGGED_RESULT_CHARS = 2_000  # of a result, for the log and a new session
INTERPRETERS = {"python", "python3", "node", "npx", "uv", "uvx", "deno", "bun", "pipx", "sh", "bash",
                "run"}


@dataclasses.dataclass(frozen=True)
class McpCommand:
    """How to start one MCP server (from --mcp or --mcp-config)."""
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def mcp_commands(commands: list[str], config_file: str) -> list[McpCommand]:
    """--mcp "COMMAND ARGS" (shell-quoted) and the desktop clients' {"mcpServers": {…}} file."""
    found = []
    for line in commands:
        try:
            argv = shlex.split(line)
        except ValueError as error:
            raise Fatal(f"--mcp {line!r}: {error}", Exit.USAGE) from None
        if argv:
            found.append(McpCommand(server_name(argv), tuple(argv)))
    if config_file:
        try:
            servers = json.loads(Path(config_file).read_text(encoding="utf-8"))["mcpServers"]
            for name, entry in servers.items():
                argv = [entry["command"], *entry.get("args", [])]
                if not all(isinstance(arg, str) for arg in argv):
                    raise TypeError("command and args must be strings")
                found.append(McpCommand(name, tuple(argv), tuple(
                    (str(key), str(value)) for key, value in (entry.get("env") or {}).items())))
        except OSError as error:
            raise Fatal(f"cannot read --mcp-config {config_file}: {error.strerror}",
                        Exit.USAGE) from None
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise Fatal(f"--mcp-config {config_file} is not an {{\"mcpServers\": {{name: "
                        f"{{\"command\": …, \"args\": […]}}}}}} file ({error})", Exit.USAGE) from None
    names: set[str] = set()
    return [dataclasses.replace(command, name=unique_name(command.name, names)) for command in found]


def unique_name(name: str, taken: set[str]) -> str:
    unique, number = name, 2
    while unique in taken:
        unique, number = f"{name}-{number}", number + 1
    taken.add(unique)
    return unique


def server_name(argv: list[str]) -> str:
    """A short name for a server from its command: `python my_tools.py` is my_tools."""
    words = [word for word in argv if not word.startswith("-")] or argv
    if len(words) > 1 and Path(words[0]).name.rstrip("0123456789.") in INTERPRETERS:
        words = words[1:]
        if len(words) > 1 and words[0] == "run":  # uv run …
            words = words[1:]
    return Path(words[0].rstrip("/")).stem or "mcp"


def remote_servers(urls: list[str]) -> list[tuple[str, str]]:
    """--mcp-url: a label for each (its host name, made unique) and the URL, which must be
    https (the API reaches it from OpenAI's side, never from here)."""
    labels: set[str] = set()
    found = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise Fatal(f"--mcp-url {url!r} is not an https:// URL", Exit.USAGE)
        label = re.sub(r"[^a-zA-Z0-9_-]", "_", parts.hostname.split(".")[0])
        found.append((unique_name(label, labels), url))
    return found


def mcp_headers(lines: list[str]) -> list[tuple[str, str]]:
    found = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise Fatal(f"--mcp-header must look like \"Name: value\", not {line.split(':')[0]!r}…",
                        Exit.USAGE)
        found.append((name.strip(), value.strip()))
    return found


def api_name(name: str, taken: set[str], server: str) -> str:
    """The API takes function names of ^[a-zA-Z0-9_-]{1,64}$; two servers may share a name."""
    clean = re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64] or "tool"
    if clean in taken:
        clean = re.sub(r"[^a-zA-Z0-9_-]", "_", f"{server}_{name}")[:60]
    return unique_name(clean, taken)


Answer = Callable[[dict[str, Any] | None, str], None]  # (result, or None and why it failed)


class McpServer:
    """One local MCP server, spoken to in JSON-RPC over its stdin and stdout. Nothing here waits:
    the loop hands it what its pipes hold, and `tick` handles the clock. It shakes hands
    (`initialize`, then `notifications/initialized`), lists its tools (following `nextCursor`),
    and then sends `tools/call` requests, each with its own reply callback and deadline."""

    def __init__(self, command: McpCommand, start_timeout: float) -> None:
        self.name = command.name
        self.start_timeout = start_timeout  # s to shake hands and list the tools
        self.state = "starting"  # → "ready" → "failed"
        self.failure = ""
        self.changed = False  # its tools arrived or went away: the model must be told
        self.tools: list[dict[str, Any]] = []
        self.notices: list[str] = []  # for the screen, once each
        self.stderr = StderrTail()
        self.pending: dict[int, tuple[Answer, float, float]] = {}  # id → (reply, deadline, timeout)
        self.next_id = 1
        self.inbox, self.outbox = b"", b""
        self.bad_json = False
        self.ended_at: float | None = None  # its output closed: it is exiting
        self.selector: selectors.BaseSelector | None = None
        # The API key is for the API host only: it is not passed on to the tool's process.
        environment = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
        try:
            # Its own session, like sox: Ctrl-C reaches us, and we end it in our own order.
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                command.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env={**environment, **dict(command.env)},
                start_new_session=True)
        except OSError as error:
            self.process = None
            self.fail(f"did not start ({command.argv[0]}: {error.strerror})")
            return
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            os.set_blocking(stream.fileno(), False)  # type: ignore[union-attr]
        self.request("initialize", {"protocolVersion": MCP_PROTOCOL, "capabilities": {},
                                    "clientInfo": {"name": "realtime-sox", "version": "1"}},
                     self._initialized, start_timeout)

    # Starting: initialize, initialized, tools/list (page by page).
    def _initialized(self, result: dict[str, Any] | None, error: str) -> None:
        if result is None:
            self.fail(f"failed its handshake ({error})")
            return
        self.notify("notifications/initialized")
        self._list_tools(None)

    def _list_tools(self, cursor: str | None, found: tuple[Any, ...] = ()) -> None:
        def listed(result: dict[str, Any] | None, error: str) -> None:
            if result is None:
                self.fail(f"did not list its tools ({error})")
                return
            tools = (*found, *[tool for tool in result.get("tools") or []
                               if isinstance(tool, dict) and isinstance(tool.get("name"), str)])
            if result.get("nextCursor"):
                self._list_tools(str(result["nextCursor"]), tools)
            else:
                self.tools, self.state, self.changed = list(tools), "ready", True
        self.request("tools/list", {"cursor": cursor} if cursor else {}, listed, self.start_timeout)

    # JSON-RPC
    def request(self, method: str, params: dict[str, Any], reply: Answer, timeout: float) -> int:
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.pending[request_id] = (reply, time.monotonic() + timeout, timeout)
        self._write({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return request_id

    def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        self._write({"jsonrpc": "2.0", "method": method, **({"params": params} if params else {})})

    def cancel(self, request_id: int, reason: str) -> None:
        """Forget a request and tell the server (its answer, if it still comes, is dropped)."""
        if self.pending.pop(request_id, None) is not None:
            self.notify("notifications/cancelled", {"requestId": request_id, "reason": reason})

    def _write(self, message: dict[str, Any]) -> None:
        if self.state != "failed":
            self.outbox += json.dumps(message).encode() + b"\n"
            self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now; the rest waits for the next turn of the loop."""
        if not self.outbox or self.process is None or self.process.stdin is None:
            return
        try:
            written = os.write(self.process.stdin.fileno(), self.outbox)
        except BlockingIOError:
            return
        except OSError:  # EPIPE: it has exited; its stdout's end says why
            self.outbox = b""
            return
        self.outbox = self.outbox[written:]

    def on_readable(self, fd: int) -> None:
        assert self.process is not None and self.process.stdout is not None
        if fd != self.process.stdout.fileno():
            self._read_stderr()
            return
        chunk = read_available(fd)
        if chunk == b"":  # it is exiting: tick() says so once its exit code is in
            self.ended_at = self.ended_at or time.monotonic()
            if self.selector is not None:
                self.selector.unregister(self.process.stdout)
            return
        *lines, self.inbox = (self.inbox + (chunk or b"")).split(b"\n")
        for line in lines:
            if line.strip():
                self._receive(line)

    def _receive(self, line: bytes) -> None:
        try:
            message = parse_json(line)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except ValueError:
            if not self.bad_json:
                self.bad_json = True
                self.notices.append(f"MCP server {self.name!r} wrote something that is not "
                                    f"JSON-RPC; skipping it ({line[:80]!r})")
            return
        if "method" in message:  # the server asks or tells us something
            if message["method"] == "notifications/tools/list_changed" and self.state == "ready":
                self._list_tools(None)
            elif "id" in message:
                self._write({"jsonrpc": "2.0", "id": message["id"], **(
                    {"result": {}} if message["method"] == "ping" else
                    {"error": {"code": -32601, "message": "not supported by this client"}})})
            return
        entry = self.pending.pop(message.get("id"), None)  # type: ignore[arg-type]
        if entry is None:
            return  # the answer to a request we gave up on
        reply = entry[0]
        error = message.get("error")
        if isinstance(message.get("result"), dict):
            reply(message["result"], "")
        else:
            reply(None, str(error.get("message")) if isinstance(error, dict) else "a bad answer")

    def _read_stderr(self) -> None:
        """Kept, not shown: a server's log is its own business until it fails."""
        stream = self.process.stderr if self.process is not None else None
        if stream is None or stream.closed:
            return
        while (chunk := read_available(stream.fileno())):
            self.stderr.feed(chunk)
        if chunk == b"" and self.selector is not None:  # at its end: stop watching it
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(stream)

    def tick(self, now: float) -> None:
        if self.ended_at is not None and self.process is not None:
            code = self.process.poll()
            if code is not None or now > self.ended_at + 0.5:
                self.fail("stopped" + (f" (exit code {code})" if code is not None else ""))
                return
        self.flush()
        for request_id, (reply, deadline, timeout) in list(self.pending.items()):
            if now >= deadline and request_id in self.pending:
                self.cancel(request_id, "timed out")
                reply(None, f"timed out: no answer within {timeout:g} s")

    def next_timer(self) -> float | None:
        deadlines = [deadline for _, deadline, _ in self.pending.values()]
        if self.outbox or self.ended_at is not None:
            deadlines.append(time.monotonic() + 0.02)
        return min(deadlines, default=None)

    def fail(self, reason: str) -> None:
        """It is out of the conversation: say why (with its last words), end it, answer what
        was waiting on it."""
        if self.state == "failed":
            return
        self._read_stderr()
        last_words = self.stderr.lines[-1] if self.stderr.lines else ""
        self.failure = reason + (f": {last_words}" if last_words else "")
        self.state, self.changed, self.tools = "failed", True, []
        self.close(wait=0)
        pending, self.pending = self.pending, {}
        for reply, _, _ in pending.values():
            reply(None, f"the MCP server {self.name} {self.failure}")

    def watch(self, selector: selectors.BaseSelector) -> None:
        if self.process is not None and self.state != "failed":
            self.selector = selector
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    selector.register(stream, selectors.EVENT_READ, self.on_readable)

    def close(self, wait: float = 1.0) -> None:
        """End it: stdin closed is the protocol's way, then SIGTERM, then SIGKILL, to its whole
        process group (npx and uv start grandchildren)."""
        if self.process is None:
            return
        if self.selector is not None:
            for stream in (self.process.stdout, self.process.stderr):
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(stream)  # type: ignore[arg-type]
            self.selector = None
        with contextlib.suppress(OSError):
            self.process.stdin.close()  # type: ignore[union-attr]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                self.process.wait(timeout=wait / 2)
                break
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # what it started, if it left any
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()  # type: ignore[union-attr]


@dataclasses.dataclass
class ToolCall:
    """One call of the model's, from the question to its output."""
    call_id: str
    name: str  # as the model knows it
    arguments: dict[str, Any]
    shown: str  # lookup_word(word="lighthouse")
    started: float
    answer: bool = True  # a reply follows its result (not when the person spoke over it)
    approval: str = ""  # who let it run: read-only, --approve-tools, you
    server: McpServer | None = None
    request_id: int | None = None
    approval_request: str = ""  # a remote server's call that the API holds for our answer


@dataclasses.dataclass
class ToolOutput:
    call: ToolCall
    output: str  # for the model
    answer: bool  # a response.create should follow
    approval: str
    cancelled: bool = False
    approve: bool = False  # for an approval_request: the answer


class Toolbox:
    """Every MCP server's tools, as the model sees them, and the calls in flight. The conversation
    hands it the model's calls and takes back finished outputs; it never waits for a tool."""

    def __init__(self, config: Config, can_ask: bool, display: Display) -> None:
        self.servers = [McpServer(command, config.mcp_start_timeout) for command in config.mcp]
        self.remote = [remote_tool(label, url, dict(config.mcp_headers), config.approve_tools)
                       for label, url in config.mcp_urls]
        self.remote_activity: dict[str, str] = {}  # item id → what the API is doing for us
        self.approve = config.approve_tools  # "" (ask), "none", "all", or "name,name"
        self.can_ask = can_ask
        self.timeout = config.tool_timeout
        self.display = display
        self.log = config.log
        self.by_name: dict[str, tuple[McpServer, dict[str, Any]]] = {}
        self.names: dict[tuple[str, str], str] = {}  # (server, tool) → its name for the model, kept
        self.changed = False
        self.running: dict[str, ToolCall] = {}
        self.questions: collections.deque[ToolCall] = collections.deque()
        self.outputs: list[ToolOutput] = []
        self.reply_owed = False  # a result came back that the model should speak about

    @property
    def configured(self) -> bool:
        return bool(self.servers or self.remote)

    def declarations(self) -> list[dict[str, Any]]:
        """The tools for session.update, as functions."""
        return [*({"type": "function", "name": name, "description": tool.get("description") or "",
                   "parameters": tool.get("inputSchema") or {"type": "object", "properties": {}}}
                  for name, (_, tool) in self.by_name.items()), *self.remote]

    def take_changed(self) -> bool:
        changed, self.changed = self.changed, False
        return changed

    # The model's calls
    def call(self, call_id: str, name: str, arguments: str, now: float,
             approval_request: str = "") -> ToolCall:
        try:
            parsed = parse_json(arguments or "{}")
        except ValueError:
            parsed = None
        valid = isinstance(parsed, dict)
        parsed = parsed if isinstance(parsed, dict) else {}
        shown = f"{name}({', '.join(f'{key}={json.dumps(value)}' for key, value in parsed.items())})"
        call = ToolCall(call_id, name, parsed, shown if len(shown) <= 200 else shown[:199] + "…",
                        now, approval_request=approval_request)
        if approval_request and (self.approve == "all" or name in self.approve.split(",")):
            self._finish(call, "", approval="--approve-tools", approve=True)
        elif approval_request and self.can_ask and self.approve != "none":
            self._ask(call)
        elif approval_request:
            self._finish(call, "", approval="refused")
        elif name not in self.by_name:
            self._finish(call, f"Error: there is no tool named {name!r}.")
        elif not valid:
            self._finish(call, "Error: the arguments were not a JSON object.")
        elif self.by_name[name][1].get("annotations", {}).get("readOnlyHint") is True:
            self._run(call, "read-only", now)
        elif self.approve == "all" or name in self.approve.split(","):
            self._run(call, "--approve-tools", now)
        elif self.can_ask and self.approve != "none":
            self._ask(call)
        else:
            why = ("--approve-tools none" if self.approve == "none" else
                   "there is no terminal to ask on (see --approve-tools)")
            self._finish(call, "The person did not allow this tool to run: it changes things, "
                               f"and {why}.", approval="refused")
        return call

    def approval_requested(self, item: dict[str, Any], now: float) -> ToolCall:
        """A remote server's tool that is not read-only: the API waits for our answer, given by
        the same rules as for a local tool."""
        return self.call(item["id"], item["name"], item.get("arguments", ""), now,
                         approval_request=item["id"])

    @property
    def question(self) -> ToolCall | None:
        return self.questions[0] if self.questions else None

    def _ask(self, call: ToolCall) -> None:
        self.questions.append(call)
        if len(self.questions) == 1:
            self.display.ask(f"run {call.shown}? [y/N]")

    def answer(self, yes: bool, now: float) -> None:
        """The person's key for the question on screen."""
        call = self.questions.popleft()
        self.display.info(f"  {'yes: running it' if yes else 'no: not running it'}")
        if call.approval_request:
            self._finish(call, "", approval="you" if yes else "refused by you", approve=yes)
        elif yes:
            self._run(call, "you", now)
        else:
            self._finish(call, "The person refused to run this.", approval="refused by you")
        if self.questions:
            self.display.ask(f"run {self.questions[0].shown}? [y/N]")

    def _run(self, call: ToolCall, approval: str, now: float) -> None:
        server, tool = self.by_name[call.name]
        call.approval, call.server, call.started = approval, server, now

        def done(result: dict[str, Any] | None, error: str) -> None:
            self.running.pop(call.call_id, None)
            self._finish(call, tool_output(result) if result is not None else f"Error: {error}.")
        self.running[call.call_id] = call
        call.request_id = server.request("tools/call", {"name": tool["name"],
                                                        "arguments": call.arguments},
                                         done, self.timeout)

    def _finish(self, call: ToolCall, output: str, approval: str = "",
                cancelled: bool = False, approve: bool = False) -> None:
        answer = call.answer and not call.approval_request  # the API goes on by itself
        self.outputs.append(ToolOutput(call, output, answer, approval or call.approval,
                                       cancelled, approve))
        self.reply_owed = self.reply_owed or answer

    def remote_running(self, item_id: str, activity: str | None) -> None:
        """What the API is doing for us with a remote server's tools (None: done)."""
        if activity is None:
            self.remote_activity.pop(item_id, None)
        else:
            self.remote_activity[item_id] = activity

    # The API's events about tools
    def item_added(self, item: dict[str, Any]) -> None:
        """response.output_item.added: a remote server's tool, called by the API, is running."""
        if item.get("type") == "mcp_call":
            self.remote_running(item["id"], f"running {item.get('name')} on "
                                            f"{item.get('server_label')} (through the API)…")

    def on_event(self, event: dict[str, Any], history: History) -> None:
        """response.output_item.done, conversation.item.done and mcp_list_tools.*."""
        item = event.get("item") or {}
        if event["type"] == "response.output_item.done":
            self._item_done(item, history)
        elif event["type"] == "conversation.item.done":
            if item.get("type") == "mcp_list_tools":
                names = ", ".join(tool.get("name", "?") for tool in item.get("tools") or [])
                self.display.info(f"tools from {item.get('server_label')} (through the API): "
                                  f"{names or 'none'}")
        elif event["type"] == "mcp_list_tools.in_progress":  # at the session's start
            self.remote_running(event.get("item_id", ""), "the API is listing the remote MCP "
                                                          "tools…")
        else:
            self.remote_running(event.get("item_id", ""), None)
            if event["type"] == "mcp_list_tools.failed":
                self.display.warn("the API could not list the tools of a --mcp-url server; "
                                  "going on without them")

    def _item_done(self, item: dict[str, Any], history: History) -> None:
        """A function call is run only once complete: interrupted and cancelled ones end here
        too, with another status."""
        if item.get("type") == "function_call" and item.get("status") == "completed":
            call = self.call(item["call_id"], item["name"], item.get("arguments", ""),
                             time.monotonic())
            self.display.tool_call(call.shown)
        elif item.get("type") == "mcp_approval_request":
            call = self.approval_requested(item, time.monotonic())
            self.display.tool_call(f"{call.shown} on {item.get('server_label')}")
        elif item.get("type") == "mcp_call":
            self.remote_call_done(item, history)

    # What goes back to the model
    def deliver(self, send: Callable[[dict[str, Any]], None], history: History,
                may_reply: bool) -> None:
        """Finished calls: a local tool's output as a function_call_output, the person's answer
        about a remote one as an mcp_approval_response (the API runs it, or not, and goes on).
        One response.create follows, once every call is answered, when the conversation
        `may_reply` (no response running: one sent during it is refused)."""
        self._send_outputs(send, history)
        if may_reply and self.reply_owed and not self.busy():
            self.reply_owed = False
            send({"type": "response.create"})

    def _send_outputs(self, send: Callable[[dict[str, Any]], None], history: History) -> None:
        for done in self.take_outputs():
            call = done.call
            if call.approval_request:
                self.display.tool_result("approved" if done.approve else "refused")
                self.log.write(event="tool approval", name=call.name, arguments=call.arguments,
                               approved_by=done.approval, approve=done.approve)
                send({"type": "conversation.item.create", "item": {
                    "type": "mcp_approval_response", "id": f"approval_{call.call_id}"[:32],
                    "approval_request_id": call.approval_request, "approve": done.approve}})
                continue
            self.returned(history, call.call_id, call.shown, done.output, not done.cancelled,
                          call_id=call.call_id, name=call.name, arguments=call.arguments,
                          approved_by=done.approval)
            send({"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": call.call_id, "output": done.output}})

    def remote_call_done(self, item: dict[str, Any], history: History) -> None:
        """A remote server's tool, which the API called: its result as it reported it."""
        self.remote_running(item.get("id", ""), None)
        error = item.get("error")
        output = item.get("output") or (f"Error: {error.get('message') or error.get('type')}"
                                        if isinstance(error, dict) else "")
        shown = f"{item.get('name')}({item.get('arguments', '')})"
        self.display.tool_call(f"{shown} on {item.get('server_label')} (through the API)")
        self.returned(history, item.get("id", ""), shown, output, name=item.get("name"),
                      server=item.get("server_label"), arguments=item.get("arguments"))

    def returned(self, history: History, item_id: str, shown: str, output: str,
                 kept: bool = True, **record: Any) -> None:
        """A tool's result, local or remote: on screen, in the log, and (unless cancelled) in
        what a new session is told."""
        self.display.tool_result(output)
        self.log.write(event="tool", **record, result=output[:LOGGED_RESULT_CHARS])
        if kept:
            history.remember("tool", item_id, f"Earlier, the tool call {shown} returned: "
                                              f"{output[:LOGGED_RESULT_CHARS]}")

    def on_keys(self, chunk: bytes, now: float) -> bytes:
        """A question about a tool takes the next key: y runs it, any other refuses. The rest
        of what was typed goes to the line being edited."""
        if not chunk or self.question is None:
            return chunk
        key, rest = chunk[:1], chunk[1:]
        self.answer(key in (b"y", b"Y"), now)
        return rest[1:] if rest[:1] in (b"\r", b"\n") and key not in (b"\r", b"\n") else rest

    def take_outputs(self) -> list[ToolOutput]:
        outputs, self.outputs = self.outputs, []
        return outputs

    def person_spoke(self) -> None:
        """The person talks over a running tool: its result joins the conversation when it comes,
        but no reply of its own follows (the person's turn gets one)."""
        self.reply_owed = False
        for call in self.running.values():
            call.answer = False

    def cancel_all(self, reason: str) -> None:
        """Enter (or a lost connection): running tools are cancelled and questions withdrawn."""
        for call in [*self.running.values(), *self.questions]:
            call.answer = False
            if call.server is not None and call.request_id is not None:
                call.server.cancel(call.request_id, reason)
            self._finish(call, f"Cancelled: {reason}.", approval=call.approval or "not asked",
                         cancelled=True)
        self.running.clear()
        self.questions.clear()
        self.reply_owed = False

    def busy(self) -> bool:
        return bool(self.running or self.questions)

    # The clock, the servers' state, the status line
    def tick(self, now: float) -> None:
        changed = False
        for server in self.servers:
            server.tick(now)
            for notice in server.notices:
                self.display.warn(notice)
            server.notices.clear()
            if server.changed:
                server.changed, changed = False, True
                self._server_changed(server)
        # The first names are given once every server has started (or failed), in the order the
        # servers were named, so that the same servers always give the same names.
        if changed and not any(server.state == "starting" for server in self.servers):
            declared = list(self.by_name)
            self._name_tools()
            self.changed = self.changed or list(self.by_name) != declared

    def _server_changed(self, server: McpServer) -> None:
        if server.state == "failed":
            self.display.warn(f"MCP server {server.name!r} {server.failure}; going on without "
                              "its tools")
        else:
            names = ", ".join(tool["name"] for tool in server.tools) or "none"
            self.display.info(f"tools from {server.name}: {names}")

    def _name_tools(self) -> None:
        """The model's names for the tools; a name once given stays, even when another server
        goes away."""
        taken = set(self.names.values())
        self.by_name = {}
        for server in self.servers:
            for tool in server.tools if server.state == "ready" else []:
                key = (server.name, tool["name"])
                if key not in self.names:
                    self.names[key] = api_name(tool["name"], taken, server.name)
                self.by_name[self.names[key]] = (server, tool)

    def next_timer(self) -> float | None:
        return min((t for server in self.servers if (t := server.next_timer()) is not None),
                   default=None)

    def status(self, now: float) -> str | None:
        if self.questions:
            return f"run {self.questions[0].name}? press y or n"
        if not self.running:
            return next(iter(self.remote_activity.values()), None)
        oldest = min(self.running.values(), key=lambda call: call.started)
        more = f" and {len(self.running) - 1} more" if len(self.running) > 1 else ""
        return f"running {oldest.name}{more}… {now - oldest.started:.1f} s"

    def watch(self, selector: selectors.BaseSelector) -> None:
        for server in self.servers:
            server.watch(selector)

    def close(self) -> None:
        for server in self.servers:
            server.close()


def remote_tool(label: str, url: str, headers: dict[str, str], approve: str) -> dict[str, Any]:
    """A `type: "mcp"` tool: the API calls the server. Read-only tools run without asking;
    for the others the API sends an `mcp_approval_request`, answered by the same rules."""
    tool: dict[str, Any] = {"type": "mcp", "server_label": label, "server_url": url,
                            "require_approval": "never" if approve == "all"
                            else {"never": {"read_only": True}}}
    return {**tool, "headers": headers} if headers else tool


def tool_output(result: dict[str, Any]) -> str:
    """What the model reads of a tools/call result: the structured content as JSON when there is
    some, else the text; an error says so."""
    structured = result.get("structuredContent")
    parts = [block.get("text", "") if block.get("type") == "text" else f"[{block.get('type')}]"
             for block in result.get("content") or [] if isinstance(block, dict)]
    text = json.dumps(structured, ensure_ascii=False) if structured is not None else "\n".join(parts)
    if result.get("isError"):
        text = f"Error: {text or 'the tool failed'}"
    return text if len(text) <= TOOL_OUTPUT_CHARS else text[:TOOL_OUTPUT_CHARS] + "… (cut)"


# --- Output ---------------------------------------------------------------------------------------

class Spend:
    """What the session has cost: by the token, response by response, or by the minute of
    connection (xAI). Held to --max-cost: a warning at 80 %, and at 100 % the reason to end."""

    def __init__(self, config: Config, display: Display) -> None:
        self.prices, self.per_minute = config.prices, config.provider.per_minute
        self.budget = config.max_cost
        self.display = display
        self.responses = self.input_tokens = self.output_tokens = 0
        self.cost: float | None = 0.0  # None once a response's cost is unknown
        self.warned = False

    def response(self, usage: dict[str, Any], minutes: float) -> float | None:
        """response.done's usage: checked, counted and shown. Returns its cost, for the log (None
        by the minute, or for unknown prices)."""
        figures = checked_usage(usage) if usage else None
        if usage and figures is None:
            self.display.warn("the API sent usage figures that are not token counts; responses "
                              "with such figures are not counted", once="usage")
        cost = response_cost(self.prices, figures) if figures and self.per_minute is None \
            else None
        if figures or self.per_minute is not None:
            self._count(figures, cost, minutes)
        return cost

    def _count(self, usage: dict[str, Any] | None, cost: float | None, minutes: float) -> None:
        """A response: its checked usage (None if it had none) and its cost, shown."""
        self.responses += 1
        if usage is not None:
            self.input_tokens += usage["input_tokens"]
            self.output_tokens += usage["output_tokens"]
        if self.per_minute is None:
            self.cost = None if cost is None or self.cost is None else self.cost + cost
            if usage is not None:
                self.display.usage(usage, cost)
            return
        self.connected(minutes)
        self.display.info(f"  {money(self.cost)} so far · {minutes:.1f} min connected, at "
                          f"${self.per_minute:.2f} a minute")

    def connected(self, minutes: float) -> None:
        """Billed by the minute, the time counts whether anyone talks or not."""
        if self.per_minute is not None:
            self.cost = minutes * self.per_minute

    def over_budget(self, minutes: float) -> str | None:
        """Why the session ends, once the spend reaches --max-cost; a warning at 80 % first."""
        self.connected(minutes)
        budget, spent = self.budget, self.cost
        if budget is None or spent is None:
            return None
        if spent >= budget:
            return f"stopped: this session has cost ${spent:.4f}, reaching --max-cost ${budget:.4f}"
        if spent >= 0.8 * budget and not self.warned:
            self.warned = True
            self.display.warn(f"{spent / budget:.0%} of --max-cost ${budget:.4f} used "
                              f"(${spent:.4f}); the session ends when it is reached")
        return None

    def status(self) -> str:
        return f"{money(self.cost)} so far" + (
            f" of ${self.budget:.2f}" if self.budget is not None else "")


def response_cost(prices: Prices | None, usage: dict[str, Any]) -> float | None:
    """USD for one response, from its checked usage (see checked_usage). Audio and cached
    tokens are subsets of the input/output totals."""
    if prices is None:
        return None
    audio_in, audio_cached, audio_out, text_in, text_cached, text_out, image_in = prices
    details = usage.get("input_token_details") or {}
    cached = details.get("cached_tokens_details") or {}
    cached_text = cached.get("text_tokens", details.get("cached_tokens", 0) if not cached else 0)
    cached_audio = cached.get("audio_tokens", 0)
    out = usage.get("output_token_details") or {}
    tokens_and_prices = [
        (details.get("text_tokens", 0) - cached_text, text_in), (cached_text, text_cached),
        (details.get("audio_tokens", 0) - cached_audio, audio_in), (cached_audio, audio_cached),
        (details.get("image_tokens", 0), image_in),
        (out.get("text_tokens", 0), text_out), (out.get("audio_tokens", 0), audio_out)]
    return float(sum(max(int(n), 0) * price for n, price in tokens_and_prices)) / 1_000_000


# What a server's text may not bring to the terminal: control characters but tab and newline (C0,
# DEL, C1: ESC starts sequences that clear the screen, set the title or make the terminal type a
# reply into our stdin), bidi embeddings, overrides and isolates (text that reads other than it
# is), and surrogates (in a str from JSON only unpaired ones, which no terminal encoding carries).
UNSAFE_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
SHOWN_CHARS = 50_000  # of one reply's words: a spoken reply of an hour is shorter
LIVE_CHARS = 2_000  # of a reply still streaming, the live lines show its end
REDRAW_EVERY = 0.05  # s: the live lines are redrawn at most this often (what is typed: at once)


class Words:
    """The assistant's words so far, per item (the conversation's record, the screen's streaming
    line). Deltas are kept in pieces and joined when read: a flood of deltas must not copy all
    the words each time. An item keeps at most SHOWN_CHARS."""

    def __init__(self) -> None:
        self.pieces: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, item_id: str, delta: str) -> None:
        size = self.sizes.get(item_id, 0)
        if size < SHOWN_CHARS:
            self.pieces.setdefault(item_id, []).append(delta[:SHOWN_CHARS - size])
            self.sizes[item_id] = size + len(delta)

    def set(self, item_id: str, text: str) -> None:
        self.pieces[item_id], self.sizes[item_id] = [text[:SHOWN_CHARS]], len(text)

    def get(self, item_id: str) -> str:
        pieces = self.pieces.get(item_id) or [""]
        if len(pieces) > 1:
            pieces[:] = ["".join(pieces)]
        return pieces[0]

    def keep(self, item_ids: Any) -> None:
        self.pieces = {key: value for key, value in self.pieces.items() if key in item_ids}
        self.sizes = {key: self.sizes[key] for key in self.pieces}


class Display:
    """Everything the person reads. Into a pipe or file: one finished line per turn. On a
    terminal, the bottom lines are live: the assistant's words as they stream, a status line and
    the line being typed; everything else prints above them. The live part is redrawn from the
    loop (rich's auto-refresh would start a thread). Every text passes `clean()` on its way."""

    def __init__(self, secret: str) -> None:
        self.out = Console(highlight=False, soft_wrap=True)
        self.live = Live(console=self.out, auto_refresh=False, transient=True,
                         redirect_stdout=False, redirect_stderr=False) \
            if self.out.is_terminal else None
        self.err = self.out if self.live else Console(stderr=True, highlight=False, soft_wrap=True)
        self.secret = secret
        self.open_line: str | None = None  # item id whose words are streaming
        self.partial = Words()  # its words so far, as shown
        self.status = ""
        self.typing = ""
        self.shown: tuple[str | None, int, str, str] | None = None
        self.drawn_at = 0.0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.escape = 0  # inside a terminal escape sequence (arrow keys …): 1 after ESC, 2 in CSI
        self.warned: set[str] = set()

    def start(self) -> None:
        if self.live:
            self.live.start()

    def stop(self) -> None:
        self.end_line()
        if self.live:
            self.live.stop()

    def refresh(self, status: str, now: float) -> None:
        """Redraw the live lines if anything in them changed: at once for what is typed, at
        most every REDRAW_EVERY for the rest (a flood of deltas must not redraw per delta)."""
        self.status = self.clean(status)
        state = self._state()
        if not self.live or self.shown == state or (
                self.shown is not None and self.shown[3] == self.typing
                and now < self.drawn_at + REDRAW_EVERY):
            return
        self.shown, self.drawn_at = state, now
        lines = [Text.assemble(("assistant: ", "bold green"), self._words()[-LIVE_CHARS:])] \
            if self.open_line else []
        lines += [Text(f"● {self.status}", style="dim"), Text.assemble(("› ", "bold"), self.typing)]
        self.live.update(Group(*lines), refresh=True)

    def next_redraw(self) -> float | None:
        """When a change held back by refresh() is due."""
        return self.drawn_at + REDRAW_EVERY if self.live and self.shown != self._state() else None

    def _state(self) -> tuple[str | None, int, str, str]:
        """What the live lines show: a change of any of it is a redraw."""
        return (self.open_line, self.partial.sizes.get(self.open_line or "", 0), self.status,
                self.typing)

    def typed(self, data: bytes) -> list[str]:
        """Lines finished with Enter. On a terminal in cbreak mode we edit the line ourselves
        (the terminal would echo it into the middle of our output); from a pipe, lines pass."""
        lines = []
        for char in self.decoder.decode(data):
            if self.escape:
                self.escape = 2 if self.escape == 1 and char in "[O" else \
                    (0 if self.escape == 1 or "@" <= char <= "~" else 2)
            elif char in "\r\n":
                lines.append(self.typing)
                self.typing = ""
            elif char in "\x7f\x08":
                self.typing = self.typing[:-1]
            elif char == "\x15":  # Ctrl-U
                self.typing = ""
            elif char == "\x1b":
                self.escape = 1
            elif char.isprintable():
                self.typing += char
        return lines

    def _words(self) -> str:
        return self.partial.get(self.open_line or "")

    def end_line(self) -> None:
        if self.open_line is not None:
            self.out.print(Text.assemble(("assistant: ", "bold green"), self._words()))
            self.open_line, self.partial = None, Words()

    def clean(self, text: Any) -> str:
        """Text as the terminal may show it (see UNSAFE_CHARS), without the API key."""
        shown = UNSAFE_CHARS.sub("", text if isinstance(text, str) else str(text))
        return shown.replace(self.secret, "sk-…") if self.secret else shown

    # Lines print above the live ones, so a reply still streaming is not cut in two.
    def info(self, text: str) -> None:
        self.out.print(Text(self.clean(text), style="dim"))

    def warn(self, text: str, once: str | None = None) -> None:
        if once in self.warned or (once and len(self.warned) >= 100):  # a server's made-up kinds
            return
        if once:
            self.warned.add(once)
        self.err.print(Text("warning: " + self.clean(text), style="yellow"))

    def fatal(self, text: str) -> None:
        self.stop()
        self.err.print(Text("error: " + self.clean(text), style="bold red"))

    def connected(self, config: Config) -> None:
        """The first session is ready: what to do now."""
        how = ("press Enter to end your turn" if config.turn_detection == "none"
               else "type a line to send text, Enter alone to interrupt")
        duplex = "echo guard on" if config.duplex == "auto" else f"{config.duplex} duplex"
        self.info(f"connected: {config.model}, voice {config.voice}, {duplex} — speak now; "
                  f"{how}; Ctrl-C quits")

    def user(self, text: str) -> None:
        self.out.print(Text.assemble(("you: ", "bold cyan"), self.clean(text).strip()))

    def assistant_delta(self, item_id: str, delta: str) -> None:
        if not self.live:
            return
        if self.open_line != item_id:
            self.end_line()
            self.open_line = item_id
        self.partial.add(item_id, self.clean(delta))

    def assistant_done(self, item_id: str, transcript: str) -> None:
        if self.open_line == item_id:
            if transcript:
                self.partial.set(item_id, self.clean(transcript[:SHOWN_CHARS]))
            self.end_line()
        elif transcript and not self.live:
            self.out.print(Text.assemble(("assistant: ", "bold green"),
                                         self.clean(transcript[:SHOWN_CHARS])))

    def interrupted(self, transcript: str, heard: float) -> None:
        """Show which words were heard; the rest, never heard, is struck through."""
        self.open_line, self.partial = None, Words()
        transcript = self.clean(transcript[:SHOWN_CHARS])
        cut = round(len(transcript) * heard)
        self.out.print(Text.assemble(("  interrupted, heard: ", "yellow"), transcript[:cut],
                                     (transcript[cut:], "dim strike")))

    def tool_call(self, shown: str) -> None:
        self.end_line()
        self.out.print(Text.assemble(("tool: ", "bold magenta"), self.clean(shown)))

    def tool_result(self, output: str) -> None:
        first = (output.strip().splitlines() or [""])[0]
        self.info(f"  → {first[:117] + '…' if len(first) > 120 else first}")

    def ask(self, question: str) -> None:
        self.end_line()
        self.out.print(Text(self.clean(question), style="bold yellow"))

    def usage(self, usage: dict[str, Any], cost: float | None) -> None:
        """A response's checked usage (see checked_usage) and its cost."""
        inp, out = usage["input_token_details"], usage["output_token_details"]
        self.info(f"  tokens in {usage['input_tokens']} (text {inp['text_tokens']}, "
                  f"audio {inp['audio_tokens']}, cached {inp['cached_tokens']}) · "
                  f"out {usage['output_tokens']} (text {out['text_tokens']}, "
                  f"audio {out['audio_tokens']}) · {money(cost)}")

    def totals(self, total: Spend) -> None:
        self.end_line()
        self.info(f"session: {total.responses} responses · {total.input_tokens} tokens in · "
                  f"{total.output_tokens} out · {money(total.cost)}")


def money(cost: float | None) -> str:
    return "cost unknown for this model" if cost is None else f"${cost:.4f}"


# --- The audio check and the device list: no API key needed ---------------------------------------

def check_audio(plumbing: Plumbing, display: Display) -> int:
    """Record 3 s with a level meter, play it back, then play a tone and listen for it. Uses the
    article's exact sox commands, so what works here works in a conversation."""
    exact = dataclasses.replace(PLUMBING["article"], input_device=plumbing.input_device,
                                output_device=plumbing.output_device)
    display.info("recording 3 seconds: say something…")
    recording = record(exact, 3.0, display)
    level = loudest_second(recording)
    if level < -60:  # Apple Silicon microphones can take seconds to wake: give it 3 s more
        display.info("only silence so far; still listening for 3 seconds…")
        recording = record(exact, 3.0, display)
        level = loudest_second(recording)
    if level < -60:
        raise Fatal(f"the microphone recorded silence ({level:.0f} dBFS). On macOS: System Settings → "
                    "Privacy & Security → Microphone → allow your terminal app, then restart it. "
                    "Elsewhere: check the input device and its volume (--input-device)", Exit.AUDIO)
    display.info(f"microphone level {level:.0f} dBFS: {'good' if level > -45 else 'quiet'}; "
                 "playing it back…")
    play(exact, recording)
    display.info("playing a test tone and listening for it…")
    echo = measure_echo(exact)
    if echo is None:
        display.info("the microphone did not hear the speakers: the echo guard (--duplex auto) "
                     "will send everything as it is, as full duplex does")
        return Exit.OK
    gain_db, delay_ms = echo
    heard = f"your speakers reach the microphone at {round(gain_db)} dB after {delay_ms:.0f} ms"
    if gain_db > -6:
        display.warn(f"{heard}, about as loud as your voice: the echo guard will hold the "
                     "assistant's voice back, but it can hardly hear you over it; use headphones "
                     "to interrupt by voice")
    else:
        display.info(f"{heard}: the echo guard will hold it back; you can still interrupt by "
                     "speaking up")
    return Exit.OK


TEST_TONE_AMPLITUDE = 8000


def measure_echo(exact: Plumbing) -> tuple[float, float] | None:
    """The speaker-to-microphone path as (gain dB, delay ms) from a 1 kHz tone, or None when the
    microphone does not hear it. The delay is timed by the recorder's sample clock, from the moment
    the player is started: the sound card's latencies are part of it, as they are in a talk."""
    tone = b"".join(struct.pack("<h", int(TEST_TONE_AMPLITUDE * math.sin(
        2 * math.pi * 1000 * n / SAMPLE_RATE))) for n in range(SAMPLE_RATE))
    recorder = start_recorder(exact)
    clock = SampleClock()
    try:
        before = read_for(recorder, 0.5, None, clock)
        offset, started = clock.received, time.monotonic()
        play(exact, tone)  # meanwhile the recorder's pipe keeps what it hears
        during = read_for(recorder, 1.2, None, clock)
    finally:
        recorder.kill(signal.SIGTERM)
    bin_bytes = int(ECHO_BIN * BYTES_PER_SECOND)
    room = max(sorted(frame_power(before[start:start + bin_bytes]) for start in range(
        0, len(before), bin_bytes))[len(before) // bin_bytes // 2], 1e-10)  # the echo of what
    # played a moment ago may still be fading: the median 10 ms is the room's own sound
    onset = next((start for start in range(0, len(during) - bin_bytes, bin_bytes)
                  if frame_power(during[start:start + bin_bytes]) > 100 * room), None)
    if onset is None:
        return None
    sounding = during[onset + bin_bytes:onset + SAMPLE_RATE]  # its first 10 ms may be partial
    level = decibels(tone_level(sounding))
    if level < -60 or level < decibels(tone_level(before)) + 10:
        return None
    delay_ms = (clock.time_of(offset + onset) - started) * 1000
    return level - decibels(TEST_TONE_AMPLITUDE / 32768), max(delay_ms, 0.0)


def record(plumbing: Plumbing, seconds: float, display: Display | None) -> bytes:
    recorder = start_recorder(plumbing)
    try:
        return read_for(recorder, seconds, display)
    finally:
        recorder.kill(signal.SIGTERM)


def read_for(recorder: Sox, seconds: float, display: Display | None,
             clock: SampleClock | None = None) -> bytes:
    """Read the recorder for `seconds` of audio, with a level meter on a terminal; the sample
    clock, if given, is told of every piece."""
    assert recorder.process.stdout is not None
    audio = bytearray()
    deadline = time.monotonic() + seconds + 5
    with selectors.DefaultSelector() as selector:
        selector.register(recorder.process.stdout, selectors.EVENT_READ)
        selector.register(recorder.process.stderr, selectors.EVENT_READ)  # type: ignore[arg-type]
        while len(audio) < seconds * BYTES_PER_SECOND and time.monotonic() < deadline:
            ready = [key.fileobj for key, _ in selector.select(0.5)]
            if recorder.process.stderr in ready and not recorder.read_stderr():
                selector.unregister(recorder.process.stderr)
            if recorder.process.stdout not in ready:
                continue
            chunk = read_available(recorder.process.stdout.fileno())
            if chunk == b"":
                raise Fatal(recorder.failure(), Exit.AUDIO)
            audio += chunk or b""
            if clock is not None and chunk:
                clock.arrived(len(chunk), time.monotonic())
            if display and display.out.is_terminal:
                level = decibels(audio_level(bytes(audio[-4800:])))
                bar = "█" * max(0, int((level + 60) / 2))
                display.out.print(Text(f"  level {bar:<30} {level:4.0f} dBFS"), end="\r")
    if display and display.out.is_terminal:
        display.out.print()
    return bytes(audio[:int(seconds * BYTES_PER_SECOND)])


def play(plumbing: Plumbing, audio: bytes) -> None:
    """Play it all and wait for the end, reading sox's stderr meanwhile (a full stderr pipe
    would stop sox)."""
    player = start_player(plumbing)
    stdin, stderr = player.process.stdin, player.process.stderr
    assert stdin is not None and stderr is not None
    left = memoryview(audio)
    deadline = time.monotonic() + len(audio) / BYTES_PER_SECOND + 5
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_WRITE)
        selector.register(stderr, selectors.EVENT_READ)
        while player.process.poll() is None and time.monotonic() < deadline:
            for key, _ in selector.select(0.1):
                if key.fileobj is stderr and not player.read_stderr():
                    selector.unregister(stderr)
                elif key.fileobj is stdin:
                    try:
                        left = left[os.write(stdin.fileno(), left):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        left = left[:0]
                    if not left:  # all written: EOF lets sox play its last block and exit
                        selector.unregister(stdin)
                        stdin.close()
    player.read_stderr_to_end()
    failed = player.process.returncode or player.failed
    failure = player.failure()
    player.kill()
    if failed:
        raise Fatal(failure, Exit.AUDIO)


def audio_level(pcm: bytes) -> float:
    """RMS of 16-bit PCM, 0..1."""
    return math.sqrt(frame_power(pcm))


def tone_level(pcm: bytes, frequency: float = 1000) -> float:
    """Amplitude of one frequency (Goertzel), 0..1."""
    samples = memoryview(pcm[:len(pcm) // 2 * 2]).cast("h")
    coefficient = 2 * math.cos(2 * math.pi * frequency / SAMPLE_RATE)
    previous = before = 0.0
    for sample in samples:
        previous, before = sample + coefficient * previous - before, previous
    power = previous * previous + before * before - coefficient * previous * before
    return 2 * math.sqrt(max(power, 0)) / max(len(samples), 1) / 32768


def loudest_second(pcm: bytes) -> float:
    """dBFS of the loudest second. Without the permission, CoreAudio gives zeros plus sox's ±1
    dither (about -90 dBFS): still silence to this."""
    return decibels(max(audio_level(pcm[start:start + BYTES_PER_SECOND])
                        for start in range(0, max(len(pcm), 1), BYTES_PER_SECOND // 2)))


def decibels(level: float) -> float:
    return 20 * math.log10(max(level, 1e-9))


def list_devices(display: Display) -> int:
    """The names --input-device and --output-device take: PulseAudio's sources and sinks on
    Linux; on macOS the CoreAudio devices sox itself finds (it lists them at -V3 while looking
    for one that does not exist), matched byte for byte and by prefix (AirPods have a curly ’)."""
    if sys.platform == "darwin":
        found = run_quietly(["sox", "-V3", "-n", "-t", "coreaudio", "no such device"])
        names = re.findall(r'Found Audio Device "(.*)"', found)
        display.out.print("\n".join(dict.fromkeys(names)) or "sox found no CoreAudio device")
        return Exit.OK if names else Exit.AUDIO
    if shutil.which("pactl") is None:
        raise Fatal("pactl is missing: install pulseaudio-utils (or pipewire-pulse) to list devices",
                    Exit.AUDIO)
    for title, kind, flag in (("microphones", "sources", "--input-device"),
                              ("speakers", "sinks", "--output-device")):
        listing = run_quietly(["pactl", "list", "short", kind])
        names = [line.split("\t")[1] for line in listing.splitlines() if "\t" in line]
        display.out.print(f"{title} ({kind}), for {flag}:")
        display.out.print("\n".join(f"  {name}" for name in names) or "  (none)")
    return Exit.OK


def run_quietly(command: list[str]) -> str:
    """A short command's output, stdout and stderr together (no loop is running yet)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10,
                              env=sox_environment())
    except (OSError, subprocess.TimeoutExpired) as error:
        raise Fatal(f"{command[0]} failed: {error}", Exit.AUDIO) from None
    return done.stdout + done.stderr


# --- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    display = Display(secret="")
    for sig in EXIT_SIGNALS:  # until the loop takes over
        signal.signal(sig, stop_starting_up)
    try:
        env_file = Path.cwd() / ".env"
        load_dotenv(env_file, override=False)  # a variable already set wins over the file
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if shutil.which("sox") is None:
            raise Fatal("sox is not installed: " + sox_install_hint(), Exit.NO_SOX)
        for name in SOX_OVERRIDES:
            if os.environ.get(name):
                display.warn(f"ignoring {name}={os.environ[name]!r} from your environment: it would "
                             "change the sox commands (use --input-device and --output-device)")
        if args.list_devices:
            return list_devices(display)
        if args.check_audio:
            return check_audio(plumbing_for(args), display)
        config = load_config(args, env_file)
        display.secret = config.api_key
        run(config, display)
    except Fatal as failure:
        display.fatal(str(failure))
        return failure.code
    except Stop as stop:
        if str(stop):
            display.info(str(stop))
    except KeyboardInterrupt:
        pass
    except Exception as error:  # a bug: sox is already stopped (run's finally); say so in one line
        if os.environ.get("REALTIME_DEBUG"):
            raise
        display.fatal(f"internal error ({type(error).__name__}: {error}); please report it, "
                      "with the traceback from REALTIME_DEBUG=1")
        return Exit.BUG
    finally:
        ignore_exit_signals()
    return Exit.OK


def sox_install_hint() -> str:
    if sys.platform == "darwin":
        return "brew install sox"
    return "sudo apt-get install sox libsox-fmt-pulse (or your distribution's sox package)"


if __name__ == "__main__":
    sys.exit(main())
