package dev.tripwire.peer.kstreams;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.AutoOffsetReset;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.Stores;

/**
 * The Processor API form: one processor with a persistent (RocksDB, cached,
 * changelogged) key-value store {@code cards}: card id (i64) to the card's recent events
 * as a {@link CardLog} byte array. Per accepted event it inserts the event, evicts the
 * events no future query can need, computes the statistics of all windows at the event's
 * time with Tripwire's exact window bounds, and emits one record: key = card id
 * (decimal string), value = windows × 28 bytes (see {@link CardLog#STAT}).
 *
 * <p>It also applies Tripwire's per-partition acceptance rules so that its accepted set,
 * and so its statistics, can be compared with Tripwire's reference model: duplicates
 * (same event id within the dedup horizon; checked per card, since producers key by card)
 * and lateness (event_time + L &lt; B, B the second largest min(event_time, Kafka
 * timestamp) over the partition's accepted records). B is kept per task (= input
 * partition) in a small changelogged store {@code partition-basis}, so it survives a
 * restart exactly as the card logs do.
 */
final class ProcessorApp {
    static final String CARDS = "cards";
    static final String BASIS = "partition-basis";

    private ProcessorApp() {}

    static Topology build(Main.Config c, Schemas schemas) {
        Topology t = new Topology();
        t.addSource(AutoOffsetReset.earliest(), "source", new TxTimestampExtractor(c.maxFutureMs, c.maxAgeMs),
                Serdes.ByteArray().deserializer(), new TxDeserializer(schemas), c.input);
        t.addProcessor("windows", () -> new CardProcessor(c), "source");
        t.addStateStore(Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(CARDS), Serdes.Long(), Serdes.ByteArray())
                .withCachingEnabled(), "windows");
        t.addStateStore(Stores.keyValueStoreBuilder(Stores.inMemoryKeyValueStore(BASIS), Serdes.Integer(), Serdes.ByteArray())
                .withCachingEnabled(), "windows");
        t.addSink("sink", c.output, Serdes.ByteArray().serializer(), Serdes.ByteArray().serializer(), "windows");
        return t;
    }

    static final class CardProcessor implements Processor<byte[], Tx, byte[], byte[]> {
        private final long[] windows;
        private final long maxWindow;
        private final long latenessMs;
        private final long horizonMs;
        private final CardLog log;
        private ProcessorContext<byte[], byte[]> context;
        private KeyValueStore<Long, byte[]> cards;
        private KeyValueStore<Integer, byte[]> basisStore;
        private int partition;
        // Tripwire's watermark basis: top = largest, basis = second largest min(event_time, ts).
        private boolean hasTop, hasBasis;
        private long top, basis;

        CardProcessor(Main.Config c) {
            windows = c.windows;
            maxWindow = windows[windows.length - 1];
            latenessMs = c.latenessMs;
            horizonMs = c.dedupHorizonMs;
            log = new CardLog(windows, c.tickMs);
        }

        @Override
        public void init(ProcessorContext<byte[], byte[]> context) {
            this.context = context;
            cards = context.getStateStore(CARDS);
            basisStore = context.getStateStore(BASIS);
            partition = context.taskId().partition();
            byte[] b = basisStore.get(partition);
            if (b != null) {
                ByteBuffer bb = ByteBuffer.wrap(b);
                hasTop = bb.get() != 0;
                top = bb.getLong();
                hasBasis = bb.get() != 0;
                basis = bb.getLong();
            }
        }

        @Override
        public void process(Record<byte[], Tx> record) {
            Counters.seen();
            Tx x = record.value();
            if (x == null || !x.valid()) {
                Counters.skipped.increment();
                return;
            }
            byte[] events = cards.get(x.cardId);
            if (events != null && CardLog.duplicate(events, x.eventId, x.eventTime, horizonMs)) {
                Counters.skipped.increment();
                Counters.duplicates.increment();
                return;
            }
            if (hasBasis && x.eventTime + latenessMs < basis) {
                Counters.skipped.increment();
                Counters.late.increment();
                return;
            }
            long clamped = x.logTime >= 0 ? Math.min(x.eventTime, x.logTime) : x.eventTime;
            if (!hasTop) {
                hasTop = true;
                top = clamped;
                saveBasis();
            } else if (clamped >= top) {
                hasBasis = true;
                basis = top;
                top = clamped;
                saveBasis();
            } else if (!hasBasis || clamped > basis) {
                hasBasis = true;
                basis = clamped;
                saveBasis();
            }
            // Every later accepted event has event_time ≥ B - L, and a dump is at T ≥ the last
            // event time ≥ B: no window query reaches τ ≤ B - L - maxWindow, and no duplicate
            // check needs an event_time below B - L - horizon.
            long lowest = hasBasis ? basis - latenessMs : Long.MIN_VALUE + maxWindow + horizonMs + 1;
            events = log.insertAndEvict(events, x, lowest - maxWindow, lowest - horizonMs);
            cards.put(x.cardId, events);
            byte[] out = new byte[windows.length * CardLog.STAT];
            log.statsAt(events, log.tau(x.eventTime), out, 0);
            byte[] key = record.key() != null ? record.key() : Long.toString(x.cardId).getBytes(StandardCharsets.US_ASCII);
            context.forward(record.withKey(key).withValue(out));
        }

        private void saveBasis() {
            basisStore.put(partition, ByteBuffer.allocate(18).put((byte) (hasTop ? 1 : 0)).putLong(top)
                    .put((byte) (hasBasis ? 1 : 0)).putLong(basis).array());
        }
    }
}
