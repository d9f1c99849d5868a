"""What QEMU's own reset does, by VFIO backend: legacy groups vs iommufd cdevs.

QEMU's two hot-reset paths (hw/vfio/pci.c's legacy container path and
``iommufd_cdev_pci_hot_reset`` in hw/vfio/iommufd.c) check ownership
differently (groups it opened vs device ids the kernel calls owned) but, with
one iommufd per QEMU, refuse and allow the same resets; only what they say differs.
"""

from __future__ import annotations

import itertools

import pytest

from qreset.qemu_model import QemuAction, VfioBackend, hot_reset_refusal, predict
from qreset.topology import Topology
from tests.helpers_plan import A, host, rp
from tests.pcibuild import config, node

GPU, AUDIO = A("01:00.0"), A("01:00.1")


def test_group_backend_names_the_group_that_is_not_owned() -> None:
    [q] = predict(host(), [GPU], backend=VfioBackend.GROUP)
    # The GPU has PM and no FLR: the hot reset comes first, is refused, PM follows.
    assert q.action is QemuAction.PM_RESET
    assert q.detail.startswith(f"Cannot reset device {GPU}, depends on group 12 which is not owned")


def test_iommufd_backend_names_the_device_that_is_not_owned() -> None:
    [q] = predict(host(), [GPU], backend=VfioBackend.IOMMUFD)
    assert q.action is QemuAction.PM_RESET
    assert q.detail.startswith(f"Cannot reset device {GPU}, depends on device {AUDIO} which is not owned")


def test_iommufd_hot_reset_passes_no_group_fds() -> None:
    by_backend = {b: predict(host(), [GPU, AUDIO], backend=b) for b in VfioBackend}
    for preds in by_backend.values():
        assert [q.action for q in preds] == [QemuAction.HOT_RESET, QemuAction.HOT_RESET]
    assert all("empty group-fd array" in q.detail for q in by_backend[VfioBackend.IOMMUFD])
    assert not any("group-fd" in q.detail for q in by_backend[VfioBackend.GROUP])


def _shared_group() -> Topology:
    """A GPU (PM only) and its audio function in ONE IOMMU group; only the GPU is assigned."""
    nodes = [
        rp("00:01.0", 1),
        node("01:00.0", config(multifunction=True, pm=True), parent="00:01.0", driver="vfio-pci",
             group=11, methods=("pm",)),
        node("01:00.1", config(multifunction=True), parent="00:01.0", driver="vfio-pci", group=11),
    ]
    return Topology({n.address: n for n in nodes}, [], True, "shared-group")


@pytest.mark.parametrize("backend", list(VfioBackend))
def test_a_device_sharing_an_owned_group_does_not_block(backend: VfioBackend) -> None:
    # group: the group is open in this QEMU; iommufd: vfio_iommufd_get_dev_id reports the
    # audio as VFIO_PCI_DEVID_OWNED (its group is in the context), so DEV_ID_OWNED is set.
    topo = _shared_group()
    assert hot_reset_refusal(topo, GPU, [GPU], backend=backend) is None
    [q] = predict(topo, [GPU], backend=backend)
    assert q.action is QemuAction.HOT_RESET


@pytest.mark.parametrize("backend", list(VfioBackend))
def test_another_vms_device_blocks_on_both_backends(backend: VfioBackend) -> None:
    why = hot_reset_refusal(host(), GPU, [GPU], held_elsewhere=[AUDIO], backend=backend)
    assert why == f"Cannot reset device {GPU}, depends on device {AUDIO} which is not owned (another VM's)"


def test_both_backends_refuse_and_allow_the_same_resets() -> None:
    topo = host()
    vfio = sorted(a for a, n in topo.functions.items() if n.info.driver == "vfio-pci")
    for size in (1, 2, 3):
        for owned in itertools.combinations(vfio, size):
            group = predict(topo, owned, backend=VfioBackend.GROUP)
            fd = predict(topo, owned, backend=VfioBackend.IOMMUFD)
            assert [q.action for q in group] == [q.action for q in fd], owned
            for a, b in zip(group, fd, strict=True):
                assert ("Cannot reset" in a.detail) == ("Cannot reset" in b.detail), (owned, a, b)


def test_default_backend_is_the_legacy_group_one() -> None:
    assert predict(host(), [GPU]) == predict(host(), [GPU], backend=VfioBackend.GROUP)


def test_per_function_backends_from_the_inventory() -> None:
    # One QEMU may open one device through iommufd and another through its group:
    # each prediction is made, and labelled, for its own function's backend.
    preds = predict(host(), [GPU, AUDIO], backends={GPU: VfioBackend.IOMMUFD})
    by_fn = {q.function: q for q in preds}
    assert by_fn[GPU].backend is VfioBackend.IOMMUFD
    assert "empty group-fd array (iommufd)" in by_fn[GPU].detail
    assert by_fn[AUDIO].backend is VfioBackend.GROUP
    assert "group-fd" not in by_fn[AUDIO].detail


def test_make_plan_predicts_qemu_for_the_given_backends() -> None:
    from qreset.plan import Policy, make_plan, owners_of

    topo = host()
    owners = owners_of(topo, {"vm": [GPU]}, "vm")
    plain = make_plan("vm", [GPU], topo, owners, Policy())
    cdev = make_plan("vm", [GPU], topo, owners, Policy(), backends={GPU: VfioBackend.IOMMUFD})
    assert [q.backend for q in plain.qemu] == [VfioBackend.GROUP]
    assert [q.backend for q in cdev.qemu] == [VfioBackend.IOMMUFD]
    assert "depends on device" in cdev.qemu[0].detail
    assert cdev.to_json()["qemu"][0]["backend"] == "iommufd"
