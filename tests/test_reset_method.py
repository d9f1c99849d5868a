"""Putting ``reset_method`` back after a narrowed reset (issue 9 item 3).

Function 0 of a multifunction device lists ``bus`` (probed before function 1
existed); the kernel refuses that name now (EINVAL, "Unsupported reset method
'bus'"), so writing the saved list back failed on every first cycle. The
simulated host's ``reset_method`` store behaves like the kernel's
``reset_method_store`` so these tests exercise the real rule.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from qreset.errors import HostError
from qreset.pci import reset_method
from qreset.pci.sim import SimHost


def _nic_pair() -> SimHost:
    fn: dict[str, Any] = {"parent": "rp", "type": "endpoint", "vendor": 0x8086, "device": 0x1521,
                          "class": 0x020000, "flr": True}
    return SimHost.from_dict({"function": [
        {"name": "rp", "type": "root_port", "dev": 1, "vendor": 0x8086, "device": 0x1901},
        {"name": "nic0", "fn": 0, **fn},
        {"name": "nic1", "fn": 1, **fn},
    ]}, "nic-pair", time_scale=0.001)


def test_sim_store_is_the_kernels() -> None:
    host = _nic_pair()
    nic0 = host.address_of("nic0")
    assert host.read_reset_method(nic0) == "flr pm bus\n"  # probed when it was alone on the bus
    with pytest.raises(HostError, match=r"Unsupported reset method 'bus'"):
        host.write_reset_method(nic0, "flr bus")
    assert host.read_reset_method(nic0) == "flr pm bus\n"  # a refused write changes nothing
    with pytest.raises(HostError, match=r"Invalid reset method 'reboot'"):
        host.write_reset_method(nic0, "reboot")
    host.write_reset_method(nic0, "pm")
    assert host.read_reset_method(nic0) == "pm\n"
    host.write_reset_method(nic0, "default")
    assert host.read_reset_method(nic0) == "flr pm\n"  # re-probed now: bus is gone
    host.write_reset_method(nic0, "")
    assert host.read_reset_method(nic0) == "\n"


async def test_stale_bus_is_dropped_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    host = _nic_pair()
    nic0 = host.address_of("nic0")
    with caplog.at_level(logging.INFO):
        await host.reset_function(nic0, "flr")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert host.read_reset_method(nic0) == "flr pm\n"
    assert [r.method for r in host.reset_log] == ["flr"]
    assert any("no longer supports 'bus'" in r.getMessage() for r in caplog.records)


async def test_operator_order_survives_a_stale_name(caplog: pytest.LogCaptureFixture) -> None:
    """``pm flr bus`` written while nic0 was alone: put back ``pm flr``, not the default ``flr pm``."""
    host = _nic_pair()
    nic0, nic1, rp = (host.address_of(n) for n in ("nic0", "nic1", "rp"))
    await host.remove(nic1)
    host.write_reset_method(nic0, "pm flr bus")  # accepted: alone on its bus now
    await host.rescan(rp)
    assert host.read_reset_method(nic1) == "flr pm\n"
    with caplog.at_level(logging.INFO):
        await host.reset_function(nic0, "flr")
    assert host.read_reset_method(nic0) == "pm flr\n"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_put_back_reads_back_and_reports_a_mismatch(caplog: pytest.LogCaptureFixture) -> None:
    """An attribute that does not hold what was written is reported, never silent."""
    stored = ["flr"]

    def read() -> str:
        return stored[0]

    def write(text: str) -> None:
        stored[0] = "flr"  # ignores every write

    with caplog.at_level(logging.WARNING):
        got = reset_method.put_back(read, write, "flr pm", "dev/reset_method")
    assert got == "flr"
    assert "reads 'flr' after restoring 'flr pm'" in caplog.text


def test_put_back_when_nothing_can_be_written() -> None:
    def read() -> str:
        return "flr"

    def write(text: str) -> None:
        raise HostError("dev/reset_method", "Permission denied")

    with pytest.raises(HostError, match=r"could not restore 'flr pm' nor 'default'"):
        reset_method.put_back(read, write, "flr pm", "dev/reset_method")
