"""The Cassandra/ScyllaDB cluster factory every process of the project opens its sessions with.

The worker's sink, the query API, ``ohs orders``, the audit and the benchmarks all connect through
``make_cluster``: one place for the protocol version and the reconnection back-off. And what the
driver raises, classified once for every package that translates it into its own errors
(``streams.sink.translate``, for the worker and replay; ``api.store``, for the API):
``DRIVER_ERRORS`` is everything a request can fail with, ``TRANSIENT_ERRORS`` the part of it a
later attempt can pass.
"""

from __future__ import annotations

from cassandra import DriverException, OperationTimedOut, ReadTimeout, Unavailable, WriteFailure, WriteTimeout
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.connection import ConnectionException
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy

from kit.auth import CqlAuth

__all__ = ["DRIVER_ERRORS", "TRANSIENT_ERRORS", "load_balancing", "make_cluster"]

DRIVER_ERRORS = (DriverException, NoHostAvailable, ConnectionException)
"""What the driver raises when a request cannot be answered (no base class covers all three)."""
TRANSIENT_ERRORS = (OperationTimedOut, WriteTimeout, ReadTimeout, Unavailable, NoHostAvailable, WriteFailure, OSError)
"""What a later attempt can pass: a timeout, replicas down, no host, a connection reset."""


def load_balancing(local_dc: str | None) -> TokenAwarePolicy:
    """Token-aware over the local datacenter's nodes: each single-partition request goes straight to a
    replica. ``local_dc`` None: the datacenter of the first contact point that answers."""
    return TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=local_dc))


def make_cluster(
    hosts: list[str],
    port: int,
    profile: ExecutionProfile,
    protocol_version: int = 4,
    auth: CqlAuth | None = None,
) -> Cluster:
    """A Cluster as every process of the project opens one: the caller's (token-aware) profile,
    this process's credentials and TLS (``auth``), and a bounded reconnection back-off.

    Protocol v4 by default: v5 frames every message in checksummed segments whose CRCs the
    Python driver computes in Python, ~15% more client CPU per row (docs/benchmarks.md)."""
    auth = auth or CqlAuth()
    return Cluster(
        hosts,
        port=port,
        protocol_version=protocol_version,
        auth_provider=PlainTextAuthProvider(auth.username, auth.password) if auth.username is not None else None,
        ssl_context=auth.ssl_context(),
        connect_timeout=10,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        # The default backs off to 10 minutes: after a database restart a process would sit idle
        # long after the node is back. Ten seconds bounds that.
        reconnection_policy=ExponentialReconnectionPolicy(0.5, 10.0),
    )
