//! Prometheus from Debian's packages, scraping the jobs' metrics ports with the config in `cluster/prometheus/`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::install::on_path;
use super::process::ProcessFiles;
use super::{Service, Stack};

/// The local Prometheus server.
pub struct Prometheus {
    stack: Stack,
}

impl Prometheus {
    pub fn new(stack: Stack) -> Self {
        Prometheus { stack }
    }

    fn dir(&self) -> PathBuf {
        self.stack.home.join("prometheus")
    }
}

impl Service for Prometheus {
    fn name(&self) -> &'static str {
        "prometheus"
    }

    fn address(&self) -> String {
        self.stack.endpoints.prometheus_address()
    }

    fn missing_packages(&self) -> Vec<&'static str> {
        if on_path("prometheus") && on_path("promtool") {
            vec![]
        } else {
            vec!["prometheus"]
        }
    }

    fn prepare(&self, _files: &ProcessFiles) -> Result<()> {
        Ok(())
    }

    fn command(&self) -> Result<Command> {
        let mut c = Command::new("prometheus");
        c.arg(format!(
            "--config.file={}",
            self.stack.root.join("cluster/prometheus/prometheus.yml").display()
        ))
        .arg(format!("--storage.tsdb.path={}", self.dir().join("data").display()))
        .arg(format!("--web.listen-address={}", self.address()))
        // Lets tests and `tripwire launch` reload the scrape config without a restart.
        .arg("--web.enable-lifecycle");
        Ok(c)
    }

    fn probe(&self) -> Result<()> {
        let body = http_get(&self.address(), "/-/ready")?;
        if !body.starts_with("HTTP/1.1 200") && !body.starts_with("HTTP/1.0 200") {
            bail!("/-/ready answered {:?}", body.lines().next().unwrap_or_default());
        }
        Ok(())
    }
}

/// A minimal HTTP/1.0 GET returning the raw response, enough for a readiness probe.
fn http_get(address: &str, path: &str) -> Result<String> {
    let addr = address.to_socket_addrs()?.next().context("address resolves to nothing")?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
