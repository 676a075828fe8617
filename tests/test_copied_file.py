"""People copy realtime_sox.py on its own: its inline metadata (PEP 723) is all `uv run` needs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SCRIPT

UV_CACHE = ROOT / ".venv" / "uv-cache"  # filled by `make test` (see the Makefile)


def inline_dependencies() -> list[str]:
    block = re.search(r"^# /// script\n(.*?)^# ///$", SCRIPT.read_text(), re.S | re.M)
    assert block, "realtime_sox.py has no `# /// script` block"
    return re.findall(r'^#\s+"([^"]+)",?$', block.group(1), re.M)


def test_the_inline_dependencies_are_requirements_txt():
    pinned = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert sorted(inline_dependencies()) == sorted(pinned)
    assert 'requires-python = ">=3.10"' in SCRIPT.read_text()


def test_a_copied_file_runs_with_uv_run_alone(tmp_path):
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (pip install uv)")
    if not UV_CACHE.is_dir():
        pytest.skip("uv's cache lacks the script's packages: `make test` fetches them once")
    copy = tmp_path / "realtime_sox.py"
    shutil.copy(SCRIPT, copy)
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "UV_CACHE_DIR": str(UV_CACHE)}
    result = subprocess.run(
        [uv, "run", "--offline", "--no-config", "--python", sys._base_executable,  # type: ignore[attr-defined]
         str(copy), "--help"],
        cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: realtime_sox.py")
    assert "--connect-timeout" in result.stdout
