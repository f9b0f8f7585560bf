package dev.tripwire.peer.kstreams;

import java.io.IOException;
import java.io.PrintStream;
import java.lang.management.ManagementFactory;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.Comparator;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;
import java.util.stream.Stream;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.RecordsToDelete;
import org.apache.kafka.clients.admin.RemoveMembersFromConsumerGroupOptions;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.GroupIdNotFoundException;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.errors.UnknownTopicOrPartitionException;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StoreQueryParameters;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.QueryableStoreTypes;
import org.apache.kafka.streams.state.ReadOnlyKeyValueStore;

/**
 * The runner: {@code run} and {@code dump} (see README.md and {@link #usage()}).
 *
 * <p>It starts from a clean slate (consumer group, internal topics and local state of the
 * application id removed), reads the input's end offsets, starts the app from the
 * earliest offsets, and stops when the group's committed offsets (under exactly-once,
 * committed only with the transaction that wrote the results) reach those end offsets on
 * every input partition. Then it prints one JSON line on stdout.
 */
public final class Main {
    static final long[] DEFAULT_WINDOWS = {60_000, 300_000, 3_600_000, 86_400_000};

    /** Everything the command line sets. */
    static final class Config {
        String command;
        String mode;
        String bootstrap = "127.0.0.1:9092";
        String input;
        String output;
        String appId;
        int threads = 2;
        long[] windows = DEFAULT_WINDOWS.clone();
        String stateDir = System.getProperty("java.io.tmpdir") + "/kstreams-peer";
        Long commitMs; // null: Kafka Streams' default (100 ms under exactly-once)
        long latenessMs = 5_000;
        long dedupHorizonMs = 3_600_000;
        long tickMs = 1;
        long maxFutureMs = 5 * 60_000;
        long maxAgeMs = 7L * 24 * 3_600_000; // < 0 with --backfill
        Long cacheMb; // null: 0 for dsl, 64 for processor (measured, see README.md)
        long rocksdbMb = 512;
        String schemasDir;
        Long at;
        long timeoutS = 3_600;
        /** Extra Kafka Streams / client properties (--prop KEY=VALUE), applied last. */
        final Map<String, String> props = new HashMap<>();
    }

    static String usage() {
        return String.join("\n",
                "usage: java -jar kstreams-peer.jar run|dump --mode dsl|processor --input TOPIC --output TOPIC --app-id ID [options]",
                "  --bootstrap HOST:PORT   Kafka (default 127.0.0.1:9092)",
                "  --threads N             num.stream.threads (default 2)",
                "  --windows W1,W2,...     window lengths in ms (default 60000,300000,3600000,86400000)",
                "  --state-dir DIR         state.dir (default $TMPDIR/kstreams-peer); the app's folder in it is wiped at start",
                "  --commit-ms MS          commit.interval.ms (default: Kafka Streams' default under exactly-once, 100)",
                "  --lateness-ms MS        grace period of the DSL windows; Tripwire's lateness bound in the processor app (default 5000)",
                "  --dedup-horizon-ms MS   processor app: Tripwire's duplicate horizon (default 3600000)",
                "  --tick-ms MS            processor app: Tripwire's tick (default 1)",
                "  --backfill              accept event times of any age (Tripwire's --backfill)",
                "  --cache-mb MB           statestore.cache.max.bytes in MiB (default: 0 for dsl, 64 for processor)",
                "  --rocksdb-mb MB         shared RocksDB block cache incl. memtables, MiB (default 512)",
                "  --schemas DIR           read manifest.json and the .avsc files from DIR (default: the copies in the jar)",
                "  --timeout-s S           give up after S seconds (default 3600)",
                "  --prop KEY=VALUE        any Kafka Streams / client property (e.g. producer.compression.type=none), applied last; repeatable",
                "  --at T                  dump: the time (ms) of the statistics; must be >= the last event time",
                "run prints one JSON line: {\"mode\":..,\"records\":N,\"skipped\":K,\"startup_ms\":S,\"processing_ms\":P,\"eps\":E}",
                "dump (processor mode only) prints one JSON line per card and non-empty window, the run line goes to stderr");
    }

