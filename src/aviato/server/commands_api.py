"""ListExecs and SignalExec: a sandbox's commands by id (docs/interactive.md).

The commands themselves live in `exec_table` (filled by `exec_api`); this module only answers
about them. Another owner's sandbox or command is NOT_FOUND, as everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from aviato.runtime.base import SandboxRuntimeError
from aviato.server import errors
from aviato.server.errors import InvalidArgument, ServiceError
from aviato.server.exec_table import CommandTable
from aviato.server.servicer import ServicerBase
from aviato.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from aviato.server.servicer import Ctx

__all__ = ["CommandCalls"]

log = logging.getLogger("aviato.server.api")

SIGKILL = 9


class CommandCalls(ServicerBase):
    """ListExecs and SignalExec; `_commands` is the table `ExecStreams` fills."""

    _commands: CommandTable

    async def ListExecs(self, request: pb.ListExecsRequest, context: Ctx) -> pb.ListExecsResponse:
        try:
            owner = self.owner(context)
            self._lifecycle.record(owner, request.sandbox_id)  # NotFound for another's sandbox
            commands = self._commands.of_sandbox(owner, request.sandbox_id)
            return pb.ListExecsResponse(execs=[c.info() for c in commands])
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ListExecs failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
        raise AssertionError("unreachable")  # abort raises

    async def SignalExec(self, request: pb.SignalExecRequest, context: Ctx) -> pb.ExecInfo:
        try:
            owner = self.owner(context)
            if not 1 <= request.signal <= 64:
                raise InvalidArgument("signal", f"{request.signal} is not a signal (1 to 64)")
            self._lifecycle.record(owner, request.sandbox_id)
            command = self._commands.get(owner, request.sandbox_id, request.exec_id)
            if command.terminal is None:
                if request.signal == SIGKILL:
                    await command.handle.kill()
                else:
                    await command.handle.signal(request.signal)
            return command.info()
        except (ServiceError, SandboxRuntimeError) as e:
            await errors.abort(context, e, sandbox_id=request.sandbox_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("SignalExec failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
        raise AssertionError("unreachable")
