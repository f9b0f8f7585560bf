//! `tripwire launch` (the supervisor in `tripwire-cluster`) running the fraud
//! detector from a hosts file: a 3-process group gives the same result as one
//! process, and a group that loses a process to SIGKILL is restarted as a
//! whole and still leaves exactly the reference's result.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tripwire_cluster::launch::{read_state, Launch};
use tripwire_cluster::stack::Stack;
use tripwire_connectors::kafka_admin::ensure_topic;
use tripwire_connectors::readback::{self, AlertRow};
use tripwire_dataflow::reference::Reference;
use tripwire_dataflow::FraudConfig;
use tripwire_jobs::generator::{GenConfig, Generator, SchemaIds};

use common::{accepted, now_ms, produce};

struct Fixture {
    stack: Stack,
    topic: String,
    config_file: PathBuf,
    dir: PathBuf,
    want_alerts: BTreeSet<AlertRow>,
    want_archive: BTreeSet<i64>,
    /// Where a bounded run over the topic ends: just past its last event.
    end: i64,
}

fn fixture(name: &str) -> Fixture {
    let stack = Stack::from_env().unwrap();
    let id = format!("{name}_{}_{}", std::process::id(), now_ms());
    let dir = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    let fraud = FraudConfig::seconds();
    #[derive(serde::Serialize)]
    struct File<'a> {
        fraud: &'a FraudConfig,
    }
    let config_file = dir.join("job.toml");
    std::fs::write(&config_file, toml::to_string(&File { fraud: &fraud }).unwrap()).unwrap();
    ensure_topic(&stack.endpoints.kafka_bootstrap, &id, 6).expect("topic; is the stack up?");
    let now = now_ms();
    let plan = Generator::new(GenConfig {
        seed: 5,
        cards: 400,
        partitions: 6,
        start_ms: now - 3_600_000,
        spacing_ms: 40,
        fraud_per_10k: 40,
        bad_per_10k: 10,
        v1_percent: 30,
        lateness_ms: 5_000,
        out_of_order_per_10k: 300,
        late_per_10k: 20,
        duplicates_per_10k: 5,
        near_miss_per_10k: 0,
        // Second-scale windows: benign randomness is what fires the rules here.
        spending_profiles: false,
        rate_per_s: None,
        now_ms: now,
        schema_ids: SchemaIds::EMBEDDED,
    })
    .generate(40_000);
    produce(&stack.endpoints.kafka_bootstrap, &id, &plan);
    let (events, _) = accepted(&plan);
    let reference = Reference::new(&fraud, &events);
    let end = events.iter().map(|x| reference.time_of(x.event_time_ms)).max().unwrap() + 1;
    Fixture {
        want_alerts: reference.alerts_until(end - 1).iter().map(readback::alert_row).collect(),
        end: end as i64,
        want_archive: events.iter().map(|x| x.event_id as i64).collect(),
        stack,
        topic: id,
        config_file,
        dir,
    }
}

impl Fixture {
    fn launch(&self, job: &str, addresses: &[String]) -> Launch {
        let hosts = self.dir.join(format!("{job}-hosts.txt"));
        let text: String = addresses.iter().map(|a| format!("{a}\n")).collect();
        std::fs::write(&hosts, format!("# {job}\n{text}")).unwrap();
        Launch {
            name: job.to_string(),
            hosts_file: hosts,
            workers: 1,
            config: Some(self.config_file.clone()),
            binary: PathBuf::from(env!("CARGO_BIN_EXE_fraud-detector")),
            args: ["--topic", &self.topic, "--dlq-topic", &format!("{}-dlq", self.topic)]
                .into_iter()
                .chain(["--job", job, "--bounded"])
                .chain([
                    "--commit-interval-ms",
                    "50",
                    "--sample-every",
                    "500",
                    "--metrics-port",
                    "0",
                ])
                .map(String::from)
                .collect(),
            max_restarts: 5,
            remote_dir: String::new(),
            env: vec![
                ("TRIPWIRE_PG_SCHEMA".into(), job.into()),
                ("RUST_LOG".into(), std::env::var("TRIPWIRE_TEST_LOG").unwrap_or("error".into())),
            ],
        }
    }

