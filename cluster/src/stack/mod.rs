//! `tripwire stack`: the local Kafka, PostgreSQL, Redis, Prometheus and schema registry, installed and run on loopback.
//!
//! Every service follows one life cycle ([`Service`]): probe it at its address;
//! if it does not answer and the address is local, install what is missing,
//! prepare its state under the stack's home folder, start it detached, and wait
//! until it answers. A service that answers already (ours from an earlier `up`,
//! or the user's own at an overridden address) is left alone, which makes `up`
//! harmless to repeat. `down` stops only the processes whose pid files it wrote.

mod install;
mod kafka;
mod postgres;
pub mod process;
mod prometheus;
mod redis;
mod registry;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tripwire_connectors::Endpoints;

use process::ProcessFiles;

/// Everything a service needs to know about the stack it belongs to.
#[derive(Clone, Debug)]
pub struct Stack {
    /// The project's root (where `cluster/` lives).
    pub root: PathBuf,
    /// The git-ignored folder holding every service's state, data and logs.
    pub home: PathBuf,
    /// Addresses, with environment overrides applied.
    pub endpoints: Endpoints,
}

/// One service of the stack.
pub trait Service {
    /// Short name used in messages, file names and `status`.
    fn name(&self) -> &'static str;
    /// `host:port` it answers on.
    fn address(&self) -> String;
    /// Debian packages this service needs that the machine lacks.
    fn missing_packages(&self) -> Vec<&'static str>;
    /// Make its state ready to start (fetch jars, format storage, init a data directory).
    fn prepare(&self, files: &ProcessFiles) -> Result<()>;
    /// The command that runs the service in the foreground.
    fn command(&self) -> Result<Command>;
    /// `Ok` when the service answers a real request at its address.
    fn probe(&self) -> Result<()>;
    /// Work to do once it answers (create roles, databases). Must be idempotent.
    fn after_ready(&self) -> Result<()> {
        Ok(())
    }
    /// The signal that asks it to shut down cleanly.
    fn stop_signal(&self) -> &'static str {
        "TERM"
    }
    /// How long a start may go without progress (an answer, a growing log,
    /// `LOADING`) before `up` gives up.
    fn start_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// The longest `up` waits for one service that keeps making progress.
const MAX_START: Duration = Duration::from_secs(30 * 60);

