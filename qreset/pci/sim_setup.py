"""
The configured state of a simulated function: what firmware and the kernel leave in
config space after boot (BARs assigned, Memory/IO + Bus Master on, bus numbers
and windows on bridges, interrupt line, ACS and SR-IOV enabled as specified),
from the power-on image of :mod:`qreset.pci.sim_config` and the addresses
enumeration decided (:class:`Assigned`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qreset.pci import regs
from qreset.pci.sim_config import DEVCTL_DEFAULT, ConfigImage, get, put
from qreset.pci.sim_model import ACS_BITS, AcsSpec, FunctionSpec


@dataclass(slots=True)
class Assigned:
    """What enumeration and resource assignment decided for one function."""

    bar_addr: dict[int, int] = field(default_factory=dict)
    rom_addr: int = 0
    vf_bar_addr: dict[int, int] = field(default_factory=dict)
    primary: int = 0
    secondary: int = 0
    subordinate: int = 0
    io_window: tuple[int, int] | None = None    # (base, limit)
    mem_window: tuple[int, int] | None = None
    pref_window: tuple[int, int] | None = None
    interrupt_line: int = 0


def configure(img: ConfigImage, spec: FunctionSpec, asg: Assigned, *, is_vf: bool,
              num_vfs: int = 0) -> bytearray:
    """The bytes firmware + kernel leave after boot (see the module docstring)."""
    cfg = bytearray(img.por)
    cmd = 0
    for slot in [] if is_vf else img.bars:
        addr = asg.bar_addr.get(slot.index, 0)
        off = regs.BASE_ADDRESS_0 + 4 * slot.index
        put(cfg, off, 4, (addr & 0xFFFFFFFF) | slot.low_bits)
        if slot.type == "mem64":
            put(cfg, off + 4, 4, addr >> 32)
        cmd |= regs.COMMAND_IO if slot.type == "io" else regs.COMMAND_MEMORY
    if img.rom_size and asg.rom_addr:
        put(cfg, regs.ROM_ADDRESS1 if spec.is_bridge else regs.ROM_ADDRESS, 4, asg.rom_addr)
    if spec.is_bridge:
        cmd |= regs.COMMAND_IO | regs.COMMAND_MEMORY
        put(cfg, regs.PRIMARY_BUS, 1, asg.primary)
        put(cfg, regs.SECONDARY_BUS, 1, asg.secondary)
        put(cfg, regs.SUBORDINATE_BUS, 1, asg.subordinate)
        # An unused window is programmed base > limit (pci_setup_bridge_* in setup-bus.c).
        io = asg.io_window or (0xF000, 0x0FFF)
        put(cfg, regs.IO_BASE, 1, ((io[0] >> 8) & 0xF0) | 0x01)
        put(cfg, regs.IO_LIMIT, 1, ((io[1] >> 8) & 0xF0) | 0x01)
        put(cfg, regs.IO_BASE_UPPER16, 2, io[0] >> 16)
        put(cfg, regs.IO_LIMIT_UPPER16, 2, io[1] >> 16)
        mem = asg.mem_window or (0xFFF00000, 0x000FFFFF)
        put(cfg, regs.MEMORY_BASE, 2, (mem[0] >> 16) & 0xFFF0)
        put(cfg, regs.MEMORY_LIMIT, 2, (mem[1] >> 16) & 0xFFF0)
        pref = asg.pref_window or (0xFFF00000, 0x000FFFFF)
        put(cfg, regs.PREF_MEMORY_BASE, 2, ((pref[0] >> 16) & 0xFFF0) | 1)
        put(cfg, regs.PREF_MEMORY_LIMIT, 2, ((pref[1] >> 16) & 0xFFF0) | 1)
        put(cfg, regs.PREF_BASE_UPPER32, 4, pref[0] >> 32)
        put(cfg, regs.PREF_LIMIT_UPPER32, 4, pref[1] >> 32)
        put(cfg, regs.BRIDGE_CONTROL, 2, 0x0003)  # parity + SERR enable
    if is_vf:
        cmd &= ~regs.COMMAND_MEMORY
    cmd |= regs.COMMAND_MASTER | (0x0100 if spec.is_pcie else 0)  # SERR# enable
    if spec.is_pcie or spec.is_bridge or img.bars or is_vf:
        put(cfg, regs.COMMAND, 2, cmd)
    put(cfg, regs.CACHE_LINE_SIZE, 1, 0x10)  # 64 bytes, what x86 firmware programs
    put(cfg, regs.INTERRUPT_LINE, 1, asg.interrupt_line)
    driver = spec.driver
    native = driver is not None and driver != "vfio-pci"
    if regs.CAP_ID_MSIX in img.caps and native:
        o = img.caps[regs.CAP_ID_MSIX]
        put(cfg, o + regs.MSIX_FLAGS, 2, get(cfg, o + regs.MSIX_FLAGS, 2) | regs.MSIX_FLAGS_ENABLE)
        put(cfg, regs.COMMAND, 2, get(cfg, regs.COMMAND, 2) | regs.COMMAND_INTX_DISABLE)
    elif regs.CAP_ID_MSI in img.caps and native:
        o = img.caps[regs.CAP_ID_MSI]
        flags = get(cfg, o + regs.MSI_FLAGS, 2)
        put(cfg, o + regs.MSI_FLAGS, 2, flags | regs.MSI_FLAGS_ENABLE)
        put(cfg, o + regs.MSI_ADDRESS_LO, 4, 0xFEE00000)  # x86 local APIC MSI window
        data_off = regs.MSI_DATA_64 if flags & regs.MSI_FLAGS_64BIT else regs.MSI_DATA_32
        put(cfg, o + data_off, 2, 0x4021)
        put(cfg, regs.COMMAND, 2, get(cfg, regs.COMMAND, 2) | regs.COMMAND_INTX_DISABLE)
    if regs.CAP_ID_EXP in img.caps:
        o = img.caps[regs.CAP_ID_EXP]
        # MPS 256 (1<<5) and the four error-reporting enables the AER driver sets.
        put(cfg, o + regs.EXP_DEVCTL, 2, (DEVCTL_DEFAULT & ~0x00E0) | 0x0020 | 0x000F)
        if get(cfg, o + regs.EXP_LNKCAP, 4):
            put(cfg, o + regs.EXP_LNKCTL, 2, 0x0040)  # Common Clock Configuration
        # Completion Timeout range 5 (16-55 ms); LTR Mechanism Enable (bit 10) where supported.
        put(cfg, o + regs.EXP_DEVCTL2, 2, 0x0005 | (0x0400 if spec.ltr else 0))
    if regs.EXT_CAP_ID_ACS in img.ext_caps:
        o = img.ext_caps[regs.EXT_CAP_ID_ACS]
        acs = spec.acs if isinstance(spec.acs, AcsSpec) else AcsSpec()
        cap_bits = sum(ACS_BITS[b] for b in acs.cap)
        wanted = acs.ctrl if acs.ctrl is not None else ("sv", "rr", "cr", "uf")
        put(cfg, o + regs.ACS_CTRL, 2, cap_bits & sum(ACS_BITS[b] for b in wanted))
    if regs.EXT_CAP_ID_LTR in img.ext_caps:
        o = img.ext_caps[regs.EXT_CAP_ID_LTR]
        put(cfg, o + regs.LTR_MAX_SNOOP_LAT, 2, 0x1003)   # 3 * 1024 ns
        put(cfg, o + regs.LTR_MAX_NOSNOOP_LAT, 2, 0x1003)
    if regs.EXT_CAP_ID_SRIOV in img.ext_caps and num_vfs:
        o = img.ext_caps[regs.EXT_CAP_ID_SRIOV]
        put(cfg, o + regs.SRIOV_NUM_VF, 2, num_vfs)
        put(cfg, o + regs.SRIOV_CTRL, 2, regs.SRIOV_CTRL_VFE | regs.SRIOV_CTRL_MSE)
        for slot in img.vf_bars:
            addr = asg.vf_bar_addr.get(slot.index, 0)
            off = o + regs.SRIOV_BAR + 4 * slot.index
            put(cfg, off, 4, (addr & 0xFFFFFFFF) | slot.low_bits)
            if slot.type == "mem64":
                put(cfg, off + 4, 4, addr >> 32)
    return cfg
