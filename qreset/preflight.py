"""
A configuration checked against this machine, before the daemon creates anything.

:func:`qreset.config.load_config` checks the file alone (keys, types, ranges,
names and devices given once). What depends on the machine is checked here,
because each of these used to fail only at start-up (exit 1, after the journal
was created, no key named) or, worse, to be accepted and fail later or never:

* **paths** (:func:`check_paths`): a socket path must fit ``sun_path``; a path
  must not be a directory or another kind of file than the one it names; its
  nearest existing ancestor must be a directory; and the journal and every
  socket (control, metrics, each VM's QMP) must be distinct *files*, compared
  resolved (``a.qmp``, ``/etc/qreset/a.qmp`` and ``x/../a.qmp`` are one socket:
  two monitors on one QMP socket fight over it);
* **the host** (:func:`check_host`): the simulated topology loads, or
  ``sysfs_root`` is a sysfs tree with PCI; every configured device and every
  ``allow`` entry is a function of that host, and no device is a bridge.

Nothing here creates, binds or opens anything for writing: a refused
configuration leaves no file behind. Every problem is one
:class:`~qreset.errors.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from qreset.config import Config, SimSection, load_config, parse_toml, read_file
from qreset.errors import ConfigError, QResetError
from qreset.pci.host import PciHost
from qreset.topology import Topology

#: sizeof(sun_path) on Linux, including the terminating NUL (unix(7)).
UNIX_PATH_MAX = 108
#: A topology file is a few KB too (configs/sim/*.toml).
MAX_TOPOLOGY_BYTES = 1 << 20


def validate(path: Path, sim: Path | None = None) -> Config:
    """Everything ``qreset run --config PATH [--sim SIM]`` checks before it starts."""
    config = load_config(path)
    sim_key = f"{config.source}: sim.topology"
    if sim is not None:
        time_scale = config.sim.time_scale if config.sim is not None else 1.0
        config = config.model_copy(update={"sim": SimSection(topology=sim.absolute(), time_scale=time_scale)})
        sim_key = "--sim"
    check_paths(config)
    asyncio.run(check_host(config, sim_key))
    return config


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a regular file"


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_one(where: str, path: Path, *, socket: bool) -> Path:
    """One journal/socket path: its shape and what is there now. Returns it resolved."""
    text = os.fsencode(path)
    if b"\0" in text:
        raise ConfigError(where, f"path contains a NUL character: {str(path)[:60]!r}")
    if socket and len(text) >= UNIX_PATH_MAX:
        raise ConfigError(where, f"{len(text)}-byte socket path is longer than {UNIX_PATH_MAX - 1} bytes "
                          "(sun_path holds 108 with the NUL, unix(7)); use a shorter directory")
    st = _stat(path)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(where, f"{path} is a directory")
        wanted = stat.S_ISSOCK(st.st_mode) if socket else stat.S_ISREG(st.st_mode)
        if not wanted:
            raise ConfigError(where, f"{path} exists and is not a {'socket' if socket else 'regular file'} "
                              f"(it is {_kind(st.st_mode)})")
    else:
        for parent in path.parents:
            pst = _stat(parent)
            if pst is None:
                continue  # created at start-up (the journal's and sockets' directories are made)
            if not stat.S_ISDIR(pst.st_mode):
                raise ConfigError(where, f"{parent} is not a directory (it is {_kind(pst.st_mode)})")
            break
    return Path(os.path.realpath(path))


def check_paths(config: Config) -> None:
    """The journal and the sockets: see the module docstring. Raises ConfigError."""
    src = config.source
    owned: list[tuple[str, Path, bool]] = [("daemon.journal", config.daemon.journal, False)]
    if config.daemon.control_socket is not None:
        owned.append(("daemon.control_socket", config.daemon.control_socket, True))
    if config.metrics.listen is not None:
        from qreset.metrics import parse_listen

        listen = parse_listen(config.metrics.listen, f"{src}: metrics.listen")
        if listen.path is not None:
            owned.append(("metrics.listen", listen.path, True))
    owned += [(f"vm.{vm.name}.qmp", vm.qmp, True) for vm in config.vm]
    seen: dict[Path, str] = {}
    for key, path, socket in owned:
        resolved = _check_one(f"{src}: {key}", path, socket=socket)
        if resolved in seen:
            raise ConfigError(f"{src}: {key}", f"{path} is also {seen[resolved]}: "
                              "each socket and the journal need a path of their own")
        seen[resolved] = key


def _check_sysfs_root(config: Config) -> None:
    """``sysfs_root`` is a directory, and a sysfs tree with PCI when it is the host in use.

    (Checked with [sim] too: a path in the file that names nothing is a mistake
    the operator wants to hear about before removing [sim].)
    """
    root = config.daemon.sysfs_root
    where = f"{config.source}: daemon.sysfs_root"
    st = _stat(root)
    if st is None:
        raise ConfigError(where, f"{root}: no such directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(where, f"{root} is not a directory (it is {_kind(st.st_mode)})")
    if config.sim is None and not (root / "bus" / "pci" / "devices").is_dir():
        raise ConfigError(where, f"{root} has no bus/pci/devices: not a sysfs tree with PCI")


def _open_host(config: Config, sim_key: str) -> PciHost:
    """The host the configuration names, opened without side effects (ConfigError keyed)."""
    _check_sysfs_root(config)
    if config.sim is not None:
        from qreset.pci.sim import SimHost

        where = str(config.sim.topology)
        try:
            data = parse_toml(read_file(config.sim.topology, MAX_TOPOLOGY_BYTES), where)
            return SimHost.from_dict(data, where, config.sim.time_scale)
        except ConfigError as exc:
            raise ConfigError(sim_key, str(exc)) from None
    from qreset.pci.sysfs import SysfsHost

    return SysfsHost(config.daemon.sysfs_root)


async def check_host(config: Config, sim_key: str | None = None) -> None:
    """Devices and ``allow`` entries against the host's functions. Raises ConfigError.

    ``sim_key`` names where the simulated topology came from (``--sim``);
    by default the file's ``sim.topology``.
    """
    src = config.source
    sim_key = sim_key or f"{src}: sim.topology"
    host = _open_host(config, sim_key)
    try:
        try:
            topo = await Topology.load(host)
        except QResetError as exc:
            key = sim_key if config.sim is not None else f"{src}: daemon.sysfs_root"
            raise ConfigError(key, f"cannot read the host: {exc}") from None
    finally:
        await host.close()
    for vm in config.vm:
        for j, dev in enumerate(vm.device):
            where = f"{src}: vm.{vm.name}.device[{j}].host"
            if dev.host not in topo:
                raise ConfigError(where, f"{dev.host}: no such PCI function on {topo.host_name}")
            if topo.is_bridge(dev.host):
                # vfio-pci binds type 0 headers only: vfio_pci_core_register_device()
                # returns -EINVAL for hdr_type != PCI_HEADER_TYPE_NORMAL.
                raise ConfigError(where, f"{dev.host} is a PCI bridge, not a device a VM can be given")
    for k, addr in enumerate(config.policy.allow):
        if addr not in topo:
            raise ConfigError(f"{src}: policy.allow[{k}]",
                              f"{addr}: no such PCI function on {topo.host_name}")
