//! `tripwire launch`: one process per line of a hosts file, supervised as a group.
//!
//! Process `i` runs on host `i` with timely's `-n N -p i -w W -h HOSTS`. An
//! address of this machine (loopback, or one of its interfaces) is spawned
//! directly; any other over `ssh` (after `tripwire submit` has copied the
//! binary, its config and the hosts file there). A line may end with a
//! comment `# netns NAME`: that process then runs inside network namespace
//! `NAME` (`ip netns exec`), which is how several hosts are made on one machine.
//!
//! Every line a process prints is passed on prefixed with `[pI]`. A timely
//! cluster cannot lose a member, so when any process ends, the supervisor
//! stops the others and, unless all ended successfully (a bounded job that
//! finished), starts the whole group again after a backoff (1 s, 2 s, 4 s,
//! ... 30 s), which then resumes from its checkpoints; it gives up after
//! `max_restarts`. SIGINT or SIGTERM stops the group with SIGTERM (each job
//! finishes the commit it is in) and then SIGKILL after a grace period.
//!
//! The supervisor records its state (its pid, the processes' pids, restarts)
//! in `.tripwire/launch/NAME.json` for `tripwire status` and `tripwire stop`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::stack::process;

/// One line of a hosts file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// `host:port`, as timely reads it.
    pub address: String,
    /// Network namespace to run the process in (`# netns NAME`).
    pub netns: Option<String>,
}

/// Parse a hosts file: one `host:port` per line; `#` starts a comment; blank lines are skipped.
pub fn parse_hosts(text: &str) -> Result<Vec<Host>> {
    let mut hosts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let (address, comment) = line.split_once('#').unwrap_or((line, ""));
        let address = address.trim();
        if address.is_empty() {
            continue;
        }
        if address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            bail!("hosts file line {}: {address:?} is not host:port", n + 1);
        }
        let mut words = comment.split_whitespace();
        let netns = match (words.next(), words.next()) {
            (Some("netns"), Some(name)) => Some(name.to_string()),
            _ => None,
        };
        hosts.push(Host { address: address.to_string(), netns });
    }
    if hosts.is_empty() {
        bail!("the hosts file names no host");
    }
    Ok(hosts)
}

/// Whether `address`'s host is this machine: loopback, or an address one of its interfaces has.
pub fn is_this_machine(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let Ok(mut addrs) = (host, 0u16).to_socket_addrs() else { return false };
    addrs.any(|a| a.ip().is_loopback() || a.ip().is_unspecified() || can_bind(a.ip()))
}

fn can_bind(ip: IpAddr) -> bool {
    TcpListener::bind((ip, 0)).is_ok()
}

/// What to launch.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The group's name (state file, `status`, `stop`).
    pub name: String,
    /// The hosts file.
    pub hosts_file: PathBuf,
    /// Worker threads per process.
    pub workers: usize,
    /// The job's config file, passed as `--config`.
    pub config: Option<PathBuf>,
    /// The job binary.
    pub binary: PathBuf,
    /// Further arguments for the job.
    pub args: Vec<String>,
    /// Restarts before giving up.
    pub max_restarts: u32,
    /// Where a remote host keeps the submitted files (`tripwire submit`).
    pub remote_dir: String,
    /// Environment variables for the job (locally set; over ssh, prefixed to the command).
    pub env: Vec<(String, String)>,
}

/// The supervisor's record, read by `status` and `stop`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// The supervisor's pid.
    pub supervisor: u32,
    /// Per process: its host and pid (0 while not running).
    pub processes: Vec<(String, u32)>,
    /// Group restarts so far.
    pub restarts: u32,
    /// When the current group started, ms since the epoch.
    pub started_ms: u64,
    /// The job's name in checkpoints (its `--job`, or the group's name).
    pub job: String,
    /// The job's PostgreSQL schema (its `TRIPWIRE_PG_SCHEMA`), if set.
    pub pg_schema: Option<String>,
}

