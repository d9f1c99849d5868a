"""
Bad daemon configurations, as an operator (or an attacker with write access to
/etc) could write them. Every one must end the same way: exit 2, ONE line on
stderr naming the file and the key, and nothing created (no journal, no socket,
no directory), because a daemon that half-starts on a wrong file is worse than
one that does not start.

A representative subset runs the real CLI (``python -m qreset run --config``)
in a subprocess; the rest call the same validation in-process
(:func:`qreset.preflight.validate`), which is what the CLI calls before the
daemon touches anything.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qreset.errors import ConfigError
from qreset.pci.sim import SimHost
from qreset.preflight import validate
from tests.conftest import ROOT, SIM_DIR
from tests.qemu_helpers import short_tmpdir

DEMO = SIM_DIR / "demo.toml"
#: Keeps everything the daemon would create inside the test's directory.
DAEMON = 'journal = "state/journal.jsonl"\ncontrol_socket = "run/ctl.sock"\n'
SIM = f'topology = "{DEMO}"\ntime_scale = 0.01\n'
#: Longer than sun_path allows (108 bytes with the NUL, unix(7)), whatever the directory.
LONG = "s" * 110 + ".sock"


def conf(body: str = "", *, daemon: str = DAEMON, sim: str | None = SIM) -> str:
    return "[daemon]\n" + daemon + ("" if sim is None else "[sim]\n" + sim) + body


def vm(name: str = "a", qmp: str = "a.qmp", extra: str = "") -> str:
    return f'[[vm]]\nname = "{name}"\nqmp = "{qmp}"\n' + extra


def dev(bdf: str) -> str:
    return f'[[vm.device]]\nhost = "{bdf}"\n'


def _mkdir(rel: str) -> Callable[[Path], None]:
    return lambda wd: (wd / rel).mkdir(parents=True)


def _touch(rel: str) -> Callable[[Path], None]:
    def make(wd: Path) -> None:
        (wd / rel).parent.mkdir(parents=True, exist_ok=True)
        (wd / rel).write_text("x")
    return make


def _sysfs(wd: Path) -> None:
    host = SimHost.from_toml(DEMO)
    host.write_tree(wd / "sys")
    asyncio.run(host.close())


def _symlink(wd: Path) -> None:
    (wd / "real").mkdir()
    (wd / "link").symlink_to("real")


def _fifo(rel: str = "qreset.toml") -> Callable[[Path], None]:
    return lambda wd: os.mkfifo(wd / rel)


@dataclass(frozen=True)
class Bad:
    id: str
    text: str | bytes | None  # None: setup makes qreset.toml itself
    key: str                  # "" for a problem with the whole file
    why: str
    setup: Callable[[Path], None] | None = None
    sim: str | None = None    # qreset run --sim VALUE
    cli: bool = False         # also run through the real CLI

    def contents(self, wd: Path) -> bytes | None:
        if self.text is None:
            return None
        raw = self.text if isinstance(self.text, bytes) else self.text.encode()
        return raw.replace(b"@TMP@", os.fsencode(wd))


BAD = [
    # --- the file as a whole ---------------------------------------------------------
    Bad("nested-brackets", "x = " + "[" * 2048, "", "nested too deeply", cli=True),
    Bad("nested-inline-tables", "x = " + "{a = " * 1000, "", "nested too deeply"),
    Bad("not-toml", "[policy\nmode = 1\n", "", "not valid TOML"),
    Bad("duplicate-key", "[policy]\nmode = 'park'\nmode = 'park'\n", "", "not valid TOML"),
    Bad("nul-byte", b"[policy]\nmode = 'park'\x00\n", "", "not valid TOML"),
    Bad("not-utf8", b"\xff\xfe[policy]\n", "", "not UTF-8", cli=True),
    Bad("huge-file", conf() + "# " + "x" * (2 << 20) + "\n", "", "too large", cli=True),
    Bad("config-is-fifo", None, "", "not a regular file", setup=_fifo(), cli=True),
    Bad("config-is-directory", None, "", "not a regular file", setup=_mkdir("qreset.toml")),
    Bad("config-missing", None, "", "cannot read"),
    # --- top level -------------------------------------------------------------------
    Bad("unknown-table", conf("[deamon]\njournal = 'j'\n"), "deamon", "unknown key"),
    Bad("source-key", "source = 'x'\n" + conf(), "source", "unknown key"),
    Bad("vm-not-array", "vm = 'x'\n", "vm", "valid tuple"),
    Bad("daemon-not-table", "daemon = 3\n", "daemon", "got 3"),
    Bad("newline-in-key", conf('[policy]\n"a\\nb" = 1\n'), "policy.'a\\nb'", "unknown key"),
    Bad("long-key", conf("[policy]\n" + "k" * 100_000 + " = 1\n"), "policy.'" + "k" * 56 + "...",
        "unknown key", cli=True),
    # --- [daemon] --------------------------------------------------------------------
    Bad("control-socket-too-long", conf(daemon=f'journal = "j"\ncontrol_socket = "{LONG}"\n'),
        "daemon.control_socket", "longer than 107 bytes", cli=True),
    Bad("control-socket-directory", conf(daemon='journal = "j"\ncontrol_socket = "d"\n'),
        "daemon.control_socket", "is a directory", setup=_mkdir("d"), cli=True),
    Bad("control-socket-regular-file", conf(daemon='journal = "j"\ncontrol_socket = "f"\n'),
        "daemon.control_socket", "exists and is not a socket", setup=_touch("f")),
    Bad("control-socket-fifo", conf(daemon='journal = "j"\ncontrol_socket = "c"\n'),
        "daemon.control_socket", "not a socket (it is a FIFO)", setup=_fifo("c")),
    Bad("control-socket-parent-file", conf(daemon='journal = "j"\ncontrol_socket = "f/c.sock"\n'),
        "daemon.control_socket", "is not a directory", setup=_touch("f")),
    Bad("control-socket-int", conf(daemon='journal = "j"\ncontrol_socket = 5\n'),
        "daemon.control_socket", "got 5"),
    Bad("journal-directory", conf(daemon='journal = "state"\ncontrol_socket = ""\n'),
        "daemon.journal", "is a directory", setup=_mkdir("state"), cli=True),
    Bad("journal-fifo", conf(daemon='journal = "j"\ncontrol_socket = ""\n'),
        "daemon.journal", "not a regular file (it is a FIFO)", setup=_fifo("j"), cli=True),
    Bad("journal-empty", conf(daemon='journal = ""\ncontrol_socket = ""\n'),
        "daemon.journal", "empty path"),
    Bad("journal-nul", conf(daemon='journal = "a\\u0000b"\ncontrol_socket = ""\n'),
        "daemon.journal", "NUL"),
    Bad("journal-parent-file", conf(daemon='journal = "f/j.jsonl"\ncontrol_socket = ""\n'),
        "daemon.journal", "is not a directory", setup=_touch("f")),
    Bad("journal-bool", conf(daemon='journal = true\ncontrol_socket = ""\n'),
        "daemon.journal", "got True"),
    Bad("journal-is-control-socket",
        conf(daemon='journal = "x.sock"\ncontrol_socket = "@TMP@/x.sock"\n'),
        "daemon.control_socket", "also daemon.journal"),
    Bad("daemon-unknown-key", conf(daemon=DAEMON + 'jurnal = "j"\n'), "daemon.jurnal", "unknown key"),
    Bad("sysfs-root-missing", conf(daemon=DAEMON + 'sysfs_root = "nosys"\n', sim=None),
        "daemon.sysfs_root", "no such directory", cli=True),
    Bad("sysfs-root-missing-with-sim", conf(daemon=DAEMON + 'sysfs_root = "nosys"\n'),
        "daemon.sysfs_root", "no such directory"),
    Bad("sysfs-root-file", conf(daemon=DAEMON + 'sysfs_root = "f"\n', sim=None),
        "daemon.sysfs_root", "not a directory", setup=_touch("f")),
    Bad("sysfs-root-not-sysfs", conf(daemon=DAEMON + 'sysfs_root = "d"\n', sim=None),
        "daemon.sysfs_root", "no bus/pci/devices", setup=_mkdir("d")),
    Bad("sysfs-device-absent",
        conf(vm(extra=dev("0000:09:00.0")), daemon=DAEMON + 'sysfs_root = "sys"\n', sim=None),
        "vm.a.device[0].host", "no such PCI function on sysfs:", setup=_sysfs, cli=True),
    Bad("sysfs-device-bridge",
        conf(vm(extra=dev("0000:00:03.0")), daemon=DAEMON + 'sysfs_root = "sys"\n', sim=None),
        "vm.a.device[0].host", "is a PCI bridge", setup=_sysfs),
    Bad("sysfs-allow-absent",
        conf("[policy]\nallow = ['0000:09:00.0']\n", daemon=DAEMON + 'sysfs_root = "sys"\n', sim=None),
        "policy.allow[0]", "no such PCI function on sysfs:", setup=_sysfs),
    # --- [sim] -----------------------------------------------------------------------
    Bad("sim-topology-missing", conf(sim='topology = "nope.toml"\n'),
        "sim.topology", "cannot read", cli=True),
    Bad("sim-topology-directory", conf(sim='topology = "d"\n'),
        "sim.topology", "not a regular file", setup=_mkdir("d")),
    Bad("sim-topology-fifo", conf(sim='topology = "t.toml"\n'),
        "sim.topology", "not a regular file", setup=_fifo("t.toml"), cli=True),
    Bad("sim-topology-invalid", conf(sim='topology = "t.toml"\n'),
        "sim.topology", "t.toml", setup=_touch("t.toml")),
    Bad("sim-topology-key-missing", conf(sim="time_scale = 0.1\n"), "sim.topology", "required key"),
    Bad("sim-time-scale-zero", conf(sim=f'topology = "{DEMO}"\ntime_scale = 0\n'),
        "sim.time_scale", "greater than 0"),
    Bad("sim-time-scale-negative", conf(sim=f'topology = "{DEMO}"\ntime_scale = -1\n'),
        "sim.time_scale", "greater than 0"),
    Bad("sim-time-scale-nan", conf(sim=f'topology = "{DEMO}"\ntime_scale = nan\n'),
        "sim.time_scale", "finite"),
    Bad("sim-time-scale-inf", conf(sim=f'topology = "{DEMO}"\ntime_scale = inf\n'),
        "sim.time_scale", "finite"),
    Bad("sim-time-scale-bool", conf(sim=f'topology = "{DEMO}"\ntime_scale = true\n'),
        "sim.time_scale", "valid number"),
    Bad("sim-time-scale-string", conf(sim=f'topology = "{DEMO}"\ntime_scale = "fast"\n'),
        "sim.time_scale", "valid number"),
    Bad("sim-unknown-key", conf(sim=SIM + "scale = 1\n"), "sim.scale", "unknown key"),
    Bad("sim-option-missing", conf(), "--sim", "cannot read", sim="missing.toml", cli=True),
    Bad("sim-option-directory", conf(), "--sim", "not a regular file", sim="d", setup=_mkdir("d")),
    # --- [policy] --------------------------------------------------------------------
    Bad("mode-unknown", conf("[policy]\nmode = 'pause'\n"), "policy.mode",
        "expected 'park' or 'stop-on-reset', got 'pause'", cli=True),
    Bad("mode-int", conf("[policy]\nmode = 3\n"), "policy.mode", "got 3"),
    Bad("mode-empty", conf("[policy]\nmode = ''\n"), "policy.mode", "got ''"),
    Bad("takeover-unknown", conf("[policy]\ntakeover = 'some'\n"), "policy.takeover", "'gaps' or 'all'"),
    Bad("identity-unknown", conf("[policy]\non_identity_change = 'ignore'\n"),
        "policy.on_identity_change", "'stop' or 'resume'"),
    Bad("cycle-timeout-bool", conf("[policy]\ncycle_timeout = true\n"), "policy.cycle_timeout",
        "valid number, got True", cli=True),
    Bad("cycle-timeout-zero", conf("[policy]\ncycle_timeout = 0\n"), "policy.cycle_timeout",
        "greater than 0"),
    Bad("cycle-timeout-negative", conf("[policy]\ncycle_timeout = -5\n"), "policy.cycle_timeout",
        "greater than 0"),
    Bad("cycle-timeout-nan", conf("[policy]\ncycle_timeout = nan\n"), "policy.cycle_timeout", "finite"),
    Bad("cycle-timeout-inf", conf("[policy]\ncycle_timeout = +inf\n"), "policy.cycle_timeout", "finite"),
    Bad("cycle-timeout-string", conf("[policy]\ncycle_timeout = '120'\n"), "policy.cycle_timeout",
        "valid number"),
    Bad("cycle-timeout-huge", conf("[policy]\ncycle_timeout = 1e9\n"), "policy.cycle_timeout",
        "less than or equal to 86400"),
    Bad("poll-timeout-string", conf("[policy]\npoll_timeout = 'fast'\n"), "policy.poll_timeout",
        "valid number"),
    Bad("poll-timeout-bool", conf("[policy]\npoll_timeout = false\n"), "policy.poll_timeout", "valid number"),
    Bad("poll-timeout-neg-inf", conf("[policy]\npoll_timeout = -inf\n"), "policy.poll_timeout", "finite"),
    Bad("backoff-zero", conf("[policy]\nconnect_backoff_max = 0\n"), "policy.connect_backoff_max",
        "greater than 0"),
    Bad("allow-string", conf("[policy]\nallow = '0000:01:00.0'\n"), "policy.allow", "valid tuple"),
    Bad("allow-bad-bdf", conf("[policy]\nallow = ['01:00']\n"), "policy.allow[0]", "bad PCI address '01:00'"),
    Bad("allow-int", conf("[policy]\nallow = [1]\n"), "policy.allow[0]", "got 1"),
    Bad("allow-absent", conf("[policy]\nallow = ['0000:09:00.0']\n"), "policy.allow[0]",
        "no such PCI function on sim:", cli=True),
    Bad("allow-twice", conf("[policy]\nallow = ['06:01.0', '0000:06:01.0']\n"), "policy.allow[1]",
        "listed twice"),
    Bad("policy-unknown-key", conf("[policy]\ntakover = 'all'\n"), "policy.takover", "unknown key"),
    # --- [metrics] -------------------------------------------------------------------
    Bad("metrics-not-loopback", conf("[metrics]\nlisten = '0.0.0.0:9477'\n"), "metrics.listen",
        "not a loopback"),
    Bad("metrics-int", conf("[metrics]\nlisten = 9477\n"), "metrics.listen", "got 9477"),
    Bad("metrics-socket-too-long", conf(f"[metrics]\nlisten = 'unix:@TMP@/{LONG}'\n"), "metrics.listen",
        "longer than 107 bytes"),
    Bad("metrics-is-control-socket", conf("[metrics]\nlisten = 'unix:@TMP@/run/ctl.sock'\n"),
        "metrics.listen", "also daemon.control_socket"),
    # --- [[vm]] ----------------------------------------------------------------------
    Bad("vm-name-missing", conf("[[vm]]\nqmp = 'a.qmp'\n"), "vm[0].name", "required key is missing"),
    Bad("vm-name-empty", conf(vm(name="")), "vm[0].name", "at least 1 character"),
    Bad("vm-name-space", conf(vm(name="a b")), "vm[0].name", "pattern"),
    Bad("vm-name-too-long", conf(vm(name="n" * 65)), "vm[0].name", "at most 64"),
    Bad("vm-name-int", conf("[[vm]]\nname = 5\nqmp = 'a.qmp'\n"), "vm[0].name", "got 5"),
    Bad("vm-name-duplicate", conf(vm() + vm(qmp="b.qmp")), "vm[1].name", "duplicate VM name 'a'"),
    Bad("vm-qmp-missing", conf("[[vm]]\nname = 'a'\n"), "vm.a.qmp", "required key is missing"),
    Bad("vm-qmp-empty", conf(vm(qmp="")), "vm.a.qmp", "empty path"),
    Bad("vm-qmp-nul", conf(vm(qmp="a\\u0000b")), "vm.a.qmp", "NUL"),
    Bad("vm-qmp-directory", conf(vm(qmp="d")), "vm.a.qmp", "is a directory", setup=_mkdir("d"), cli=True),
    Bad("vm-qmp-too-long", conf(vm(qmp=LONG)), "vm.a.qmp", "longer than 107 bytes", cli=True),
    Bad("vm-qmp-regular-file", conf(vm(qmp="f")), "vm.a.qmp", "exists and is not a socket",
        setup=_touch("f")),
    Bad("vm-qmp-same", conf(vm() + vm(name="b")), "vm.b.qmp", "also vm.a.qmp"),
    Bad("vm-qmp-relative-and-absolute", conf(vm() + vm(name="b", qmp="@TMP@/a.qmp")), "vm.b.qmp",
        "also vm.a.qmp", cli=True),
    Bad("vm-qmp-dotdot", conf(vm() + vm(name="b", qmp="x/../a.qmp")), "vm.b.qmp", "also vm.a.qmp"),
    Bad("vm-qmp-via-symlink", conf(vm(qmp="real/s") + vm(name="b", qmp="link/s")), "vm.b.qmp",
        "also vm.a.qmp", setup=_symlink),
    Bad("vm-qmp-is-control-socket", conf(vm(qmp="run/ctl.sock")), "vm.a.qmp", "also daemon.control_socket"),
    Bad("vm-qmp-is-journal", conf(vm(qmp="state/journal.jsonl")), "vm.a.qmp", "also daemon.journal"),
    Bad("vm-mode-unknown", conf(vm(extra="mode = 'pause'\n")), "vm.a.mode", "got 'pause'"),
    Bad("vm-mode-int", conf(vm(extra="mode = 3\n")), "vm.a.mode", "got 3"),
    Bad("vm-unknown-key", conf(vm(extra="qmp_socket = 'x'\n")), "vm.a.qmp_socket", "unknown key"),
    Bad("device-bad-bdf", conf(vm(extra=dev("0000:01:20.0"))), "vm.a.device[0].host", "out of range"),
    Bad("device-absent", conf(vm(extra=dev("0000:09:00.0"))), "vm.a.device[0].host",
        "no such PCI function on sim:", cli=True),
    Bad("device-bridge", conf(vm(extra=dev("0000:00:01.0"))), "vm.a.device[0].host",
        "is a PCI bridge", cli=True),
    Bad("device-pcie-pci-bridge", conf(vm(extra=dev("0000:05:00.0"))),
        "vm.a.device[0].host", "is a PCI bridge"),
    Bad("device-twice-in-one-vm", conf(vm(extra=dev("01:00.0") + dev("0000:01:00.0"))),
        "vm.a.device[1].host", "listed twice"),
    Bad("device-in-two-vms", conf(vm(extra=dev("01:00.0")) + vm(name="b", qmp="b.qmp",
                                                              extra=dev("0000:01:00.0"))),
        "vm.b.device[0].host", "already assigned to VM 'a'"),
    Bad("device-host-missing", conf(vm(extra="[[vm.device]]\n")), "vm.a.device[0].host", "required key"),
    Bad("device-unknown-key", conf(vm(extra="[[vm.device]]\nbdf = '01:00.0'\n")), "vm.a.device[0].bdf",
        "unknown key"),
    Bad("device-string", conf(vm(extra="device = '0000:01:00.0'\n")), "vm.a.device", "valid tuple"),
]
assert len({b.id for b in BAD}) == len(BAD)


@pytest.fixture
def wd() -> Iterator[Path]:
    # Short: a pytest tmp_path named after a parametrized test can itself exceed sun_path.
    with short_tmpdir("qrc") as path:
        yield path


def prepare(wd: Path, bad: Bad) -> tuple[Path, set[Path]]:
    """Write the case's files; return the config path and what exists before the run."""
    path = wd / "qreset.toml"
    if bad.setup is not None:
        bad.setup(wd)
    raw = bad.contents(wd)
    if raw is not None:
        path.write_bytes(raw)
    return path, set(wd.rglob("*"))


