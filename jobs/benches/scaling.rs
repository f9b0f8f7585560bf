//! `scaling`: the full job on 1 × 1, 1 × 2 (threads) and 2 × 1 (processes, hosts file).
//!
//! ```text
//! ./tripwire stack up
//! cargo build --release -p tripwire-jobs --bins
//! cargo bench -p tripwire-jobs --bench scaling     # TRIPWIRE_BENCH_EVENTS, default 1,000,000
//! ```
//!
//! Each configuration reads the same bulk-loaded 12-partition topic (the
//! throughput benchmark's, loaded if missing) from offset 0 to its end,
//! exactly-once into PostgreSQL and Redis, as a fresh job. Efficiency is a
//! configuration's events/s over (its workers × the 1 × 1 events/s). For 2 × 1
//! the bytes the two processes exchange over their timely connection are read
//! from the kernel's per-socket counters (`ss -ti`) while the job runs; with
//! the per-worker rate they model larger clusters. This machine has 2 cores,
//! which the job shares with Kafka, PostgreSQL and Redis.
//!
//! Prints a table, writes `bench/results/scaling.json` and draws
//! `bench/results/scaling.svg`.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{bulk_config, clean_up, env_or, load, records_in, unique, write_results, JobRun};
use tripwire_jobs::generator::Generator;

/// Bytes sent so far on every TCP connection to or from `ports`.
fn bytes_on(ports: &[u16]) -> u64 {
    let filter = ports
        .iter()
        .map(|p| format!("sport = :{p} or dport = :{p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let Ok(out) = Command::new("ss").args(["-tin", &format!("( {filter} )")]).output() else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("bytes_sent:"))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

/// Run `run` bounded; its seconds and, with several processes, the most
/// bytes seen on the timely connections between them.
fn timed(run: &JobRun) -> (f64, u64) {
    let run = run.bounded();
    let started = Instant::now();
    let mut children = run.spawn();
    let hosts = std::env::temp_dir().join(format!("{}.hosts", run.job));
    let ports: Vec<u16> = std::fs::read_to_string(&hosts)
        .map(|h| h.lines().filter_map(|l| l.rsplit(':').next()?.parse().ok()).collect())
        .unwrap_or_default();
    let mut exchanged = 0;
    loop {
        if !ports.is_empty() {
            exchanged = exchanged.max(bytes_on(&ports));
        }
        let mut done = true;
        for c in &mut children {
            match c.try_wait().unwrap() {
                Some(status) => assert!(status.success(), "the job failed"),
                None => done = false,
            }
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (started.elapsed().as_secs_f64(), exchanged)
}

/// A bar chart of events/s per configuration, with the ideal (linear) line.
fn svg(rows: &[(String, usize, f64)], per_worker: f64) -> String {
    let (w, h, left, bottom, top) = (560.0, 360.0, 80.0, 50.0, 40.0);
    let max = rows.iter().map(|r| r.2).fold(per_worker * 2.0, f64::max) * 1.1;
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v / max);
    let slot = (w - left - 20.0) / rows.len() as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">Tripwire scaling \
         (full job, exactly-once; 2-core machine)</text>\n",
        w / 2.0
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let (gy, right, tx, ty, k) = (y(v), w - 20.0, left - 6.0, y(v) + 4.0, v / 1000.0);
        s += &format!(
            "<line x1=\"{left}\" x2=\"{right}\" y1=\"{gy}\" y2=\"{gy}\" stroke=\"#ddd\"/>\
             <text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{k:.0}K</text>\n"
        );
    }
    for (i, (name, workers, eps)) in rows.iter().enumerate() {
        let x = left + slot * i as f64 + slot * 0.2;
        let (bar_w, bar_y, bar_h) = (slot * 0.6, y(*eps), y(0.0) - y(*eps));
        let ideal_y = y(per_worker * *workers as f64);
        let (x0, x1, mid) = (x - slot * 0.1, x + slot * 0.7, x + slot * 0.3);
        let (label_y, value_y, k) = (h - bottom + 18.0, bar_y - 6.0, eps / 1000.0);
        s += &format!(
            "<rect x=\"{x}\" y=\"{bar_y}\" width=\"{bar_w}\" height=\"{bar_h}\" fill=\"#4a78b5\"/>\n\
             <line x1=\"{x0}\" x2=\"{x1}\" y1=\"{ideal_y}\" y2=\"{ideal_y}\" stroke=\"#c0392b\" \
             stroke-dasharray=\"4 3\" stroke-width=\"2\"/>\n\
             <text x=\"{mid}\" y=\"{label_y}\" text-anchor=\"middle\">{name}</text>\n\
             <text x=\"{mid}\" y=\"{value_y}\" text-anchor=\"middle\">{k:.0}K/s</text>\n"
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" fill=\"#c0392b\">- - ideal: workers × 1 × 1 rate</text>\n</svg>\n",
        left,
        h - 10.0
    );
    s
}

fn main() {
    let events = env_or("TRIPWIRE_BENCH_EVENTS", 1_000_000);
    let bootstrap = support::endpoints().kafka_bootstrap;
    let topic = support::bulk_topic(events);
    if records_in(&bootstrap, &topic) == 0 {
        load(&bootstrap, &topic, &Generator::new(bulk_config(1, events)).generate(events));
    }
    let records = records_in(&bootstrap, &topic) as f64;
    let configs = [("1 × 1", 1, 1), ("1 × 2 (threads)", 1, 2), ("2 × 1 (processes)", 2, 1)];
    let mut rows = Vec::new();
    let mut exchanged_per_event = 0.0;
    for (name, processes, workers) in configs {
        let job = unique("bench_scaling");
        let args = vec!["--archive".to_string(), "false".to_string()];
        let (secs, bytes) = timed(&JobRun { topic: &topic, job: &job, processes, workers, args });
        clean_up(&job, &[]);
        if processes > 1 {
            exchanged_per_event = bytes as f64 / records;
        }
        rows.push((name.to_string(), processes * workers, records / secs));
        println!("{name}: {:.0} events/s", records / secs);
    }
    let base = rows[0].2;
    println!("\n{records} records, 12 partitions; this machine has 2 cores, shared with");
    println!("Kafka, PostgreSQL and Redis\n");
    println!("| configuration | workers | events/s | efficiency vs 1 × 1 |");
    println!("|---|---|---|---|");
    let mut json = serde_json::Map::new();
    for (name, workers, eps) in &rows {
        let efficiency = eps / (base * *workers as f64);
        println!("| {name} | {workers} | {eps:.0} | {:.0} % |", 100.0 * efficiency);
        json.insert(
            name.clone(),
            serde_json::json!({"workers": workers, "eps": eps.round(), "efficiency": efficiency}),
        );
    }
    let threads = rows[1].2;
    let processes = rows[2].2;
    println!(
        "\nprocesses vs threads: {:+.1} %; timely exchange between the 2 processes: \
         {exchanged_per_event:.0} bytes per event",
        100.0 * (processes / threads - 1.0)
    );
    let mut out = serde_json::Value::Object(json);
    out["records"] = records.into();
    out["processes_vs_threads"] = (processes / threads - 1.0).into();
    out["exchange_bytes_per_event"] = exchanged_per_event.round().into();
    write_results("scaling", &out);
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results/scaling.svg");
    std::fs::write(&path, svg(&rows, base)).unwrap();
    println!("wrote bench/results/scaling.svg");
}
