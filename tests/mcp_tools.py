"""A real MCP server for the tests, built with the official `mcp` package.

    python mcp_tools.py MODE DIR       MODE: normal, crash-at-start, silent or noisy

normal: lookup_word (read-only, quick), slow_lookup (read-only, sleeps MCP_SLOW seconds),
delete_note (changes things: writes DIR/deleted-NAME), broken (read-only, raises), and
crash (read-only, the process dies). Every call is appended to DIR/calls, and the server's
environment to DIR/environ-PID.json. DIR is on the command line, so that a test can find
its servers among the machine's processes.
crash-at-start: says why on stderr and exits 3. silent: reads its input and never answers.
noisy: writes a line that is not JSON-RPC before its first answer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

MODE, DIR = sys.argv[1], Path(sys.argv[2])


def note(line: str) -> None:
    with open(DIR / "calls", "a") as calls:
        calls.write(line + "\n")


if MODE == "crash-at-start":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("sqlite3.OperationalError: unable to open database file", file=sys.stderr)
    sys.exit(3)
if MODE == "silent":
    for _ in sys.stdin:
        pass
    sys.exit(0)

from mcp.server.mcpserver import MCPServer  # noqa: E402
from mcp.types import ToolAnnotations  # noqa: E402

(DIR / f"environ-{os.getpid()}.json").write_text(json.dumps(dict(os.environ)))
app = MCPServer("test-tools")
READ_ONLY = ToolAnnotations(readOnlyHint=True)


@app.tool(annotations=READ_ONLY)
def lookup_word(word: str) -> str:
    """Look a word up in the dictionary."""
    note(f"lookup_word {word}")
    return f"{word}: a tower with a bright light that guides ships"


@app.tool(annotations=READ_ONLY)
def slow_lookup(word: str) -> str:
    """Look a word up in the big, slow dictionary."""
    note(f"slow_lookup {word} started")
    time.sleep(float(os.environ.get("MCP_SLOW", "3")))
    note(f"slow_lookup {word} finished")
    return f"{word}: found in the big dictionary"


@app.tool()
def delete_note(name: str) -> str:
    """Delete one of the person's notes."""
    note(f"delete_note {name}")
    (DIR / f"deleted-{name}").write_text("deleted")
    return f"deleted the note {name}"


@app.tool(annotations=READ_ONLY)
def broken(word: str) -> str:
    """Look a word up in a dictionary that is closed."""
    raise ValueError("the dictionary is closed today")


@app.tool(annotations=READ_ONLY)
def crash() -> str:
    """Crash the server."""
    print("fatal: out of dictionary pages", file=sys.stderr, flush=True)
    os._exit(1)


if __name__ == "__main__":
    if MODE == "noisy":  # a library that prints to stdout, as some do
        os.write(1, b"hello from a chatty library\n")
    app.run()
