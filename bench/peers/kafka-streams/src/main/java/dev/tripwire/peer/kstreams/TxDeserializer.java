package dev.tripwire.peer.kstreams;

import java.util.HashMap;
import java.util.Map;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.util.Utf8;
import org.apache.kafka.common.serialization.Deserializer;

/**
 * Confluent wire format (magic 0, big-endian schema id, Avro binary) to {@link Tx}, with
 * the validation limits of Tripwire's source ({@code connectors/src/avro.rs}): size at
 * most 64 KiB, a registered transaction schema, no bytes left after the record,
 * amount in 1..=10^12, finite lat/lon within ±90/±180, listed currency and country, mcc
 * in 0..=9999, event_time &ge; 0. A record that fails is returned as a rejected {@link Tx}
 * (never null, never an exception), so the topology can count and drop it without the
 * deserialization exception handler logging every one.
 *
 * <p>Kafka Streams shares one deserializer instance between its stream threads, so the
 * reusable decoding state is per thread.
 */
public final class TxDeserializer implements Deserializer<Tx> {
    static final int MAX_MESSAGE_BYTES = 64 * 1024;
    static final long MAX_AMOUNT_MINOR = 1_000_000_000_000L;

    private final Schemas schemas;
    private final GenericData data = new GenericData();
    private final ThreadLocal<State> state = ThreadLocal.withInitial(State::new);
    private final int fEventId, fCardId, fMerchant, fMcc, fAmount, fCurrency, fCountry, fLat, fLon, fEventTime;

    public TxDeserializer(Schemas schemas) {
        this.schemas = schemas;
        data.setFastReaderEnabled(true);
        Schema r = schemas.reader;
        fEventId = r.getField("event_id").pos();
        fCardId = r.getField("card_id").pos();
        fMerchant = r.getField("merchant_id").pos();
        fMcc = r.getField("mcc").pos();
        fAmount = r.getField("amount_minor").pos();
        fCurrency = r.getField("currency").pos();
        fCountry = r.getField("country").pos();
        fLat = r.getField("lat").pos();
        fLon = r.getField("lon").pos();
        fEventTime = r.getField("event_time").pos();
    }

    private final class State {
        final Map<Integer, GenericDatumReader<GenericRecord>> readers = new HashMap<>();
        BinaryDecoder decoder;
        GenericRecord reuse;

        GenericDatumReader<GenericRecord> reader(int id) {
            GenericDatumReader<GenericRecord> r = readers.get(id);
            if (r == null) {
                Schema writer = schemas.writers.get(id);
                if (writer == null) {
                    return null;
                }
                r = new GenericDatumReader<>(writer, schemas.reader, data);
                readers.put(id, r);
            }
            return r;
        }
    }

    @Override
    public Tx deserialize(String topic, byte[] bytes) {
        if (bytes == null || bytes.length < 5 || bytes.length > MAX_MESSAGE_BYTES || bytes[0] != 0) {
            return Tx.rejected(Tx.UNDECODABLE);
        }
        int id = ((bytes[1] & 0xff) << 24) | ((bytes[2] & 0xff) << 16) | ((bytes[3] & 0xff) << 8) | (bytes[4] & 0xff);
        State s = state.get();
        GenericDatumReader<GenericRecord> reader = s.reader(id);
        if (reader == null) {
            return Tx.rejected(Tx.UNDECODABLE);
        }
        GenericRecord rec;
        try {
            s.decoder = DecoderFactory.get().binaryDecoder(bytes, 5, bytes.length - 5, s.decoder);
            rec = reader.read(s.reuse, s.decoder);
            if (!s.decoder.isEnd()) {
                return Tx.rejected(Tx.UNDECODABLE); // bytes left: not written with this schema
            }
        } catch (Exception | StackOverflowError e) {
            s.reuse = null;
            return Tx.rejected(Tx.UNDECODABLE);
        }
        s.reuse = rec;
        Tx t = new Tx();
        t.eventId = (Long) rec.get(fEventId);
        t.cardId = (Long) rec.get(fCardId);
        t.merchantId = (Long) rec.get(fMerchant);
        t.amountMinor = (Long) rec.get(fAmount);
        t.eventTime = (Long) rec.get(fEventTime);
        int mcc = (Integer) rec.get(fMcc);
        double lat = (Double) rec.get(fLat);
        double lon = (Double) rec.get(fLon);
        Utf8 currency = (Utf8) rec.get(fCurrency);
        Utf8 country = (Utf8) rec.get(fCountry);
        int packedCountry = Codes.country(country.getBytes(), country.getByteLength());
        if (t.amountMinor <= 0 || t.amountMinor > MAX_AMOUNT_MINOR
                || !(lat >= -90.0 && lat <= 90.0) || !(lon >= -180.0 && lon <= 180.0)
                || !Codes.currency(currency.getBytes(), currency.getByteLength())
                || packedCountry < 0
                || mcc < 0 || mcc > 9999
                || t.eventTime < 0) {
            t.rejected = Tx.INVALID_FIELD;
            return t;
        }
        t.country = (short) packedCountry;
        return t;
    }
}
