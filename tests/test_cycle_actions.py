"""Run-state actions: what QEMU's command line set up, and what a monitor puts back (qreset.actions)."""

from __future__ import annotations

from typing import Any

import pytest

from qreset.actions import DEFAULT_ACTIONS, last_actions, originals, pending_restore, startup_actions

QEMU = "qemu-system-x86_64"


@pytest.mark.parametrize(("argv", "expected"), [
    ([QEMU, "-m", "64"], {"reboot": "reset", "shutdown": "poweroff"}),
    ([QEMU, "-no-shutdown"], {"reboot": "reset", "shutdown": "pause"}),          # libvirt
    ([QEMU, "--no-reboot"], {"reboot": "shutdown", "shutdown": "poweroff"}),
    ([QEMU, "-action", "reboot=shutdown,shutdown=pause,panic=none"],
     {"reboot": "shutdown", "shutdown": "pause"}),
    ([QEMU, "-no-shutdown", "-action", "shutdown=poweroff"], {"reboot": "reset", "shutdown": "poweroff"}),
    ([QEMU, "-action", "shutdown=poweroff", "-no-shutdown"], {"reboot": "reset", "shutdown": "pause"}),
    ([QEMU, "--action=reboot=shutdown"], {"reboot": "shutdown", "shutdown": "poweroff"}),
    ([QEMU, "-name", "no-shutdown"], {"reboot": "reset", "shutdown": "poweroff"}),   # a value, not an option
])
def test_startup_actions_later_options_override(argv: list[str], expected: dict[str, str]) -> None:
    assert startup_actions(argv) == expected


def test_unreadable_command_line_falls_back_to_qemus_defaults() -> None:
    assert startup_actions(None) is None
    found, source = originals(None, "1:2", None)
    assert found == DEFAULT_ACTIONS
    assert "defaults" in source


def test_a_journaled_change_on_the_same_qemu_wins_and_is_pending_until_put_back() -> None:
    recs: list[dict[str, Any]] = [
        {"vm": "vm1", "cycle": "act-1", "phase": "actions", "qemu": "7:9",
         "found": {"reboot": "reset", "shutdown": "pause"},
         "set": {"reboot": "shutdown", "shutdown": "pause"}},
        {"vm": "vm1", "cycle": "x", "phase": "resumed"},
        {"vm": "vm2", "cycle": "act-2", "phase": "actions", "qemu": "8:9", "found": "garbage", "set": None},
    ]
    last = last_actions(recs)
    assert set(last) == {"vm1"}
    assert originals(last["vm1"], "7:9", [QEMU]) == ({"reboot": "reset", "shutdown": "pause"}, "journal")
    assert pending_restore(last["vm1"], "7:9") == {"reboot": "reset", "shutdown": "pause"}
    # Another QEMU process: its own command line decides, nothing is pending.
    assert originals(last["vm1"], "7:10", [QEMU])[1] == "command line"
    assert pending_restore(last["vm1"], "7:10") is None
    put_back = last_actions([*recs, {**recs[0], "set": None}])
    assert pending_restore(put_back["vm1"], "7:9") is None