def expected_start(path: Path, bad: Bad) -> str:
    where = "--sim" if bad.key == "--sim" else f"{path}: {bad.key}" if bad.key else str(path)
    return where + ": "


def check_line(line: str, path: Path, bad: Bad) -> None:
    assert "\n" not in line
    assert line.startswith(expected_start(path, bad)), line
    assert bad.why in line, line
    assert len(line) < 400, line


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_config_refused_by_validation(wd: Path, bad: Bad) -> None:
    path, before = prepare(wd, bad)
    sim = None if bad.sim is None else wd / bad.sim
    with pytest.raises(ConfigError) as info:
        validate(path, sim=sim)
    check_line(str(info.value), path, bad)
    assert set(wd.rglob("*")) == before


CLI = [b for b in BAD if b.cli]


@pytest.mark.parametrize("bad", CLI, ids=[b.id for b in CLI])
def test_bad_config_refused_by_qreset_run(wd: Path, bad: Bad) -> None:
    """The real CLI: exit 2, one stderr line naming file and key, nothing created."""
    path, before = prepare(wd, bad)
    argv = [sys.executable, "-m", "qreset", "run", "--config", str(path)]
    if bad.sim is not None:
        argv += ["--sim", str(wd / bad.sim)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("qreset run started (or hung) on a bad configuration")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qreset: "), lines[0]
    check_line(lines[0].removeprefix("qreset: "), path, bad)
    assert set(wd.rglob("*")) == before
