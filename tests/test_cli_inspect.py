"""``qreset topology`` and ``qreset doctor`` as a user runs them: subprocesses,
on this machine's real /sys (lspci as the oracle) and on the simulated hosts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, SIM_DIR

SYS_DEVICES = Path("/sys/bus/pci/devices")
SIMS = sorted(SIM_DIR.glob("*.toml"))


def qreset(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "qreset", *args], capture_output=True, text=True, timeout=60,
        cwd=ROOT, env=env, check=False,
    )


def ok_json(*args: str) -> Any:
    proc = qreset(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def real_bdfs() -> set[str]:
    return {p.name for p in SYS_DEVICES.iterdir()}


needs_sys = pytest.mark.skipif(not SYS_DEVICES.is_dir(), reason="no /sys/bus/pci on this machine")


@needs_sys
def test_topology_json_on_real_sys_matches_lspci() -> None:
    data = ok_json("topology")
    assert isinstance(data, list)
    assert {f["bdf"] for f in data} == real_bdfs()
    lspci = shutil.which("lspci")
    if lspci is None:
        pytest.skip("lspci not installed")
    # lspci -D -n -mm: BDF "class(base+sub)" "vendor" "device" ...
    out = subprocess.run([lspci, "-D", "-n", "-mm"], capture_output=True, text=True, check=True).stdout
    by_bdf = {f["bdf"]: f for f in data}
    for line in out.splitlines():
        fields = re.findall(r'"([^"]*)"', line)
        f = by_bdf[line.split()[0]]
        assert f["class"] >> 8 == int(fields[0], 16)
        assert f["vendor"] == int(fields[1], 16)
        assert f["device"] == int(fields[2], 16)
    # Capability offsets against lspci -vv ("Capabilities: [40] ..." / "[100 v1]").
    if os.geteuid() == 0:
        for bdf, f in by_bdf.items():
            text = subprocess.run([lspci, "-vv", "-s", bdf], capture_output=True, text=True,
                                  check=True).stdout
            std = {int(m, 16) for m in re.findall(r"Capabilities: \[([0-9a-f]+)\]", text)}
            ext = {int(m, 16) for m in re.findall(r"Capabilities: \[([0-9a-f]+) v\d+\]", text)}
            assert {c["offset"] for c in f["capabilities"]} == std, bdf
            assert {c["offset"] for c in f["ext_capabilities"]} == ext, bdf


@needs_sys
def test_topology_text_on_real_sys() -> None:
    proc = qreset("topology")
    assert proc.returncode == 0, proc.stderr
    for bdf in real_bdfs():
        assert bdf[5:] in proc.stdout  # BB:DD.F on every tree line
    if not any(Path("/sys/kernel/iommu_groups").glob("*")):
        assert "no IOMMU groups" in proc.stdout.splitlines()[0]
    if not any(SYS_DEVICES.glob("*/reset_method")):
        assert "no reset_method" in proc.stdout.splitlines()[0]


@needs_sys
def test_doctor_json_on_real_sys() -> None:
    data = ok_json("doctor")
    assert {f["bdf"] for f in data["functions"]} == real_bdfs()
    notes = {n["code"] for n in data["notes"]}
    assert ("no-iommu" in notes) == (not any(Path("/sys/kernel/iommu_groups").glob("*")))
    assert ("no-reset-method-attr" in notes) == (not any(SYS_DEVICES.glob("*/reset_method")))
    for f in data["functions"]:
        has_file = (SYS_DEVICES / f["bdf"] / "reset_method").exists()
        assert bool(f["reset_methods"]) == has_file


@needs_sys
def test_doctor_selected_function_and_text() -> None:
    first = sorted(real_bdfs())[-1]
    data = ok_json("doctor", first[5:])  # short form BB:DD.F
    assert [f["bdf"] for f in data["functions"]] == [first]
    proc = qreset("doctor", first)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n0000:") == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["doctor", "00:1g.0"], "'00:1g.0'"),
        (["doctor", "0000:00:1f.9"], "'0000:00:1f.9'"),
        (["doctor", "--sim", "/nonexistent/x.toml"], "/nonexistent/x.toml"),
        (["topology", "--sim", "/nonexistent/x.toml"], "/nonexistent/x.toml"),
        (["topology", "--sysfs-root", "/nonexistent"], "/nonexistent"),
        (["doctor", "--sim", "a.toml", "--sysfs-root", "/sys"], "not allowed with"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], needle: str) -> None:
    proc = qreset(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert needle in lines[-1]
    if "not allowed" not in needle:  # argparse's own errors print usage first
        assert len(lines) == 1
        assert lines[0].startswith("qreset: ")


@needs_sys
def test_unknown_bdf_exit_2() -> None:
    missing = next(f"0000:00:{d:02x}.0" for d in range(32) if f"0000:00:{d:02x}.0" not in real_bdfs())
    proc = qreset("doctor", missing)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"qreset: no such PCI function on sysfs:/sys: {missing}"


def test_help_teaches_with_examples() -> None:
    for cmd in ("topology", "doctor"):
        proc = qreset(cmd, "--help")
        assert proc.returncode == 0
        assert "examples:" in proc.stdout
        assert f"qreset {cmd} --sim configs/sim/" in proc.stdout


@pytest.mark.parametrize("sim", SIMS, ids=[p.stem for p in SIMS])
def test_sim_topology_and_doctor(sim: Path) -> None:
    topo = ok_json("topology", "--sim", str(sim))
    doc = ok_json("doctor", "--sim", str(sim))
    bdfs = [f["bdf"] for f in topo]
    assert bdfs == sorted(bdfs)
    assert [f["bdf"] for f in doc["functions"]] == bdfs
    by = {f["bdf"]: f for f in topo}
    for f in topo:
        assert f["parent"] is None or f["parent"] in by
        assert all(isinstance(c["id"], int) for c in f["capabilities"])


def test_sysfs_root_tree_equals_sim(tmp_path: Path) -> None:
    """``--sysfs-root`` on the tree the simulator writes prints the same JSON as ``--sim``
    (every sim is compared in-process in test_topology; here the biggest, end to end)."""
    import asyncio

    from qreset.pci.sim import SimHost

    sim = SIM_DIR / "demo.toml"
    host = SimHost.from_toml(sim)
    host.write_tree(tmp_path)
    asyncio.run(host.close())
    assert ok_json("topology", "--sysfs-root", str(tmp_path)) == ok_json("topology", "--sim", str(sim))
    doc_sys = ok_json("doctor", "--sysfs-root", str(tmp_path))
    doc_sim = ok_json("doctor", "--sim", str(sim))
    assert doc_sys["functions"] == doc_sim["functions"]
    assert doc_sys["host"] != doc_sim["host"]


def test_sim_doctor_text_names_blockers() -> None:
    proc = qreset("doctor", "--sim", str(SIM_DIR / "conventional.toml"), "02:02.0")
    assert proc.returncode == 0, proc.stderr
    assert "blocked by: 0000:02:02.0 (firewire_ohci)" in proc.stdout
    assert "[warning] behind a conventional (PCIe-to-PCI) bridge 0000:01:00.0" in proc.stdout
    assert proc.stdout.count("\n0000:") == 1


def test_bad_sim_file_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[function]]\nname = 'x'\ntype = 'nonsense'\n")
    proc = qreset("topology", "--sim", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("qreset: ")
    assert "bad.toml" in lines[0]


def test_tree_nests_like_lspci_t() -> None:
    import asyncio

    from qreset.cli.topology import render_tree
    from qreset.pci.sim import SimHost
    from qreset.topology import Topology

    async def load() -> Topology:
        host = SimHost.from_toml(SIM_DIR / "switch.toml")
        try:
            return await Topology.load(host)
        finally:
            await host.close()

    lines = render_tree(asyncio.run(load()))
    depth = {}
    for line in lines[2:]:
        m = re.match(r"^([|` -]*?)[|`]-- ([0-9a-f]{2}:[0-9a-f]{2}\.\d) ", line)
        assert m is not None, line
        depth[m[2]] = len(m[1]) // 4
    assert depth == {
        "00:00.0": 0, "00:01.0": 0, "01:00.0": 1,
        "02:08.0": 2, "02:09.0": 2, "02:10.0": 2, "02:11.0": 2,
        "03:00.0": 3, "04:00.0": 3, "05:00.0": 3, "06:00.0": 3,
    }
    line = next(ln for ln in lines if "06:00.0" in ln)
    assert "driver=xhci_hcd" in line
    assert "reset=pm,bus" in line
    port = next(ln for ln in lines if "02:11.0" in ln)
    assert "no-ACS" in port
    assert "bus [06-06]" in port


def test_closed_pipe_is_not_a_traceback() -> None:
    # `qreset doctor | head -1`: the reader goes away before we write.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for cmd in (["doctor"], ["topology", "--json"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "qreset", *cmd, "--sim", str(SIM_DIR / "demo.toml")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in err