/// Where the state of group `name` is kept.
pub fn state_path(home: &Path, name: &str) -> PathBuf {
    home.join("launch").join(format!("{name}.json"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct Group {
    children: Vec<Child>,
    printers: Vec<thread::JoinHandle<()>>,
}

impl Launch {
    fn job_name(&self) -> String {
        self.args
            .iter()
            .position(|a| a == "--job")
            .and_then(|i| self.args.get(i + 1).cloned())
            .unwrap_or_else(|| self.name.clone())
    }

    fn command(&self, hosts: &[Host], i: usize) -> Result<Command> {
        let n = hosts.len().to_string();
        let mut job_args: Vec<String> =
            vec!["-n".into(), n, "-p".into(), i.to_string(), "-w".into(), self.workers.to_string()];
        let host = &hosts[i];
        if host.netns.is_some() || is_this_machine(&host.address) {
            job_args.extend(["-h".into(), self.hosts_file.display().to_string()]);
            if let Some(c) = &self.config {
                job_args.extend(["--config".into(), c.display().to_string()]);
            }
            job_args.extend(self.args.iter().cloned());
            let mut cmd = match &host.netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(&self.binary);
                    c
                }
                None => Command::new(&self.binary),
            };
            cmd.args(job_args).envs(self.env.iter().map(|(k, v)| (k, v)));
            Ok(cmd)
        } else {
            // Remote: the files `submit` copied, under `remote_dir`.
            let dir = &self.remote_dir;
            let file =
                |p: &Path| format!("{dir}/{}", p.file_name().unwrap_or_default().to_string_lossy());
            job_args.extend(["-h".into(), file(&self.hosts_file)]);
            if let Some(c) = &self.config {
                job_args.extend(["--config".into(), file(c)]);
            }
            job_args.extend(self.args.iter().cloned());
            let remote_host =
                host.address.rsplit_once(':').map_or(host.address.as_str(), |(h, _)| h);
            let quoted: Vec<String> = job_args.iter().map(|a| shell_quote(a)).collect();
            let env: Vec<String> =
                self.env.iter().map(|(k, v)| format!("{k}={}", shell_quote(v))).collect();
            let mut cmd = Command::new("ssh");
            cmd.args(["-o", "BatchMode=yes", remote_host]).arg(format!(
                "exec env {} {} {}",
                env.join(" "),
                shell_quote(&file(&self.binary)),
                quoted.join(" ")
            ));
            Ok(cmd)
        }
    }

    fn spawn(
        &self,
        hosts: &[Host],
        out: &Arc<Mutex<std::io::Stdout>>,
        restarts: u32,
    ) -> Result<Group> {
        let mut group = Group { children: Vec::new(), printers: Vec::new() };
        for i in 0..hosts.len() {
            let mut cmd = self.command(hosts, i)?;
            cmd.env("TRIPWIRE_RESTARTS", restarts.to_string());
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    group.stop(Duration::from_secs(5));
                    return Err(e).with_context(|| format!("starting process {i}: {cmd:?}"));
                }
            };
            for stream in [
                child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
                child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
            ]
            .into_iter()
            .flatten()
            {
                let out = out.clone();
                group.printers.push(thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        let mut o = out.lock().expect("stdout");
                        let _ = writeln!(o, "[p{i}] {line}");
                    }
                }));
            }
            group.children.push(child);
        }
        Ok(group)
    }

    /// Run the group until it finishes, gives up, or is told to stop; the restarts it took.
    pub fn supervise(&self, home: &Path, stop: Arc<AtomicBool>) -> Result<u32> {
        let text = fs::read_to_string(&self.hosts_file)
            .with_context(|| format!("reading {}", self.hosts_file.display()))?;
        let hosts = parse_hosts(&text)?;
        let out = Arc::new(Mutex::new(std::io::stdout()));
        let state_file = state_path(home, &self.name);
        fs::create_dir_all(state_file.parent().expect("launch folder"))?;
        let mut state = State {
            supervisor: std::process::id(),
            processes: hosts.iter().map(|h| (h.address.clone(), 0)).collect(),
            job: self.job_name(),
            pg_schema: self
                .env
                .iter()
                .find(|(k, _)| k == "TRIPWIRE_PG_SCHEMA")
                .map(|(_, v)| v.clone()),
            ..State::default()
        };
        let mut backoff = Duration::from_secs(1);
        let result = loop {
            let mut group = self.spawn(&hosts, &out, state.restarts)?;
            state.started_ms = now_ms();
            for (i, c) in group.children.iter().enumerate() {
                state.processes[i].1 = c.id();
            }
            write_state(&state_file, &state)?;
            eprintln!(
                "launch: {} processes × {} workers started (restart {})",
                hosts.len(),
                self.workers,
                state.restarts
            );
            let started = Instant::now();
            let ended = group.wait_for_first(&stop);
            if stop.load(Ordering::SeqCst) {
                eprintln!("launch: stopping the group");
                group.stop(Duration::from_secs(30));
                group.report();
                break Ok(state.restarts);
            }
            let (first, status) = ended.expect("a process ended");
            eprintln!("launch: process {first} ended: {status}");
            if status.success() && group.wait_all_success(Duration::from_secs(600), &stop) {
                group.report();
                break Ok(state.restarts);
            }
            group.stop(Duration::from_secs(10));
            group.report();
            if state.restarts >= self.max_restarts {
                break Err(anyhow::anyhow!(
                    "giving up after {} restarts; the last group ran {:?}",
                    state.restarts,
                    started.elapsed()
                ));
            }
            // A group that ran a while resets the backoff.
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            state.restarts += 1;
            for p in &mut state.processes {
                p.1 = 0;
            }
            write_state(&state_file, &state)?;
            eprintln!("launch: restarting the group in {backoff:?}");
            let until = Instant::now() + backoff;
            while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(50));
            }
            if stop.load(Ordering::SeqCst) {
                break Ok(state.restarts);
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        };
        let _ = fs::remove_file(&state_file);
        result
    }
}

