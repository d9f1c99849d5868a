"""
A monitor's run-state actions: set what park mode needs, put back exactly what was found.

See :mod:`qreset.actions` for the rule and where "what was found" comes from.
Also here: a guest poweroff under ``shutdown=pause`` (park mode), and
leaving a QEMU (``remove-vm``, daemon exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping

from qemu.qmp import ExecuteError, QMPClient, QMPError

from qreset import actions as qactions
from qreset.config import Mode
from qreset.cycle import RESET_SETTLE_TIMEOUT, STATUS_POLL
from qreset.errors import QResetError
from qreset.vm_base import MonitorBase, cycle_ids


class ActionKeeper(MonitorBase):
    """Mixed into :class:`qreset.vm.VmMonitor` (bottom half)."""

    async def _set_actions(self, client: QMPClient) -> None:
        """Park: read what QEMU has, set the park actions, journal both. Stop-on-reset: nothing,
        except putting back what a previous daemon set on this same QEMU."""
        if self.mode is not Mode.PARK:
            pending = qactions.pending_restore(self._actions_rec, self._qemu_id)
            if pending is not None:
                await client.execute("set-action", dict(pending))
                await self._journal_actions(pending, None)
                self._log.info("put back the actions a previous daemon had changed: %s", _fmt(pending))
            return
        found, source = qactions.originals(self._actions_rec, self._qemu_id, self._qemu_argv)
        if source.startswith("QEMU's defaults"):
            self._log.warning("cannot read QEMU's command line: will put back %s", source)
        try:
            await client.execute("set-action", dict(qactions.PARK_ACTIONS))
        except ExecuteError as exc:
            raise QResetError(f"VM {self.name}: set-action refused ({exc}): park mode needs "
                              "QEMU >= 6.0; use mode = \"stop-on-reset\"") from None
        self._found_actions = found
        await self._journal_actions(found, dict(qactions.PARK_ACTIONS))
        self._log.debug("actions found (%s): %s", source, _fmt(found))

    async def _journal_actions(self, found: dict[str, str], set_: dict[str, str] | None) -> None:
        rec = {"vm": self.name, "cycle": f"act-{self.name}-{os.getpid()}-{next(cycle_ids)}",
               "phase": qactions.PHASE, "qemu": self._qemu_id, "found": found, "set": set_}
        with contextlib.suppress(QResetError):
            self._actions_rec = await self.ctx.journal.append(rec)

    async def _release(self, client: QMPClient) -> None:
        """Leaving: put back the actions we changed, and finish a reset that parked the guest meanwhile."""
        async with self._cycle_lock:
            found = self._found_actions
            if found is None:
                return  # stop-on-reset: nothing was changed
            with contextlib.suppress(QMPError, OSError, TimeoutError):
                async with asyncio.timeout(2 * RESET_SETTLE_TIMEOUT):
                    # Actions first: a guest reset from now on is QEMU's alone.
                    await client.execute("set-action", dict(found))
                    self._found_actions = None
                    await self._journal_actions(found, None)
                    self._log.info("actions put back as found (%s)", _fmt(found))
                    if await self._status_of(client) == "shutdown":
                        # A guest reset parked it before that: finish it with QEMU's own reset.
                        self._log.info("finishing a reset that arrived while closing")
                        await client.execute("set-action", {"reboot": "reset"})
                        await client.execute("system_reset")
                        while await self._status_of(client) == "shutdown":
                            await asyncio.sleep(STATUS_POLL)
                        await client.execute("set-action", {"reboot": found["reboot"]})
                        await client.execute("cont")

    @staticmethod
    async def _status_of(client: QMPClient) -> str | None:
        reply = await client.execute("query-status")
        return str(reply["status"]) if isinstance(reply, dict) else None

    async def _poweroff(self, client: QMPClient, reason: str) -> None:
        """A real poweroff under shutdown=pause. QEMU would have exited unless told to pause."""
        if (self._found_actions or {}).get("shutdown") == "pause":
            self._log.info("guest powered off (%s): paused, as QEMU was started to do", reason)
            return
        self._log.info("guest powered off (%s): sending quit, as QEMU would have exited", reason)
        with contextlib.suppress(Exception):
            await self.ctx.journal.append({
                "vm": self.name, "cycle": f"{self.name}-poweroff-{os.getpid()}-{next(cycle_ids)}",
                "phase": "poweroff", "reason": reason, "action": "quit"})
        with contextlib.suppress(QMPError, OSError):
            await client.execute("quit")


def _fmt(actions: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(actions.items()))
