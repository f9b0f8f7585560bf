//! Where the external services live: one place that reads the `TRIPWIRE_*` address overrides.
//!
//! The local stack, the jobs and the integration tests all take their addresses
//! from here, so pointing Tripwire at your own Kafka, PostgreSQL, Redis or
//! Prometheus is a matter of environment variables:
//!
//! | variable | default |
//! |---|---|
//! | `TRIPWIRE_KAFKA_BOOTSTRAP` | `127.0.0.1:9092` |
//! | `TRIPWIRE_KAFKA_CONTROLLER_PORT` | `9093` (local broker only) |
//! | `TRIPWIRE_PG_HOST` / `TRIPWIRE_PG_PORT` | `127.0.0.1` / `5432` |
//! | `TRIPWIRE_PG_USER` / `TRIPWIRE_PG_PASSWORD` / `TRIPWIRE_PG_DATABASE` | `tripwire` each |
//! | `TRIPWIRE_PG_SCHEMA` | none (the role's default schema) |
//! | `TRIPWIRE_REDIS_HOST` / `TRIPWIRE_REDIS_PORT` | `127.0.0.1` / `6379` |
//! | `TRIPWIRE_PROMETHEUS_HOST` / `TRIPWIRE_PROMETHEUS_PORT` | `127.0.0.1` / `9090` |
//! | `TRIPWIRE_REGISTRY_HOST` / `TRIPWIRE_REGISTRY_PORT` | `127.0.0.1` / `8081` |
//! | `TRIPWIRE_REGISTRY_URL` | `http://{host}:{port}/apis/ccompat/v7` (the stack's registry) |

use std::env;

/// Addresses and credentials of every external service Tripwire talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub kafka_bootstrap: String,
    /// Port of the KRaft controller listener of the local broker.
    pub kafka_controller_port: u16,
    /// PostgreSQL host.
    pub pg_host: String,
    /// PostgreSQL port.
    pub pg_port: u16,
    /// PostgreSQL role Tripwire logs in as.
    pub pg_user: String,
    /// Password of that role.
    pub pg_password: String,
    /// Database holding Tripwire's tables.
    pub pg_database: String,
    /// Schema for Tripwire's tables (created if missing); `None` = the role's default.
    pub pg_schema: Option<String>,
    /// Redis host.
    pub redis_host: String,
    /// Redis port.
    pub redis_port: u16,
    /// Prometheus host.
    pub prometheus_host: String,
    /// Prometheus port.
    pub prometheus_port: u16,
    /// Schema registry host (the local stack's).
    pub registry_host: String,
    /// Schema registry port.
    pub registry_port: u16,
    /// Base URL of the Confluent-compatible schema registry API.
    pub registry_url: String,
}

impl Default for Endpoints {
    /// The local stack's addresses, all on loopback.
    fn default() -> Self {
        Endpoints {
            kafka_bootstrap: "127.0.0.1:9092".into(),
            kafka_controller_port: 9093,
            pg_host: "127.0.0.1".into(),
            pg_port: 5432,
            pg_user: "tripwire".into(),
            pg_password: "tripwire".into(),
            pg_database: "tripwire".into(),
            pg_schema: None,
            redis_host: "127.0.0.1".into(),
            redis_port: 6379,
            prometheus_host: "127.0.0.1".into(),
            prometheus_port: 9090,
            registry_host: "127.0.0.1".into(),
            registry_port: 8081,
            registry_url: "http://127.0.0.1:8081/apis/ccompat/v7".into(),
        }
    }
}

/// An override that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {var}={value:?} is not a valid port number")]
pub struct BadPort {
    /// The variable's name.
    pub var: &'static str,
    /// What it held.
    pub value: String,
}

impl Endpoints {
    /// The defaults with every `TRIPWIRE_*` override from the environment applied.
    pub fn from_env() -> Result<Self, BadPort> {
        Self::from_lookup(|k| env::var(k).ok())
    }

    /// The defaults with overrides taken from `lookup` (the environment, in production).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, BadPort> {
        let d = Endpoints::default();
        let text = |var: &str, default: String| lookup(var).unwrap_or(default);
        let port = |var: &'static str, default: u16| match lookup(var) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|_| BadPort { var, value }),
        };
        Ok(Endpoints {
            kafka_bootstrap: text("TRIPWIRE_KAFKA_BOOTSTRAP", d.kafka_bootstrap),
            kafka_controller_port: port("TRIPWIRE_KAFKA_CONTROLLER_PORT", d.kafka_controller_port)?,
            pg_host: text("TRIPWIRE_PG_HOST", d.pg_host),
            pg_port: port("TRIPWIRE_PG_PORT", d.pg_port)?,
            pg_user: text("TRIPWIRE_PG_USER", d.pg_user),
            pg_password: text("TRIPWIRE_PG_PASSWORD", d.pg_password),
            pg_database: text("TRIPWIRE_PG_DATABASE", d.pg_database),
            pg_schema: lookup("TRIPWIRE_PG_SCHEMA"),
            redis_host: text("TRIPWIRE_REDIS_HOST", d.redis_host),
            redis_port: port("TRIPWIRE_REDIS_PORT", d.redis_port)?,
            prometheus_host: text("TRIPWIRE_PROMETHEUS_HOST", d.prometheus_host),
            prometheus_port: port("TRIPWIRE_PROMETHEUS_PORT", d.prometheus_port)?,
            registry_host: text("TRIPWIRE_REGISTRY_HOST", d.registry_host),
            registry_port: port("TRIPWIRE_REGISTRY_PORT", d.registry_port)?,
            registry_url: String::new(),
        })
        .map(|mut e| {
            e.registry_url = lookup("TRIPWIRE_REGISTRY_URL").unwrap_or_else(|| {
                format!("http://{}:{}/apis/ccompat/v7", e.registry_host, e.registry_port)
            });
            e
        })
    }

    /// A tokio-postgres connection string for the Tripwire role.
    pub fn postgres_config(&self) -> String {
        let mut c = format!(
            "host={} port={} user={} password={} dbname={} application_name=tripwire",
            self.pg_host, self.pg_port, self.pg_user, self.pg_password, self.pg_database
        );
        if let Some(schema) = &self.pg_schema {
            c.push_str(&format!(" options='-c search_path={schema}'"));
        }
        c
    }

    /// A `redis://` URL.
    pub fn redis_url(&self) -> String {
        format!("redis://{}:{}/", self.redis_host, self.redis_port)
    }

    /// `host:port` of the local schema registry.
    pub fn registry_address(&self) -> String {
        format!("{}:{}", self.registry_host, self.registry_port)
    }

    /// `host:port` of Prometheus.
    pub fn prometheus_address(&self) -> String {
        format!("{}:{}", self.prometheus_host, self.prometheus_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_defaults_and_the_rest_stay() {
        let e = Endpoints::from_lookup(|k| match k {
            "TRIPWIRE_PG_PORT" => Some("6543".into()),
            "TRIPWIRE_KAFKA_BOOTSTRAP" => Some("10.1.1.1:19092".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(e.pg_port, 6543);
        assert_eq!(e.kafka_bootstrap, "10.1.1.1:19092");
        assert_eq!(e.redis_port, 6379);
        assert!(e.postgres_config().contains("port=6543"));
    }

    #[test]
    fn a_port_that_is_not_a_number_is_an_error_naming_the_variable() {
        let err = Endpoints::from_lookup(|k| (k == "TRIPWIRE_REDIS_PORT").then(|| "six".into()))
            .unwrap_err();
        assert!(err.to_string().contains("TRIPWIRE_REDIS_PORT"));
    }
}
