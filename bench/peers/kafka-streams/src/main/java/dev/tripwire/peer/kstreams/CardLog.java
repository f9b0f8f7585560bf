package dev.tripwire.peer.kstreams;

import java.lang.invoke.MethodHandles;
import java.lang.invoke.VarHandle;
import java.nio.ByteOrder;
import java.util.Arrays;

/**
 * A card's recent events as one compact byte array (the value of the card's entry in the
 * RocksDB store), sorted by event time (ties in arrival order). Each event is 34 bytes,
 * big-endian: event_time i64, event_id i64, amount_minor i64, merchant_id i64, country i16.
 * All operations work on the bytes directly: no per-event objects.
 *
 * <p>The statistics follow Tripwire's semantics exactly ({@code dataflow/SEMANTICS.md}):
 * τ(x) = ceil(event_time / tick) * tick, and x is in the window of length W at time t iff
 * τ(x) ≤ t &lt; τ(x) + W.
 */
final class CardLog {
    static final int EVENT = 34;
    /** Output bytes per window: count i32, sum i64, max i64, distinct merchants i32, distinct countries i32. */
    static final int STAT = 28;

    private static final VarHandle LONG = MethodHandles.byteArrayViewVarHandle(long[].class, ByteOrder.BIG_ENDIAN);
    private static final VarHandle SHORT = MethodHandles.byteArrayViewVarHandle(short[].class, ByteOrder.BIG_ENDIAN);
    private static final VarHandle INT = MethodHandles.byteArrayViewVarHandle(int[].class, ByteOrder.BIG_ENDIAN);

    private final long[] windows; // ascending
    private final long tick;
    // Scratch sets for distinct counts, reused across events (one CardLog per task).
    private long[] merchantKeys = new long[64];
    private int[] merchantStamp = new int[64];
    private final int[] countryStamp = new int[26 * 26];
    private int stamp;

    CardLog(long[] windowsAscending, long tick) {
        this.windows = windowsAscending;
        this.tick = Math.max(tick, 1);
    }

    static int size(byte[] log) {
        return log == null ? 0 : log.length / EVENT;
    }

    static long eventTime(byte[] b, int i) {
        return (long) LONG.get(b, i * EVENT);
    }

    static long eventId(byte[] b, int i) {
        return (long) LONG.get(b, i * EVENT + 8);
    }

    static long amount(byte[] b, int i) {
        return (long) LONG.get(b, i * EVENT + 16);
    }

    static long merchant(byte[] b, int i) {
        return (long) LONG.get(b, i * EVENT + 24);
    }

    static short country(byte[] b, int i) {
        return (short) SHORT.get(b, i * EVENT + 32);
    }

    long tau(long eventTime) {
        if (tick == 1) return eventTime;
        return Math.floorDiv(eventTime + tick - 1, tick) * tick;
    }

    /**
     * Tripwire's duplicate rule, per card: an event with the same id was accepted earlier
     * and x's event time is at most {@code horizon} after that event's.
     */
    static boolean duplicate(byte[] log, long eventId, long eventTime, long horizon) {
        int n = size(log);
        for (int i = n - 1; i >= 0; i--) {
            if (eventId(log, i) == eventId && eventTime <= eventTime(log, i) + horizon) {
                return true;
            }
        }
        return false;
    }

    /**
     * The log with tx inserted (after the events of the same time) and the events that no
     * future query can need dropped: those with τ ≤ {@code dropTauAtMost} and event_time &lt;
     * {@code dropTimeBelow} (a sorted prefix).
     */
    byte[] insertAndEvict(byte[] log, Tx tx, long dropTauAtMost, long dropTimeBelow) {
        int n = size(log);
        int drop = 0;
        while (drop < n) {
            long et = eventTime(log, drop);
            if (tau(et) <= dropTauAtMost && et < dropTimeBelow) drop++;
            else break;
        }
        int at = n;
        while (at > drop && eventTime(log, at - 1) > tx.eventTime) at--;
        byte[] out = new byte[(n - drop + 1) * EVENT];
        System.arraycopy(log == null ? out : log, drop * EVENT, out, 0, (at - drop) * EVENT);
        int o = (at - drop) * EVENT;
        LONG.set(out, o, tx.eventTime);
        LONG.set(out, o + 8, tx.eventId);
        LONG.set(out, o + 16, tx.amountMinor);
        LONG.set(out, o + 24, tx.merchantId);
        SHORT.set(out, o + 32, tx.country);
        if (at < n) {
            System.arraycopy(log, at * EVENT, out, o + EVENT, (n - at) * EVENT);
        }
        return out;
    }

    /**
     * The statistics of every window at time t, written to out[off ..] as windows.length ×
     * {@link #STAT} bytes (all zero for an empty window), in ascending window order.
     * Windows are nested (all end at t), so one backwards walk from the newest event with
     * τ ≤ t fills them all.
     */
    void statsAt(byte[] log, long t, byte[] out, int off) {
        int n = size(log);
        int hi = n - 1;
        while (hi >= 0 && tau(eventTime(log, hi)) > t) hi--;
        if (++stamp == 0) { // wrapped: clear the stamps
            Arrays.fill(merchantStamp, 0);
            Arrays.fill(countryStamp, 0);
            stamp = 1;
        }
        if (merchantKeys.length < 2 * (hi + 1)) {
            int cap = Integer.highestOneBit(Math.max(4 * (hi + 1), 64) - 1) << 1;
            merchantKeys = new long[cap];
            merchantStamp = new int[cap];
        }
        int count = 0, merchants = 0, countries = 0;
        long sum = 0, max = 0;
        int k = 0;
        for (int i = hi; i >= 0 && k < windows.length; i--) {
            long tau = tau(eventTime(log, i));
            while (k < windows.length && tau <= t - windows[k]) {
                put(out, off + k * STAT, count, sum, max, merchants, countries);
                k++;
            }
            if (k == windows.length) break;
            count++;
            long a = amount(log, i);
            sum += a;
            if (a > max) max = a;
            if (addMerchant(merchant(log, i))) merchants++;
            int c = country(log, i);
            if (countryStamp[c] != stamp) {
                countryStamp[c] = stamp;
                countries++;
            }
        }
        for (; k < windows.length; k++) {
            put(out, off + k * STAT, count, sum, max, merchants, countries);
        }
    }

    private boolean addMerchant(long m) {
        int mask = merchantKeys.length - 1;
        int h = (int) (m * 0x9E3779B97F4A7C15L >>> 40) & mask;
        while (merchantStamp[h] == stamp) {
            if (merchantKeys[h] == m) return false;
            h = (h + 1) & mask;
        }
        merchantStamp[h] = stamp;
        merchantKeys[h] = m;
        return true;
    }

    private static void put(byte[] out, int o, int count, long sum, long max, int merchants, int countries) {
        INT.set(out, o, count);
        LONG.set(out, o + 4, sum);
        LONG.set(out, o + 12, max);
        INT.set(out, o + 20, merchants);
        INT.set(out, o + 24, countries);
    }

    static int statCount(byte[] out, int o) {
        return (int) INT.get(out, o);
    }

    static long statSum(byte[] out, int o) {
        return (long) LONG.get(out, o + 4);
    }

    static long statMax(byte[] out, int o) {
        return (long) LONG.get(out, o + 12);
    }

    static int statMerchants(byte[] out, int o) {
        return (int) INT.get(out, o + 20);
    }

    static int statCountries(byte[] out, int o) {
        return (int) INT.get(out, o + 24);
    }
}
