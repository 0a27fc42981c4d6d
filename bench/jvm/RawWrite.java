// The JVM raw-limit client of `ohs bench raw-cql` (issue 13, item 5): how fast this box's Cassandra
// absorbs a given set of rows when the client costs almost nothing. It is compiled at bench time
// against Cassandra's own lib/ (the DataStax Java driver 3.x ships there), so it needs no download.
//
// Input: a rows file written by bench/raw.py (big-endian, DataInputStream):
//   "OHSR" int:version(=1)
//   int:nStatements, each: int:len + UTF-8 CQL with ? markers
//   rows, each: int:stmtIndex (-1 ends the rows), long:groupKey, short:nValues, values
//   value: byte:tag + payload; tags 0 NULL, 1 INTEGER long, 2 TEXT int:len+UTF-8, 3 BLOB int:len+bytes,
//          4 DATE int days since 1970-01-01, 5 BOOLEAN byte, 6 DOUBLE,
//          7 MAP int:n + n (key, value) tagged values, 8 LIST int:n + n tagged values, 9 SET likewise
//   trailer (after the -1): long:rowCount
// An INTEGER is bound as the prepared variable's own type (bigint, int, smallint, tinyint, timestamp),
// range-checked, so Python need not know the schema; collection elements likewise by the type arguments.
//
// Rows with the same group key may share one UNLOGGED batch (the writer promises they live on the
// same replicas); a group is cut into chunks of at most --batch statements, a chunk of one is sent as
// a plain statement. At most --inflight requests are outstanding. One JSON line on stdout; diagnostics
// on stderr; exit 0 only when every request succeeded within --timeout-s.

import com.datastax.driver.core.BatchStatement;
import com.datastax.driver.core.BoundStatement;
import com.datastax.driver.core.Cluster;
import com.datastax.driver.core.ColumnDefinitions;
import com.datastax.driver.core.ConsistencyLevel;
import com.datastax.driver.core.DataType;
import com.datastax.driver.core.LocalDate;
import com.datastax.driver.core.PoolingOptions;
import com.datastax.driver.core.PreparedStatement;
import com.datastax.driver.core.ProtocolVersion;
import com.datastax.driver.core.QueryOptions;
import com.datastax.driver.core.ResultSet;
import com.datastax.driver.core.ResultSetFuture;
import com.datastax.driver.core.Session;
import com.datastax.driver.core.SocketOptions;
import com.datastax.driver.core.Statement;

import java.io.BufferedInputStream;
import java.io.DataInputStream;
import java.io.EOFException;
import java.io.FileInputStream;
import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Collection;
import java.util.LinkedHashSet;
import java.util.Set;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.Semaphore;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;

public final class RawWrite {
    static final int MAX_LEN = 16 << 20; // one value or statement: far above any row of ours, bounds a corrupt file
    static final byte NULL = 0, INTEGER = 1, TEXT = 2, BLOB = 3, DATE = 4, BOOLEAN = 5, DOUBLE = 6, MAP = 7, LIST = 8,
            SET = 9;
    static final int MAX_DEPTH = 8;

    static final class Row {
        final int stmt;
        final long group;
        final byte[] tags;
        final Object[] values;

        Row(int stmt, long group, byte[] tags, Object[] values) {
            this.stmt = stmt;
            this.group = group;
            this.tags = tags;
            this.values = values;
        }
    }

    static final class Input {
        final List<String> statements = new ArrayList<>();
        final List<Row> rows = new ArrayList<>();
    }

    static String readString(DataInputStream in, String what) throws IOException {
        int len = in.readInt();
        if (len < 0 || len > MAX_LEN) throw new IOException(what + ": bad length " + len);
        byte[] b = new byte[len];
        in.readFully(b);
        return new String(b, StandardCharsets.UTF_8);
    }

