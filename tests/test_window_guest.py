"""
The stop-on-reset window guest (tests/window_guest.py) under a real QEMU, no lab needed.

The lab test (tests/lab/test_libvirt.py::test_guest_config_writes_in_the_window_survive_the_cycle)
rests on what the firmware does: a boot counter that survives QEMU's reset, one
Cache Line Size write per boot to the function at 00:SLOT.0, ``boots`` boots
and then a halt. Here the function is an emulated ``pci-testdev`` (any QEMU PCI
device keeps the byte: ``pci_init_wmask``), so the read-back equals the write.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests import window_guest
from tests.qemu_helpers import die_with_parent, have_qemu, qemu_command, short_tmpdir, track

SLOT = 5


def test_image_layout() -> None:
    img = window_guest.image(SLOT, 3)
    assert len(img) == 0x10000
    assert img[0xFFF0:0xFFF5] == b"\xEA\x00\x00\x00\xF0"  # jmp far F000:0000
    assert img[0] == 0xFA  # cli
    # mov eax, CONFIG_ADDRESS of 00:05.0 register 0x0C, then out dx, eax.
    assert b"\x66\xB8" + (0x80000000 | SLOT << 11 | 0x0C).to_bytes(4, "little") + b"\x66\xEF" in img
    assert b"\xB0\x06\xBA\xF9\x0C\xEE" in img  # 0x06 to port 0xCF9
    listing = window_guest.listing(SLOT, 3)
    assert "write Cache Line Size" in listing


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        window_guest.image(32, 3)
    with pytest.raises(ValueError, match="out of range"):
        window_guest.image(SLOT, 0)


def test_writes_parses_the_console() -> None:
    assert window_guest.writes(b"WAAWBBWC\xffH") == [(0x41, 0x41), (0x42, 0x42), (0x43, 0xFF)]
    assert window_guest.writes(b"WA") == []


@pytest.mark.qemu
@pytest.mark.skipif(not have_qemu(), reason="needs qemu-system-x86_64")
def test_guest_counts_boots_writes_each_and_halts() -> None:
    boots = 3
    with short_tmpdir() as wd:
        fw = window_guest.write_image(wd / "fw.bin", SLOT, boots, delay=1)
        debug = wd / "debug"
        proc = subprocess.Popen([
            *qemu_command(), "-machine", "q35", "-accel", "tcg", "-m", "16", "-nodefaults",
            "-no-user-config", "-display", "none", "-bios", str(fw), "-debugcon", f"file:{debug}",
            "-device", f"pci-testdev,addr={SLOT:02x}.0",
        ], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=die_with_parent())  # noqa: PLW1509 - only prctl runs in it
        track(proc)
        try:
            deadline = time.monotonic() + 30
            while not (debug.exists() and debug.read_bytes().endswith(window_guest.HALT_MARK)):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                assert time.monotonic() < deadline, debug.read_bytes() if debug.exists() else b""
                time.sleep(0.05)
            time.sleep(0.3)  # halted for good: nothing more comes
            console = debug.read_bytes()
        finally:
            proc.kill()
            proc.wait(timeout=10)
    want = [(window_guest.expected(n), window_guest.expected(n)) for n in range(1, boots + 1)]
    assert window_guest.writes(console) == want, console
    assert console == b"".join(b"W" + bytes(w) for w in want) + b"H"
