package dev.tripwire.peer.kstreams;

import java.nio.ByteBuffer;
import java.time.Duration;
import java.util.Arrays;
import java.util.Properties;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.KGroupedStream;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Named;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.kstream.SlidingWindows;
import org.apache.kafka.streams.state.WindowStore;

/**
 * The DSL form: one sliding-window aggregation per window length, each with its own
 * RocksDB window store (cached, changelogged):
 *
 * <pre>
 * stream(input) -&gt; filter(valid) -&gt; groupByKey()
 *   -&gt; for each W: windowedBy(SlidingWindows.ofTimeDifferenceAndGrace(W - 1 ms, lateness))
 *                  .aggregate(count, sum, max, distinct merchants, distinct countries)
 *                  .toStream() -&gt; filter(window ends at its newest record) -&gt; to(output)
 * </pre>
 *
 * <p>A time difference of W - 1 ms makes Kafka Streams' window [t-(W-1), t] (both ends
 * inclusive) hold the same events as Tripwire's window W at t (τ in (t-W, t]), with ms
 * timestamps and a 1 ms tick. Output: per input record (after the state cache) one record
 * per window length, for the window ending at that record's time; see README.md.
 */
final class DslApp {
    private DslApp() {}

    static Topology build(Main.Config c, Schemas schemas, Properties props) {
        StreamsBuilder b = new StreamsBuilder();
        Serde<Tx> txSerde = Serdes.serdeFrom(new NoSerializer<>(), new TxDeserializer(schemas));
        KStream<String, Tx> source = b.stream(c.input,
                Consumed.with(Serdes.String(), txSerde)
                        .withTimestampExtractor(new TxTimestampExtractor(c.maxFutureMs, c.maxAgeMs))
                        .withName("source"));
        KStream<String, Tx> valid = source.filter((k, tx) -> {
            Counters.seen();
            if (tx.valid() && k != null) {
                return true;
            }
            Counters.skipped.increment();
            return false;
        }, Named.as("valid"));
        // The input is keyed by card already: no repartition topic.
        KGroupedStream<String, Tx> byCard = valid.groupByKey(Grouped.with("by-card", Serdes.String(), txSerde));
        Serde<Agg> aggSerde = Serdes.serdeFrom(new AggSerializer(), new AggDeserializer());
        for (long w : c.windows) {
            final int windowMs = (int) w;
            byCard.windowedBy(SlidingWindows.ofTimeDifferenceAndGrace(Duration.ofMillis(w - 1), Duration.ofMillis(c.latenessMs)))
                    .aggregate(Agg::new, (card, tx, agg) -> agg.plus(tx),
                            Named.as("agg-" + w),
                            Materialized.<String, Agg, WindowStore<Bytes, byte[]>>as("w" + w)
                                    .withKeySerde(Serdes.String())
                                    .withValueSerde(aggSerde))
                    .toStream(Named.as("changes-" + w))
                    // A sliding-window aggregation updates several windows per record (the
                    // record's own window ending at it, the one starting just after it, and
                    // every existing window it falls in). Keep the windows that end at their
                    // newest record: the statistics as of that record's time.
                    .filter((wk, agg) -> agg != null && wk.window().end() == agg.maxTime, Named.as("at-record-" + w))
                    .map((wk, agg) -> KeyValue.pair(wk.key(), agg.encode(windowMs)), Named.as("encode-" + w))
                    .to(c.output, Produced.with(Serdes.String(), Serdes.ByteArray()).withName("sink-" + w));
        }
        return b.build(props);
    }

    /** The aggregate of one window: immutable once stored (the aggregator copies). */
    static final class Agg {
        int count;
        long sum;
        long max;
        /** Largest event time in the window. */
        long maxTime = -1;
        long[] merchants = EMPTY_L; // sorted, distinct
        short[] countries = EMPTY_S; // sorted, distinct

        static final long[] EMPTY_L = new long[0];
        static final short[] EMPTY_S = new short[0];

        /**
         * A new aggregate with tx added. Kafka Streams' sliding-window processor may pass
         * one stored aggregate object to the aggregator for one window and then use it as
         * the base of another, so the aggregator must not change its argument.
         */
        Agg plus(Tx tx) {
            Agg a = new Agg();
            a.count = count + 1;
            a.sum = sum + tx.amountMinor;
            a.max = Math.max(max, tx.amountMinor);
            a.maxTime = Math.max(maxTime, tx.eventTime);
            int i = Arrays.binarySearch(merchants, tx.merchantId);
            if (i >= 0) {
                a.merchants = merchants;
            } else {
                int at = -i - 1;
                a.merchants = new long[merchants.length + 1];
                System.arraycopy(merchants, 0, a.merchants, 0, at);
                a.merchants[at] = tx.merchantId;
                System.arraycopy(merchants, at, a.merchants, at + 1, merchants.length - at);
            }
            int j = Arrays.binarySearch(countries, tx.country);
            if (j >= 0) {
                a.countries = countries;
            } else {
                int at = -j - 1;
                a.countries = new short[countries.length + 1];
                System.arraycopy(countries, 0, a.countries, 0, at);
                a.countries[at] = tx.country;
                System.arraycopy(countries, at, a.countries, at + 1, countries.length - at);
            }
            return a;
        }

        /**
         * Output value, 40 bytes big-endian: window_ms i32, time i64 (the window's end, =
         * the newest event time in it), count i32, sum i64, max i64, distinct merchants i32,
         * distinct countries i32.
         */
        byte[] encode(int windowMs) {
            return ByteBuffer.allocate(40).putInt(windowMs).putLong(maxTime).putInt(count).putLong(sum)
                    .putLong(max).putInt(merchants.length).putInt(countries.length).array();
        }
    }

    /** Stored aggregate: count i32, sum i64, max i64, maxTime i64, nM i32, nM × i64, nC i16, nC × i16. */
    static final class AggSerializer implements Serializer<Agg> {
        @Override
        public byte[] serialize(String topic, Agg a) {
            if (a == null) return null;
            ByteBuffer b = ByteBuffer.allocate(4 + 8 + 8 + 8 + 4 + 8 * a.merchants.length + 2 + 2 * a.countries.length);
            b.putInt(a.count).putLong(a.sum).putLong(a.max).putLong(a.maxTime).putInt(a.merchants.length);
            for (long m : a.merchants) b.putLong(m);
            b.putShort((short) a.countries.length);
            for (short s : a.countries) b.putShort(s);
            return b.array();
        }
    }

    static final class AggDeserializer implements Deserializer<Agg> {
        @Override
        public Agg deserialize(String topic, byte[] bytes) {
            if (bytes == null) return null;
            ByteBuffer b = ByteBuffer.wrap(bytes);
            Agg a = new Agg();
            a.count = b.getInt();
            a.sum = b.getLong();
            a.max = b.getLong();
            a.maxTime = b.getLong();
            a.merchants = new long[b.getInt()];
            for (int i = 0; i < a.merchants.length; i++) a.merchants[i] = b.getLong();
            a.countries = new short[b.getShort()];
            for (int i = 0; i < a.countries.length; i++) a.countries[i] = b.getShort();
            return a;
        }
    }

    /** The input is never written back (no repartition), so Tx needs no serializer. */
    static final class NoSerializer<T> implements Serializer<T> {
        @Override
        public byte[] serialize(String topic, T data) {
            throw new UnsupportedOperationException("Tx values are never serialized (the input is keyed by card)");
        }
    }
}
