"""
What qreset needs from a libvirt domain XML (the hook's stdin).

Only two things: the host PCI addresses of ``<hostdev mode='subsystem'
type='pci'>`` entries, and the path of the extra QMP monitor libvirt was told
to add for qreset (libvirt owns its own monitor socket and allows one client,
so qreset needs its own: see :data:`COMMANDLINE_SNIPPET`).
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from qreset.errors import AddressError, ConfigError
from qreset.pci.address import PciAddress

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
RUN_DIR = "/run/qreset"

#: The domain XML fragment that gives qreset its own QMP monitor.
COMMANDLINE_SNIPPET = """\
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  ...
  <qemu:commandline>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=qreset0,path=/run/qreset/DOMAIN.qmp,server=on,wait=off'/>
    <qemu:arg value='-mon'/>
    <qemu:arg value='chardev=qreset0,mode=control'/>
  </qemu:commandline>
</domain>"""


@dataclass(frozen=True, slots=True)
class DomainInfo:
    name: str
    uuid: str | None
    hostdevs: tuple[PciAddress, ...]
    qmp: str | None


def default_qmp_path(name: str) -> str:
    return f"{RUN_DIR}/{name}.qmp"


def _int(text: str | None, what: str, where: str) -> int:
    if text is None:
        raise ConfigError(where, f"<address> lacks the {what} attribute")
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(where, f"<address {what}={text!r}> is not a number") from None


def _qmp_from_commandline(root: ET.Element) -> str | None:
    args = [a.get("value", "") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    # The chardev is the one a control-mode -mon uses; look for qreset's id first.
    chardevs: dict[str, str] = {}
    monitors: list[str] = []
    for flag, value in itertools.pairwise(args):
        opts = dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv)
        if flag == "-chardev" and "id" in opts and "path" in opts:
            chardevs[opts["id"]] = opts["path"]
        elif flag == "-mon" and opts.get("mode") == "control" and "chardev" in opts:
            monitors.append(opts["chardev"])
    for chardev in ["qreset0", *monitors]:
        if chardev in chardevs and chardev in monitors:
            return chardevs[chardev]
    return None


def parse_domain_xml(text: str, where: str = "domain XML") -> DomainInfo:
    """Parse the hook's stdin. Raises ConfigError naming ``where`` and the problem."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ConfigError(where, f"not XML: {exc}") from None
    if root.tag != "domain":
        raise ConfigError(where, f"root element is <{root.tag}>, expected <domain>")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise ConfigError(where, "<domain> has no <name>")
    hostdevs: list[PciAddress] = []
    for i, hd in enumerate(root.iterfind("devices/hostdev")):
        if hd.get("mode", "subsystem") != "subsystem" or hd.get("type") != "pci":
            continue
        addr = hd.find("source/address")
        here = f"{where}: hostdev #{i + 1}"
        if addr is None:
            raise ConfigError(here, "PCI <hostdev> without <source><address>")
        try:
            hostdevs.append(PciAddress(
                _int(addr.get("domain", "0"), "domain", here),
                _int(addr.get("bus"), "bus", here),
                _int(addr.get("slot"), "slot", here),
                _int(addr.get("function", "0"), "function", here),
            ))
        except AddressError as exc:
            raise ConfigError(here, str(exc)) from None
    uuid = root.findtext("uuid")
    return DomainInfo(name, uuid.strip() if uuid else None, tuple(hostdevs), _qmp_from_commandline(root))
