//! The window state holds what the windows hold and no more: it stays bounded
//! while a stream runs for days, and is empty once every window has emptied.

use differential_dataflow::input::Input;
use timely::dataflow::operators::probe::Probe;
use timely::dataflow::ProbeHandle;
use tripwire_dataflow::config::DAY;
use tripwire_dataflow::{Channel, DetectFraud, Diff, FraudConfig, Time, Transaction};

#[test]
fn state_stays_within_the_longest_window_and_empties_at_the_end() {
    // One event every 10 s for three days, over 50 cards; the longest window is 24 h.
    let config = FraudConfig::default();
    let every_ms: Time = 10_000;
    let events: u64 = 3 * DAY / every_ms;
    let per_day = DAY / every_ms;
    let (max_entries, end) = timely::execute_directly(move |worker| {
        let probe = ProbeHandle::new();
        let (mut input, state) = worker.dataflow::<Time, _, _>(|scope| {
            let (input, events) = scope.new_collection::<Transaction, Diff>();
            let out = events.detect_fraud(&config);
            out.stats.inner.probe_with(&probe);
            out.alerts.inner.probe_with(&probe);
            (input, out.state)
        });
        let t0: Time = 1_700_000_000_000;
        let mut max_entries = 0;
        for n in 0..events {
            let x = Transaction {
                event_id: n,
                card_id: n % 50,
                account_id: 1,
                merchant_id: n % 7,
                mcc: 5411,
                amount_minor: 1_000,
                currency: *b"EUR",
                country: *b"DE",
                lat_e6: 52_520_000,
                lon_e6: 13_405_000,
                channel: Channel::Pos,
                event_time_ms: t0 + n * every_ms,
                device_id: None,
            };
            input.update_at(x, t0 + n * every_ms, 1);
            input.advance_to(t0 + (n + 1) * every_ms);
            if n % 100 == 0 {
                input.flush();
                worker.step_while(|| probe.less_than(input.time()));
                max_entries = max_entries.max(state.get().entries);
            }
        }
        input.close();
        worker.step_while(|| !probe.done());
        (max_entries, state.get())
    });
    assert!(max_entries as u64 > per_day / 2, "the 24 h window did fill: {max_entries}");
    assert!(
        max_entries <= per_day as usize + 101,
        "held {max_entries} transactions; the 24 h window holds at most {per_day} (+ one unprocessed batch)"
    );
    assert_eq!(end.entries, 0, "nothing held once all windows emptied: {end:?}");
    assert_eq!(end.cards, 0, "no card state left: {end:?}");
    assert_eq!(end.due, 0, "no departures left queued: {end:?}");
}
