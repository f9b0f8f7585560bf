package dev.tripwire.peer.kstreams;

import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.streams.processor.TimestampExtractor;

/**
 * Event time from the record's Avro {@code event_time} (ms). Also applies Tripwire's time
 * bounds against the record's Kafka timestamp (an event time more than 5 min after it is
 * too far in the future, more than 7 days before it too far in the past unless
 * {@code --backfill}), since only here does Kafka Streams hand over the deserialized value
 * together with the timestamp. A rejected record gets the partition time (or 0), so it
 * cannot move stream time: the topology drops it right after the source.
 */
public final class TxTimestampExtractor implements TimestampExtractor {
    private final long maxFutureMs;
    private final long maxAgeMs; // < 0: any age (backfill)

    public TxTimestampExtractor(long maxFutureMs, long maxAgeMs) {
        this.maxFutureMs = maxFutureMs;
        this.maxAgeMs = maxAgeMs;
    }

    @Override
    public long extract(ConsumerRecord<Object, Object> record, long partitionTime) {
        Object v = record.value();
        if (!(v instanceof Tx)) {
            return Math.max(partitionTime, 0);
        }
        Tx t = (Tx) v;
        if (!t.valid()) {
            return Math.max(partitionTime, 0);
        }
        long log = record.timestamp();
        t.logTime = log;
        if (log >= 0) {
            if (t.eventTime > saturatingAdd(log, maxFutureMs)
                    || (maxAgeMs >= 0 && t.eventTime < log - maxAgeMs)) {
                t.rejected = Tx.TIME_BOUNDS;
                return Math.max(partitionTime, 0);
            }
        }
        return t.eventTime;
    }

    private static long saturatingAdd(long a, long b) {
        long r = a + b;
        return ((a ^ r) & (b ^ r)) < 0 ? Long.MAX_VALUE : r;
    }
}
