"""sd_notify against a real NOTIFY_SOCKET datagram socket, path and abstract."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from qreset import sdnotify


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_ready_and_stopping_reach_a_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with _bind(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sdnotify.ready("serving 2 VMs")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 VMs"
        assert sdnotify.stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"qreset-test-{os.getpid()}"
    with _bind("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_is_a_quiet_no_op(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", environ={})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "relative/path"})
    # A socket that went away: no exception, just False.
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
