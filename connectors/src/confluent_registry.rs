//! A Confluent Schema Registry REST client: writer schemas by id, registering
//! under a subject, compatibility checks, with a cache.
//!
//! Speaks the Confluent API (`GET /schemas/ids/{id}`, `POST
//! /subjects/{subject}/versions`, `POST /compatibility/subjects/{subject}/versions/latest`,
//! `GET /subjects/{subject}/versions/latest`, `PUT /config[/{subject}]`), so it
//! works with Confluent's registry and with compatible ones; the local stack
//! runs Apicurio Registry's Confluent-compatible API.
//!
//! Schemas are immutable per id, so a schema fetched once is cached for good;
//! an id the registry does not know is remembered for [`NEGATIVE_TTL`], so a
//! flood of records with a bogus id does not become a flood of requests. A
//! registry that cannot be reached is retried with backoff until it answers:
//! the source must not send valid records to the dead letters because the
//! registry is briefly down (the same choice as Confluent's deserializers,
//! which fail rather than guess). That wait happens only on the first record
//! with a new id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::Schema;
use serde::Deserialize;

use crate::registry::SchemaRegistry;

/// How long an unknown id stays unknown before the registry is asked again.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// What went wrong talking to the registry.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer (connection refused, timeout).
    #[error("schema registry at {url} unreachable: {detail}")]
    Unreachable {
        /// The request's URL.
        url: String,
        /// The transport error.
        detail: String,
    },
    /// An answer that is not what the API promises.
    #[error("schema registry: {status} from {url}: {body}")]
    Status {
        /// The request's URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The body, usually `{"error_code":..,"message":..}`.
        body: String,
    },
    /// A schema the registry returned does not parse as Avro.
    #[error("schema registry returned a schema that is not valid Avro: {0}")]
    Schema(String),
}

/// A client of one registry, with its cache.
pub struct ConfluentRegistry {
    base: String,
    agent: ureq::Agent,
    by_id: Mutex<HashMap<u32, Arc<Schema>>>,
    unknown: Mutex<HashMap<u32, Instant>>,
    retry_for: Duration,
}

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
}

#[derive(Deserialize)]
struct IdBody {
    id: u32,
}

#[derive(Deserialize)]
struct Compatible {
    is_compatible: bool,
}

impl ConfluentRegistry {
    /// A client of the registry at `base` (e.g. `http://127.0.0.1:8081` for
    /// Confluent, `http://127.0.0.1:8081/apis/ccompat/v7` for Apicurio).
    pub fn new(base: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        ConfluentRegistry {
            base: base.trim_end_matches('/').to_string(),
            agent,
            by_id: Mutex::default(),
            unknown: Mutex::default(),
            retry_for: Duration::MAX,
        }
    }

    /// Give up on an unreachable registry after `limit` instead of waiting for it (tests, tools).
    pub fn retry_for(mut self, limit: Duration) -> Self {
        self.retry_for = limit;
        self
    }

