//! The schema registry: Apicurio Registry's Confluent-compatible API, built from Maven Central.
//!
//! Neither Confluent's Schema Registry nor Karapace can be had from the
//! registries this project builds from (Maven Central, PyPI); Apicurio
//! Registry 2.4.2 can, as a Quarkus application assembled by
//! `cluster/registry/pom.xml`. It serves the Confluent REST API under
//! `/apis/ccompat/v7` and keeps schemas in memory (they are re-registered by
//! whoever needs them after a restart, as txgen does).

use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::install::on_path;
use super::process::ProcessFiles;
use super::{run_checked, Service, Stack};

/// The local Confluent-compatible schema registry.
pub struct Registry {
    stack: Stack,
}

impl Registry {
    pub fn new(stack: Stack) -> Self {
        Registry { stack }
    }

    fn dir(&self) -> PathBuf {
        self.stack.home.join("registry")
    }

    fn jar(&self) -> PathBuf {
        self.dir().join("build/quarkus-app/quarkus-run.jar")
    }

    /// What the build depends on: rebuilt when it changes.
    fn recipe(&self) -> Result<String> {
        let src = self.stack.root.join("cluster/registry");
        let mut text = String::new();
        for f in ["pom.xml", ".mvn/maven.config", "src/main/resources/application.properties"] {
            text.push_str(
                &fs::read_to_string(src.join(f))
                    .with_context(|| format!("reading cluster/registry/{f}"))?,
            );
        }
        Ok(text)
    }
}

impl Service for Registry {
    fn name(&self) -> &'static str {
        "registry"
    }

    fn address(&self) -> String {
        self.stack.endpoints.registry_address()
    }

    fn missing_packages(&self) -> Vec<&'static str> {
        let mut p = Vec::new();
        if !on_path("java") {
            p.push("openjdk-17-jre-headless");
        }
        if !on_path("mvn") {
            p.push("maven");
        }
        p
    }

    fn prepare(&self, _files: &ProcessFiles) -> Result<()> {
        let recipe = self.recipe()?;
        let stamp = self.dir().join("build/.recipe");
        if self.jar().exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(&recipe) {
            return Ok(());
        }
        eprintln!("stack: building the schema registry from Maven Central (first time: ~2 min)");
        let mut mvn = Command::new("mvn");
        mvn.args(["-q", "-B", "-f"])
            .arg(self.stack.root.join("cluster/registry/pom.xml"))
            .arg(format!("-Dregistry.build.dir={}", self.dir().join("build").display()))
            .arg("package");
        run_checked(mvn).context("mvn could not build the schema registry")?;
        fs::write(stamp, recipe)?;
        Ok(())
    }

    fn command(&self) -> Result<Command> {
        let mut cmd = Command::new("java");
        cmd.args(["-Xmx256m", "-Djava.awt.headless=true"])
            .arg(format!("-Dquarkus.http.host={}", self.stack.endpoints.registry_host))
            .arg(format!("-Dquarkus.http.port={}", self.stack.endpoints.registry_port))
            .arg("-jar")
            .arg(self.jar());
        Ok(cmd)
    }

    fn probe(&self) -> Result<()> {
        let mut s = super::connect_briefly(&self.address())?;
        write!(
            s,
            "GET /apis/ccompat/v7/subjects HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.address()
        )?;
        let mut head = [0u8; 16];
        let n = s.read(&mut head)?;
        if !head[..n].starts_with(b"HTTP/1.1 200") {
            bail!(
                "GET /apis/ccompat/v7/subjects answered {:?}",
                String::from_utf8_lossy(&head[..n])
            );
        }
        Ok(())
    }

    fn start_timeout(&self) -> Duration {
        Duration::from_secs(90)
    }
}
