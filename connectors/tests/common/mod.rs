//! Pieces the connector tests share.

#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use differential_dataflow::input::{Input, InputSession};
use tripwire_connectors::commit::{Committed, SinkInputs};
use tripwire_connectors::redis_sink::{redis_sink, RedisSinkConfig};
use tripwire_connectors::Endpoints;
use tripwire_dataflow::{Alert, CardChange, CardStats, Diff, Time, WindowStats};

/// A name no earlier run used: `{what}_{pid}_{ms}`.
pub fn unique(what: &str) -> String {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
    format!("{what}_{}_{ms}", std::process::id())
}

/// A Redis sink for `job` on the stack's Redis that commits as soon as it can.
pub fn eager_redis(endpoints: &Endpoints, job: &str) -> RedisSinkConfig {
    RedisSinkConfig {
        commit_interval: std::time::Duration::ZERO,
        catch_up_interval: std::time::Duration::ZERO,
        stream_max_len: 1_000,
        ..RedisSinkConfig::new(endpoints.redis_url(), job.to_string())
    }
}

/// Statistics and alerts fed by hand into a Redis sink alone, and what it committed.
pub type RedisAlone =
    (InputSession<Time, (u64, CardChange), Diff>, InputSession<Time, Alert, Diff>, Committed);

/// A card's first change: one window of `window_ms` holding `stats`.
pub fn arrival(window_ms: Time, stats: WindowStats) -> CardChange {
    CardChange { stats: CardStats::new([(window_ms, stats)]), existed: false }
}

/// A card's last change: its one window of `window_ms` emptied.
pub fn departure(window_ms: Time) -> CardChange {
    CardChange { stats: CardStats::new([(window_ms, WindowStats::default())]), existed: true }
}

/// A dataflow on `worker` with nothing but a Redis sink configured by `config`.
pub fn redis_sink_alone(
    worker: &mut timely::worker::Worker,
    config: &RedisSinkConfig,
) -> RedisAlone {
    worker.dataflow::<Time, _, _>(|scope| {
        let (input, rows) = scope.new_collection::<(u64, CardChange), Diff>();
        let (alerts_in, alerts) = scope.new_collection::<Alert, Diff>();
        let committed =
            redis_sink(SinkInputs { stats: rows, alerts, archive: None, coalesce: None }, config);
        (input, alerts_in, committed)
    })
}
