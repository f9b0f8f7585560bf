package dev.tripwire.peer.kstreams;

import java.util.concurrent.atomic.LongAdder;

/** Process-wide counters, read by the runner at the end of a run. */
final class Counters {
    /** Input records seen by the first processor (valid or not). */
    static final LongAdder processed = new LongAdder();
    /** Records dropped: undecodable, invalid fields, time bounds; in the processor app also late and duplicates. */
    static final LongAdder skipped = new LongAdder();
    static final LongAdder late = new LongAdder();
    static final LongAdder duplicates = new LongAdder();
    /** Wall clock (ms) and nanoTime when the first record was processed; 0 before. */
    static volatile long firstRecordMs;
    static volatile long firstRecordNanos;

    private Counters() {}

    /** Called for every input record by the first processor of each topology. */
    static void seen() {
        if (firstRecordMs == 0) {
            first();
        }
        processed.increment();
    }

    private static synchronized void first() {
        if (firstRecordMs == 0) {
            firstRecordNanos = System.nanoTime();
            firstRecordMs = System.currentTimeMillis();
        }
    }
}
