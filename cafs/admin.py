"""The admin commands as one entry point: which part runs a command, and its typed result.

Owns: dispatching a command by name (`Admin.call`, typed results) and the control socket's JSON
boundary (`Admin.run`: the result's JSON form; `decode_result` turns it back into the same type
on the client's side). What each command does lives in its part: cafs.maintenance (gc, repair),
cafs.lifecycle (log, version, find, seal, unseal), cafs.transfer (export, import).

The same code runs inside the daemon when the store is mounted (requests arrive over the control
socket, cafs.control) and inside the `cafs` command when it is not (holding the store's lock,
under asyncio: `run_locally`), so a command never depends on where it runs and never writes the
manifest behind a running daemon's back. Must not import trio, pyfuse3 or the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from cafs.admin_context import (
    AdminContext,
    JsonResult,
    Live,
    LocalRuntime,
    NotMounted,
    Progress,
    Runtime,
)
from cafs.errors import InvalidArgument
from cafs.lifecycle import Found, History, Lifecycle, Sealed, Unsealed, VersionLocation, root_hash
from cafs.maintenance import DEFAULT_ORPHAN_GRACE, GcReport, Maintenance, RepairReport
from cafs.transfer import Exported, Imported, Transfer

__all__ = ["DEFAULT_ORPHAN_GRACE", "Admin", "Browsed", "Live", "LocalRuntime", "NotMounted",
           "Progress", "Runtime", "decode_result", "root_hash", "run_locally"]

P = TypeVar("P", bound=AdminContext)


@dataclass(frozen=True)
class Browsed(JsonResult):
    """The answer of one read-only page query of `cafs ui` (cafs.sqlite_manifest.ui_queries)."""

    answer: dict[str, Any]


# The result type of every command: what Admin.call answers and decode_result rebuilds.
RESULT_TYPES: dict[str, type[JsonResult]] = {
    "log": History, "version": VersionLocation, "find": Found, "seal": Sealed,
    "unseal": Unsealed, "gc": GcReport, "repair": RepairReport, "export": Exported,
    "import": Imported, "browse": Browsed,
}


@dataclass
class Admin(AdminContext):
    """Runs one admin command against a store; holds no state between commands."""

    def _part(self, cls: type[P]) -> P:
        return cls(self.store, self.runtime, self.live, self.mounted, self.progress,
                   self.max_artifact_size)

    async def call(self, command: str, args: dict[str, Any], files: list[IO[bytes]]
                   ) -> JsonResult:
        """Run `command` with `args` (keyword arguments of its method) and `files` (an
        export's output, an import's input)."""
        lifecycle, maintenance = self._part(Lifecycle), self._part(Maintenance)
        handlers: dict[str, Callable[..., Awaitable[JsonResult]]] = {
            "log": lifecycle.log, "version": lifecycle.version, "seal": lifecycle.seal,
            "unseal": lifecycle.unseal, "find": lifecycle.find, "gc": maintenance.gc,
            "repair": maintenance.repair,
        }
        if command in handlers:
            return await handlers[command](**args)
        if command == "browse":
            return Browsed(self.manifest.browse(**args))
        transfer = self._part(Transfer)
        if command == "export":
            return Exported.from_json(await transfer.export(files[0], **args))
        if command == "import":
            return Imported.from_json(await transfer.import_bundle(files[0], **args))
        raise InvalidArgument(f"unknown command {command!r}")

    async def run(self, command: str, args: dict[str, Any], files: list[IO[bytes]]
                  ) -> dict[str, Any]:
        """The control socket's handler: the command's result as JSON."""
        return (await self.call(command, args, files)).to_json()

    async def _delete_unreferenced(self, digests: list[str]) -> set[str]:
        return await self._part(Maintenance)._delete_unreferenced(digests)


def decode_result(command: str, data: dict[str, Any]) -> JsonResult:
    """A result that came over the control socket, as the type Admin.call gives."""
    return RESULT_TYPES[command].from_json(data)


def run_locally(admin: Admin, command: str, args: dict[str, Any], files: list[IO[bytes]]
                ) -> JsonResult:
    """Run a command in this process, on an unmounted store (`admin` built with LocalRuntime
    and NotMounted): asyncio, no trio."""
    return asyncio.run(admin.call(command, args, files))