    /// The job's checkpoint frontiers; none while its tables do not exist yet.
    fn frontiers(&self, job: &str) -> Vec<i64> {
        let mut e = self.stack.endpoints.clone();
        e.pg_schema = Some(job.to_string());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let Ok((c, conn)) = tokio_postgres::connect(&e.postgres_config(), NoTls).await else {
                return Vec::new();
            };
            tokio::spawn(conn);
            readback::pg_frontiers(&c, job).await.unwrap_or_default()
        })
    }

    /// Alerts and archived event ids the job left in its schema.
    fn results(&self, job: &str) -> (BTreeSet<AlertRow>, BTreeSet<i64>, Vec<i64>) {
        let mut e = self.stack.endpoints.clone();
        e.pg_schema = Some(job.to_string());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&e.postgres_config(), NoTls).await.unwrap();
            tokio::spawn(conn);
            (
                readback::pg_alerts(&c).await.unwrap(),
                readback::pg_archive(&c).await.unwrap(),
                readback::pg_frontiers(&c, job).await.unwrap(),
            )
        })
    }
}

/// Free loopback ports for `n` processes.
fn addresses(n: usize) -> Vec<String> {
    let ls: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect()
}

#[test]
fn three_processes_from_a_hosts_file_equal_one_process_and_a_killed_one_restarts_the_group() {
    let f = fixture("launch");
    let home = f.dir.join("home");

    // One process, then three, each to the end of the topic.
    let one = format!("{}_one", f.topic);
    let restarts = f.launch(&one, &addresses(1)).supervise(&home, Arc::default()).unwrap();
    assert_eq!(restarts, 0);
    let three = format!("{}_three", f.topic);
    let restarts = f.launch(&three, &addresses(3)).supervise(&home, Arc::default()).unwrap();
    assert_eq!(restarts, 0);
    let (alerts_one, archive_one, frontiers_one) = f.results(&one);
    let (alerts_three, archive_three, frontiers_three) = f.results(&three);
    assert_eq!(frontiers_one, vec![f.end]);
    assert_eq!(frontiers_three, vec![f.end; 3], "each of the three processes finished");
    assert!(f.want_alerts.len() > 50, "the input fires rules: {}", f.want_alerts.len());
    assert_eq!(alerts_one, f.want_alerts, "one process: the reference's alerts");
    assert_eq!(alerts_three, alerts_one, "three processes: the same alerts");
    assert_eq!(archive_one, f.want_archive);
    assert_eq!(archive_three, archive_one, "three processes: the same archive");

    // Three processes again; one is SIGKILLed once the group has committed something.
    let killed = format!("{}_killed", f.topic);
    let mut launch = f.launch(&killed, &addresses(3));
    // Commits at every interval even though the input is an hour old, so that
    // there is a commit to kill after before the group reads to the end.
    launch.args.extend(["--catch-up-commit-interval-ms".to_string(), "0".to_string()]);
    let stop = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let (launch, home, stop) = (launch.clone(), home.clone(), stop.clone());
        std::thread::spawn(move || launch.supervise(&home, stop))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let committed = f.frontiers(&killed);
        let state = read_state(&home, &killed);
        if let Some(s) = state.filter(|_| committed.iter().any(|c| *c > 0 && *c < f.end)) {
            break s.processes[1].1;
        }
        assert!(!supervisor.is_finished(), "the group finished before it could be killed");
        assert!(Instant::now() < deadline, "no commit to kill after");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap();
    let restarts = supervisor.join().unwrap().unwrap();
    assert!(restarts >= 1, "the group was restarted");
    let (alerts, archive, frontiers) = f.results(&killed);
    assert_eq!(frontiers, vec![f.end; 3]);
    assert_eq!(alerts, f.want_alerts, "after the kill and restart: exactly the reference's alerts");
    assert_eq!(archive, f.want_archive, "and every accepted event archived once");

    // Stopping (what SIGINT/SIGTERM to `tripwire launch` does): an unbounded
    // group stops cleanly, its checkpoints intact, no process left behind.
    let stopped = format!("{}_stopped", f.topic);
    let mut launch = f.launch(&stopped, &addresses(2));
    launch.args.retain(|a| a != "--bounded");
    launch.args.extend(["--catch-up-commit-interval-ms".to_string(), "0".to_string()]);
    let stop = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let (launch, home, stop) = (launch.clone(), home.clone(), stop.clone());
        std::thread::spawn(move || launch.supervise(&home, stop))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let pids: Vec<u32> = loop {
        let state = read_state(&home, &stopped);
        let committed = f.frontiers(&stopped);
        if let Some(s) = state.filter(|_| committed.len() == 2 && committed.iter().all(|c| *c > 0))
        {
            break s.processes.iter().map(|p| p.1).collect();
        }
        assert!(Instant::now() < deadline, "no commit before the stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(supervisor.join().unwrap().unwrap(), 0, "stopped, not restarted");
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} is gone");
    }
    assert!(read_state(&home, &stopped).is_none(), "the supervisor's state is cleared");
    let frontiers = f.frontiers(&stopped);
    assert!(frontiers.len() == 2 && frontiers.iter().all(|c| *c > 0 && *c < f.end));
    let _ = std::fs::remove_dir_all(&f.dir);
}

