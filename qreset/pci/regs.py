"""
Config-space register offsets and bits.

Every number here is from Linux ``include/uapi/linux/pci_regs.h`` (the names
are the kernel's without the ``PCI_`` prefix) which follows the PCI Local Bus
Spec 3.0 and the PCI Express Base Spec. Other modules import these instead of
writing offsets inline; a constant not listed here is defined next to its use
with the same citation.
"""

from __future__ import annotations

from typing import Final

# Sizes (PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE)
CFG_SPACE_SIZE: Final = 256
CFG_SPACE_EXP_SIZE: Final = 4096
# What an unprivileged read of sysfs ``config`` returns (pci_read_config() in
# drivers/pci/pci-sysfs.c caps non-CAP_SYS_ADMIN readers at 64 bytes).
CFG_SPACE_UNPRIV_SIZE: Final = 64

# Type 0 / common header
VENDOR_ID: Final = 0x00
DEVICE_ID: Final = 0x02
COMMAND: Final = 0x04
COMMAND_IO: Final = 0x1
COMMAND_MEMORY: Final = 0x2
COMMAND_MASTER: Final = 0x4
COMMAND_INTX_DISABLE: Final = 0x400
STATUS: Final = 0x06
STATUS_CAP_LIST: Final = 0x10
CLASS_REVISION: Final = 0x08
REVISION_ID: Final = 0x08
CLASS_PROG: Final = 0x09
CLASS_DEVICE: Final = 0x0A
CACHE_LINE_SIZE: Final = 0x0C
LATENCY_TIMER: Final = 0x0D
HEADER_TYPE: Final = 0x0E
HEADER_TYPE_MASK: Final = 0x7F
HEADER_TYPE_NORMAL: Final = 0
HEADER_TYPE_BRIDGE: Final = 1
HEADER_TYPE_CARDBUS: Final = 2
HEADER_TYPE_MFD: Final = 0x80
BIST: Final = 0x0F
BASE_ADDRESS_0: Final = 0x10
BASE_ADDRESS_SPACE_IO: Final = 0x01
BASE_ADDRESS_MEM_TYPE_64: Final = 0x04
BASE_ADDRESS_MEM_PREFETCH: Final = 0x08
CARDBUS_CIS: Final = 0x28
SUBSYSTEM_VENDOR_ID: Final = 0x2C
SUBSYSTEM_ID: Final = 0x2E
ROM_ADDRESS: Final = 0x30
CAPABILITY_LIST: Final = 0x34
INTERRUPT_LINE: Final = 0x3C
INTERRUPT_PIN: Final = 0x3D
MIN_GNT: Final = 0x3E
MAX_LAT: Final = 0x3F

# Type 1 (PCI-to-PCI bridge) header
PRIMARY_BUS: Final = 0x18
SECONDARY_BUS: Final = 0x19
SUBORDINATE_BUS: Final = 0x1A
SEC_LATENCY_TIMER: Final = 0x1B
IO_BASE: Final = 0x1C
IO_LIMIT: Final = 0x1D
SEC_STATUS: Final = 0x1E
MEMORY_BASE: Final = 0x20
MEMORY_LIMIT: Final = 0x22
PREF_MEMORY_BASE: Final = 0x24
PREF_MEMORY_LIMIT: Final = 0x26
PREF_BASE_UPPER32: Final = 0x28
PREF_LIMIT_UPPER32: Final = 0x2C
IO_BASE_UPPER16: Final = 0x30
IO_LIMIT_UPPER16: Final = 0x32
ROM_ADDRESS1: Final = 0x38
BRIDGE_CONTROL: Final = 0x3E
BRIDGE_CTL_BUS_RESET: Final = 0x40  # bit 6: Secondary Bus Reset

# Capability IDs (PCI_CAP_ID_*)
CAP_ID_PM: Final = 0x01
CAP_ID_AGP: Final = 0x02
CAP_ID_VPD: Final = 0x03
CAP_ID_SLOTID: Final = 0x04
CAP_ID_MSI: Final = 0x05
CAP_ID_CHSWP: Final = 0x06
CAP_ID_PCIX: Final = 0x07
CAP_ID_HT: Final = 0x08
CAP_ID_VNDR: Final = 0x09
CAP_ID_DBG: Final = 0x0A
CAP_ID_CCRC: Final = 0x0B
CAP_ID_SHPC: Final = 0x0C
CAP_ID_SSVID: Final = 0x0D
CAP_ID_AGP3: Final = 0x0E
CAP_ID_SECDEV: Final = 0x0F
CAP_ID_EXP: Final = 0x10
CAP_ID_MSIX: Final = 0x11
CAP_ID_SATA: Final = 0x12
CAP_ID_AF: Final = 0x13
CAP_ID_EA: Final = 0x14
CAP_LIST_NEXT: Final = 1

# Power management (PCI_PM_*)
PM_PMC: Final = 2
PM_CTRL: Final = 4
PM_CTRL_STATE_MASK: Final = 0x0003
PM_CTRL_NO_SOFT_RESET: Final = 0x0008
PM_CTRL_PME_ENABLE: Final = 0x0100
PM_CTRL_PME_STATUS: Final = 0x8000

# MSI (PCI_MSI_*)
MSI_FLAGS: Final = 2
MSI_FLAGS_ENABLE: Final = 0x0001
MSI_FLAGS_64BIT: Final = 0x0080
MSI_FLAGS_MASKBIT: Final = 0x0100
MSI_ADDRESS_LO: Final = 4
MSI_ADDRESS_HI: Final = 8
MSI_DATA_32: Final = 8
MSI_MASK_32: Final = 12
MSI_DATA_64: Final = 12
MSI_MASK_64: Final = 16

# MSI-X (PCI_MSIX_*)
MSIX_FLAGS: Final = 2
MSIX_FLAGS_QSIZE: Final = 0x07FF
MSIX_FLAGS_MASKALL: Final = 0x4000
MSIX_FLAGS_ENABLE: Final = 0x8000
MSIX_TABLE: Final = 4
MSIX_PBA: Final = 8

# Advanced Features (PCI_AF_*)
AF_CAP: Final = 3
AF_CAP_TP: Final = 0x01
AF_CAP_FLR: Final = 0x02
AF_CTRL: Final = 4
AF_CTRL_FLR: Final = 0x01
AF_STATUS: Final = 5
AF_STATUS_TP: Final = 0x01

# PCI Express capability (PCI_EXP_*)
EXP_FLAGS: Final = 0x02
EXP_FLAGS_VERS: Final = 0x000F
EXP_FLAGS_TYPE: Final = 0x00F0
EXP_FLAGS_SLOT: Final = 0x0100
EXP_TYPE_ENDPOINT: Final = 0x0
EXP_TYPE_LEG_END: Final = 0x1
EXP_TYPE_ROOT_PORT: Final = 0x4
EXP_TYPE_UPSTREAM: Final = 0x5
EXP_TYPE_DOWNSTREAM: Final = 0x6
EXP_TYPE_PCI_BRIDGE: Final = 0x7
EXP_TYPE_PCIE_BRIDGE: Final = 0x8
EXP_TYPE_RC_END: Final = 0x9
EXP_TYPE_RC_EC: Final = 0xA
EXP_DEVCAP: Final = 0x04
EXP_DEVCAP_FLR: Final = 0x10000000
EXP_DEVCTL: Final = 0x08
EXP_DEVCTL_BCR_FLR: Final = 0x8000
EXP_DEVSTA: Final = 0x0A
EXP_DEVSTA_TRPND: Final = 0x0020
EXP_LNKCAP: Final = 0x0C
EXP_LNKCAP_SLS: Final = 0x0000000F
EXP_LNKCAP_DLLLARC: Final = 0x00100000
EXP_LNKCTL: Final = 0x10
EXP_LNKSTA: Final = 0x12
EXP_LNKSTA_CLS: Final = 0x000F
EXP_LNKSTA_DLLLA: Final = 0x2000
EXP_SLTCAP: Final = 0x14
EXP_SLTCAP_HPC: Final = 0x00000040
EXP_SLTCTL: Final = 0x18
EXP_SLTSTA: Final = 0x1A
EXP_RTCTL: Final = 0x1C
EXP_RTCAP: Final = 0x1E
EXP_RTSTA: Final = 0x20
EXP_DEVCAP2: Final = 0x24
EXP_DEVCTL2: Final = 0x28
EXP_DEVSTA2: Final = 0x2A
EXP_LNKCAP2: Final = 0x2C
EXP_LNKCTL2: Final = 0x30
EXP_LNKSTA2: Final = 0x32
EXP_SLTCAP2: Final = 0x34
EXP_SLTCTL2: Final = 0x38
EXP_SLTSTA2: Final = 0x3A

# Extended capabilities (PCI_EXT_CAP_*): header at 0x100, id 15:0, version 19:16,
# next 31:20 (dword aligned).
EXT_CAP_START: Final = 0x100
EXT_CAP_ID_ERR: Final = 0x01
EXT_CAP_ID_VC: Final = 0x02
EXT_CAP_ID_DSN: Final = 0x03
EXT_CAP_ID_PWR: Final = 0x04
EXT_CAP_ID_RCLD: Final = 0x05
EXT_CAP_ID_RCILC: Final = 0x06
EXT_CAP_ID_RCEC: Final = 0x07
EXT_CAP_ID_MFVC: Final = 0x08
EXT_CAP_ID_VC9: Final = 0x09
EXT_CAP_ID_RCRB: Final = 0x0A
EXT_CAP_ID_VNDR: Final = 0x0B
EXT_CAP_ID_CAC: Final = 0x0C
EXT_CAP_ID_ACS: Final = 0x0D
EXT_CAP_ID_ARI: Final = 0x0E
EXT_CAP_ID_ATS: Final = 0x0F
EXT_CAP_ID_SRIOV: Final = 0x10
EXT_CAP_ID_MRIOV: Final = 0x11
EXT_CAP_ID_MCAST: Final = 0x12
EXT_CAP_ID_PRI: Final = 0x13
EXT_CAP_ID_AMD_XXX: Final = 0x14
EXT_CAP_ID_REBAR: Final = 0x15
EXT_CAP_ID_DPA: Final = 0x16
EXT_CAP_ID_TPH: Final = 0x17
EXT_CAP_ID_LTR: Final = 0x18
EXT_CAP_ID_SECPCI: Final = 0x19
EXT_CAP_ID_PMUX: Final = 0x1A
EXT_CAP_ID_PASID: Final = 0x1B
EXT_CAP_ID_DPC: Final = 0x1D
EXT_CAP_ID_L1SS: Final = 0x1E
EXT_CAP_ID_PTM: Final = 0x1F
EXT_CAP_ID_DVSEC: Final = 0x23
EXT_CAP_ID_DLF: Final = 0x25
EXT_CAP_ID_PL_16GT: Final = 0x26

# AER (PCI_ERR_*)
ERR_UNCOR_STATUS: Final = 0x04
ERR_UNCOR_MASK: Final = 0x08
ERR_UNCOR_SEVER: Final = 0x0C
ERR_COR_STATUS: Final = 0x10
ERR_COR_MASK: Final = 0x14
ERR_CAP: Final = 0x18
ERR_ROOT_COMMAND: Final = 0x2C

# ACS (PCI_ACS_*)
ACS_CAP: Final = 0x04
ACS_CTRL: Final = 0x06
ACS_SV: Final = 0x0001
ACS_TB: Final = 0x0002
ACS_RR: Final = 0x0004
ACS_CR: Final = 0x0008
ACS_UF: Final = 0x0010
ACS_EC: Final = 0x0020
ACS_DT: Final = 0x0040
# The flags the kernel requires for isolation (REQ_ACS_FLAGS in drivers/pci/pci.c
# / drivers/iommu/iommu.c: SV | RR | CR | UF).
ACS_ISOLATION: Final = ACS_SV | ACS_RR | ACS_CR | ACS_UF

# SR-IOV (PCI_SRIOV_*)
SRIOV_CAP: Final = 0x04
SRIOV_CTRL: Final = 0x08
SRIOV_CTRL_VFE: Final = 0x01
SRIOV_CTRL_MSE: Final = 0x08
SRIOV_STATUS: Final = 0x0A
SRIOV_INITIAL_VF: Final = 0x0C
SRIOV_TOTAL_VF: Final = 0x0E
SRIOV_NUM_VF: Final = 0x10
SRIOV_FUNC_LINK: Final = 0x12
SRIOV_VF_OFFSET: Final = 0x14
SRIOV_VF_STRIDE: Final = 0x16
SRIOV_VF_DID: Final = 0x1A
SRIOV_SUP_PGSIZE: Final = 0x1C
SRIOV_SYS_PGSIZE: Final = 0x20
SRIOV_BAR: Final = 0x24

# Resizable BAR (PCI_REBAR_*)
REBAR_CAP: Final = 4
REBAR_CTRL: Final = 8
REBAR_CTRL_NBAR_MASK: Final = 0x000000E0
REBAR_CTRL_NBAR_SHIFT: Final = 5

# LTR (PCI_LTR_*)
LTR_MAX_SNOOP_LAT: Final = 0x4
LTR_MAX_NOSNOOP_LAT: Final = 0x6

# Vendor ID a function returns while it answers Configuration Request Retry
# Status with CRS Software Visibility enabled (PCIe Base Spec r6.0 sec 2.3.2;
# pci_bus_crs_vendor_id() in drivers/pci/probe.c).
CRS_VENDOR_ID: Final = 0x0001
