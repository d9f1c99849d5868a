"""
The PCIe extended capabilities of a simulated function (from 0x100): AER,
ACS, SR-IOV, Resizable BAR and LTR, chained in that order, laid out per
include/uapi/linux/pci_regs.h (see qreset.pci.regs) and the PCI Express Base
Spec r6.0 (7.8.4 AER, 7.7.8 ACS, 9.3.3 SR-IOV, 7.8.6 Resizable BAR, 7.8.2
LTR). Called by :func:`qreset.pci.sim_config.build_image`.
"""

from __future__ import annotations

from qreset.pci import regs
from qreset.pci.sim_image import BarSlot, ImageWriter, bar_slots, log2, put_bar
from qreset.pci.sim_model import ACS_BITS, AcsSpec, FunctionSpec

_AER_SIZE = 0x38                   # PCI_ERR_ROOT_COMMAND is 0x2c; root ports use 0x48
_AER_ROOT_SIZE = 0x48
_ACS_SIZE = 8
_SRIOV_SIZE = 0x40                 # PCI_EXT_CAP_SRIOV_SIZEOF
_LTR_SIZE = 8                      # PCI_EXT_CAP_LTR_SIZEOF
_SRIOV_SUP_PGSIZES = 0x553         # 4K 8K 64K 256K 1M 4M, what most NICs report
_SRIOV_CTRL_WMASK = 0x001F         # VFE, VFM, VF_MIGRATION_INT, VF MSE, ARI hierarchy


def _ext_header(cap_id: int, version: int) -> int:
    return cap_id | (version << 16)


def put_ext_caps(img: ImageWriter, spec: FunctionSpec, ext: dict[int, int]) -> list[BarSlot]:
    chain: list[tuple[int, int]] = []
    aer = spec.aer if spec.aer is not None else True
    if aer:
        chain.append((regs.EXT_CAP_ID_ERR, _AER_ROOT_SIZE if spec.type == "root_port" else _AER_SIZE))
    acs: AcsSpec | None = None
    if spec.acs is True:
        acs = AcsSpec()
    elif isinstance(spec.acs, AcsSpec):
        acs = spec.acs
    if acs is not None:
        chain.append((regs.EXT_CAP_ID_ACS, _ACS_SIZE))
    if spec.sriov is not None:
        chain.append((regs.EXT_CAP_ID_SRIOV, _SRIOV_SIZE))
    if spec.ltr:
        chain.append((regs.EXT_CAP_ID_LTR, _LTR_SIZE))
    if spec.rebar is not None:
        chain.append((regs.EXT_CAP_ID_REBAR, 12))
    pos = regs.EXT_CAP_START
    layout: list[tuple[int, int]] = []
    for cap_id, size in chain:
        layout.append((cap_id, pos))
        ext[cap_id] = pos
        pos = (pos + size + 3) & ~3
    for i, (cap_id, off) in enumerate(layout):
        nxt = layout[i + 1][1] if i + 1 < len(layout) else 0
        version = 2 if cap_id == regs.EXT_CAP_ID_ERR else 1
        img.put(off, 4, _ext_header(cap_id, version) | (nxt << 20))

    if regs.EXT_CAP_ID_ERR in ext:
        o = ext[regs.EXT_CAP_ID_ERR]
        uncor = 0x03FFF030
        img.put(o + regs.ERR_UNCOR_STATUS, 4, 0, 0, uncor)
        img.put(o + regs.ERR_UNCOR_MASK, 4, 0, uncor)
        img.put(o + regs.ERR_UNCOR_SEVER, 4, 0x00462030, uncor)  # spec default severities
        img.put(o + regs.ERR_COR_STATUS, 4, 0, 0, 0x0000F1C1)
        img.put(o + regs.ERR_COR_MASK, 4, 0x00002000, 0x0000F1C1)  # Advisory Non-Fatal masked
        img.put(o + regs.ERR_CAP, 4, 0x000000A0, 0x00000140)  # ECRC gen/check capable; enables rw
        if spec.type == "root_port":
            img.put(o + regs.ERR_ROOT_COMMAND, 4, 0, 0x7)
            img.put(o + 0x30, 4, 0, 0, 0x7F)  # PCI_ERR_ROOT_STATUS
    if acs is not None:
        o = ext[regs.EXT_CAP_ID_ACS]
        cap_bits = sum(ACS_BITS[b] for b in acs.cap)
        img.put(o + regs.ACS_CAP, 2, cap_bits)
        img.put(o + regs.ACS_CTRL, 2, 0, cap_bits)
    vf_bars: list[BarSlot] = []
    if spec.sriov is not None:
        s = spec.sriov
        o = ext[regs.EXT_CAP_ID_SRIOV]
        img.put(o + regs.SRIOV_CAP, 4, 0)
        img.put(o + regs.SRIOV_CTRL, 2, 0, _SRIOV_CTRL_WMASK)
        img.put(o + regs.SRIOV_INITIAL_VF, 2, s.total_vfs)
        img.put(o + regs.SRIOV_TOTAL_VF, 2, s.total_vfs)
        img.put(o + regs.SRIOV_NUM_VF, 2, 0, 0xFFFF)
        img.put(o + regs.SRIOV_VF_OFFSET, 2, s.offset)
        img.put(o + regs.SRIOV_VF_STRIDE, 2, s.stride)
        img.put(o + regs.SRIOV_VF_DID, 2, s.vf_device)
        img.put(o + regs.SRIOV_SUP_PGSIZE, 4, _SRIOV_SUP_PGSIZES)
        img.put(o + regs.SRIOV_SYS_PGSIZE, 4, 1, 0xFFFFFFFF)
        vf_bars = bar_slots(s.vf_bars)
        for slot in vf_bars:
            put_bar(img, o + regs.SRIOV_BAR + 4 * slot.index, slot)
    if spec.ltr:
        o = ext[regs.EXT_CAP_ID_LTR]
        img.put(o + regs.LTR_MAX_SNOOP_LAT, 2, 0, 0x1FFF)
        img.put(o + regs.LTR_MAX_NOSNOOP_LAT, 2, 0, 0x1FFF)
    if spec.rebar is not None:
        o = ext[regs.EXT_CAP_ID_REBAR]
        supported = 0
        for size in spec.rebar.sizes:
            supported |= 1 << (log2(size) - 20 + 4)
        img.put(o + regs.REBAR_CAP, 4, supported)
        current = next((b.size for b in bar_slots(spec.bars) if b.index == spec.rebar.bar), 1 << 20)
        ctrl = spec.rebar.bar | (1 << regs.REBAR_CTRL_NBAR_SHIFT) | ((log2(current) - 20) << 8)
        img.put(o + regs.REBAR_CTRL, 4, ctrl, 0x3F00)
    return vf_bars
