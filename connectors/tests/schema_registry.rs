//! The Confluent Schema Registry client against the stack's registry (Apicurio
//! Registry's Confluent-compatible API): registering under a subject, the
//! compatibility rule, schemas by id, and the codec reading records framed with
//! the ids the registry assigned.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apache_avro::Schema;
use tripwire_connectors::avro::{encode, AvroChannel, AvroTransaction, Limits, TransactionCodec};
use tripwire_connectors::confluent_registry::{ClientError, ConfluentRegistry};
use tripwire_connectors::dead_letter::DeadLetterReason;
use tripwire_connectors::registry::{EmbeddedRegistry, SchemaRegistry};
use tripwire_connectors::Endpoints;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn record(device_id: Option<i64>) -> AvroTransaction {
    AvroTransaction {
        event_id: 7,
        card_id: 42,
        account_id: 21,
        merchant_id: 1_001,
        mcc: 5411,
        amount_minor: 1_250,
        currency: "EUR".into(),
        country: "FR".into(),
        lat: 48.8566,
        lon: 2.3522,
        channel: AvroChannel::POS,
        event_time: now_ms() - 1_000,
        device_id,
    }
}

#[test]
fn schemas_registered_by_subject_are_served_by_id_and_decode_records() {
    let endpoints = Endpoints::from_env().unwrap();
    let registry =
        ConfluentRegistry::new(&endpoints.registry_url).retry_for(Duration::from_secs(20));
    let embedded = EmbeddedRegistry::new().unwrap();
    let (v1, v2) = (embedded.schema(1).unwrap(), embedded.schema(2).unwrap());
    let subject = format!("registry-test-{}-{}-value", std::process::id(), now_ms());

    registry.set_compatibility(Some(&subject), "BACKWARD").expect("is the stack up?");
    // Schema ids are per content: on a fresh registry this keeps the ids of the
    // transaction schemas from coinciding with the embedded manifest's.
    let dummy = r#"{"type":"record","name":"Dummy","fields":[{"name":"x","type":"long"}]}"#;
    registry.register("dummy-value", &Schema::parse_str(dummy).unwrap()).unwrap();
    let id1 = registry.register(&subject, &v1).unwrap();
    assert!(registry.is_compatible(&subject, &v2).unwrap(), "v2 (optional device id) reads v1");
    // A v2 whose device id is required, without default, cannot read v1 records.
    let v2_text = include_str!("../../schemas/transaction-v2.avsc");
    let broken_text = v2_text.replace(r#"["null", "long"], "default": null"#, r#""long""#);
    let broken = Schema::parse_str(&broken_text).unwrap();
    assert_ne!(broken.canonical_form(), v2.canonical_form(), "the test changed the schema");
    assert!(!registry.is_compatible(&subject, &broken).unwrap(), "BACKWARD refuses it");
    let id2 = registry.register(&subject, &v2).unwrap();
    assert_ne!(id1, id2);
    assert_eq!(
        registry.register(&subject, &v2).unwrap(),
        id2,
        "registering again finds the same id"
    );
    assert_eq!(registry.latest_version(&subject).unwrap().map(|(id, _)| id), Some(id2));

    // A fresh client (no cache) fetches both by id; the codec reads records framed with them.
    let fresh = Arc::new(ConfluentRegistry::new(&endpoints.registry_url));
    assert_eq!(fresh.fetch(id1).unwrap().unwrap().canonical_form(), v1.canonical_form());
    let mut codec = TransactionCodec::new(fresh.clone(), Limits::default());
    let old = codec.decode(&encode(&record(None), id1, &v1).unwrap(), Some(now_ms())).unwrap();
    let new = codec.decode(&encode(&record(Some(99)), id2, &v2).unwrap(), Some(now_ms())).unwrap();
    assert_eq!((old.device_id, new.device_id), (None, Some(99)));
    assert_eq!((old.event_id, old.amount_minor), (7, 1_250));

    // An id the registry never assigned is an unknown schema id: a dead letter, not a panic.
    let bogus = encode(&record(None), 0x7fff_fff0, &v1).unwrap();
    let rejected = codec.decode(&bogus, Some(now_ms())).unwrap_err();
    assert_eq!(rejected.reason, DeadLetterReason::UnknownSchemaId);
    assert!(fresh.schema(0x7fff_fff0).is_none(), "remembered as unknown");
}

#[test]
fn an_unreachable_registry_is_an_error_not_an_unknown_id() {
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let registry = ConfluentRegistry::new(&format!("http://127.0.0.1:{port}"))
        .retry_for(Duration::from_millis(300));
    match registry.fetch(1) {
        Err(ClientError::Unreachable { .. }) => {}
        other => panic!("expected Unreachable, got {other:?}"),
    }
}
