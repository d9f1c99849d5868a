"""sd_notify against a real NOTIFY_SOCKET datagram socket, path and abstract."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qreset import sdnotify
from qreset.qmpsync import call
from tests.conftest import ROOT, SIM_DIR
from tests.qemu_helpers import short_tmpdir


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


def _scrape(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def test_daemon_notifies_ready_after_its_sockets_exist_and_stopping_at_shutdown() -> None:
    """``qreset run`` under a NOTIFY_SOCKET, as systemd runs it (Type=notify)."""
    with short_tmpdir() as wd:
        control = wd / "c.sock"
        metrics = wd / "m.sock"
        cfg = wd / "qreset.toml"
        cfg.write_text(
            f'[daemon]\njournal = "journal.jsonl"\ncontrol_socket = "{control}"\n'
            f'[sim]\ntopology = "{SIM_DIR / "demo.toml"}"\ntime_scale = 0.01\n'
            f'[metrics]\nlisten = "unix:{metrics}"\n')
        with _bind(str(wd / "notify")) as sock:
            sock.settimeout(30)
            env = {**os.environ, "NOTIFY_SOCKET": str(wd / "notify")}
            proc = subprocess.Popen([sys.executable, "-m", "qreset", "run", "--config", str(cfg)],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                ready = sock.recv(4096)
                # At READY=1 both sockets answer (systemd starts dependants now).
                sockets_then = (control.is_socket(), metrics.is_socket())
                status = call(str(control), "query-status", 5.0)
                scrape = _scrape(metrics)
                proc.send_signal(signal.SIGTERM)
                stopping = sock.recv(4096)
                out, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert ready.split(b"\n")[0] == b"READY=1", ready
    assert sockets_then == (True, True)
    assert status["state"] == "running"
    # The [metrics] listener serves the same status as Prometheus text.
    assert scrape.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"\nqreset_vms 0.0\n" in scrape
    assert f"\nqreset_cycles_total {float(status['cycles'])}\n".encode() in scrape
    assert stopping == b"STOPPING=1"
    assert proc.returncode == 0, err
    assert out == b""
