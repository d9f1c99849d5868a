"""docs/qreset.1 (named by configs/qreset.service) is generated from the argparse definitions and current."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from qreset.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "qreset.1"


def test_the_man_page_is_up_to_date() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_manpage.py"), "--check"],
                         capture_output=True, text=True, check=False, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_the_man_page_has_every_command_and_option() -> None:
    page = PAGE.read_text()
    for name in COMMANDS:
        assert f".SH QRESET {name.upper()}" in page, name
    # A few options of different commands, as roff writes them.
    for option in ("\\-\\-sim", "\\-\\-bus\\-method", "\\-\\-config", "\\-\\-run\\-dir"):
        assert option in page, option


def test_the_unit_file_names_this_page() -> None:
    assert "Documentation=man:qreset(1)" in (ROOT / "configs" / "qreset.service").read_text()
    assert page_title() == "QRESET 1"


def page_title() -> str:
    th = next(line for line in PAGE.read_text().splitlines() if line.startswith(".TH "))
    return " ".join(th.split()[1:3])


def test_the_man_page_renders_without_warnings() -> None:
    groff = shutil.which("groff")
    if groff is None:  # man-db brings groff-base on Debian; without it the text checks above stand
        return
    run = subprocess.run([groff, "-man", "-ww", "-z", str(PAGE)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr
