"""lspci (pciutils) as an independent decoder of config-space bytes: the oracle's machinery.

The bytes go into a dump in ``lspci -xxxx`` format and ``lspci -F DUMP -vvv -n -D``
decodes them; :func:`check_all` compares its capability lists with
:func:`qreset.pci.cfgspace.parse_config` (why and where the two may differ:
tests/test_lspci_oracle.py). Used by that module and by the lab's
tests/lab/test_lspci.py on the real kernel's sysfs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from qreset.pci import regs
from qreset.pci.address import PciAddress
from qreset.pci.cfgspace import ConfigSpace, parse_config

LSPCI = shutil.which("lspci")

# Standard capability names: the first words show_caps (ls-caps.c) prints per
# PCI_CAP_ID_*. Unknown IDs print "Capability ID 0x%02x" (3.9) or "#%02x" (older).
STD_NAMES: tuple[tuple[str, int], ...] = (
    ("Null", 0x00),
    ("Power Management version", regs.CAP_ID_PM),
    ("AGP version", regs.CAP_ID_AGP),
    ("Vital Product Data", regs.CAP_ID_VPD),
    ("Slot ID", regs.CAP_ID_SLOTID),
    ("MSI:", regs.CAP_ID_MSI),
    ("CompactPCI hot-swap", regs.CAP_ID_CHSWP),
    ("PCI-X ", regs.CAP_ID_PCIX),
    ("HyperTransport", regs.CAP_ID_HT),
    ("Vendor Specific Information", regs.CAP_ID_VNDR),
    ("Debug port", regs.CAP_ID_DBG),
    ("CompactPCI central resource control", regs.CAP_ID_CCRC),
    ("Hot-plug capable", regs.CAP_ID_SHPC),
    ("Subsystem:", regs.CAP_ID_SSVID),
    ("AGP3", regs.CAP_ID_AGP3),
    ("Secure device", regs.CAP_ID_SECDEV),
    ("Express", regs.CAP_ID_EXP),
    ("MSI-X:", regs.CAP_ID_MSIX),
    ("SATA HBA", regs.CAP_ID_SATA),
    ("PCI Advanced Features", regs.CAP_ID_AF),
    ("Enhanced Allocation (EA)", regs.CAP_ID_EA),
)

# Extended capability names (show_ext_caps in ls-ecaps.c). "Virtual Channel"
# covers both PCI_EXT_CAP_ID_VC and _VC2 (0x09). Unknown IDs print
# "Extended Capability ID 0x%x".
EXT_NAMES: tuple[tuple[str, frozenset[int]], ...] = tuple(
    (name, frozenset(ids) if isinstance(ids, tuple) else frozenset((ids,)))
    for name, ids in (
        ("Null", 0x00),
        ("Advanced Error Reporting", regs.EXT_CAP_ID_ERR),
        ("Virtual Channel", (regs.EXT_CAP_ID_VC, regs.EXT_CAP_ID_VC9)),
        ("Device Serial Number", regs.EXT_CAP_ID_DSN),
        ("Power Budgeting", regs.EXT_CAP_ID_PWR),
        ("Root Complex Link", regs.EXT_CAP_ID_RCLD),
        ("Root Complex Internal Link", regs.EXT_CAP_ID_RCILC),
        ("Root Complex Event Collector", regs.EXT_CAP_ID_RCEC),
        ("Multi-Function Virtual Channel", regs.EXT_CAP_ID_MFVC),
        ("Root Complex Register Block", regs.EXT_CAP_ID_RCRB),
        ("Vendor Specific Information", regs.EXT_CAP_ID_VNDR),
        ("Access Control Services", regs.EXT_CAP_ID_ACS),
        ("Alternative Routing-ID Interpretation", regs.EXT_CAP_ID_ARI),
        ("Address Translation Service", regs.EXT_CAP_ID_ATS),
        ("Single Root I/O Virtualization", regs.EXT_CAP_ID_SRIOV),
        ("Multi-Root I/O Virtualization", regs.EXT_CAP_ID_MRIOV),
        ("Multicast", regs.EXT_CAP_ID_MCAST),
        ("Page Request Interface", regs.EXT_CAP_ID_PRI),
        ("Physical Resizable BAR", regs.EXT_CAP_ID_REBAR),
        ("Dynamic Power Allocation", regs.EXT_CAP_ID_DPA),
        ("Transaction Processing Hints", regs.EXT_CAP_ID_TPH),
        ("Latency Tolerance Reporting", regs.EXT_CAP_ID_LTR),
        ("Secondary PCI Express", regs.EXT_CAP_ID_SECPCI),
        ("Protocol Multiplexing", regs.EXT_CAP_ID_PMUX),
        ("Process Address Space ID", regs.EXT_CAP_ID_PASID),
        ("LN Requester", 0x1C),
        ("Downstream Port Containment", regs.EXT_CAP_ID_DPC),
        ("L1 PM Substates", regs.EXT_CAP_ID_L1SS),
        ("Precision Time Measurement", regs.EXT_CAP_ID_PTM),
        ("PCI Express over M_PHY", 0x20),
        ("FRS Queueing", 0x21),
        ("Readiness Time Reporting", 0x22),
        ("Designated Vendor-Specific", regs.EXT_CAP_ID_DVSEC),
        ("Virtual Resizable BAR", 0x24),
        ("Data Link Feature", regs.EXT_CAP_ID_DLF),
        ("Physical Layer 16.0 GT/s", regs.EXT_CAP_ID_PL_16GT),
        ("Lane Margining at the Receiver", 0x27),
        ("Hierarchy ID", 0x28),
        ("Native PCIe Enclosure Management", 0x29),
        ("Physical Layer 32.0 GT/s", 0x2A),
        ("Data Object Exchange", 0x2E),
    )
)

_DEV_RE = re.compile(r"^([0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]) (.*)$")
_CAP_RE = re.compile(r"^\tCapabilities: (?:\[([0-9a-f]+)(?: v(\d+))?\] )?(.*)$")


def std_ids(text: str) -> frozenset[int]:
    """IDs lspci's name can stand for; empty when lspci printed no name at all."""
    if not text:
        return frozenset()
    m = re.match(r"(?:Capability ID 0x|#)([0-9a-f]{1,2})\b", text)
    if m:
        return frozenset((int(m[1], 16),))
    # Longest prefix first so "MSI-X:" is never read as "MSI".
    for name, cap_id in sorted(STD_NAMES, key=lambda e: -len(e[0])):
        if text.startswith(name):
            return frozenset((cap_id,))
    raise AssertionError(f"lspci printed a standard capability name not in STD_NAMES: {text!r}")


def ext_ids(text: str) -> frozenset[int]:
    m = re.match(r"Extended Capability ID 0x([0-9a-f]+)\b", text)
    if m:
        return frozenset((int(m[1], 16),))
    for name, ids in sorted(EXT_NAMES, key=lambda e: -len(e[0])):
        if text.startswith(name):
            return ids
    raise AssertionError(f"lspci printed an extended capability name not in EXT_NAMES: {text!r}")


@dataclass
class LspciFunction:
    """What lspci said about one function."""

    header: str
    std: list[tuple[int, frozenset[int]]] = field(default_factory=list)
    ext: list[tuple[int, int, frozenset[int]]] = field(default_factory=list)
    access_denied: bool = False
    looped: bool = False
    broken: bool = False


def dump_text(functions: dict[PciAddress, bytes]) -> str:
    """``lspci -xxxx`` format: a header line, then 16 bytes per line."""
    out: list[str] = []
    for addr, data in functions.items():
        out.append(f"{addr} Function under test")
        for off in range(0, len(data), 16):
            width = 2 if len(data) <= 0x100 else 3
            out.append(f"{off:0{width}x}: " + " ".join(f"{b:02x}" for b in data[off:off + 16]))
        out.append("")
    return "\n".join(out)


def run_lspci(functions: dict[PciAddress, bytes], workdir: Path) -> dict[PciAddress, LspciFunction]:
    assert LSPCI is not None
    dump = workdir / "lspci.dump"
    dump.write_text(dump_text(functions))
    proc = subprocess.run(
        [LSPCI, "-F", str(dump), "-vvv", "-n", "-D"],
        capture_output=True, text=True, errors="replace", timeout=60, check=False,
    )
    assert proc.returncode == 0, f"lspci failed ({proc.returncode}): {proc.stderr.strip()}"
    result: dict[PciAddress, LspciFunction] = {}
    current: LspciFunction | None = None
    # A decoder that cannot fetch its registers may print nothing, not even
    # the newline, so the next "\tCapabilities: " lands on the same line.
    for line in proc.stdout.replace("] \tCapabilities: ", "] \n\tCapabilities: ").splitlines():
        dm = _DEV_RE.match(line)
        if dm:
            current = result.setdefault(PciAddress.parse(dm[1]), LspciFunction(dm[2]))
            continue
        cm = _CAP_RE.match(line)
        if not cm or current is None:
            continue
        off, version, text = cm[1], cm[2], cm[3]
        if off is None:
            assert text == "<access denied>", line
            current.access_denied = True
            continue
        if text.startswith("<chain looped>"):
            current.looped = True
            continue
        if text.startswith("<chain broken>"):
            current.broken = True
            continue
        if version is None:
            current.std.append((int(off, 16), std_ids(text)))
        else:
            current.ext.append((int(off, 16), int(version), ext_ids(text)))
    missing = set(functions) - set(result)
    assert not missing, f"lspci did not list {sorted(map(str, missing))}"
    return result


def _header_mismatches(cfg: ConfigSpace, header: str) -> list[str]:
    out: list[str] = []
    # lspci -n: "CCCC: VVVV:DDDD (rev RR) (prog-if PP)"
    m = re.match(r"([0-9a-f]{4}): ([0-9a-f]{4}):([0-9a-f]{4})\b", header)
    if m is None:
        return [f"unexpected lspci header line {header!r}"]
    if (int(m[2], 16), int(m[3], 16)) != (cfg.vendor_id, cfg.device_id):
        out.append(f"vendor:device: lspci {m[2]}:{m[3]}, ours {cfg.vendor_id:04x}:{cfg.device_id:04x}")
    if int(m[1], 16) != cfg.class_code >> 8:
        out.append(f"class: lspci {m[1]}, ours {cfg.class_code >> 8:04x}")
    rev = re.search(r"\(rev ([0-9a-f]{2})\)", header)
    if (int(rev[1], 16) if rev else 0) != cfg.revision:
        out.append(f"revision: lspci {rev and rev[1]}, ours {cfg.revision:02x}")
    progif = re.search(r"\(prog-if ([0-9a-f]{2})", header)
    if (int(progif[1], 16) if progif else 0) != cfg.class_code & 0xFF:
        out.append(f"prog-if: lspci {progif and progif[1]}, ours {cfg.class_code & 0xFF:02x}")
    return out


def compare(data: bytes, seen: LspciFunction) -> list[str]:
    """Every way parse_config(data) disagrees with lspci, as readable lines."""
    cfg = parse_config(data)
    out = _header_mismatches(cfg, seen.header)

    # Absent or answering CRS: we decode the header only (lspci decodes the
    # all-ones or retry bytes as if they were a device).
    if not cfg.present:
        if cfg.capabilities or cfg.ext_capabilities:
            out.append("capabilities decoded for an absent function")
        return out
    # Status all-ones: we refuse to walk (see config._walk_caps), lspci walks.
    if cfg.status == 0xFFFF:
        if not any("status reads 0xffff" in p for p in cfg.problems):
            out.append("status is 0xffff but we did not report it")
        return out
    # Standard list: lspci follows pointers below 0x40, the kernel stops there.
    theirs = seen.std
    cut = next((i for i, (off, _) in enumerate(theirs) if off < 0x40), None)
    if cut is not None:
        theirs = theirs[:cut]
        if not any("points into the header" in p for p in cfg.problems):
            out.append("lspci followed a pointer into the header; we did not report it")
    ours_std = [(c.offset, c.id) for c in cfg.capabilities]
    if [off for off, _ in theirs] != [off for off, _ in ours_std]:
        out.append(f"capability offsets: lspci {[hex(o) for o, _ in theirs]}, "
                   f"ours {[hex(o) for o, _ in ours_std]}")
    else:
        for (off, ids), (_, ours_id) in zip(theirs, ours_std, strict=True):
            if ids and ours_id not in ids:
                out.append(f"capability at {off:#x}: lspci id {sorted(ids)}, ours {ours_id:#x}")
    if seen.access_denied and cut is None and not any("not read" in p for p in cfg.problems):
        out.append("lspci could not read a capability; we did not report a short read")

    # Extended list, when lspci walks it at all.
    walks_ext = any(ids & {regs.CAP_ID_EXP, regs.CAP_ID_PCIX} for _, ids in seen.std) and len(data) >= 0x104
    if walks_ext:
        ext = seen.ext
        cut = next((i for i, (off, _, _) in enumerate(ext) if off < 0x100), None)
        if cut is not None:
            ext = ext[:cut]
            if not any("points into the header" in p for p in cfg.problems):
                out.append("lspci followed an extended pointer below 0x100; we did not report it")
        ours_ext = [(e.offset, e.version, e.id) for e in cfg.ext_capabilities]
        if [(o, v) for o, v, _ in ext] != [(o, v) for o, v, _ in ours_ext]:
            out.append(f"extended capabilities: lspci {[(hex(o), v) for o, v, _ in ext]}, "
                       f"ours {[(hex(o), v) for o, v, _ in ours_ext]}")
        else:
            for (off, _, ids), (_, _, ours_id) in zip(ext, ours_ext, strict=True):
                if ours_id not in ids:
                    out.append(f"extended capability at {off:#x}: lspci id {sorted(ids)}, ours {ours_id:#x}")
    elif seen.ext:
        out.append(f"lspci showed extended capabilities without a PCIe/PCI-X capability: {seen.ext}")
    return out


def check_all(functions: dict[PciAddress, bytes], workdir: Path) -> int:
    """Compare every function; fail listing all differences. Returns capabilities compared."""
    seen = run_lspci(functions, workdir)
    problems: list[str] = []
    count = 0
    for addr, data in functions.items():
        problems += [f"{addr}: {p}" for p in compare(data, seen[addr])]
        count += len(seen[addr].std) + len(seen[addr].ext)
    assert not problems, "parse_config and lspci disagree:\n" + "\n".join(problems)
    return count