/// Bytes in a service's log so far (0 before it exists).
fn log_length(log: &Path) -> u64 {
    fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

impl Stack {
    /// The stack for this checkout: home is `$TRIPWIRE_HOME` or `<root>/.tripwire`.
    pub fn from_env() -> Result<Self> {
        let root = match std::env::var_os("TRIPWIRE_ROOT") {
            Some(r) => PathBuf::from(r),
            None => Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .context("cluster crate has no parent folder")?
                .to_path_buf(),
        };
        let home = std::env::var_os("TRIPWIRE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".tripwire"));
        let endpoints = Endpoints::from_env()?;
        Ok(Stack { root, home, endpoints })
    }

    /// The services, in start order.
    pub fn services(&self) -> Vec<Box<dyn Service>> {
        vec![
            Box::new(kafka::Kafka::new(self.clone())),
            Box::new(postgres::Postgres::new(self.clone())),
            Box::new(redis::Redis::new(self.clone())),
            Box::new(prometheus::Prometheus::new(self.clone())),
            Box::new(registry::Registry::new(self.clone())),
        ]
    }

    /// Pid and log file of a service.
    pub fn files(&self, name: &str) -> ProcessFiles {
        let dir = self.home.join(name);
        ProcessFiles { pid: dir.join(format!("{name}.pid")), log: dir.join(format!("{name}.log")) }
    }

    /// Bring every service up; return the names of those this call started.
    pub fn up(&self) -> Result<Vec<&'static str>> {
        let services = self.services();
        let mut to_start = Vec::new();
        for s in &services {
            match s.probe() {
                Ok(()) => eprintln!("stack: {} already up at {}", s.name(), s.address()),
                Err(_) if !is_local(&s.address()) => bail!(
                    "{} does not answer at {} and that address is not on this machine, so the stack cannot start it",
                    s.name(),
                    s.address()
                ),
                Err(_) => to_start.push(s),
            }
        }
        let mut packages: Vec<&str> = to_start.iter().flat_map(|s| s.missing_packages()).collect();
        packages.sort_unstable();
        packages.dedup();
        install::apt_install(&packages)?;

        let mut started = Vec::new();
        for s in &to_start {
            let files = self.files(s.name());
            fs::create_dir_all(files.pid.parent().unwrap())?;
            if let Some(pid) = files.running_pid() {
                eprintln!("stack: {} is starting already (pid {pid})", s.name());
                continue;
            }
            s.prepare(&files).with_context(|| {
                format!("preparing {} (log: {})", s.name(), files.log.display())
            })?;
            let pid = process::spawn_detached(s.command()?, &files)?;
            eprintln!("stack: started {} (pid {pid})", s.name());
            started.push(s.name());
        }
        for s in &to_start {
            self.wait_until_up(s.as_ref())?;
        }
        for s in &services {
            if is_local(&s.address()) && self.files(s.name()).running_pid().is_some() {
                s.after_ready()
                    .with_context(|| format!("setting up {} at {}", s.name(), s.address()))?;
            }
        }
        Ok(started)
    }

    /// Wait until `s` answers. The start timeout counts from the service's last
    /// sign of progress, not from its start: a broker recovering thousands of
    /// partitions after an unclean stop keeps writing its log, and a Redis
    /// loading a large append-only file answers `LOADING`; both are starting,
    /// not stuck, so `up` waits for them (up to [`MAX_START`] in all).
    fn wait_until_up(&self, s: &dyn Service) -> Result<()> {
        let files = self.files(s.name());
        let started = Instant::now();
        let mut progress_at = started;
        let mut log_len = log_length(&files.log);
        loop {
            let err = match s.probe() {
                Ok(()) => {
                    eprintln!("stack: {} up at {}", s.name(), s.address());
                    return Ok(());
                }
                Err(e) => e,
            };
            if files.running_pid().is_none() {
                bail!(
                    "{} exited before answering at {}: {err:#}\n--- last lines of {} ---\n{}",
                    s.name(),
                    s.address(),
                    files.log.display(),
                    process::tail(&files.log, 20)
                );
            }
            let len = log_length(&files.log);
            if len != log_len || format!("{err:#}").contains("LOADING") {
                log_len = len;
                progress_at = Instant::now();
            }
            if progress_at.elapsed() > s.start_timeout() || started.elapsed() > MAX_START {
                bail!(
                    "{} did not answer at {} within {:?} of its last progress ({:?} in all): {err:#}; see its log at {}",
                    s.name(),
                    s.address(),
                    s.start_timeout(),
                    started.elapsed(),
                    files.log.display()
                );
            }
            sleep(Duration::from_millis(250));
        }
    }

    /// Stop every process this stack started (by pid file); `only` restricts to some names.
    pub fn down(&self, only: &[String]) -> Result<()> {
        // Reverse start order: Prometheus first, Kafka last.
        for s in self.services().iter().rev() {
            if !only.is_empty() && !only.iter().any(|n| n == s.name()) {
                continue;
            }
            let files = self.files(s.name());
            match files.running_pid() {
                Some(pid) => {
                    process::stop(pid, s.stop_signal(), Duration::from_secs(30))?;
                    eprintln!("stack: stopped {} (pid {pid})", s.name());
                }
                None => eprintln!("stack: {} was not running", s.name()),
            }
            let _ = fs::remove_file(&files.pid);
        }
        Ok(())
    }

    /// Stop the service named `name` and start it again; waits until it answers.
    ///
    /// Only a service this stack runs on this machine can be restarted.
    pub fn restart(&self, name: &str) -> Result<()> {
        let Some(s) = self.services().into_iter().find(|s| s.name() == name) else {
            bail!("no service named {name:?} (kafka, postgres, redis, prometheus, registry)");
        };
        if !is_local(&s.address()) {
            bail!("{name} at {} is not on this machine; it cannot be restarted", s.address());
        }
        self.down(&[name.to_string()])?;
        self.up()?;
        Ok(())
    }

    /// One line per service: up or down, address, and who runs it.
    pub fn status(&self) -> Vec<(String, bool)> {
        self.services()
            .iter()
            .map(|s| {
                let up = s.probe().is_ok();
                let owner = match self.files(s.name()).running_pid() {
                    Some(pid) => format!("pid {pid}, started by tripwire"),
                    None if up => "not started by tripwire".to_string(),
                    None => String::new(),
                };
                let line = format!(
                    "{:<11}{:<6}{:<22}{}",
                    s.name(),
                    if up { "up" } else { "down" },
                    s.address(),
                    owner
                );
                (line, up)
            })
            .collect()
    }

    /// The last `lines` of each selected service's log.
    pub fn logs(&self, only: &[String], lines: usize) -> String {
        let mut out = String::new();
        for s in self.services() {
            if !only.is_empty() && !only.iter().any(|n| n == s.name()) {
                continue;
            }
            let files = self.files(s.name());
            out.push_str(&format!("==> {} ({}) <==\n", s.name(), files.log.display()));
            out.push_str(&process::tail(&files.log, lines));
            out.push('\n');
        }
        out
    }
}

/// Whether `host:port` points at this machine (loopback or `localhost`).
pub fn is_local(address: &str) -> bool {
    let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

/// A TCP connection to `address` for a probe: two seconds to connect, two to answer.
pub fn connect_briefly(address: &str) -> Result<std::net::TcpStream> {
    use std::net::ToSocketAddrs;
    let addr = address
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("{address} resolves to nothing"))?;
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

/// Split `host:port`, for services that must be told where to listen.
pub fn split_address(address: &str) -> Result<(String, u16)> {
    let (host, port) =
        address.rsplit_once(':').with_context(|| format!("{address:?} is not host:port"))?;
    Ok((host.to_string(), port.parse().with_context(|| format!("bad port in {address:?}"))?))
}

/// Run a command to completion, failing with its output if it fails.
pub fn run_checked(mut cmd: Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_localhost_are_local_other_addresses_are_not() {
        assert!(is_local("127.0.0.1:9092"));
        assert!(is_local("localhost:5432"));
        assert!(is_local("[::1]:6379"));
        assert!(!is_local("10.0.0.5:9092"));
        assert!(!is_local("kafka.internal:9092"));
    }
}
