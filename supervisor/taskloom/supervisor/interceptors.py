"""The one place where gRPC server interceptors are chosen.

Authentication, metrics and tracing hook in here, so every RPC passes through
them before any servicer runs. There are none yet.
"""

from __future__ import annotations

import grpc

from taskloom.supervisor.settings import SupervisorSettings


def server_interceptors(settings: SupervisorSettings) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors for the supervisor's server, outermost first."""
    del settings
    return []