    static Input read(String path) throws IOException {
        Input input = new Input();
        try (DataInputStream in = new DataInputStream(new BufferedInputStream(new FileInputStream(path), 1 << 16))) {
            byte[] magic = new byte[4];
            in.readFully(magic);
            if (!"OHSR".equals(new String(magic, StandardCharsets.US_ASCII))) throw new IOException("not a rows file");
            int version = in.readInt();
            if (version != 1) throw new IOException("rows file version " + version + ", expected 1");
            int n = in.readInt();
            if (n <= 0 || n > 10_000) throw new IOException("bad statement count " + n);
            for (int i = 0; i < n; i++) input.statements.add(readString(in, "statement " + i));
            while (true) {
                int stmt = in.readInt();
                if (stmt == -1) break;
                if (stmt < 0 || stmt >= n) throw new IOException("row " + input.rows.size() + ": statement " + stmt);
                long group = in.readLong();
                int nv = in.readShort();
                if (nv < 0) throw new IOException("row " + input.rows.size() + ": " + nv + " values");
                byte[] tags = new byte[nv];
                Object[] values = new Object[nv];
                for (int v = 0; v < nv; v++) {
                    tags[v] = in.readByte();
                    try {
                        values[v] = payload(in, tags[v], 0);
                    } catch (IllegalArgumentException e) {
                        throw new IOException("row " + input.rows.size() + ": " + e.getMessage());
                    }
                }
                input.rows.add(new Row(stmt, group, tags, values));
            }
            long count = in.readLong();
            if (count != input.rows.size()) throw new IOException("trailer says " + count + " rows, read " + input.rows.size());
        } catch (EOFException e) {
            throw new IOException("rows file is truncated (no end marker)", e);
        }
        return input;
    }

    /** One value after its tag: Long, String, byte[], LocalDate, Boolean, Double, null, or a Map/List/Set of them. */
    static Object payload(DataInputStream in, byte tag, int depth) throws IOException {
        switch (tag) {
            case NULL: return null;
            case INTEGER: return in.readLong();
            case TEXT: return readString(in, "text value");
            case BLOB: {
                int len = in.readInt();
                if (len < 0 || len > MAX_LEN) throw new IOException("blob: bad length " + len);
                byte[] b = new byte[len];
                in.readFully(b);
                return b;
            }
            case DATE: return LocalDate.fromDaysSinceEpoch(in.readInt());
            case BOOLEAN: return in.readByte() != 0;
            case DOUBLE: return in.readDouble();
            case MAP: case LIST: case SET: {
                if (depth >= MAX_DEPTH) throw new IllegalArgumentException("collections nested deeper than " + MAX_DEPTH);
                int n = in.readInt();
                if (n < 0 || n > MAX_LEN) throw new IOException("collection: bad size " + n);
                if (tag == MAP) {
                    Map<Object, Object> m = new LinkedHashMap<>();
                    for (int i = 0; i < n; i++) {
                        Object k = payload(in, in.readByte(), depth + 1);
                        m.put(k, payload(in, in.readByte(), depth + 1));
                    }
                    return m;
                }
                Collection<Object> c = tag == LIST ? new ArrayList<>(n) : new LinkedHashSet<>();
                for (int i = 0; i < n; i++) c.add(payload(in, in.readByte(), depth + 1));
                return c;
            }
            default: throw new IllegalArgumentException("unknown value tag " + tag);
        }
    }

    /** A decoded value as the Java object the driver's codec of `type` takes (collections element-wise). */
    static Object convert(Object v, DataType type) {
        if (v == null) return null;
        List<DataType> args = type.getTypeArguments();
        switch (type.getName()) {
            case BIGINT: case COUNTER: case TIME: return (Long) v;
            case INT: return (int) checked((Long) v, Integer.MIN_VALUE, Integer.MAX_VALUE, "int");
            case SMALLINT: return (short) checked((Long) v, Short.MIN_VALUE, Short.MAX_VALUE, "smallint");
            case TINYINT: return (byte) checked((Long) v, Byte.MIN_VALUE, Byte.MAX_VALUE, "tinyint");
            case TIMESTAMP: return new java.util.Date((Long) v);
            case BLOB: return ByteBuffer.wrap((byte[]) v);
            case MAP: {
                Map<Object, Object> out = new LinkedHashMap<>();
                for (Map.Entry<?, ?> e : ((Map<?, ?>) v).entrySet()) {
                    out.put(convert(e.getKey(), args.get(0)), convert(e.getValue(), args.get(1)));
                }
                return out;
            }
            case LIST: {
                List<Object> out = new ArrayList<>();
                for (Object x : (Collection<?>) v) out.add(convert(x, args.get(0)));
                return out;
            }
            case SET: {
                Set<Object> out = new LinkedHashSet<>();
                for (Object x : (Collection<?>) v) out.add(convert(x, args.get(0)));
                return out;
            }
            default: return v; // text, date, boolean, double: decoded as the codec's own type already
        }
    }

    static long checked(long v, long lo, long hi, String what) {
        if (v < lo || v > hi) throw new IllegalArgumentException(v + " out of range for " + what);
        return v;
    }

