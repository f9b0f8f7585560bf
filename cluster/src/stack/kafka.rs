//! The Kafka broker: KRaft mode, one combined broker+controller node, jars from Maven Central.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use super::install::on_path;
use super::process::ProcessFiles;
use super::{run_checked, split_address, Service, Stack};

/// The local single-node Kafka cluster.
pub struct Kafka {
    stack: Stack,
}

impl Kafka {
    pub fn new(stack: Stack) -> Self {
        Kafka { stack }
    }

    fn dir(&self) -> PathBuf {
        self.stack.home.join("kafka")
    }

    fn classpath(&self) -> String {
        format!("{}/*", self.dir().join("libs").display())
    }

    fn pom(&self) -> PathBuf {
        self.stack.root.join("cluster/kafka/pom.xml")
    }

    /// Fetch the broker's jars with Maven unless the copy we have came from the same pom.
    fn fetch_jars(&self) -> Result<()> {
        let pom = fs::read_to_string(self.pom()).context("reading cluster/kafka/pom.xml")?;
        let stamp = self.dir().join("libs/.pom");
        if fs::read_to_string(&stamp).ok().as_deref() == Some(pom.as_str()) {
            return Ok(());
        }
        let libs = self.dir().join("libs");
        let _ = fs::remove_dir_all(&libs);
        eprintln!("stack: fetching the Kafka broker's jars from Maven Central");
        let mut mvn = Command::new("mvn");
        mvn.args(["-q", "-B", "-f"])
            .arg(self.pom())
            .args(["dependency:copy-dependencies", "-DincludeScope=runtime"])
            .arg(format!("-DoutputDirectory={}", libs.display()));
        run_checked(mvn).context("mvn could not fetch the Kafka broker")?;
        fs::write(stamp, pom)?;
        Ok(())
    }

    fn properties(&self) -> Result<String> {
        let (host, port) = split_address(&self.stack.endpoints.kafka_bootstrap)?;
        let cport = self.stack.endpoints.kafka_controller_port;
        let data = self.dir().join("data");
        Ok(format!(
            "# Written by `tripwire stack up` from TRIPWIRE_KAFKA_* settings; edits are overwritten.\n\
             # One node is both broker and KRaft controller: the smallest real Kafka.\n\
             process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@{host}:{cport}\n\
             listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}\n\
             advertised.listeners=PLAINTEXT://{host}:{port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={data}\n\
             # A single broker can only hold one replica of the internal topics; with the\n\
             # defaults (3) the group coordinator and the transaction coordinator never\n\
             # start, and idempotent/transactional producers and offset commits hang.\n\
             offsets.topic.replication.factor=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             # Topics are created on purpose, with their partition counts, by the job\n\
             # and by txgen; automatic creation would hide a misspelt topic behind an\n\
             # empty one-partition topic.\n\
             auto.create.topics.enable=false\n\
             num.partitions=1\n\
             # Tests create and drop many small topics; waiting 60 s to rebalance a\n\
             # single-member consumer group only slows them.\n\
             group.initial.rebalance.delay.ms=0\n",
            data = data.display()
        ))
    }
}

impl Service for Kafka {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn address(&self) -> String {
        self.stack.endpoints.kafka_bootstrap.clone()
    }

