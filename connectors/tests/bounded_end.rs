//! A bounded run's sinks commit up to the end of its input and no further.
//!
//! Once every source has read to its end, the dataflow still runs the
//! departures of windows beyond it, and the frontier passes through their
//! times on its way to the end of time. A sink that committed there would
//! store windows closed after the input's last event (and a checkpoint
//! beyond its end, which a re-run would take as done). Here the frontier is
//! held beyond the end, where a window has closed, before the input closes.
//!
//! Needs the stack up (`./tripwire stack up`, or run through `./tripwire test`).

mod common;

use std::time::{Duration, Instant};

use tripwire_connectors::commit::InputEnd;
use tripwire_connectors::readback;
use tripwire_connectors::redis_sink::RedisSinkConfig;
use tripwire_connectors::Endpoints;
use tripwire_dataflow::{Metric, StatKey, WindowStats};

#[test]
fn a_bounded_run_commits_its_windows_as_they_stand_at_the_end_of_input() {
    let endpoints = Endpoints::from_env().unwrap();
    let job = common::unique("bounded_end");
    let end = InputEnd::default();
    let config =
        RedisSinkConfig { end: Some(end.clone()), ..common::eager_redis(&endpoints, &job) };
    let url = endpoints.redis_url();
    let stats = WindowStats {
        count: 1,
        sum: 100,
        max_amount: 100,
        distinct_merchants: 1,
        distinct_countries: 1,
    };
    timely::execute(timely::Config::thread(), move |worker| {
        let (mut input, mut alerts, committed) = common::redis_sink_alone(worker, &config);
        // The last event at 4; its window departs at 14, beyond the end at 5.
        input.update_at((7, common::arrival(10, stats)), 4, 1);
        input.update_at((7, common::departure(10)), 14, 1);
        end.set(5);
        alerts.advance_to(20);
        alerts.flush();
        // The frontier beyond the end, past the departure, input not yet closed.
        input.advance_to(20);
        input.flush();
        let deadline = Instant::now() + Duration::from_secs(30);
        while committed.input_frontier() < 5 {
            assert!(Instant::now() < deadline, "the sink never saw its input reach the end");
            worker.step_or_park(Some(Duration::from_millis(5)));
        }
        for _ in 0..100 {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        drop((input, alerts));
        while worker.step_or_park(Some(Duration::from_millis(5))) {}
        assert_eq!(committed.frontier(), 5, "committed up to the end of input, not beyond");
        let mut con = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        assert_eq!(readback::redis_frontiers(&mut con, &job, 1).unwrap(), vec![Some(5)]);
        let count = StatKey { card_id: 7, window_ms: 10, metric: Metric::Count };
        assert_eq!(
            readback::redis_stats(&mut con, &job).unwrap().get(&count),
            Some(&1),
            "the window as it stands at the end, not closed"
        );
    })
    .unwrap()
    .join()
    .into_iter()
    .for_each(|r| r.unwrap());
}