    static BoundStatement bind(PreparedStatement ps, Row row) {
        ColumnDefinitions vars = ps.getVariables();
        if (vars.size() != row.values.length) {
            throw new IllegalArgumentException(
                    "statement " + row.stmt + " has " + vars.size() + " markers, row has " + row.values.length + " values");
        }
        BoundStatement b = ps.bind();
        for (int i = 0; i < row.values.length; i++) {
            Object v = row.values[i];
            DataType.Name type = vars.getType(i).getName();
            switch (row.tags[i]) {
                case NULL: b.setToNull(i); break;
                case INTEGER: {
                    long x = (Long) v;
                    switch (type) {
                        case BIGINT: case COUNTER: case TIME: b.setLong(i, x); break;
                        case INT: b.setInt(i, (int) checked(x, Integer.MIN_VALUE, Integer.MAX_VALUE, "int")); break;
                        case SMALLINT: b.setShort(i, (short) checked(x, Short.MIN_VALUE, Short.MAX_VALUE, "smallint")); break;
                        case TINYINT: b.setByte(i, (byte) checked(x, Byte.MIN_VALUE, Byte.MAX_VALUE, "tinyint")); break;
                        case TIMESTAMP: b.setTimestamp(i, new java.util.Date(x)); break;
                        default: throw new IllegalArgumentException("integer for a " + type + " marker " + i);
                    }
                    break;
                }
                case TEXT: b.setString(i, (String) v); break;
                case BLOB: b.setBytes(i, ByteBuffer.wrap((byte[]) v)); break;
                case DATE: b.setDate(i, (LocalDate) v); break;
                case BOOLEAN: b.setBool(i, (Boolean) v); break;
                case DOUBLE: b.setDouble(i, (Double) v); break;
                case MAP: b.setMap(i, (Map<?, ?>) convert(v, vars.getType(i))); break;
                case LIST: b.setList(i, (List<?>) convert(v, vars.getType(i))); break;
                case SET: b.setSet(i, (Set<?>) convert(v, vars.getType(i))); break;
                default: throw new IllegalArgumentException("tag " + row.tags[i]);
            }
        }
        b.setIdempotent(true);
        return b;
    }

    /** utime + stime of a process in clock ticks, -1 when it cannot be read (no such pid, not Linux). */
    static long procTicks(long pid) {
        if (pid <= 0) return -1;
        try {
            String stat = new String(Files.readAllBytes(Paths.get("/proc/" + pid + "/stat")), StandardCharsets.US_ASCII);
            String[] f = stat.substring(stat.lastIndexOf(')') + 2).trim().split(" ");
            return Long.parseLong(f[11]) + Long.parseLong(f[12]);
        } catch (IOException | RuntimeException e) {
            return -1;
        }
    }

    /** Busy clock ticks of every core since boot (user, nice, system, irq, softirq, steal), -1 if unknown. */
    static long machineBusyTicks() {
        try {
            String line = Files.readAllLines(Paths.get("/proc/stat"), StandardCharsets.US_ASCII).get(0);
            String[] f = line.trim().split("\\s+");
            return Long.parseLong(f[1]) + Long.parseLong(f[2]) + Long.parseLong(f[3]) + Long.parseLong(f[6])
                    + Long.parseLong(f[7]) + Long.parseLong(f[8]);
        } catch (IOException | RuntimeException e) {
            return -1;
        }
    }

    static long cpuNanos() {
        java.lang.management.OperatingSystemMXBean os = ManagementFactory.getOperatingSystemMXBean();
        if (os instanceof com.sun.management.OperatingSystemMXBean) {
            return ((com.sun.management.OperatingSystemMXBean) os).getProcessCpuTime();
        }
        return -1;
    }

