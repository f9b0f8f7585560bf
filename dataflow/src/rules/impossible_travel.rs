//! Impossible travel: a transaction too far from the card's previous one for the time between them.

use crate::card_windows::{Judged, Previous, Trigger};
use crate::config::TravelConfig;
use crate::output::{Alert, Details, Rule};
use crate::rules::alert;

/// Mean earth radius, km (IUGG).
const EARTH_RADIUS_KM: f64 = 6371.0088;
const MS_PER_HOUR: f64 = 3_600_000.0;

/// An alert for an event whose previous transaction on the card (by event
/// time, then id, within the lookback) implies a speed above `max_speed_kmh`.
pub fn check(config: &TravelConfig, j: &Judged, out: &mut Vec<Alert>) {
    let Some(p) = j.previous.as_ref() else { return };
    let km = great_circle_km(p, &j.event);
    let dt_ms = j.event.event_time_ms - p.event_time_ms;
    let speed = match dt_ms {
        0 if km > 0.0 => f64::INFINITY,
        0 => 0.0,
        _ => km / (dt_ms as f64 / MS_PER_HOUR),
    };
    if speed > config.max_speed_kmh as f64 {
        let speed_kmh = if speed.is_infinite() { u64::MAX } else { speed as u64 };
        let details = Details::ImpossibleTravel {
            previous_event: p.event_id,
            distance_km: km as u64,
            speed_kmh,
        };
        out.push(alert(j, Rule::ImpossibleTravel, 0, details));
    }
}

/// Haversine distance between the previous position and the event's, km.
fn great_circle_km(a: &Previous, b: &Trigger) -> f64 {
    let rad = |e6: i32| (e6 as f64 / 1e6).to_radians();
    let (phi1, phi2) = (rad(a.lat_e6), rad(b.lat_e6));
    let dphi = phi2 - phi1;
    let dlambda = rad(b.lon_e6) - rad(a.lon_e6);
    let h = (dphi / 2.0).sin().powi(2) + phi1.cos() * phi2.cos() * (dlambda / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}
