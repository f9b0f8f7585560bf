//! Impossible travel: a transaction too far from the card's previous one for the time between them.

use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};

use crate::config::TravelConfig;
use crate::event::{Diff, Time, Transaction};
use crate::output::{alert_id, Alert, Details, Rule};
use crate::windows::Sliding;

/// Mean earth radius, km (IUGG).
const EARTH_RADIUS_KM: f64 = 6371.0088;
const MS_PER_HOUR: f64 = 3_600_000.0;

/// Where and when a card was used; ordered by `(event_time_ms, event_id)`,
/// the order in which "previous transaction" is meant.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
struct Point {
    event_time_ms: Time,
    event_id: u64,
    lat_e6: i32,
    lon_e6: i32,
}

/// Extension trait: the impossible-travel rule.
pub trait ImpossibleTravel<'s> {
    /// Alerts for events whose previous transaction on the card (within the
    /// lookback) implies a speed above `max_speed_kmh`.
    ///
    /// A `reduce` per card over the lookback window pairs each event with its
    /// predecessor; the pairing changes as the window slides, which the latch
    /// downstream ignores: only the pairing at the trigger's own time counts.
    fn impossible_travel(self, config: &TravelConfig) -> VecCollection<'s, Time, Alert, Diff>;
}

impl<'s> ImpossibleTravel<'s> for VecCollection<'s, Time, Transaction, Diff> {
    fn impossible_travel(self, config: &TravelConfig) -> VecCollection<'s, Time, Alert, Diff> {
        let max = config.max_speed_kmh;
        self.map(|x| {
            let p = Point {
                event_time_ms: x.event_time_ms,
                event_id: x.event_id,
                lat_e6: x.lat_e6,
                lon_e6: x.lon_e6,
            };
            (x.card_id, p)
        })
        .sliding(&[config.lookback_ms])
        .map(|(_, card_point)| card_point)
        .reduce_named(
            "ImpossibleTravel",
            move |card: &u64, input: &[(&Point, Diff)], output| {
                for pair in input.windows(2) {
                    let (previous, x) = (pair[0].0, pair[1].0);
                    if let Some(alert) = judge(*card, previous, x, max) {
                        output.push((alert, 1 as Diff));
                    }
                }
            },
        )
        .map(|(_card, alert)| alert)
    }
}

fn judge(card_id: u64, previous: &Point, x: &Point, max_speed_kmh: u64) -> Option<Alert> {
    let km = great_circle_km(previous, x);
    let dt_ms = x.event_time_ms - previous.event_time_ms;
    let speed = if dt_ms == 0 {
        if km > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    } else {
        km / (dt_ms as f64 / MS_PER_HOUR)
    };
    (speed > max_speed_kmh as f64).then(|| Alert {
        id: alert_id(Rule::ImpossibleTravel, x.event_id, 0),
        card_id,
        rule: Rule::ImpossibleTravel,
        trigger_event: x.event_id,
        event_time_ms: x.event_time_ms,
        details: Details::ImpossibleTravel {
            previous_event: previous.event_id,
            distance_km: km as u64,
            speed_kmh: if speed.is_infinite() {
                u64::MAX
            } else {
                speed as u64
            },
        },
    })
}

/// Haversine distance between two points, km.
fn great_circle_km(a: &Point, b: &Point) -> f64 {
    let rad = |e6: i32| (e6 as f64 / 1e6).to_radians();
    let (phi1, phi2) = (rad(a.lat_e6), rad(b.lat_e6));
    let dphi = phi2 - phi1;
    let dlambda = rad(b.lon_e6) - rad(a.lon_e6);
    let h = (dphi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (dlambda / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}
