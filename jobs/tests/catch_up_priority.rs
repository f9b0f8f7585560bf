//! The job's CPU priority follows its work, with the shipped defaults
//! (`--nice 10`, the 30 s idle timeout, the catch-up commit interval): every
//! thread of the job drops to nice 10 while it catches up on a backlog (an
//! hour-old bulk load), and goes back to the priority it was started with
//! once it follows real time. A twin runs the same job without the right to
//! raise its priority again (no `CAP_SYS_NICE`, `RLIMIT_NICE` 0): it must
//! still catch up and follow real time, keep nice 10, and say why.
//!
//! Needs the stack up on this machine (`./tripwire test` brings it up).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tripwire_connectors::endpoints::Endpoints;
use tripwire_connectors::kafka_admin::ensure_topic;

use common::{committed, now_ms, pg, wait_until, Processes};

/// The nice of every thread of process `pid`, from `/proc`.
fn thread_nices(pid: u32) -> Vec<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the job is running");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .map(|stat| {
            // `tid (name) state ...`: the name may hold spaces; nice is the
            // 19th field, the 17th after the name.
            let (_, rest) = stat.rsplit_once(')').expect("a stat line");
            rest.split_whitespace().nth(16).and_then(|n| n.parse().ok()).expect("a nice field")
        })
        .collect()
}

fn all_at(pid: u32, nice: i32) -> bool {
    let nices = thread_nices(pid);
    nices.len() >= 8 && nices.iter().all(|n| *n == nice)
}

/// Whether a process started by this test may go back to nice 0 after a
/// higher nice: it inherits `CAP_SYS_NICE` (bit 23 of the effective set) or
/// an `RLIMIT_NICE` of 20 or more (nice 0 is `20 - limit`), from `/proc`.
fn may_raise_priority() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("CapEff in /proc/self/status");
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let nice_limit: u64 = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max nice priority"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("Max nice priority in /proc/self/limits");
    effective & (1 << 23) != 0 || nice_limit >= 20
}

struct Run {
    job: String,
    log: PathBuf,
}

/// A bulk load an hour old on a fresh topic, the job with its defaults
/// (through `wrapper`, if any), and txgen at 1,000 events/s once the job
/// catches up on the load.
fn start(processes: &mut Processes, name: &str, wrapper: &[&str]) -> (Run, u32) {
    let endpoints = Endpoints::from_env().unwrap();
    let id = format!("prio_{name}_{}_{}", std::process::id(), now_ms());
    ensure_topic(&endpoints.kafka_bootstrap, &id, 4).expect("topic; is the stack up?");
    let bulk = Command::new(env!("CARGO_BIN_EXE_txgen"))
        .args(["--topic", &id, "--partitions", "4", "--events", "20000", "--cards", "2000"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(bulk.success(), "txgen's bulk load");
    let log = std::env::temp_dir().join(format!("{id}.log"));
    let (program, args) = match wrapper.split_first() {
        Some((program, args)) => {
            (*program, [args, &[env!("CARGO_BIN_EXE_fraud-detector")]].concat())
        }
        None => (env!("CARGO_BIN_EXE_fraud-detector"), vec![]),
    };
    let job = Command::new(program)
        .args(args)
        .args(["--topic", &id, "--dlq-topic", &format!("{id}-dlq"), "--job", &id])
        .args(["--metrics-port", "0"])
        .env("TRIPWIRE_PG_SCHEMA", &id)
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = job.id();
    processes.0.push(job);
    (Run { job: id, log }, pid)
}

/// Real-time traffic on the run's topic.
fn real_time(processes: &mut Processes, run: &Run) {
    processes.0.push(
        Command::new(env!("CARGO_BIN_EXE_txgen"))
            .args(["--topic", &run.job, "--partitions", "4", "--rate", "1000", "--seconds", "300"])
            .args(["--cards", "2000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
}

#[test]
fn the_job_yields_while_catching_up_and_keeps_its_priority_in_real_time() {
    let mut processes = Processes(Vec::new());
    let privileged = may_raise_priority();
    // The twin: no capability, and a nice limit that allows no raise.
    let unprivileged = [
        "prlimit",
        "--nice=0:0",
        "setpriv",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-sys_nice",
        "--",
    ];
    let (plain, plain_pid) = start(&mut processes, "plain", &[]);
    let (twin, twin_pid) = start(&mut processes, "twin", &unprivileged);

    // Catching up on the hour-old load: every thread at the shipped nice 10.
    for (run, pid) in [(&plain, plain_pid), (&twin, twin_pid)] {
        wait_until(
            &format!("{}: every thread at nice 10", run.job),
            Duration::from_secs(60),
            || all_at(pid, 10),
        );
        real_time(&mut processes, run);
    }

    // Following real time: results within a minute of the wall clock.
    for run in [&plain, &twin] {
        let (rt, client) = pg(&run.job);
        wait_until(&format!("{} follows real time", run.job), Duration::from_secs(180), || {
            committed(&rt, &client, &run.job).is_some_and(|f| f > now_ms() - 60_000)
        });
    }
    if privileged {
        wait_until("the job back at its usual priority", Duration::from_secs(30), || {
            all_at(plain_pid, 0)
        });
    } else {
        println!(
            "this test may not raise a priority again: the job without that right is the twin"
        );
    }
    // The twin may not go back: it keeps nice 10, and its log says why.
    assert!(all_at(twin_pid, 10), "the twin's threads: {:?}", thread_nices(twin_pid));
    let log = std::fs::read_to_string(&twin.log).unwrap();
    assert!(
        log.contains("may not raise its priority again"),
        "the twin's log says it keeps nice 10:\n{log}"
    );
}
