"""
The control socket's commands: one pydantic model of arguments per command,
the backend method that serves it, and validation errors in one line that
name the command and the argument.

Why a table: ``query-commands``, argument checking and dispatch all read the
same entry, so a command cannot be listed and not served, or served with
arguments nobody checked. A model's fields are exactly the keyword
arguments of its backend method (:class:`ControlBackend`): the server calls
``method(**arguments)``.

Validation is strict, as QAPI's input visitor is: no coercion (``"5"`` is
not an integer, ``true`` is not ``1``), no unknown argument, no ``null``
for an optional one. Messages keep QAPI's wording
(``qapi/qobject-input-visitor.c``: ``Parameter 'x' is missing``, ``Parameter
'x' is unexpected``, ``Invalid parameter type for 'x', expected: string``)
behind the command's name, e.g. ``query-plan: Parameter 'vm' is missing``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, runtime_checkable

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qreset.control.framing import RequestError, printable

__all__ = [
    "COMMANDS",
    "DEFAULT_RESETS_LIMIT",
    "MAX_RESETS_LIMIT",
    "OPTIONAL_COMMANDS",
    "Command",
    "ControlBackend",
    "validate_arguments",
]

#: query-resets without a limit returns this many cycles (one screen).
DEFAULT_RESETS_LIMIT = 20
#: At most this many cycles in one query-resets reply; more are paged with the
#: ``before`` cursor. A cycle summary with its report is a few KiB, so a page
#: stays a few MiB at most: one reply never holds a whole busy journal.
MAX_RESETS_LIMIT = 1000


@runtime_checkable
class ControlBackend(Protocol):
    """
    What the daemon provides to the control socket, one method per command.

    Every method returns JSON-serialisable data (dicts, lists, str, int,
    float, bool, None; anything else is sent as its ``str()``). A method
    raises :class:`qreset.errors.QResetError` for a failure the client
    should read (unknown VM, plan refused...); its message is sent as one line.
    """

    async def query_vms(self) -> list[dict[str, Any]]: ...

    async def query_devices(self, vm: str | None) -> list[dict[str, Any]]: ...

    async def query_plan(self, vm: str) -> dict[str, Any]: ...

    async def query_resets(self, vm: str | None, limit: int, before: str | None,
                           since: float | None, until: float | None) -> dict[str, Any]:
        """
        Finished cycles, newest first: ``{"resets": [...], "next": CURSOR}``.
        ``next`` (None on the last page) passed as ``before`` gives the
        following, older page; ``since``/``until`` bound the cycles' end time
        (UNIX seconds, inclusive).
        """
        ...

    async def reset_vm(self, vm: str) -> dict[str, Any]: ...

    async def add_vm(self, name: str, qmp: str, devices: list[str], mode: str | None) -> dict[str, Any]: ...

    async def remove_vm(self, name: str, release: bool) -> dict[str, Any]: ...

    async def doctor(self, functions: list[str]) -> list[dict[str, Any]]: ...

    async def query_status(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------- argument models


class Arguments(BaseModel):
    """Base of every command's arguments: strict types, nothing unknown, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoArguments(Arguments):
    pass


class QmpCapabilities(Arguments):
    enable: list[str] = []


class VmFilter(Arguments):
    vm: str | None = None


class VmName(Arguments):
    vm: str


class QueryResets(Arguments):
    vm: str | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_RESETS_LIMIT)] = DEFAULT_RESETS_LIMIT
    #: The ``next`` of the previous page: only cycles older than it.
    before: str | None = None
    #: UNIX seconds: cycles that ended at or after / at or before this time.
    since: float | None = None
    until: float | None = None


class AddVm(Arguments):
    name: str
    qmp: str
    devices: list[str] = []
    mode: str | None = None


class RemoveVm(Arguments):
    name: str
    release: bool = False


class Doctor(Arguments):
    functions: list[str] = []


class CheckDevices(Arguments):
    name: str
    devices: list[str]


@dataclass(frozen=True)
class Command:
    """
    One command. ``method`` names the backend method that serves it (called
    with the model's fields as keyword arguments); None for the protocol's
    own commands, which the server answers. An ``optional`` command is served
    (and listed) only when the backend has the method.
    """

    name: str
    arguments: type[Arguments]
    help: str
    method: str | None
    optional: bool = False


#: Every command, in the order query-commands lists them.
COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("qmp_capabilities", QmpCapabilities, "leave capabilities negotiation mode", None),
        Command("query-commands", NoArguments, "list the commands this server accepts", None),
        Command("query-status", NoArguments, "daemon state and counters", "query_status"),
        Command("query-vms", NoArguments, "the VMs the daemon serves", "query_vms"),
        Command("query-devices", VmFilter, "assigned devices (of one VM or all)", "query_devices"),
        Command("query-plan", VmName, "what a reset of this VM would do, touching nothing", "query_plan"),
        Command("query-resets", QueryResets, "past reset cycles, newest first, one page at a time",
                "query_resets"),
        Command("reset-vm", VmName, "run a reset cycle for this VM now", "reset_vm"),
        Command("add-vm", AddVm, "start serving a VM", "add_vm"),
        Command("remove-vm", RemoveVm, "stop serving a VM (release: reset its functions for the host)",
                "remove_vm"),
        Command("doctor", Doctor, "explain how functions can be reset and what blocks it", "doctor"),
        # qreset hook calls check-devices at prepare/start; a backend without it
        # answers CommandNotFound and query-commands does not list it.
        Command("check-devices", CheckDevices,
                "whether a VM with these devices may start (libvirt hook); optional",
                "check_devices", optional=True),
    )
}

#: Optional commands: command -> backend method name.
OPTIONAL_COMMANDS: dict[str, str] = {
    c.name: c.method for c in COMMANDS.values() if c.optional and c.method is not None
}


# ---------------------------------------------------------------- validation


def _kind(annotation: Any) -> str:
    """An argument's type as QAPI names it in its messages."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return "array of strings"
    names = {str: "string", bool: "boolean", int: "integer", float: "number"}
    return names.get(annotation, str(annotation))


def _range(model: type[Arguments], name: str) -> str:
    low = high = None
    for meta in model.model_fields[name].metadata:
        if isinstance(meta, annotated_types.Ge):
            low = meta.ge
        elif isinstance(meta, annotated_types.Le):
            high = meta.le
    return f"must be between {low} and {high}"


def validate_arguments(command: str, arguments: dict[str, Any]) -> Arguments:
    """
    ``arguments`` checked against ``command``'s model (``command`` must be in
    :data:`COMMANDS`); defaults filled in. Raises :class:`RequestError` with
    one line naming the command and the first bad argument.
    """
    model = COMMANDS[command].arguments
    fields = model.model_fields
    for key, value in arguments.items():
        if key not in fields:
            raise RequestError(f"{command}: Parameter '{printable(key)}' is unexpected")
        if value is None:  # QAPI has no null for an optional argument: absent is how to omit it
            raise RequestError(f"{command}: Invalid parameter type for '{key}', "
                               f"expected: {_kind(fields[key].annotation)}")
    try:
        return model.model_validate(arguments)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = str(err["loc"][0]) if err["loc"] else "?"
        if err["type"] == "missing":
            raise RequestError(f"{command}: Parameter '{name}' is missing") from None
        if err["type"] in ("greater_than_equal", "less_than_equal"):
            raise RequestError(f"{command}: Parameter '{name}' {_range(model, name)}") from None
        kind = _kind(fields[name].annotation) if name in fields else "?"
        raise RequestError(f"{command}: Invalid parameter type for '{name}', expected: {kind}") from None
