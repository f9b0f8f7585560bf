package dev.tripwire.peer.kstreams;

/**
 * The fields of a decoded transaction that the window statistics need. One object per
 * input record, made by {@link TxDeserializer}; {@link TxTimestampExtractor} adds the
 * record's Kafka timestamp and may still reject it (time bounds).
 */
public final class Tx {
    /** Why a record was rejected; {@link #OK} for a valid one. */
    public static final byte OK = 0;
    public static final byte UNDECODABLE = 1;
    public static final byte INVALID_FIELD = 2;
    public static final byte TIME_BOUNDS = 3;

    public long eventId;
    public long cardId;
    public long merchantId;
    public long amountMinor;
    /** ISO 3166-1 alpha-2 country packed as (c0-'A')*26 + (c1-'A'), 0..675. */
    public short country;
    public long eventTime;
    /** The record's Kafka timestamp (CreateTime or LogAppendTime), -1 if none. */
    public long logTime = -1;
    public byte rejected;

    public boolean valid() {
        return rejected == OK;
    }

    static Tx rejected(byte reason) {
        Tx t = new Tx();
        t.rejected = reason;
        return t;
    }

    static String countryString(int packed) {
        return new String(new char[] {(char) ('A' + packed / 26), (char) ('A' + packed % 26)});
    }
}
