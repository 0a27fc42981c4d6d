"""How each server is configured and started: Kafka (KRaft) and Cassandra.

Each server gets its own directory under the state dir with its config, data
and logs. Configs are rewritten on every ``up`` (they derive from settings);
data directories are only ever created, never wiped, except by ``reset``.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from stack.errors import StackError
from stack.settings import StackSettings

__all__ = ["ServerSpec", "cassandra_spec", "kafka_spec", "registry_spec"]


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    home: Path
    """The server's directory in the state dir (config, data, logs)."""
    argv: list[str]
    ports: list[int]
    log_file: Path
    """Where the server's own log goes (shown on failure)."""


def kafka_spec(s: StackSettings, lib: Path) -> ServerSpec:
    home = s.state_dir / "kafka"
    data = home / "data"
    for d in (home, data, home / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    props = home / "server.properties"
    client = "SASL_PLAINTEXT" if s.auth else "PLAINTEXT"
    props.write_text(
        "\n".join(
            [
                # One process is both broker and controller: the smallest real KRaft cluster.
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@{s.host}:{s.kafka_controller_port}",
                f"listeners={client}://{s.host}:{s.kafka_port},CONTROLLER://{s.host}:{s.kafka_controller_port}",
                f"advertised.listeners={client}://{s.host}:{s.kafka_port}",
                "controller.listener.names=CONTROLLER",
                f"listener.security.protocol.map={client}:{client},CONTROLLER:PLAINTEXT",
                f"inter.broker.listener.name={client}",
                *_kafka_sasl(s),
                f"log.dirs={data}",
                f"num.partitions={s.kafka_partitions}",
                # Single node: every internal topic has exactly one replica.
                "offsets.topic.replication.factor=1",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                # Topics are created explicitly with their partition count; a typo must not
                # silently create a one-off topic.
                "auto.create.topics.enable=false",
                # Tests and `make run` start consumers right after the broker: no 3 s join delay.
                "group.initial.rebalance.delay.ms=0",
                # Two cores shared with Cassandra and the pipeline.
                "num.network.threads=2",
                "num.io.threads=4",
                "num.recovery.threads.per.data.dir=1",
                "message.max.bytes=4194304",
                "",
            ]
        )
    )
    log4j = home / "log4j2.yaml"
    log4j.write_text(
        "Configuration:\n"
        "  Appenders:\n"
        "    RollingFile:\n"
        "      name: FILE\n"
        f"      fileName: {home / 'logs' / 'server.log'}\n"
        f"      filePattern: {home / 'logs' / 'server.log.%i'}\n"
        "      PatternLayout:\n"
        '        pattern: "[%d] %p %m (%c)%n"\n'
        "      Policies:\n"
        "        SizeBasedTriggeringPolicy:\n"
        "          size: 50MB\n"
        "      DefaultRollOverStrategy:\n"
        "        max: 3\n"
        "  Loggers:\n"
        "    Root:\n"
        "      level: INFO\n"
        "      AppenderRef:\n"
        "        - ref: FILE\n"
    )
    classpath = f"{lib}/*"
    if not (data / "meta.properties").exists():
        _format_kafka_storage(s, classpath, props, log4j)
    argv = [
        s.java,
        f"-Xms{s.kafka_heap}",
        f"-Xmx{s.kafka_heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        f"-Dkafka.logs.dir={home / 'logs'}",
        "-cp",
        classpath,
        "kafka.Kafka",
        str(props),
    ]
    return ServerSpec("kafka", home, argv, [s.kafka_port, s.kafka_controller_port], home / "logs" / "server.log")


def _kafka_sasl(s: StackSettings) -> list[str]:
    """With auth: SASL/PLAIN on the client listener, with the configured users (the controller
    listener stays on loopback without SASL: only the broker inside this same process uses it).
    Every authenticated principal may do anything: no authorizer here; the ACLs production uses
    are in docs/operations.md and docker-compose.yml."""
    if not s.auth:
        return []
    admin = s.kafka_admin_password.get_secret_value()
    users = " ".join(f'user_{n}="{p}"' for n, p in {"admin": admin, **s.users}.items())
    jaas = (
        f'org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="{admin}" {users};'
    )
    return [
        "sasl.enabled.mechanisms=PLAIN",
        "sasl.mechanism.inter.broker.protocol=PLAIN",
        f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
    ]


def _format_kafka_storage(s: StackSettings, classpath: str, props: Path, log4j: Path) -> None:
    """KRaft needs its log dir formatted once with a cluster id before the first start."""
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    cmd = [
        s.java,
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        classpath,
        "kafka.tools.StorageTool",
        "format",
        # One argument: an id may begin with "-" (urlsafe base64), which a separate value would
        # make an option (a 1-in-64 failure seen in CI).
        f"--cluster-id={cluster_id}",
        "-c",
        str(props),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StackError(f"formatting Kafka storage failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


# The flags of Cassandra's own conf/jvm17-server.options: the server reaches into JDK
# internals (off-heap memory, attach API, reflection on NIO) that Java 17 closes by default.
_CASSANDRA_JPMS = [
    "-Djdk.attach.allowAttachSelf=true",
    *[
        f"--add-exports={m}=ALL-UNNAMED"
        for m in (
            "java.base/jdk.internal.misc",
            "java.management.rmi/com.sun.jmx.remote.internal.rmi",
            "java.rmi/sun.rmi.registry",
            "java.rmi/sun.rmi.server",
            "java.sql/java.sql",
            "java.base/java.lang.ref",
            "jdk.unsupported/sun.misc",
            "jdk.compiler/com.sun.tools.javac.file",
            "jdk.attach/sun.tools.attach",
        )
    ],
    *[
        f"--add-opens={m}=ALL-UNNAMED"
        for m in (
            "java.base/java.lang.module",
            "java.base/jdk.internal.loader",
            "java.base/jdk.internal.ref",
            "java.base/jdk.internal.reflect",
            "java.base/jdk.internal.math",
            "java.base/jdk.internal.module",
            "java.base/jdk.internal.util.jar",
            "jdk.management/com.sun.management.internal",
            "java.base/sun.nio.ch",
            "java.base/java.io",
            "java.base/java.lang.reflect",
            "jdk.compiler/com.sun.tools.javac",
            "java.base/java.lang",
            "java.base/java.util",
        )
    ],
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
]


def cassandra_spec(s: StackSettings, lib: Path) -> ServerSpec:
    home = s.state_dir / "cassandra"
    dirs = {n: home / n for n in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "logs")}
    for d in (home, *dirs.values()):
        d.mkdir(parents=True, exist_ok=True)
    yaml = home / "cassandra.yaml"
    yaml.write_text(
        f"""cluster_name: ohs-local
num_tokens: 16
allocate_tokens_for_local_replication_factor: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
data_file_directories: [{dirs["data"]}]
commitlog_directory: {dirs["commitlog"]}
saved_caches_directory: {dirs["saved_caches"]}
hints_directory: {dirs["hints"]}
cdc_raw_directory: {dirs["cdc_raw"]}
# batch: a write is acknowledged only after the commit log holding it is synced (writes that
# arrive during a sync share the next one). Not periodic: on replay Cassandra reads the commit
# log only up to its last sync marker, so a kill -9 of the server lost the writes of the last
# period even though it had acknowledged them (the fault suite's Cassandra kill -9 found 335 of
# them gone), and the worker had committed their offsets. With one replica per row, as here,
# nothing else holds them. Not group either: each mutation holds one of the concurrent_writes
# threads until the next sync, one window later, which capped this node at ~1,600 order
# updates/s from the JVM client (batch: ~5,400; periodic: ~11,600; `ohs bench sink`,
# docs/benchmarks.md). Direct I/O for the commit log (Cassandra 5.0) helps batch mode here.
# Production with RF >= 3 and LOCAL_QUORUM may keep periodic (docs/operations.md).
commitlog_sync: batch
commitlog_disk_access_mode: direct
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{s.host}:{s.cassandra_storage_port}"
listen_address: {s.host}
rpc_address: {s.host}
storage_port: {s.cassandra_storage_port}
native_transport_port: {s.cql_port}
start_native_transport: true
endpoint_snitch: SimpleSnitch
# Two cores: one compactor, so compaction never starves the write path.
concurrent_compactors: 1
concurrent_writes: 32
concurrent_reads: 16
# The worker sends UNLOGGED batches of many partitions that share one replica set (one
# coordinator owns all of it: no batchlog, one round trip). Such batches are the fast path
# here, not a mistake, so the warnings about their size (bounded by the worker's
# OHS_WORKER_BATCH_MAX_BYTES, 256 KiB) and partition count are set above what it sends;
# otherwise every batch logs a line in the server and in every client. Production: the same
# settings in cassandra.yaml / scylla.yaml (docs/operations.md).
batch_size_warn_threshold: 512KiB
batch_size_fail_threshold: 1MiB
unlogged_batch_across_partitions_warn_threshold: 100000
# Tests drop many throw-away keyspaces: no snapshot of each on DROP/TRUNCATE.
auto_snapshot: false
{_cassandra_auth(s)}""",
    )
    logback = home / "logback.xml"
    logback.write_text(
        f"""<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>{dirs["logs"] / "system.log"}</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>{dirs["logs"] / "system.log.%i"}</fileNamePattern>
      <minIndex>1</minIndex><maxIndex>3</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>50MB</maxFileSize>
    </triggeringPolicy>
    <encoder><pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
"""
    )
    jamm = next(iter(sorted(lib.glob("jamm-*.jar"))), None)
    argv = [
        s.java,
        f"-Xms{s.cassandra_heap}",
        f"-Xmx{s.cassandra_heap}",
        "-XX:+UseG1GC",
        "-XX:+ParallelRefProcEnabled",
        "-XX:MaxGCPauseMillis=200",
        "-Xss256k",
        *_CASSANDRA_JPMS,
        *([f"-javaagent:{jamm}"] if jamm else []),
        f"-Dcassandra.config=file://{yaml}",
        f"-Dlogback.configurationFile={logback}",
        f"-Dcassandra.logdir={dirs['logs']}",
        f"-Dcassandra.storagedir={home}",
        f"-Dcassandra.jmx.local.port={s.cassandra_jmx_port}",
        "-Dcassandra-foreground=yes",
        # One node, never joining others: skip the ring-settle wait at startup.
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=0",
        # With auth: the default superuser exists at once, not 10 s after the node is up.
        "-Dcassandra.superuser_setup_delay_ms=0",
        "-cp",
        str(lib) + "/*",
        "org.apache.cassandra.service.CassandraDaemon",
    ]
    ports = [s.cql_port, s.cassandra_storage_port, s.cassandra_jmx_port]
    return ServerSpec("cassandra", home, argv, ports, dirs["logs"] / "system.log")


def _cassandra_auth(s: StackSettings) -> str:
    if not s.auth:
        return ""
    return (
        "# Rehearsal of production credentials (OHS_AUTH): logins and per-role permissions.\n"
        "authenticator: PasswordAuthenticator\n"
        "authorizer: CassandraAuthorizer\n"
        "role_manager: CassandraRoleManager\n"
    )


def registry_spec(s: StackSettings, app: Path) -> ServerSpec:
    """Apicurio Registry with its schemas in an H2 file under the state dir: ids must survive a
    restart, because records in Kafka carry them."""
    if not s.registry_java:
        raise StackError(
            "the schema registry (Apicurio 3) needs Java 21+ and none was found under /usr/lib/jvm: "
            "set OHS_REGISTRY_JAVA to a Java 21+ executable, or run without OHS_REGISTRY"
        )
    home = s.state_dir / "registry"
    for d in (home, home / "data", home / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    log_file = home / "logs" / "registry.log"
    argv = [
        s.registry_java,
        f"-Xmx{s.registry_heap}",
        "-XX:+UseSerialGC",  # a small heap on two shared cores: no parallel GC threads
        f"-Dquarkus.http.host={s.host}",
        f"-Dquarkus.http.port={s.registry_port}",
        # Without these the management interface listens on 0.0.0.0:9000.
        f"-Dquarkus.management.host={s.host}",
        f"-Dquarkus.management.port={s.registry_management_port}",
        f"-Dapicurio.datasource.url=jdbc:h2:file:{home / 'data' / 'registry'}",
        "-Dquarkus.log.file.enable=true",
        f"-Dquarkus.log.file.path={log_file}",
        "-Dquarkus.log.console.enable=false",
        "-jar",
        str(app / "quarkus-run.jar"),
    ]
    return ServerSpec("registry", home, argv, [s.registry_port, s.registry_management_port], log_file)
