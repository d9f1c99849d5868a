"""
The CLI entry point with a reader that goes away (``qreset ... | head -1``):
no traceback, the command runs to its end and exits with its own status.
Real subprocesses, real pipes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "configs" / "sim" / "demo.toml")

COMMANDS = {
    "reset": ["reset", "--sim", DEMO, "--time-scale", "0.01", "0000:03:00.0"],
    "reset-json": ["reset", "--sim", DEMO, "--time-scale", "0.01", "0000:03:00.0", "--json"],
    "plan": ["plan", "--sim", DEMO, "0000:03:00.0", "0000:06:01.0"],
    "release": ["release", "--sim", DEMO, "--time-scale", "0.01", "0000:01:00.0"],
    "topology": ["topology", "--sim", DEMO],
    "help": ["--help"],
}


def _run_into_closed_pipe(argv: list[str]) -> tuple[int, str]:
    """Run ``qreset ARGV`` with stdout a pipe whose reader is already gone: every write fails."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "qreset", *argv], stdout=w, stderr=subprocess.PIPE,
                              cwd=ROOT, timeout=60, check=False)
    finally:
        os.close(w)
    return proc.returncode, proc.stderr.decode()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_closed_stdout_is_no_traceback_and_keeps_the_status(name: str) -> None:
    argv = COMMANDS[name]
    normal = subprocess.run([sys.executable, "-m", "qreset", *argv], capture_output=True, cwd=ROOT,
                            timeout=60, check=False)
    rc, err = _run_into_closed_pipe(argv)
    assert err == ""
    # reset/release return 0 only once the reset came back clean: it ran to its end
    # although nothing could be printed.
    assert rc == normal.returncode


@pytest.mark.parametrize("name", ["reset", "plan", "release"])
def test_piped_into_head(name: str) -> None:
    argv = " ".join(COMMANDS[name])
    script = f'"{sys.executable}" -m qreset {argv} | head -1; echo "status=${{PIPESTATUS[0]}}"'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, cwd=ROOT, timeout=60, check=False)
    out = proc.stdout.decode().splitlines()
    assert proc.stderr.decode() == ""
    assert len(out) == 2
    assert out[1] == "status=0"