impl Group {
    /// Wait until some process ends (or `stop` is set): its index and status.
    fn wait_for_first(&mut self, stop: &AtomicBool) -> Option<(usize, ExitStatus)> {
        loop {
            for (i, c) in self.children.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Some((i, status));
                }
            }
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// After a successful exit: whether the others also end successfully (a finished bounded job).
    fn wait_all_success(&mut self, within: Duration, stop: &AtomicBool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let mut all = true;
            for c in &mut self.children {
                match c.try_wait() {
                    Ok(Some(s)) if s.success() => {}
                    Ok(Some(_)) => return false,
                    _ => all = false,
                }
            }
            if all {
                return true;
            }
            if Instant::now() > deadline || stop.load(Ordering::SeqCst) {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM every process still running, SIGKILL after `grace`, and reap them.
    fn stop(&mut self, grace: Duration) {
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = process::stop(c.id(), "TERM", grace);
            }
            let _ = c.wait();
        }
    }

    /// Print every process's exit status (after its output).
    fn report(&mut self) {
        for p in self.printers.drain(..) {
            let _ = p.join();
        }
        for (i, c) in self.children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                eprintln!("launch: process {i}: {status}");
            }
        }
    }
}

fn write_state(path: &Path, state: &State) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(state)?)?;
    fs::rename(tmp, path)?;
    Ok(())
}

/// Read group `name`'s state, if a supervisor of that name is running.
pub fn read_state(home: &Path, name: &str) -> Option<State> {
    let s: State = serde_json::from_str(&fs::read_to_string(state_path(home, name)).ok()?).ok()?;
    process::alive(s.supervisor).then_some(s)
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `tripwire submit`: copy the binary, its config and the hosts file to every remote host.
pub fn submit(launch: &Launch) -> Result<()> {
    let text = fs::read_to_string(&launch.hosts_file)?;
    for host in parse_hosts(&text)? {
        if host.netns.is_some() || is_this_machine(&host.address) {
            continue;
        }
        let h = host.address.rsplit_once(':').map_or(host.address.as_str(), |(h, _)| h).to_string();
        let status = Command::new("ssh")
            .args([
                "-o",
                "BatchMode=yes",
                &h,
                &format!("mkdir -p {}", shell_quote(&launch.remote_dir)),
            ])
            .status()?;
        if !status.success() {
            bail!("ssh {h}: mkdir {} failed ({status})", launch.remote_dir);
        }
        let mut scp = Command::new("scp");
        scp.args(["-q", "-o", "BatchMode=yes"]).arg(&launch.binary).arg(&launch.hosts_file);
        if let Some(c) = &launch.config {
            scp.arg(c);
        }
        let status = scp.arg(format!("{h}:{}/", launch.remote_dir)).status()?;
        if !status.success() {
            bail!("scp to {h} failed ({status})");
        }
        eprintln!("submit: copied to {h}:{}", launch.remote_dir);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_files_allow_comments_blank_lines_and_a_netns_note() {
        let hosts = parse_hosts(
            "# the cluster\n127.0.0.1:2101\n\n  10.0.0.2:2101   # netns tw1\nexample.org:2101 # a remote\n",
        )
        .unwrap();
        assert_eq!(
            hosts,
            vec![
                Host { address: "127.0.0.1:2101".into(), netns: None },
                Host { address: "10.0.0.2:2101".into(), netns: Some("tw1".into()) },
                Host { address: "example.org:2101".into(), netns: None },
            ]
        );
        assert!(parse_hosts("# nothing\n\n").is_err());
        assert!(parse_hosts("127.0.0.1\n").is_err(), "a port is required");
    }

    #[test]
    fn loopback_is_this_machine_and_a_documentation_address_is_not() {
        assert!(is_this_machine("127.0.0.1:2101"));
        assert!(is_this_machine("localhost:2101"));
        assert!(!is_this_machine("192.0.2.7:2101"));
    }

    #[test]
    fn remote_commands_quote_what_the_shell_would_split() {
        assert_eq!(shell_quote("--topic"), "--topic");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