    static String json(String s) {
        if (s == null) return "null";
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    /** The requests of the rows: each group cut into chunks of at most `batch`, in order of first appearance. */
    static List<List<Row>> chunks(List<Row> rows, int batch) {
        List<List<Row>> out = new ArrayList<>();
        if (batch <= 1) {
            for (Row r : rows) out.add(List.of(r));
            return out;
        }
        Map<Long, List<Row>> groups = new LinkedHashMap<>();
        for (Row r : rows) groups.computeIfAbsent(r.group, k -> new ArrayList<>()).add(r);
        for (List<Row> members : groups.values()) {
            for (int i = 0; i < members.size(); i += batch) out.add(members.subList(i, Math.min(members.size(), i + batch)));
        }
        return out;
    }

    static Statement request(List<PreparedStatement> prepared, List<Row> chunk) {
        if (chunk.size() == 1) return bind(prepared.get(chunk.get(0).stmt), chunk.get(0));
        // UNLOGGED: the writer grouped these rows by replica set, so one round trip and no batchlog.
        BatchStatement batch = new BatchStatement(BatchStatement.Type.UNLOGGED);
        for (Row r : chunk) batch.add(bind(prepared.get(r.stmt), r));
        batch.setIdempotent(true);
        return batch;
    }

    static final class Sender {
        final Session session;
        final Semaphore window;
        final int inflight;
        final AtomicLong errors = new AtomicLong();
        final AtomicLong warnings = new AtomicLong();
        final AtomicReference<String> firstError = new AtomicReference<>();

        Sender(Session session, int inflight) {
            this.session = session;
            this.inflight = inflight;
            this.window = new Semaphore(inflight);
        }

        /** Send every request with at most `inflight` outstanding; false when `deadline` (nanoTime) passed. */
        boolean send(List<PreparedStatement> prepared, List<List<Row>> chunks, int limit, long deadline)
                throws InterruptedException {
            for (int i = 0; i < limit; i++) {
                if (!window.tryAcquire(Math.max(0, deadline - System.nanoTime()), TimeUnit.NANOSECONDS)) return false;
                ResultSetFuture f;
                try {
                    f = session.executeAsync(request(prepared, chunks.get(i)));
                } catch (RuntimeException e) {
                    window.release();
                    fail(e);
                    continue;
                }
                f.addListener(() -> {
                    try {
                        ResultSet rs = f.getUninterruptibly();
                        warnings.addAndGet(rs.getExecutionInfo().getWarnings().size());
                    } catch (RuntimeException e) {
                        fail(e);
                    } finally {
                        window.release();
                    }
                }, Runnable::run);
            }
            // Every permit back = every request answered.
            if (!window.tryAcquire(inflight, Math.max(0, deadline - System.nanoTime()), TimeUnit.NANOSECONDS)) return false;
            window.release(inflight);
            return true;
        }

        void fail(Throwable e) {
            errors.incrementAndGet();
            firstError.compareAndSet(null, e.getClass().getSimpleName() + ": " + e.getMessage());
        }
    }

    static String arg(Map<String, String> opts, String name, String dflt) {
        String v = opts.get(name);
        if (v == null && dflt == null) throw new IllegalArgumentException("missing --" + name);
        return v == null ? dflt : v;
    }

    public static void main(String[] argv) throws Exception {
        Map<String, String> opts = new LinkedHashMap<>();
        for (int i = 0; i < argv.length; i++) {
            if (!argv[i].startsWith("--") || i + 1 >= argv.length) {
                System.err.println("usage: RawWrite --file F [--hosts 127.0.0.1] [--port 9042] [--batch 1] [--inflight 32]"
                        + " [--consistency LOCAL_ONE] [--protocol 4] [--warmup 0] [--timeout-s 600] [--server-pid 0]"
                        + " [--clk-tck 100] [--check false]");
                System.exit(64);
            }
            opts.put(argv[i].substring(2), argv[++i]);
        }
        String file = arg(opts, "file", null);
        String[] hosts = arg(opts, "hosts", "127.0.0.1").split(",");
        int port = Integer.parseInt(arg(opts, "port", "9042"));
        int batch = Integer.parseInt(arg(opts, "batch", "1"));
        int inflight = Integer.parseInt(arg(opts, "inflight", "32"));
        ConsistencyLevel cl = ConsistencyLevel.valueOf(arg(opts, "consistency", "LOCAL_ONE"));
        int protocol = Integer.parseInt(arg(opts, "protocol", "4"));
        int warmup = Integer.parseInt(arg(opts, "warmup", "0"));
        double timeoutS = Double.parseDouble(arg(opts, "timeout-s", "600"));
        long serverPid = Long.parseLong(arg(opts, "server-pid", "0"));
        long clkTck = Long.parseLong(arg(opts, "clk-tck", "100"));
        if (batch < 1 || inflight < 1 || inflight > 1024 || warmup < 0 || timeoutS <= 0) {
            throw new IllegalArgumentException("need batch >= 1, 1 <= inflight <= 1024, warmup >= 0, timeout-s > 0");
        }
        long deadline = System.nanoTime() + (long) (timeoutS * 1e9);

        Input input = read(file);
        if (Boolean.parseBoolean(arg(opts, "check", "false"))) {
            // No server: what this program read from the file and how it would cut it into requests.
            long groups = input.rows.stream().mapToLong(r -> r.group).distinct().count();
            long values = input.rows.stream().mapToLong(r -> r.values.length).sum();
            System.out.println("{\"statements\": " + input.statements.size() + ", \"rows\": " + input.rows.size()
                    + ", \"groups\": " + groups + ", \"values\": " + values + ", \"requests\": "
                    + chunks(input.rows, batch).size() + "}");
            return;
        }
        Cluster.Builder builder = Cluster.builder()
                .addContactPoints(hosts)
                .withPort(port)
                .withoutJMXReporting()
                .withoutMetrics()
                .withQueryOptions(new QueryOptions().setConsistencyLevel(cl))
                .withSocketOptions(new SocketOptions().setConnectTimeoutMillis(10_000).setReadTimeoutMillis(30_000))
                .withPoolingOptions(new PoolingOptions());
        // 6 = the driver's newest beta (allowBetaProtocolVersion() cannot be combined with a fixed version).
        if (protocol == 6) builder = builder.allowBetaProtocolVersion();
        else builder = builder.withProtocolVersion(ProtocolVersion.fromInt(protocol));
        String result;
        boolean ok;
        Cluster cluster = builder.build();
        try {
            Session session = cluster.connect();
            List<PreparedStatement> prepared = new ArrayList<>();
            for (String cql : input.statements) prepared.add(session.prepare(cql));
            Sender sender = new Sender(session, inflight);
            if (warmup > 0) {
                // Warm-up: JIT-compile the send path on the first requests (they are written again, identically,
                // in the measured pass: same values, same USING TIMESTAMP).
                List<List<Row>> warm = chunks(input.rows, batch);
                if (!sender.send(prepared, warm, Math.min(warmup, warm.size()), deadline)) {
                    throw new IllegalStateException("warm-up requests not answered within --timeout-s");
                }
            }
            long errors0 = sender.errors.get();
            long server0 = procTicks(serverPid);
            long busy0 = machineBusyTicks();
            long cpu0 = cpuNanos();
            long t0 = System.nanoTime();
            List<List<Row>> todo = chunks(input.rows, batch);
            boolean finished = sender.send(prepared, todo, todo.size(), deadline);
            long t1 = System.nanoTime();
            long cpu1 = cpuNanos();
            long server1 = procTicks(serverPid);
            long busy1 = machineBusyTicks();
            double wall = (t1 - t0) / 1e9;
            double cpu = (cpu1 - cpu0) / 1e9;
            int rows = input.rows.size();
            long errors = sender.errors.get() - errors0;
            ok = finished && errors == 0;
            String serverCpu = server0 >= 0 && server1 >= 0 ? String.valueOf((server1 - server0) / (double) clkTck) : "null";
            String busy = busy0 >= 0 && busy1 >= 0 ? String.valueOf((busy1 - busy0) / (double) clkTck) : "null";
            result = "{\"client\": \"jvm\", \"driver\": " + json("datastax-java-driver " + Cluster.getDriverVersion())
                    + ", \"protocol\": " + cluster.getConfiguration().getProtocolOptions().getProtocolVersion().toInt()
                    + ", \"consistency\": " + json(cl.name()) + ", \"batch\": " + batch + ", \"inflight\": " + inflight
                    + ", \"rows\": " + rows + ", \"requests\": " + todo.size() + ", \"warmup_requests\": " + warmup
                    + ", \"wall_s\": " + wall + ", \"rows_per_s\": " + (rows / wall) + ", \"client_cpu_s\": " + cpu
                    + ", \"client_cpu_us_per_row\": " + (1e6 * cpu / rows) + ", \"server_cpu_s\": " + serverCpu + ", \"machine_busy_s\": " + busy
                    + ", \"errors\": " + errors + ", \"first_error\": " + json(sender.firstError.get())
                    + ", \"server_warnings\": " + sender.warnings.get()
                    + ", \"timed_out\": " + !finished + "}";
        } finally {
            // Bounded: after a timeout requests may still be outstanding, and close() would wait for them.
            try {
                cluster.closeAsync().get(10, TimeUnit.SECONDS);
            } catch (Exception e) {
                System.err.println("cluster close: " + e);
            }
        }
        System.out.println(result);
        System.out.flush();
        System.exit(ok ? 0 : 2);
    }
}
