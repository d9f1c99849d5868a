"""lspci (pciutils) against qreset's decoder on the lab kernel's real /sys: ~30
functions of real QEMU PCIe devices, switch ports and bridges, read as root."""

from __future__ import annotations

from pathlib import Path

from qreset.pci.sysfs import SysfsHost
from tests.lspci_oracle import check_all


async def test_lab_sysfs_decodes_like_lspci(tmp_path: Path) -> None:
    host = SysfsHost("/sys")
    try:
        functions = {a: await host.read_config(a) for a in await host.functions()}
    finally:
        await host.close()
    assert len(functions) >= 20, "the lab topology has more functions than this"
    compared = check_all(functions, tmp_path)
    # PCIe functions read 4096 bytes as root: extended capabilities are compared too.
    assert any(len(d) == 4096 for d in functions.values())
    assert compared >= 100, f"only {compared} capabilities compared"
