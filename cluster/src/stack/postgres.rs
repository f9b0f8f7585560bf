//! PostgreSQL from Debian's packages, as a cluster of the project's own under the stack's home.
//!
//! The server refuses to run as root, so when we are root the data directory
//! belongs to the `postgres` system user (created by the package) and the
//! server runs as that user through `setpriv`, which execs in place so that the
//! pid we record is the postmaster's.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::install::{is_root, on_path};
use super::process::ProcessFiles;
use super::{run_checked, Service, Stack};

/// The local PostgreSQL server.
pub struct Postgres {
    stack: Stack,
}

impl Postgres {
    pub fn new(stack: Stack) -> Self {
        Postgres { stack }
    }

    fn dir(&self) -> PathBuf {
        self.stack.home.join("postgres")
    }

    fn data(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The unix socket folder used for admin work. Socket paths are limited to
    /// 107 bytes, so a deep checkout falls back to a folder under /tmp.
    fn socket_dir(&self) -> PathBuf {
        let own = self.dir().join("run");
        if own.as_os_str().len() + 20 < 100 {
            own
        } else {
            PathBuf::from(format!("/tmp/tripwire-pg-{}", self.stack.endpoints.pg_port))
        }
    }

    /// `cmd` run as the postgres system user when we are root, else as ourselves.
    fn as_owner(&self, program: &str) -> Command {
        if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", program]);
            c
        } else {
            Command::new(program)
        }
    }

    fn psql(&self, sql: &str) -> Result<String> {
        let mut c = Command::new(bin("psql")?);
        c.arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.stack.endpoints.pg_port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql]);
        run_checked(c)
    }
}

/// The path of a PostgreSQL server binary (initdb, postgres, psql) of the newest installed version.
fn bin(name: &str) -> Result<String> {
    let mut versions: Vec<u32> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/{name}")).exists())
        .collect();
    versions.sort_unstable();
    match versions.last() {
        Some(v) => Ok(format!("/usr/lib/postgresql/{v}/bin/{name}")),
        None if on_path(name) => Ok(name.to_string()),
        None => bail!("no PostgreSQL `{name}` found under /usr/lib/postgresql or on the PATH"),
    }
}

impl Service for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn address(&self) -> String {
        format!("{}:{}", self.stack.endpoints.pg_host, self.stack.endpoints.pg_port)
    }

    fn missing_packages(&self) -> Vec<&'static str> {
        if bin("initdb").is_ok() && on_path("pg_isready") {
            vec![]
        } else {
            vec!["postgresql"]
        }
    }

    fn prepare(&self, files: &ProcessFiles) -> Result<()> {
        let run = self.socket_dir();
        fs::create_dir_all(&run)?;
        if is_root() {
            // The server's own files, its log and pid included, belong to its user.
            let mut chown = Command::new("chown");
            chown.arg("-R").arg("postgres:postgres").arg(self.dir()).arg(&run);
            run_checked(chown)?;
            let probe = Command::new("setpriv")
                .args(["--reuid=postgres", "--regid=postgres", "--init-groups", "test", "-w"])
                .arg(self.dir())
                .status()?;
            if !probe.success() {
                bail!(
                    "the postgres user cannot write {}: every parent folder must be searchable by others (chmod o+x)",
                    self.dir().display()
                );
            }
        }
        if !self.data().join("PG_VERSION").exists() {
            let mut init = self.as_owner(&bin("initdb")?);
            init.arg("-D")
                .arg(self.data())
                .args(["-U", "postgres", "-E", "UTF8", "--no-locale"])
                // Admin work goes through the unix socket in our own folder; TCP
                // clients, Tripwire included, log in with a password.
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"]);
            run_checked(init).context("initdb")?;
        }
        let _ = files;
        Ok(())
    }

    fn command(&self) -> Result<Command> {
        let mut c = self.as_owner(&bin("postgres")?);
        c.arg("-D")
            .arg(self.data())
            .args(["-c", &format!("listen_addresses={}", self.stack.endpoints.pg_host)])
            .args(["-p", &self.stack.endpoints.pg_port.to_string()])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.socket_dir().display()))
            // Each worker's sink holds connections; tests run many jobs side by side.
            .args(["-c", "max_connections=200"])
            // A write-heavy workload's usual settings (the defaults suit a
            // laptop): with max_wal_size at its 1 GB default, a sustained
            // stream of commits forces a checkpoint every 10-40 s, and each
            // one's writes and full-page images stall commits for seconds.
            .args(["-c", "shared_buffers=1GB", "-c", "max_wal_size=16GB"])
            .args(["-c", "checkpoint_timeout=15min", "-c", "checkpoint_completion_target=0.9"]);
        Ok(c)
    }

    fn probe(&self) -> Result<()> {
        let e = &self.stack.endpoints;
        let status = Command::new("pg_isready")
            .args(["-q", "-t", "2", "-h", &e.pg_host, "-p", &e.pg_port.to_string()])
            .status()
            .context("running pg_isready")?;
        if !status.success() {
            bail!("pg_isready: not accepting connections ({status})");
        }
        Ok(())
    }

    fn after_ready(&self) -> Result<()> {
        let e = &self.stack.endpoints;
        let role = e.pg_user.replace('"', "");
        let password = e.pg_password.replace('\'', "''");
        self.psql(&format!(
            "DO $$ BEGIN \
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN \
                 CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'; \
               END IF; END $$;"
        ))?;
        let db = e.pg_database.replace('\'', "");
        let exists = self.psql(&format!("SELECT 1 FROM pg_database WHERE datname = '{db}'"))?;
        if exists.trim().is_empty() {
            self.psql(&format!("CREATE DATABASE \"{db}\" OWNER \"{role}\""))?;
        }
        Ok(())
    }

    fn stop_signal(&self) -> &'static str {
        // SIGINT is PostgreSQL's "fast" shutdown: disconnect clients, checkpoint, exit.
        "INT"
    }
}
