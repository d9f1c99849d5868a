"""
``check-devices`` (the libvirt hook's question at prepare/start) on devices the
host cannot give a VM: a function that is not there, or that went away after
the daemon read the topology, and a bridge. Each is unsafe, with the reason.
And add-vm refuses a QMP path the configuration file would refuse.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from qreset.daemon import Daemon
from qreset.errors import ConfigError
from qreset.pci.address import PciAddress
from qreset.pci.sim import SimHost
from tests.conftest import SIM_DIR
from tests.hook_helpers import daemon_on
from tests.qemu_helpers import short_tmpdir

DEMO = SIM_DIR / "demo.toml"
NIC1 = "0000:01:00.0"
NIC2 = "0000:04:00.0"


@asynccontextmanager
async def _daemon(host: SimHost) -> AsyncIterator[Daemon]:
    """tests.hook_helpers.daemon_on (the shared in-process daemon) in a short temp dir."""
    with short_tmpdir() as wd:
        async with daemon_on(wd, host) as daemon:
            yield daemon


async def test_check_devices_absent_function_or_bridge_is_unsafe() -> None:
    host = SimHost.from_toml(DEMO, time_scale=0.01)
    async with _daemon(host) as daemon:
        assert await daemon.check_devices("vm1", [NIC1]) == {"safe": True, "reasons": []}
        absent = await daemon.check_devices("vm1", [NIC1, "0000:09:00.0"])
        assert absent == {"safe": False, "reasons": [
            f"0000:09:00.0 is absent on this host ({host.name})"]}
        bridge = await daemon.check_devices("vm1", ["00:01.0"])
        assert bridge == {"safe": False, "reasons": [
            "0000:00:01.0 is a PCI bridge, not a device a VM can be given"]}
        # Removed after the daemon read (and cached) its topology: absent now.
        assert (await daemon.check_devices("vm1", [NIC2]))["safe"] is True
        await host.remove(PciAddress.parse(NIC2))
        gone = await daemon.check_devices("vm1", [NIC2])
        assert gone == {"safe": False, "reasons": [f"{NIC2} is absent on this host ({host.name})"]}


async def test_add_vm_refuses_a_qmp_path_past_sun_path() -> None:
    """add-vm (the hook, qreset launch) refuses what the configuration file refuses:
    a socket path no connect() could use (its monitor would retry it forever)."""
    async with _daemon(SimHost.from_toml(DEMO, time_scale=0.01)) as daemon:
        long = "/tmp/" + "s" * 110 + ".qmp"
        with pytest.raises(ConfigError) as info:
            await daemon.add_vm("vm1", long, [NIC1], None)
        assert str(info.value) == ("add-vm 'vm1': qmp: socket path longer than 107 bytes "
                                   "(sun_path holds 108 with the NUL, unix(7))")
        with pytest.raises(ConfigError, match=r"^add-vm 'vm1': qmp: expected an absolute socket path"):
            await daemon.add_vm("vm1", "", [NIC1], None)
        assert daemon.monitors == {}
