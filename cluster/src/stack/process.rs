//! Background processes of the stack: spawn detached, remember by pid file, stop by pid.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where one service keeps its pid and log.
#[derive(Clone, Debug)]
pub struct ProcessFiles {
    /// The pid file written at spawn.
    pub pid: PathBuf,
    /// stdout and stderr of the process.
    pub log: PathBuf,
}

impl ProcessFiles {
    /// The pid recorded for this service, if its process is still alive.
    pub fn running_pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(&self.pid).ok()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }
}

/// Whether `pid` names a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Start `cmd` in a session of its own, detached from our terminal and pipes, and record its pid.
///
/// The child's stdin is `/dev/null` and its output goes to the log file, so a
/// caller that waits on our output (CI, `| tee`) does not wait on the service.
pub fn spawn_detached(mut cmd: Command, files: &ProcessFiles) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.log)
        .with_context(|| format!("opening log {}", files.log.display()))?;
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pid = child.id();
    // The child is reaped by init once we exit; we never wait on it.
    std::mem::forget(child);
    fs::write(&files.pid, format!("{pid}\n"))?;
    Ok(pid)
}

/// Send `signal` (a name such as `TERM`) to `pid`, then wait up to `grace` for it to exit
/// before sending `KILL`. Returns once the process is gone.
pub fn stop(pid: u32, signal: &str, grace: Duration) -> Result<()> {
    send(pid, signal)?;
    let deadline = Instant::now() + grace;
    while alive(pid) {
        if Instant::now() > deadline {
            send(pid, "KILL")?;
            let hard = Instant::now() + Duration::from_secs(10);
            while alive(pid) {
                if Instant::now() > hard {
                    bail!("process {pid} survived SIGKILL");
                }
                sleep(Duration::from_millis(50));
            }
            break;
        }
        sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn send(pid: u32, signal: &str) -> Result<()> {
    // `kill` through the shell: a builtin, so present wherever `sh` is, and no unsafe libc call.
    let status =
        Command::new("sh").args(["-c", &format!("kill -{signal} {pid} 2>/dev/null")]).status()?;
    if !status.success() && alive(pid) {
        bail!("could not send SIG{signal} to {pid}");
    }
    Ok(())
}

/// The last `n` lines of a log file, or a note that it does not exist yet.
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(_) => format!("(no log yet at {})", path.display()),
    }
}
