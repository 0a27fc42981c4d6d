"""Credentials and TLS of the Kafka and Cassandra clients: one shape for every process.

Every process that talks to Kafka (bridge, worker, API tail, ``ohs lag``, ``replay``, ``audit``,
``dlq``) reads the same ``OHS_KAFKA_*`` variables, and every Cassandra client (worker, API, replay,
audit, ``ohs orders``, ``ohs db``) the same ``OHS_CQL_*`` ones, through the two mixins below, which
each process's own settings class inherits. The names carry no process prefix on purpose: each
process runs as its own principal, so each gets its own environment (a compose service, a systemd
unit, a Kubernetes secret), and one name per setting is what an operator types everywhere.

Secrets are ``SecretStr``: they never appear in a repr, a log line or ``docs/configuration.md``.
The translation into each client library's options lives here too: librdkafka's dict, an
``ssl.SSLContext`` for aiokafka (under Faust) and cassandra-driver, and the keyword arguments of
acsylla, so no caller spells a security option itself.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings

__all__ = ["CqlAuth", "CqlClientSettings", "KafkaAuth", "KafkaClientSettings"]

KafkaProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def _context(ca: Path | None, cert: Path | None, key: Path | None, password: str | None, check: bool) -> ssl.SSLContext:
    """A client TLS context: the CA to trust (the system's when none), and a client certificate for mutual TLS."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.check_hostname = check
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None, password)
    return ctx


@dataclass(frozen=True, slots=True)
class KafkaAuth:
    """How a Kafka client authenticates and encrypts: plain values, built once from the settings."""

    protocol: KafkaProtocol = "PLAINTEXT"
    mechanism: SaslMechanism = "PLAIN"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: Path | None = None
    """CA bundle that signed the brokers' certificates (None: the system's)."""
    cert: Path | None = None
    """Client certificate for mutual TLS (PEM)."""
    key: Path | None = None
    key_password: str | None = field(default=None, repr=False)
    check_hostname: bool = True

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def librdkafka(self) -> dict[str, str]:
        """The options of a confluent-kafka Producer/Consumer/AdminClient (nothing for PLAINTEXT)."""
        out: dict[str, str] = {}
        if self.protocol == "PLAINTEXT":
            return out
        out["security.protocol"] = self.protocol
        if self.sasl:
            out["sasl.mechanism"] = self.mechanism
            out["sasl.username"] = self.username or ""
            out["sasl.password"] = self.password or ""
        if self.tls:
            if self.ca is not None:
                out["ssl.ca.location"] = str(self.ca)
            if self.cert is not None:
                out["ssl.certificate.location"] = str(self.cert)
            if self.key is not None:
                out["ssl.key.location"] = str(self.key)
            if self.key_password is not None:
                out["ssl.key.password"] = self.key_password
            out["ssl.endpoint.identification.algorithm"] = "https" if self.check_hostname else "none"
        return out

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of a Python client (aiokafka under Faust), or None without TLS."""
        if not self.tls:
            return None
        return _context(self.ca, self.cert, self.key, self.key_password, self.check_hostname)


@dataclass(frozen=True, slots=True)
class CqlAuth:
    """How a Cassandra/ScyllaDB client authenticates (PasswordAuthenticator) and encrypts."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    check_hostname: bool = True

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return _context(self.ca, self.cert, self.key, None, self.check_hostname)

    def acsylla(self) -> dict[str, Any]:
        """Keyword arguments of ``acsylla.create_cluster`` (the C++ driver reads PEM text, not paths)."""
        out: dict[str, Any] = {}
        if self.username is not None:
            out["username"], out["password"] = self.username, self.password or ""
        if self.tls:
            out["ssl_enabled"] = True
            if self.ca is not None:
                out["ssl_trusted_cert"] = self.ca.read_text()
            if self.cert is not None:
                out["ssl_cert"] = self.cert.read_text()
            if self.key is not None:
                out["ssl_private_key"] = self.key.read_text()
            out["ssl_verify_flags"] = "PEER_IDENTITY" if self.check_hostname else "PEER_CERT"
        return out


