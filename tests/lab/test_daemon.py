"""`qreset run` in park mode serving a nested QEMU whose guest reboots itself, on the real kernel.

The nested QEMU opens its two lab functions through VFIO groups (the legacy
container); tests/lab/park.py runs the guest and says why every boot after
the first proves a coordinated reset (tests/lab/test_iommufd.py: the same
over iommufd).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qreset.qemu_model import VfioBackend
from tests.lab.labhost import Roles, bind_group_vfio
from tests.lab.park import check_flr_cycles, park_cycles

pytestmark = pytest.mark.lab

WORK = Path("/run/qreset-lab-daemon")


async def test_park_mode_cycles_on_real_devices(roles: Roles, witnesses: list[str]) -> None:
    devices = [roles["virtio1"], roles["nvme1"]]
    for d in devices:
        bind_group_vfio(d)
    run = await park_cycles(devices, WORK)
    assert sorted(d.host for d in run.inventory) == sorted(devices)
    assert {d.backend for d in run.inventory} == {VfioBackend.GROUP}
    check_flr_cycles(run, devices)