    /// One request: `(status, body)`.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, String), ClientError> {
        let url = format!("{}{path}", self.base);
        let unreachable =
            |e: ureq::Error| ClientError::Unreachable { url: url.clone(), detail: e.to_string() };
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Accept", CONTENT_TYPE).call(),
            ("PUT", Some(b)) => {
                self.agent.put(&url).header("Content-Type", CONTENT_TYPE).send(b.as_str())
            }
            (_, b) => self
                .agent
                .post(&url)
                .header("Content-Type", CONTENT_TYPE)
                .send(b.unwrap_or_default().as_str()),
        };
        let mut response = response.map_err(unreachable)?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(unreachable)?;
        Ok((status, text))
    }

    /// `call`, retried with backoff while the registry cannot be reached.
    fn call_retrying(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, String), ClientError> {
        let started = Instant::now();
        let mut wait = Duration::from_millis(100);
        loop {
            match self.call(method, path, body.clone()) {
                Err(e @ ClientError::Unreachable { .. }) if started.elapsed() < self.retry_for => {
                    crate::metrics::registry_retries_total().inc();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "schema registry unreachable; retrying");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    fn expect<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        (status, body): (u16, String),
    ) -> Result<T, ClientError> {
        if status == 200 {
            if let Ok(v) = serde_json::from_str(&body) {
                return Ok(v);
            }
        }
        Err(ClientError::Status { url: format!("{}{path}", self.base), status, body })
    }

    /// The writer schema registered under `id`; `None` if the registry does not know it.
    pub fn fetch(&self, id: u32) -> Result<Option<Arc<Schema>>, ClientError> {
        if let Some(s) = self.by_id.lock().expect("cache").get(&id) {
            return Ok(Some(s.clone()));
        }
        if self.unknown.lock().expect("cache").get(&id).is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
        {
            return Ok(None);
        }
        let path = format!("/schemas/ids/{id}");
        let answer = self.call_retrying("GET", &path, None)?;
        if answer.0 == 404 {
            self.unknown.lock().expect("cache").insert(id, Instant::now());
            return Ok(None);
        }
        let body: SchemaBody = self.expect(&path, answer)?;
        let schema = Arc::new(
            Schema::parse_str(&body.schema).map_err(|e| ClientError::Schema(e.to_string()))?,
        );
        self.by_id.lock().expect("cache").insert(id, schema.clone());
        Ok(Some(schema))
    }

    /// Register `schema` under `subject` (or find it there); its id.
    pub fn register(&self, subject: &str, schema: &Schema) -> Result<u32, ClientError> {
        let path = format!("/subjects/{subject}/versions");
        let body = serde_json::json!({ "schema": full_json(schema) }).to_string();
        let id = self.expect::<IdBody>(&path, self.call_retrying("POST", &path, Some(body))?)?.id;
        self.by_id.lock().expect("cache").insert(id, Arc::new(schema.clone()));
        Ok(id)
    }

    /// Whether `schema` may be registered next under `subject`, by the subject's compatibility rule.
    pub fn is_compatible(&self, subject: &str, schema: &Schema) -> Result<bool, ClientError> {
        let path = format!("/compatibility/subjects/{subject}/versions/latest");
        let body = serde_json::json!({ "schema": full_json(schema) }).to_string();
        Ok(self
            .expect::<Compatible>(&path, self.call_retrying("POST", &path, Some(body))?)?
            .is_compatible)
    }

    /// Set the compatibility rule (`BACKWARD`, `FULL`, ...) of `subject`, or the global one.
    pub fn set_compatibility(&self, subject: Option<&str>, level: &str) -> Result<(), ClientError> {
        let path = subject.map_or("/config".to_string(), |s| format!("/config/{s}"));
        let body = serde_json::json!({ "compatibility": level }).to_string();
        let (status, text) = self.call_retrying("PUT", &path, Some(body))?;
        if status != 200 {
            return Err(ClientError::Status {
                url: format!("{}{path}", self.base),
                status,
                body: text,
            });
        }
        Ok(())
    }

    /// The latest version registered under `subject`: its id and schema.
    pub fn latest_version(&self, subject: &str) -> Result<Option<(u32, Arc<Schema>)>, ClientError> {
        #[derive(Deserialize)]
        struct Version {
            id: u32,
            schema: String,
        }
        let path = format!("/subjects/{subject}/versions/latest");
        let answer = self.call_retrying("GET", &path, None)?;
        if answer.0 == 404 {
            return Ok(None);
        }
        let v: Version = self.expect(&path, answer)?;
        let schema =
            Arc::new(Schema::parse_str(&v.schema).map_err(|e| ClientError::Schema(e.to_string()))?);
        self.by_id.lock().expect("cache").insert(v.id, schema.clone());
        Ok(Some((v.id, schema)))
    }
}

/// The schema as JSON with its defaults: the parsing canonical form drops
/// them, and a registry judging compatibility needs them (v2's optional device
/// id reads v1 records only thanks to its default).
fn full_json(schema: &Schema) -> String {
    serde_json::to_string(schema).expect("a parsed schema serializes")
}

impl SchemaRegistry for ConfluentRegistry {
    fn schema(&self, id: u32) -> Option<Arc<Schema>> {
        match self.fetch(id) {
            Ok(s) => s,
            Err(e) => {
                // Unreachable past `retry_for`, or a broken answer: the record cannot be read.
                tracing::warn!(error = %e, id, "no writer schema");
                None
            }
        }
    }

    fn latest(&self, subject: &str) -> Option<(u32, Arc<Schema>)> {
        self.latest_version(subject).ok().flatten()
    }
}
