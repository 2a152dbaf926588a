//! When simulated Cloud Eye publishes a minute. The datapoint of the minute starting at `t` (stamped `t`)
//! becomes visible at `t + lag(t)`: a base lag, plus a per-minute jitter, plus — for an occasional late
//! minute — a further delay. Deterministic per (seed, minute), so a test or benchmark replays exactly; shared
//! by the HTTP simulator (`sim::cloud`) and the in-memory fake (`sim::fake`).

use std::time::Duration;

const MINUTE_MS: i64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publication {
    /// Lag of every minute (real Cloud Eye: somewhat more than a minute, not a whole number of minutes).
    pub base: Duration,
    /// Extra lag drawn per minute, uniform in `[0, jitter)`.
    pub jitter: Duration,
    /// About one minute in `late_every` (drawn per minute) is published `late_by` later still; 0 = never.
    pub late_every: u32,
    pub late_by: Duration,
    pub seed: u64,
}

impl Publication {
    /// Every minute published `lag` after its timestamp.
    pub const fn constant(lag: Duration) -> Self {
        Publication {
            base: lag,
            jitter: Duration::ZERO,
            late_every: 0,
            late_by: Duration::ZERO,
            seed: 0,
        }
    }

    fn draw(&self, minute_ms: i64, salt: u64) -> u64 {
        // splitmix64 of (seed, minute, salt): uniform enough and stable across runs.
        let mut z = self
            .seed
            .wrapping_add((minute_ms as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_add(salt.wrapping_mul(0xd1b5_4a32_d192_ed03));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Whether the minute stamped `minute_ms` is one of the late ones.
    pub fn is_late(&self, minute_ms: i64) -> bool {
        self.late_every > 0
            && self
                .draw(minute_ms, 2)
                .is_multiple_of(u64::from(self.late_every))
    }

    /// Milliseconds from the minute's timestamp to its publication.
    pub fn lag_ms(&self, minute_ms: i64) -> i64 {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4);
        let jitter = match ms(self.jitter) {
            0 => 0,
            j => i64::try_from(self.draw(minute_ms, 1) % j.unsigned_abs()).unwrap_or(0),
        };
        let late = if self.is_late(minute_ms) {
            ms(self.late_by)
        } else {
            0
        };
        ms(self.base).saturating_add(jitter).saturating_add(late)
    }

    /// Unix ms at which the minute becomes visible.
    pub fn published_at(&self, minute_ms: i64) -> i64 {
        minute_ms.saturating_add(self.lag_ms(minute_ms))
    }

    pub fn is_published(&self, minute_ms: i64, now_ms: i64) -> bool {
        self.published_at(minute_ms) <= now_ms
    }

    /// The newest minute visible at `now_ms` (a late minute may be missing below it).
    pub fn newest(&self, now_ms: i64) -> i64 {
        let max_lag = self
            .base
            .saturating_add(self.jitter)
            .saturating_add(self.late_by);
        let floor = now_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        // Every minute at least the largest lag old is published: the search ends there.
        let oldest = floor
            .saturating_sub(i64::try_from(max_lag.as_millis()).unwrap_or(0))
            .saturating_sub(MINUTE_MS);
        let mut t = floor;
        while t > oldest && !self.is_published(t, now_ms) {
            t -= MINUTE_MS;
        }
        t
    }
}

impl Default for Publication {
    /// Today's simulator: every minute one minute after it starts.
    fn default() -> Self {
        Publication::constant(Duration::from_secs(60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE_MS;

    #[test]
    fn constant_lag_matches_the_old_newest_minute() {
        let p = Publication::constant(Duration::from_secs(83));
        for now in [T0, T0 + 22_999, T0 + 23_000, T0 + 59_999] {
            let old = (now - 83_000).div_euclid(MINUTE_MS) * MINUTE_MS;
            assert_eq!(p.newest(now), old, "now {now}");
        }
    }

    #[test]
    fn jitter_and_late_minutes_stay_in_their_ranges() {
        let p = Publication {
            base: Duration::from_secs(68),
            jitter: Duration::from_secs(30),
            late_every: 10,
            late_by: Duration::from_secs(60),
            seed: 7,
        };
        let minutes: Vec<i64> = (0..1000).map(|i| T0 + i * MINUTE_MS).collect();
        let late = minutes.iter().filter(|m| p.is_late(**m)).count();
        assert!((60..140).contains(&late), "{late} late minutes in 1000");
        let lags: Vec<i64> = minutes
            .iter()
            .filter(|m| !p.is_late(**m))
            .map(|m| p.lag_ms(*m))
            .collect();
        assert!(lags.iter().all(|l| (68_000..98_000).contains(l)));
        assert!(lags.iter().any(|l| *l < 72_000) && lags.iter().any(|l| *l > 94_000));
        // A late minute leaves a gap below a newer published one.
        let m = *minutes
            .iter()
            .find(|m| p.is_late(**m))
            .expect("a late minute");
        let next = m + MINUTE_MS;
        let at = p.published_at(next).max(next + 98_000);
        if !p.is_late(next) && at < p.published_at(m) {
            assert!(!p.is_published(m, at) && p.newest(at) >= next);
        }
    }
}