    static Config parse(String[] args) {
        if (args.length == 0 || !(args[0].equals("run") || args[0].equals("dump"))) {
            throw new IllegalArgumentException("the first argument must be run or dump");
        }
        Config c = new Config();
        c.command = args[0];
        for (int i = 1; i < args.length; i++) {
            String a = args[i];
            if (a.equals("--backfill")) {
                c.maxAgeMs = -1;
                continue;
            }
            if (i + 1 >= args.length) {
                throw new IllegalArgumentException(a + " needs a value");
            }
            String v = args[++i];
            switch (a) {
                case "--mode" -> c.mode = v;
                case "--bootstrap" -> c.bootstrap = v;
                case "--input" -> c.input = v;
                case "--output" -> c.output = v;
                case "--app-id" -> c.appId = v;
                case "--threads" -> c.threads = Integer.parseInt(v);
                case "--windows" -> c.windows = Arrays.stream(v.split(",")).map(String::trim).mapToLong(Long::parseLong).sorted().distinct().toArray();
                case "--state-dir" -> c.stateDir = v;
                case "--commit-ms" -> c.commitMs = Long.parseLong(v);
                case "--lateness-ms" -> c.latenessMs = Long.parseLong(v);
                case "--dedup-horizon-ms" -> c.dedupHorizonMs = Long.parseLong(v);
                case "--tick-ms" -> c.tickMs = Long.parseLong(v);
                case "--cache-mb" -> c.cacheMb = Long.parseLong(v);
                case "--rocksdb-mb" -> c.rocksdbMb = Long.parseLong(v);
                case "--schemas" -> c.schemasDir = v;
                case "--at" -> c.at = Long.parseLong(v);
                case "--timeout-s" -> c.timeoutS = Long.parseLong(v);
                case "--prop" -> {
                    int eq = v.indexOf('=');
                    if (eq <= 0) throw new IllegalArgumentException("--prop needs KEY=VALUE");
                    c.props.put(v.substring(0, eq), v.substring(eq + 1));
                }
                default -> throw new IllegalArgumentException("unknown option " + a);
            }
        }
        if (!"dsl".equals(c.mode) && !"processor".equals(c.mode)) {
            throw new IllegalArgumentException("--mode must be dsl or processor");
        }
        if (c.input == null || c.output == null || c.appId == null) {
            throw new IllegalArgumentException("--input, --output and --app-id are required");
        }
        if (c.windows.length == 0 || c.windows[0] < 1 || c.windows[c.windows.length - 1] > Integer.MAX_VALUE) {
            throw new IllegalArgumentException("window lengths must be in 1..2^31-1 ms");
        }
        if (c.command.equals("dump")) {
            if (!c.mode.equals("processor")) {
                throw new IllegalArgumentException("dump needs --mode processor (the DSL app's windows are not Tripwire's)");
            }
            if (c.at == null) {
                throw new IllegalArgumentException("dump needs --at T");
            }
        }
        return c;
    }

    public static void main(String[] args) {
        long jvmStartMs = ManagementFactory.getRuntimeMXBean().getStartTime();
        // A message is at most 64 KiB: a corrupt length prefix must not make Avro allocate
        // more (Tripwire's codec caps its allocations the same way). Read by Avro's
        // SystemLimitException when it is loaded, so set before any decoding.
        System.setProperty("org.apache.avro.limits.string.maxLength", Integer.toString(TxDeserializer.MAX_MESSAGE_BYTES));
        System.setProperty("org.apache.avro.limits.bytes.maxLength", Integer.toString(TxDeserializer.MAX_MESSAGE_BYTES));
        Config c;
        try {
            c = parse(args);
        } catch (IllegalArgumentException e) {
            System.err.println("error: " + e.getMessage());
            System.err.println(usage());
            System.exit(2);
            return;
        }
        int rc;
        try {
            rc = new Main(c, jvmStartMs).execute();
        } catch (Exception e) {
            System.err.println("error: " + e);
            e.printStackTrace();
            rc = 1;
        }
        System.out.flush();
        System.err.flush();
        // Kafka clients' threads are not to hold the exit (System.exit does not wait for them).
        System.exit(rc);
    }

    private final Config c;
    private final long jvmStartMs;
    private volatile Throwable failure;

    private Main(Config c, long jvmStartMs) {
        this.c = c;
        this.jvmStartMs = jvmStartMs;
    }

    private static void log(String msg) {
        System.err.println("[kstreams-peer] " + msg);
    }