class KafkaClientSettings(BaseSettings):
    """The Kafka security settings every Kafka client of the project reads (``OHS_KAFKA_*``)."""

    kafka_security_protocol: KafkaProtocol = Field(
        default="PLAINTEXT",
        validation_alias="OHS_KAFKA_SECURITY_PROTOCOL",
        description="Kafka security.protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (every Kafka client).",
    )
    kafka_sasl_mechanism: SaslMechanism = Field(
        default="PLAIN", validation_alias="OHS_KAFKA_SASL_MECHANISM", description="SASL mechanism."
    )
    kafka_sasl_username: str | None = Field(
        default=None, validation_alias="OHS_KAFKA_SASL_USERNAME", description="SASL user (this process's principal)."
    )
    kafka_sasl_password: SecretStr | None = Field(
        default=None, validation_alias="OHS_KAFKA_SASL_PASSWORD", description="SASL password (secret)."
    )
    kafka_ssl_ca: Path | None = Field(
        default=None,
        validation_alias="OHS_KAFKA_SSL_CA",
        description="CA bundle of the brokers (PEM); none: system CAs.",
    )
    kafka_ssl_cert: Path | None = Field(
        default=None, validation_alias="OHS_KAFKA_SSL_CERT", description="Client certificate for mutual TLS (PEM)."
    )
    kafka_ssl_key: Path | None = Field(
        default=None, validation_alias="OHS_KAFKA_SSL_KEY", description="Private key of the client certificate (PEM)."
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None, validation_alias="OHS_KAFKA_SSL_KEY_PASSWORD", description="Password of that key (secret)."
    )
    kafka_ssl_check_hostname: bool = Field(
        default=True,
        validation_alias="OHS_KAFKA_SSL_CHECK_HOSTNAME",
        description="Verify that a broker's certificate names the host connected to.",
    )

    @model_validator(mode="after")
    def _kafka_complete(self) -> KafkaClientSettings:
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"OHS_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs OHS_KAFKA_SASL_USERNAME "
                "and OHS_KAFKA_SASL_PASSWORD"
            )
        if (self.kafka_ssl_cert is None) != (self.kafka_ssl_key is None):
            raise ValueError("OHS_KAFKA_SSL_CERT and OHS_KAFKA_SSL_KEY go together (mutual TLS)")
        return self

    @property
    def kafka_auth(self) -> KafkaAuth:
        return KafkaAuth(
            self.kafka_security_protocol,
            self.kafka_sasl_mechanism,
            self.kafka_sasl_username,
            _secret(self.kafka_sasl_password),
            self.kafka_ssl_ca,
            self.kafka_ssl_cert,
            self.kafka_ssl_key,
            _secret(self.kafka_ssl_key_password),
            self.kafka_ssl_check_hostname,
        )


class CqlClientSettings(BaseSettings):
    """The Cassandra security settings every CQL client of the project reads (``OHS_CQL_*``)."""

    cql_username: str | None = Field(
        default=None,
        validation_alias="OHS_CQL_USERNAME",
        description="Cassandra role to log in as (PasswordAuthenticator); none: no authentication.",
    )
    cql_password: SecretStr | None = Field(
        default=None, validation_alias="OHS_CQL_PASSWORD", description="Password of that role (secret)."
    )
    cql_local_dc: str | None = Field(
        default=None,
        validation_alias="OHS_CQL_LOCAL_DC",
        description="Datacenter whose nodes serve this process's requests; none: the first contact point's.",
    )
    cql_tls: bool = Field(default=False, validation_alias="OHS_CQL_TLS", description="Encrypt CQL connections (TLS).")
    cql_ssl_ca: Path | None = Field(
        default=None,
        validation_alias="OHS_CQL_SSL_CA",
        description="CA bundle of the nodes (PEM); none: system CAs.",
    )
    cql_ssl_cert: Path | None = Field(
        default=None, validation_alias="OHS_CQL_SSL_CERT", description="Client certificate for mutual TLS (PEM)."
    )
    cql_ssl_key: Path | None = Field(
        default=None, validation_alias="OHS_CQL_SSL_KEY", description="Private key of the client certificate (PEM)."
    )
    cql_ssl_check_hostname: bool = Field(
        default=True,
        validation_alias="OHS_CQL_SSL_CHECK_HOSTNAME",
        description="Verify that a node's certificate names the host connected to.",
    )

    @model_validator(mode="after")
    def _cql_complete(self) -> CqlClientSettings:
        if (self.cql_username is None) != (self.cql_password is None):
            raise ValueError("OHS_CQL_USERNAME and OHS_CQL_PASSWORD go together")
        if (self.cql_ssl_cert is None) != (self.cql_ssl_key is None):
            raise ValueError("OHS_CQL_SSL_CERT and OHS_CQL_SSL_KEY go together (mutual TLS)")
        return self

    @property
    def cql_auth(self) -> CqlAuth:
        return CqlAuth(
            self.cql_username,
            _secret(self.cql_password),
            self.cql_tls,
            self.cql_ssl_ca,
            self.cql_ssl_cert,
            self.cql_ssl_key,
            self.cql_ssl_check_hostname,
        )
