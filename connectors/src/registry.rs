//! Writer schemas by id: the embedded registry built from `schemas/`.
//!
//! Every Confluent-framed record names its writer schema by a 4-byte id. The
//! default registry is compiled in from `schemas/manifest.json`, so a job needs
//! no registry service; [`SchemaRegistry`] is the seam for a Confluent Schema
//! Registry client.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::Schema;
use serde::Deserialize;

/// Where writer schemas come from.
pub trait SchemaRegistry: Send + Sync {
    /// The schema registered under `id`, if any.
    fn schema(&self, id: u32) -> Option<Arc<Schema>>;
    /// The id of the latest version of `subject`, with its schema.
    fn latest(&self, subject: &str) -> Option<(u32, Arc<Schema>)>;
}

/// An entry of `schemas/manifest.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct ManifestEntry {
    /// Subject, e.g. `transactions-value`.
    pub subject: String,
    /// Version within the subject.
    pub version: u32,
    /// Schema id in the wire format.
    pub id: u32,
    /// File name under `schemas/`.
    pub file: String,
}

#[derive(Deserialize)]
struct Manifest {
    schemas: Vec<ManifestEntry>,
}

/// The schemas of `schemas/`, compiled into the binary.
pub struct EmbeddedRegistry {
    entries: Vec<ManifestEntry>,
    by_id: HashMap<u32, Arc<Schema>>,
}

/// A manifest or schema file that does not parse; a build-time mistake.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The manifest is not the expected JSON.
    #[error("schemas/manifest.json: {0}")]
    Manifest(#[from] serde_json::Error),
    /// A schema file is not valid Avro.
    #[error("schemas/{file}: {source}")]
    Schema {
        /// Which file.
        file: String,
        /// Why.
        source: Box<apache_avro::Error>,
    },
    /// The manifest names a file that is not embedded.
    #[error("schemas/manifest.json names {0}, which is not embedded")]
    MissingFile(String),
}

const MANIFEST: &str = include_str!("../../schemas/manifest.json");
const FILES: [(&str, &str); 3] = [
    ("transaction-v1.avsc", include_str!("../../schemas/transaction-v1.avsc")),
    ("transaction-v2.avsc", include_str!("../../schemas/transaction-v2.avsc")),
    ("alert-v1.avsc", include_str!("../../schemas/alert-v1.avsc")),
];

impl EmbeddedRegistry {
    /// Parse the embedded manifest and schemas.
    pub fn new() -> Result<Self, RegistryError> {
        let manifest: Manifest = serde_json::from_str(MANIFEST)?;
        let mut by_id = HashMap::new();
        for e in &manifest.schemas {
            let text = FILES
                .iter()
                .find(|(f, _)| *f == e.file)
                .map(|(_, t)| *t)
                .ok_or_else(|| RegistryError::MissingFile(e.file.clone()))?;
            let schema = Schema::parse_str(text).map_err(|source| RegistryError::Schema {
                file: e.file.clone(),
                source: Box::new(source),
            })?;
            by_id.insert(e.id, Arc::new(schema));
        }
        Ok(EmbeddedRegistry { entries: manifest.schemas, by_id })
    }

    /// The manifest's entries.
    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }
}

impl SchemaRegistry for EmbeddedRegistry {
    fn schema(&self, id: u32) -> Option<Arc<Schema>> {
        self.by_id.get(&id).cloned()
    }

    fn latest(&self, subject: &str) -> Option<(u32, Arc<Schema>)> {
        let e = self.entries.iter().filter(|e| e.subject == subject).max_by_key(|e| e.version)?;
        Some((e.id, self.by_id[&e.id].clone()))
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::schema_compatibility::SchemaCompatibility;

    use super::*;

    #[test]
    fn every_manifest_entry_parses_and_ids_are_unique() {
        let r = EmbeddedRegistry::new().unwrap();
        let mut ids: Vec<u32> = r.entries().iter().map(|e| e.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), r.entries().len());
        assert!(r.schema(1).is_some() && r.schema(2).is_some() && r.schema(3).is_some());
        assert!(r.schema(99).is_none());
    }

    #[test]
    fn transaction_v1_and_v2_are_compatible_both_ways() {
        let r = EmbeddedRegistry::new().unwrap();
        let (v1, v2) = (r.schema(1).unwrap(), r.schema(2).unwrap());
        // Backward: a v2 reader reads v1 data. Forward: a v1 reader reads v2 data.
        SchemaCompatibility::can_read(&v1, &v2).expect("v2 reads v1");
        SchemaCompatibility::can_read(&v2, &v1).expect("v1 reads v2");
    }

    #[test]
    fn an_incompatible_change_is_caught() {
        // Guards the test above: a new required field without default breaks backward compatibility.
        let r = EmbeddedRegistry::new().unwrap();
        let v1 = r.schema(1).unwrap();
        let text = FILES[1].1.replace(r#"["null", "long"], "default": null"#, r#""long""#);
        let broken = Schema::parse_str(&text).unwrap();
        assert!(SchemaCompatibility::can_read(&v1, &broken).is_err());
    }

    #[test]
    fn latest_transaction_schema_is_v2() {
        let r = EmbeddedRegistry::new().unwrap();
        assert_eq!(r.latest("transactions-value").map(|(id, _)| id), Some(2));
    }
}