    fn missing_packages(&self) -> Vec<&'static str> {
        let mut p = Vec::new();
        if !java_17_or_newer() {
            p.push("openjdk-17-jre-headless");
        }
        if !on_path("mvn") {
            p.push("maven");
        }
        p
    }

    fn prepare(&self, _files: &ProcessFiles) -> Result<()> {
        if !java_17_or_newer() {
            bail!("the Kafka 4 broker needs Java 17 or newer on the PATH");
        }
        self.fetch_jars()?;
        let config = self.dir().join("server.properties");
        fs::write(&config, self.properties()?)?;
        if !self.dir().join("data/meta.properties").exists() {
            let uuid =
                run_checked(self.java(TOOL_HEAP, &["kafka.tools.StorageTool", "random-uuid"]))?;
            let uuid = uuid.lines().last().unwrap_or_default().trim().to_string();
            let cfg = config.display().to_string();
            run_checked(
                self.java(
                    TOOL_HEAP,
                    &["kafka.tools.StorageTool", "format", "-t", &uuid, "-c", &cfg],
                ),
            )
            .context("formatting Kafka storage")?;
        }
        Ok(())
    }

    fn command(&self) -> Result<Command> {
        let config = self.dir().join("server.properties").display().to_string();
        // The GC log `kafka-server-start.sh` writes too: the broker's pauses
        // are part of every latency figure measured beside it.
        let gc = self.dir().join("kafka-gc.log").display().to_string();
        let gc = format!("-Xlog:gc*:file={gc}:time,tags:filecount=10,filesize=100M");
        Ok(self.java(BROKER_HEAP, &[&gc, "kafka.Kafka", &config]))
    }

    fn probe(&self) -> Result<()> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.stack.endpoints.kafka_bootstrap)
            // A probe must fail fast rather than retry for the default minute.
            .set("socket.timeout.ms", "2000")
            .set("log_level", "0")
            .create()?;
        let md = consumer.fetch_metadata(None, Duration::from_secs(2))?;
        if md.brokers().is_empty() {
            bail!("metadata lists no broker");
        }
        Ok(())
    }

    fn start_timeout(&self) -> Duration {
        Duration::from_secs(90)
    }
}

/// `kafka-run-class.sh`'s KAFKA_JVM_PERFORMANCE_OPTS (Kafka 4.1).
const JVM_PERFORMANCE_OPTS: &str = "-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 \
    -Djava.awt.headless=true";

/// `kafka-server-start.sh`'s heap for the broker.
const BROKER_HEAP: &str = "-Xmx1G -Xms1G";

/// `kafka-run-class.sh`'s heap for its other tools (formatting the storage).
const TOOL_HEAP: &str = "-Xmx256M";

impl Kafka {
    fn java(&self, heap: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("java");
        // The JVM options Kafka's own launcher gives the broker
        // (`kafka-server-start.sh`'s heap, `kafka-run-class.sh`'s
        // KAFKA_JVM_PERFORMANCE_OPTS). A fixed 1 GiB heap is ample for test and
        // demo traffic on a 24 GiB machine; G1's pause goal of 20 ms (its own
        // default is 200) sizes the young generation for a broker's latency.
        // Without them the heap starts at a 64th of the machine's memory and
        // grows: in the first minutes at 10K records/s the broker paused every
        // 1.8 s (13 ms on average). Once warm the two pause alike (11-18 young
        // pauses of 15-20 ms on average in two minutes of 10K and 50K/s).
        // As there, KAFKA_HEAP_OPTS and KAFKA_JVM_PERFORMANCE_OPTS replace them.
        let opts = |var: &str, default: &str| {
            let set = std::env::var(var).ok().filter(|v| !v.trim().is_empty());
            let opts = set.unwrap_or_else(|| default.to_string());
            opts.split_whitespace().map(str::to_string).collect::<Vec<_>>()
        };
        cmd.args(opts("KAFKA_HEAP_OPTS", heap))
            .args(opts("KAFKA_JVM_PERFORMANCE_OPTS", JVM_PERFORMANCE_OPTS))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.stack.root.join("cluster/kafka/log4j2.yaml").display()
            ))
            .arg("-cp")
            .arg(self.classpath())
            .args(args);
        cmd
    }
}

/// Whether `java -version` reports 17 or newer.
fn java_17_or_newer() -> bool {
    let Ok(out) = Command::new("java").arg("-version").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stderr);
    // e.g. `openjdk version "17.0.15" 2025-04-15`
    text.split('"')
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| major >= 17)
}
