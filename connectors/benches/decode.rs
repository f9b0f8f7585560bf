//! Avro decode throughput on one thread: the codec's serde path against the generic `Value` path.
//!
//! `cargo bench -p tripwire-connectors --bench decode [-- RECORDS]`

use std::sync::Arc;
use std::time::Instant;

use apache_avro::reader::datum::GenericDatumReader;
use tripwire_connectors::avro::{encode, AvroChannel, AvroTransaction, Limits, TransactionCodec};
use tripwire_connectors::registry::{EmbeddedRegistry, SchemaRegistry};

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let registry = Arc::new(EmbeddedRegistry::new().expect("embedded schemas"));
    let now = 1_700_000_000_000i64;
    // Half v1, half v2, as during a schema rollout.
    let messages: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let r = AvroTransaction {
                event_id: i as i64,
                card_id: (i % 100_000) as i64,
                account_id: (i % 50_000) as i64,
                merchant_id: (i % 5_000) as i64,
                mcc: 5411,
                amount_minor: 100 + (i % 20_000) as i64,
                currency: "EUR".into(),
                country: "DE".into(),
                lat: 52.52,
                lon: 13.405,
                channel: AvroChannel::POS,
                event_time: now - 1_000,
                device_id: (i % 2 == 0).then_some(i as i64),
            };
            let id = 1 + (i % 2) as u32;
            encode(&r, id, &registry.schema(id).unwrap()).unwrap()
        })
        .collect();
    let bytes: usize = messages.iter().map(Vec::len).sum();
    println!(
        "Avro decode, one thread: {n} records, {:.0} bytes each on average\n",
        bytes as f64 / n as f64
    );
    println!("| path | records/s |");
    println!("|---|---|");

    let mut codec = TransactionCodec::new(registry.clone(), Limits::default());
    let start = Instant::now();
    let mut ok = 0usize;
    for m in &messages {
        ok += codec.decode(m, Some(now)).is_ok() as usize;
    }
    let serde_rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(ok, n);
    println!("| codec: serde straight into the record, validated | {serde_rate:.0} |");

    let schemas = [registry.schema(1).unwrap(), registry.schema(2).unwrap()];
    let readers: Vec<GenericDatumReader> =
        schemas.iter().map(|s| GenericDatumReader::builder(s).build().unwrap()).collect();
    let start = Instant::now();
    for m in &messages {
        let id = u32::from_be_bytes(m[1..5].try_into().unwrap()) as usize;
        let value = readers[id - 1].read_value(&mut &m[5..]).unwrap();
        let _r: AvroTransaction = apache_avro::from_value(&value).unwrap();
    }
    let value_rate = n as f64 / start.elapsed().as_secs_f64();
    println!("| generic Value, then from_value (no validation) | {value_rate:.0} |");
    println!("\ndecode_records_per_sec={serde_rate:.0}");
}