    private int execute() throws Exception {
        Schemas schemas = Schemas.load(c.schemasDir);
        Properties adminProps = new Properties();
        adminProps.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, c.bootstrap);
        adminProps.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, 10_000);
        adminProps.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, 20_000);
        long deadline = System.currentTimeMillis() + c.timeoutS * 1000;
        try (Admin admin = Admin.create(adminProps)) {
            TopicDescription input = retry(deadline, "describe " + c.input,
                    () -> admin.describeTopics(List.of(c.input)).allTopicNames().get().get(c.input));
            int partitions = input.partitions().size();
            resetApplication(admin, deadline, partitions);

            List<TopicPartition> tps = new ArrayList<>();
            for (int p = 0; p < partitions; p++) tps.add(new TopicPartition(c.input, p));
            Map<TopicPartition, Long> start = offsets(admin, deadline, tps, OffsetSpec.earliest());
            Map<TopicPartition, Long> end = offsets(admin, deadline, tps, OffsetSpec.latest());
            long records = 0;
            for (TopicPartition tp : tps) records += end.get(tp) - start.get(tp);
            log("input " + c.input + ": " + partitions + " partitions, " + records + " records; mode " + c.mode
                    + ", " + c.threads + " threads, windows " + Arrays.toString(c.windows));

            Properties props = streamsProps();
            Topology topology = c.mode.equals("dsl") ? DslApp.build(c, schemas, props) : ProcessorApp.build(c, schemas);
            KafkaStreams streams = new KafkaStreams(topology, props);
            streams.setUncaughtExceptionHandler(e -> {
                failure = e;
                return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
            });
            streams.cleanUp();
            streams.start();

            long doneMs = awaitCommitted(admin, deadline, streams, start, end);
            long doneNanos = System.nanoTime();
            long firstMs = Counters.firstRecordMs;
            long startupMs = firstMs == 0 ? doneMs - jvmStartMs : firstMs - jvmStartMs;
            long processingMs = firstMs == 0 ? 0 : TimeUnit.NANOSECONDS.toMillis(doneNanos - Counters.firstRecordNanos);
            long eps = processingMs == 0 ? 0 : Math.round(records * 1000.0 / processingMs);
            String line = String.format("{\"mode\":\"%s\",\"records\":%d,\"skipped\":%d,\"startup_ms\":%d,\"processing_ms\":%d,\"eps\":%d}",
                    c.mode, records, Counters.skipped.sum(), startupMs, processingMs, eps);
            log("processed " + Counters.processed.sum() + " records (skipped " + Counters.skipped.sum()
                    + ": late " + Counters.late.sum() + ", duplicates " + Counters.duplicates.sum()
                    + ", invalid " + (Counters.skipped.sum() - Counters.late.sum() - Counters.duplicates.sum()) + ")");
            List<TopicPartition> outTps = new ArrayList<>();
            int outPartitions = retry(deadline, "describe " + c.output,
                    () -> admin.describeTopics(List.of(c.output)).allTopicNames().get().get(c.output)).partitions().size();
            for (int p = 0; p < outPartitions; p++) outTps.add(new TopicPartition(c.output, p));
            Map<TopicPartition, Long> outStart = offsets(admin, deadline, outTps, OffsetSpec.earliest());
            Map<TopicPartition, Long> outEnd = offsets(admin, deadline, outTps, OffsetSpec.latest());
            long outRecords = 0;
            for (TopicPartition tp : outTps) outRecords += outEnd.get(tp) - outStart.get(tp);
            log("output " + c.output + ": " + outRecords + " records (incl. transaction markers)");
            if (c.command.equals("run")) {
                System.out.println(line);
                System.out.flush();
            } else {
                System.err.println(line);
                dump(streams, deadline);
            }
            // Leave the group now (Kafka Streams otherwise stays a member until the session
            // times out), so that the next run with this app id can reset it at once.
            streams.close(new KafkaStreams.CloseOptions().timeout(Duration.ofSeconds(30)).leaveGroup(true));
            return 0;
        }
    }

    /** A fresh start: no committed offsets, no internal topics, no local state of the app id. */
    private void resetApplication(Admin admin, long deadline, int partitions) throws Exception {
        retry(deadline, "delete group " + c.appId, () -> {
            try {
                // Kafka Streams' consumers do not leave the group on close; a member of an
                // earlier run would block the deletion until its session timed out.
                admin.removeMembersFromConsumerGroup(c.appId, new RemoveMembersFromConsumerGroupOptions()).all().get();
            } catch (ExecutionException e) {
                // No such group, or no members: nothing to remove.
            }
            try {
                admin.deleteConsumerGroups(List.of(c.appId)).all().get();
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof GroupIdNotFoundException)) throw e;
            }
            return null;
        });
        Set<String> internal = retry(deadline, "list topics", () -> admin.listTopics().names().get()).stream()
                .filter(t -> t.startsWith(c.appId + "-") && (t.endsWith("-changelog") || t.endsWith("-repartition")))
                .collect(Collectors.toSet());
        if (!internal.isEmpty()) {
            log("deleting internal topics of a previous run: " + internal);
            retry(deadline, "delete internal topics", () -> {
                try {
                    admin.deleteTopics(internal).all().get();
                } catch (ExecutionException e) {
                    if (!(e.getCause() instanceof UnknownTopicOrPartitionException)) throw e;
                }
                return null;
            });
            while (retry(deadline, "list topics", () -> admin.listTopics().names().get()).stream().anyMatch(internal::contains)) {
                Thread.sleep(200);
            }
        }
        retry(deadline, "create " + c.output, () -> {
            try {
                admin.createTopics(List.of(new NewTopic(c.output, partitions, (short) 1))).all().get();
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) throw e;
            }
            return null;
        });
        // Empty the output topic, so that it holds this run's results only.
        TopicDescription out = retry(deadline, "describe " + c.output,
                () -> admin.describeTopics(List.of(c.output)).allTopicNames().get().get(c.output));
        List<TopicPartition> outTps = new ArrayList<>();
        for (int p = 0; p < out.partitions().size(); p++) outTps.add(new TopicPartition(c.output, p));
        Map<TopicPartition, Long> outEnd = offsets(admin, deadline, outTps, OffsetSpec.latest());
        Map<TopicPartition, RecordsToDelete> purge = new HashMap<>();
        outEnd.forEach((tp, o) -> purge.put(tp, RecordsToDelete.beforeOffset(o)));
        retry(deadline, "empty " + c.output, () -> admin.deleteRecords(purge).all().get());
        Path dir = Path.of(c.stateDir, c.appId);
        if (Files.exists(dir)) {
            try (Stream<Path> walk = Files.walk(dir)) {
                walk.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
            }
        }
        Files.createDirectories(Path.of(c.stateDir));
    }

    private Properties streamsProps() {
        BoundedRocksDB.totalBytes = c.rocksdbMb << 20;
        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, c.appId);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, c.bootstrap);
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, c.threads);
        if (c.commitMs != null) {
            p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, c.commitMs);
        }
        p.put(StreamsConfig.STATE_DIR_CONFIG, c.stateDir);
        long cacheMb = c.cacheMb != null ? c.cacheMb : c.mode.equals("dsl") ? 0 : 64;
        p.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG, cacheMb << 20);
        p.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, 1); // one broker
        p.put(StreamsConfig.ROCKSDB_CONFIG_SETTER_CLASS_CONFIG, BoundedRocksDB.class);
        p.put(StreamsConfig.TOPOLOGY_OPTIMIZATION_CONFIG, StreamsConfig.OPTIMIZE);
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");
        // Fewer, larger produce requests for the output and changelog topics.
        p.put(StreamsConfig.producerPrefix(ProducerConfig.BATCH_SIZE_CONFIG), 128 * 1024);
        p.put(StreamsConfig.producerPrefix(ProducerConfig.COMPRESSION_TYPE_CONFIG), "lz4");
        p.putAll(c.props);
        return p;
    }

    /** Polls the group's committed offsets until every input partition's reaches its end. */
    private long awaitCommitted(Admin admin, long deadline, KafkaStreams streams,
                                Map<TopicPartition, Long> start, Map<TopicPartition, Long> end) throws Exception {
        long lastNote = System.currentTimeMillis();
        while (true) {
            if (failure != null) {
                throw new IllegalStateException("the streams app failed", failure);
            }
            KafkaStreams.State s = streams.state();
            if (s == KafkaStreams.State.ERROR || s == KafkaStreams.State.NOT_RUNNING || s == KafkaStreams.State.PENDING_ERROR) {
                throw new IllegalStateException("the streams app stopped: " + s);
            }
            try {
                Map<TopicPartition, OffsetAndMetadata> committed = admin.listConsumerGroupOffsets(c.appId)
                        .partitionsToOffsetAndMetadata().get(5, TimeUnit.SECONDS);
                boolean done = true;
                long behind = 0;
                for (Map.Entry<TopicPartition, Long> e : end.entrySet()) {
                    if (e.getValue().equals(start.get(e.getKey()))) continue; // empty partition
                    OffsetAndMetadata o = committed.get(e.getKey());
                    long at = o == null ? start.get(e.getKey()) : o.offset();
                    if (at < e.getValue()) {
                        done = false;
                        behind += e.getValue() - at;
                    }
                }
                if (done) {
                    return System.currentTimeMillis();
                }
                if (System.currentTimeMillis() - lastNote >= 10_000) {
                    lastNote = System.currentTimeMillis();
                    log("committed offsets " + behind + " records behind the end");
                }
            } catch (Exception e) {
                // Kafka restarting, or the group not there yet: keep polling.
            }
            if (System.currentTimeMillis() > deadline) {
                throw new IllegalStateException("timed out waiting for the committed offsets");
            }
            Thread.sleep(100);
        }
    }

    /** Prints the statistics at --at of every card and non-empty window, from the final store. */
    private void dump(KafkaStreams streams, long deadline) throws Exception {
        ReadOnlyKeyValueStore<Long, byte[]> store = null;
        while (store == null) {
            try {
                store = streams.store(StoreQueryParameters.fromNameAndType(ProcessorApp.CARDS, QueryableStoreTypes.keyValueStore()));
            } catch (Exception e) {
                if (System.currentTimeMillis() > deadline) throw e;
                Thread.sleep(100);
            }
        }
        List<KeyValue<Long, byte[]>> all = new ArrayList<>();
        try (KeyValueIterator<Long, byte[]> it = store.all()) {
            while (it.hasNext()) all.add(it.next());
        }
        all.sort(Comparator.comparingLong(kv -> kv.key));
        CardLog log = new CardLog(c.windows, c.tickMs);
        byte[] out = new byte[c.windows.length * CardLog.STAT];
        PrintStream o = new PrintStream(new java.io.FileOutputStream(java.io.FileDescriptor.out), false, "UTF-8");
        StringBuilder sb = new StringBuilder(256);
        long lines = 0;
        for (KeyValue<Long, byte[]> kv : all) {
            log.statsAt(kv.value, c.at, out, 0);
            for (int k = 0; k < c.windows.length; k++) {
                int off = k * CardLog.STAT;
                int count = CardLog.statCount(out, off);
                if (count == 0) continue;
                sb.setLength(0);
                sb.append("{\"card\":").append(kv.key).append(",\"window\":").append(c.windows[k])
                        .append(",\"count\":").append(count).append(",\"sum\":").append(CardLog.statSum(out, off))
                        .append(",\"max\":").append(CardLog.statMax(out, off))
                        .append(",\"merchants\":").append(CardLog.statMerchants(out, off))
                        .append(",\"countries\":").append(CardLog.statCountries(out, off)).append('}');
                o.println(sb);
                lines++;
            }
        }
        o.flush();
        log("dumped " + lines + " statistics of " + all.size() + " cards at " + c.at);
    }

    interface Call<T> {
        T call() throws Exception;
    }

    /** Retries a call to Kafka until it succeeds or the deadline passes (the broker may be restarting). */
    private static <T> T retry(long deadline, String what, Call<T> call) throws Exception {
        Exception last = null;
        int attempt = 0;
        while (System.currentTimeMillis() < deadline) {
            try {
                return call.call();
            } catch (Exception e) {
                last = e;
                if (attempt++ % 10 == 0) log(what + " failed, retrying: " + e);
                Thread.sleep(1000);
            }
        }
        throw new IllegalStateException(what + " failed", last);
    }

    private static Map<TopicPartition, Long> offsets(Admin admin, long deadline, List<TopicPartition> tps, OffsetSpec spec) throws Exception {
        Map<TopicPartition, OffsetSpec> req = new HashMap<>();
        for (TopicPartition tp : tps) req.put(tp, spec);
        Map<TopicPartition, Long> out = new HashMap<>();
        retry(deadline, "list offsets", () -> {
            admin.listOffsets(req).all().get().forEach((tp, info) -> out.put(tp, info.offset()));
            return null;
        });
        return Collections.unmodifiableMap(out);
    }
}