/// Three network namespaces on a bridge, each with an address of its own, and
/// TCP relays that carry their loopback ports for the stack to the host's.
struct Namespaces {
    names: Vec<String>,
    bridge: String,
    relays: Vec<std::process::Child>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for r in &mut self.relays {
            let _ = r.kill();
            let _ = r.wait();
        }
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip").args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Set up `n` namespaces on subnet `10.77.{net}.0/24`; the host is `.1`, namespace i is `.(11 + i)`.
fn namespaces(
    n: usize,
    net: u32,
    stack_ports: &[u16],
    relay_bin: &std::path::Path,
) -> Result<Namespaces, String> {
    let tag = std::process::id() % 100_000;
    let mut ns = Namespaces { names: Vec::new(), bridge: format!("twb{tag}"), relays: Vec::new() };
    let host = format!("10.77.{net}.1");
    ip(&["link", "add", &ns.bridge, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{host}/24"), "dev", &ns.bridge])?;
    ip(&["link", "set", &ns.bridge, "up"])?;
    for i in 0..n {
        let name = format!("tw{tag}n{i}");
        ip(&["netns", "add", &name])?;
        ns.names.push(name.clone());
        let veth = format!("twv{tag}{i}");
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name])?;
        ip(&["link", "set", &veth, "master", &ns.bridge, "up"])?;
        let inside = |args: &[&str]| -> Result<(), String> {
            let mut a = vec!["netns", "exec", &name, "ip"];
            a.extend_from_slice(args);
            ip(&a)
        };
        inside(&["addr", "add", &format!("10.77.{net}.{}/24", 11 + i), "dev", "eth0"])?;
        inside(&["link", "set", "eth0", "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        // In the namespace: its loopback ports of the stack, relayed to the host's bridge address.
        let maps: Vec<String> =
            stack_ports.iter().map(|p| format!("127.0.0.1:{p}={host}:{p}")).collect();
        let relay = std::process::Command::new("ip")
            .args(["netns", "exec", &name])
            .arg(relay_bin)
            .arg("forward")
            .args(&maps)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        ns.relays.push(relay);
    }
    // On the host: the bridge address's ports, relayed to the stack on loopback.
    for p in stack_ports {
        tripwire_cluster::forward::relay(&format!("{host}:{p}"), &format!("127.0.0.1:{p}"))
            .map_err(|e| e.to_string())?;
    }
    Ok(ns)
}

#[test]
fn processes_in_separate_network_namespaces_give_the_same_result() {
    let relay_bin = PathBuf::from(env!("CARGO_BIN_EXE_fraud-detector")).with_file_name("tripwire");
    if !relay_bin.exists() {
        println!("skipped: {} is not built (./tripwire test builds it)", relay_bin.display());
        return;
    }
    if let Err(e) = ip(&["netns", "add", &format!("twprobe{}", std::process::id())]) {
        println!("skipped: this machine does not allow network namespaces ({e})");
        return;
    }
    let _ = ip(&["netns", "del", &format!("twprobe{}", std::process::id())]);
    let f = fixture("netns");
    let e = &f.stack.endpoints;
    let port = |a: &str| a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap();
    let stack_ports = [port(&e.kafka_bootstrap), e.pg_port, e.redis_port];
    let net = std::process::id() % 200 + 20;
    let ns = namespaces(3, net, &stack_ports, &relay_bin).expect("namespaces");
    let home = f.dir.join("home");

    let one = format!("{}_one", f.topic);
    f.launch(&one, &addresses(1)).supervise(&home, Arc::default()).unwrap();
    // One hosts file: each process at its namespace's own address.
    let spread = format!("{}_ns", f.topic);
    let mut launch = f.launch(&spread, &[]);
    let lines: String = ns
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("10.77.{net}.{}:2101 # netns {n}\n", 11 + i))
        .collect();
    std::fs::write(&launch.hosts_file, lines).unwrap();
    launch.max_restarts = 0;
    launch.supervise(&home, Arc::default()).expect("the namespaced group finishes");
    let (alerts_one, archive_one, _) = f.results(&one);
    let (alerts, archive, frontiers) = f.results(&spread);
    assert_eq!(frontiers, vec![f.end; 3]);
    assert_eq!(alerts_one, f.want_alerts);
    assert_eq!(alerts, alerts_one, "three namespaces: the same alerts as one process");
    assert_eq!(archive, archive_one, "and the same archive");
    drop(ns);
    let _ = std::fs::remove_dir_all(&f.dir);
}
