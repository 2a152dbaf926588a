//! When to collect. Cloud Eye publishes each minute's datapoint (stamped with the minute's start) some time
//! after the minute: its publication lag. [`LagEstimator`] learns that lag from what each answer held and
//! when it was asked; [`Aligner`] picks when a cycle first asks for the next minute and when to ask again
//! after a miss, spending at most a budget of extra calls. [`RateWindow`] keeps every call inside the CES
//! rate limit. Pure: wall time (Unix ms) and monotonic instants are passed in.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// A minute in milliseconds: CES publishes raw data per minute.
pub const MINUTE_MS: i64 = 60_000;
/// Minutes the lag estimate looks back over.
const WINDOW: usize = 20;
/// The estimate is this quantile of the recent minutes' lags: high, yet above one late minute in ten.
const QUANTILE: f64 = 0.8;
/// A missed minute is asked again after half the way to the estimate, within these bounds.
const RETRY_MIN_MS: i64 = 1_000;
const RETRY_MAX_MS: i64 = 5_000;
/// A minute seen within this long of a miss has its lag pinned down.
const PINNED_MS: i64 = 2 * RETRY_MAX_MS;
/// Missed this far past the estimate, a minute is a late one: stop re-asking, collect as usual.
const GIVE_UP_MS: i64 = 15_000;
/// After minutes seen at the first attempt, the next first attempt moves earlier by 2, 4, 8, 16 s, so a
/// shorter lag is found within a few minutes.
const DOWN_FIRST_MS: i64 = 2_000;
const DOWN_MAX_MS: i64 = 16_000;
/// A miss this recent (minutes) bounds how early the first attempt moves (bisection, not a blind step).
const FLOOR_MINUTES: i64 = 2;
/// Extra calls allowed, as a share of the cycle's calls per minute (issue 16: ≤ 10 %).
pub const EXTRA_SHARE: f64 = 0.10;
/// The extra-call bucket holds this many minutes of budget and starts full, so learning the lag after a
/// start does not wait for it to fill; the long-run rate stays the budget.
const BUCKET_MINUTES: f64 = 10.0;

/// What is known about one minute's lag: more than `above` (asked then, not there), at most `upto`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bounds {
    minute_ms: i64,
    above: Option<i64>,
    upto: Option<i64>,
}

/// Learns the publication lag from answers: a robust high quantile of the recent minutes.
#[derive(Debug, Clone, Default)]
pub struct LagEstimator {
    /// Recent minutes, oldest first.
    minutes: VecDeque<Bounds>,
    newest_seen: Option<i64>,
}

impl LagEstimator {
    /// An answer asked at `asked_ms` whose newest datapoint is stamped `newest_ms`: that minute was
    /// published by then, the one after it not yet.
    pub fn observe(&mut self, asked_ms: i64, newest_ms: i64) {
        let newest_ms = newest_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        if asked_ms < newest_ms {
            return;
        }
        self.newest_seen = self.newest_seen.max(Some(newest_ms));
        self.bound(newest_ms, |b| {
            b.upto = Some(
                b.upto
                    .map_or(asked_ms - newest_ms, |u| u.min(asked_ms - newest_ms)),
            );
        });
        let next = newest_ms + MINUTE_MS;
        if asked_ms > next {
            self.bound(next, |b| b.above = b.above.max(Some(asked_ms - next)));
        }
    }

    fn bound(&mut self, minute_ms: i64, f: impl FnOnce(&mut Bounds)) {
        let at = self.minutes.partition_point(|b| b.minute_ms < minute_ms);
        if self
            .minutes
            .get(at)
            .is_none_or(|b| b.minute_ms != minute_ms)
        {
            if at == 0 && self.minutes.len() >= WINDOW {
                return;
            }
            self.minutes.insert(
                at,
                Bounds {
                    minute_ms,
                    above: None,
                    upto: None,
                },
            );
        }
        if let Some(b) = self.minutes.get_mut(at) {
            f(b);
        }
        while self.minutes.len() > WINDOW {
            self.minutes.pop_front();
        }
    }

    /// Each settled recent minute's lag (ms): at most when it was first seen; for a minute overtaken by a
    /// newer one before it showed (a late one), at least when it was last missed. A minute first seen
    /// without a miss shortly before only bounds its lag from above, loosely after a start: once three
    /// minutes are pinned between a miss and a hit, only those (and the late ones) count.
    fn lags(&self) -> Vec<i64> {
        let newest = self.newest_seen.unwrap_or(i64::MIN);
        let mut all = Vec::with_capacity(self.minutes.len());
        let mut pinned = Vec::with_capacity(self.minutes.len());
        for b in &self.minutes {
            match (b.upto, b.above) {
                (Some(u), Some(a)) if u - a <= PINNED_MS => {
                    all.push(u.max(a));
                    pinned.push(u.max(a));
                }
                (Some(u), a) => all.push(u.max(a.unwrap_or(i64::MIN))),
                (None, Some(a)) if b.minute_ms < newest => {
                    all.push(a);
                    pinned.push(a);
                }
                _ => {}
            }
        }
        if pinned.len() >= 3 { pinned } else { all }
    }

    /// The estimated lag: the 0.8 quantile of the last 20 minutes'.
    pub fn estimate_ms(&self) -> Option<i64> {
        let mut lags = self.lags();
        if lags.is_empty() {
            return None;
        }
        lags.sort_unstable();
        let i = ((lags.len() - 1) as f64 * QUANTILE).round() as usize;
        lags.get(i).copied()
    }

    /// [`LagEstimator::estimate_ms`] as a duration (0 for a negative lag).
    pub fn estimate(&self) -> Option<Duration> {
        self.estimate_ms()
            .map(|ms| Duration::from_millis(ms.max(0).unsigned_abs()))
    }

    /// The latest offset at which a minute from `minute_ms - FLOOR_MINUTES` on was missed.
    fn recent_floor(&self, minute_ms: i64) -> Option<i64> {
        self.minutes
            .iter()
            .filter(|b| b.minute_ms >= minute_ms - FLOOR_MINUTES * MINUTE_MS)
            .filter_map(|b| b.above)
            .max()
    }
}

/// Picks the start of each aligned cycle and the re-asks after a miss, within a budget of extra calls.
#[derive(Debug, Clone)]
pub struct Aligner {
    est: LagEstimator,
    /// Offset after a minute's timestamp of its first attempt; `None` until a minute was seen.
    offset_ms: Option<i64>,
    down_ms: i64,
    /// Offset at which the last settled minute was seen: a retry halves the way to it.
    last_seen_ms: Option<i64>,
    tokens: f64,
    budget: f64,
}

impl Default for Aligner {
    fn default() -> Self {
        Aligner {
            est: LagEstimator::default(),
            offset_ms: None,
            down_ms: DOWN_FIRST_MS,
            last_seen_ms: None,
            tokens: 0.0,
            budget: 0.0,
        }
    }
}

impl Aligner {
    /// The publication lag estimator the aligner plans with.
    pub fn estimator(&self) -> &LagEstimator {
        &self.est
    }

    /// Extra calls per minute for a plan of `calls_per_minute` under a limit of `rate_per_minute`: 10 %
    /// of the plan, never more than the limit leaves. The first call fills the bucket.
    pub fn set_budget(&mut self, calls_per_minute: f64, rate_per_minute: f64) {
        let budget = (calls_per_minute * EXTRA_SHARE)
            .min(rate_per_minute - calls_per_minute)
            .max(0.0);
        if self.budget == 0.0 && self.tokens == 0.0 {
            self.tokens = budget * BUCKET_MINUTES;
        }
        self.budget = budget;
        self.tokens = self.tokens.min(self.capacity());
    }

    fn capacity(&self) -> f64 {
        self.budget * BUCKET_MINUTES
    }

    /// Adds the budget of `minutes` elapsed.
    pub fn refill(&mut self, minutes: f64) {
        self.tokens = (self.tokens + self.budget * minutes.max(0.0)).min(self.capacity());
    }

    /// Extra calls the budget holds now.
    pub fn tokens(&self) -> f64 {
        self.tokens
    }

    /// Takes `calls` extra calls from the budget when it holds them.
    pub fn spend(&mut self, calls: usize) -> bool {
        let n = calls as f64;
        if self.tokens + 1e-9 < n {
            return false;
        }
        self.tokens -= n;
        true
    }

    /// Feeds an answer to the lag estimator (see [`LagEstimator::observe`]).
    pub fn observe(&mut self, asked_ms: i64, newest_ms: i64) {
        self.est.observe(asked_ms, newest_ms);
    }

    /// When (Unix ms) to first ask for `minute_ms`; `None` while nothing is known.
    pub fn first_attempt(&self, minute_ms: i64) -> Option<i64> {
        self.offset_ms
            .or_else(|| self.est.estimate_ms())
            .map(|o| minute_ms.saturating_add(o))
    }

    /// After an attempt at `asked_ms` missed `minute_ms`: when to ask again, spending one extra call;
    /// `None` when the budget is empty or the minute is late past the estimate.
    pub fn retry(&mut self, minute_ms: i64, asked_ms: i64) -> Option<i64> {
        let missed = asked_ms - minute_ms;
        let good = self
            .last_seen_ms
            .or(self.est.estimate_ms())
            .unwrap_or(missed + RETRY_MAX_MS);
        if self.late(minute_ms, asked_ms) {
            return None;
        }
        // Halve the way to where the last minute showed (reaching it, not creeping towards it); past
        // it, the lag grew: step by the most.
        let gap = good - missed;
        let step = match gap {
            g if g <= 0 => RETRY_MAX_MS,
            g if g <= 2 * RETRY_MIN_MS => g,
            g => (g / 2).clamp(RETRY_MIN_MS, RETRY_MAX_MS),
        };
        self.spend(1).then_some(asked_ms + step)
    }

    /// Whether a minute still missing at `asked_ms` is a late one (past the estimate by a margin).
    pub fn late(&self, minute_ms: i64, asked_ms: i64) -> bool {
        self.est
            .estimate_ms()
            .is_some_and(|good| asked_ms - minute_ms >= good + GIVE_UP_MS)
    }

    /// When to send the rest of a cycle whose first attempt missed and cannot be repeated: when the
    /// minute is expected, within a few re-ask steps.
    pub fn fallback(&self, minute_ms: i64, asked_ms: i64) -> i64 {
        match self.last_seen_ms.or(self.est.estimate_ms()) {
            Some(good) if !self.late(minute_ms, asked_ms) => {
                (minute_ms + good).clamp(asked_ms + RETRY_MIN_MS, asked_ms + 3 * RETRY_MAX_MS)
            }
            _ => asked_ms,
        }
    }

    /// The minute was first asked at `first_ms` and seen at `seen_ms` (`None`: not this cycle). Moves
    /// the next first attempt: earlier after a minute seen at once, when a miss is affordable (halving
    /// the way to a recent miss); to where it was seen after misses.
    pub fn settle(&mut self, minute_ms: i64, first_ms: i64, seen_ms: Option<i64>) {
        let first = first_ms - minute_ms;
        if let Some(s) = seen_ms {
            self.last_seen_ms = Some(s - minute_ms);
        }
        match seen_ms {
            Some(s) if s <= first_ms => {
                self.offset_ms = Some(first);
                if self.tokens < 1.0 {
                    return;
                }
                // Finding the lag again below costs about one re-ask per halving of the step: step no
                // further than the budget in hand can pay for.
                let affordable = (DOWN_FIRST_MS / 2) << (self.tokens.floor() as u32).min(5);
                let mut next = first - self.down_ms.min(affordable);
                if let Some(floor) = self.est.recent_floor(minute_ms).filter(|f| *f < first) {
                    if first - floor <= RETRY_MIN_MS {
                        self.down_ms = DOWN_FIRST_MS;
                        return;
                    }
                    next = next.max((first + floor) / 2);
                }
                self.offset_ms = Some(next);
                self.down_ms = (self.down_ms * 2).min(DOWN_MAX_MS);
            }
            Some(s) => {
                self.offset_ms = Some(s - minute_ms);
                self.down_ms = DOWN_FIRST_MS;
            }
            None => {
                self.offset_ms.get_or_insert(first);
                self.down_ms = DOWN_FIRST_MS;
            }
        }
    }
}

/// The calls sent in the last minute, so a cycle or an extra call starts only when it fits the limit.
#[derive(Debug, Default, Clone)]
pub struct RateWindow {
    sent: VecDeque<Instant>,
}

impl RateWindow {
    /// Counts a call sent at `at`.
    pub fn record(&mut self, at: Instant) {
        self.sent.push_back(at);
    }

    fn prune(&mut self, now: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(60))
        {
            self.sent.pop_front();
        }
    }

    /// The earliest instant from `now` at which `calls` more fit a sliding minute of `limit`.
    pub fn fits_at(&mut self, now: Instant, calls: usize, limit: usize) -> Instant {
        self.prune(now);
        let over = (self.sent.len() + calls).saturating_sub(limit);
        match over {
            0 => now,
            n => self
                .sent
                .get(n - 1)
                .map_or(now, |t| (*t + Duration::from_secs(60)).max(now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE_MS;

    fn minute(i: i64) -> i64 {
        T0 + i * MINUTE_MS
    }

    #[test]
    fn the_estimate_is_a_high_quantile_that_ignores_one_late_minute_in_ten() {
        let mut e = LagEstimator::default();
        assert_eq!(e.estimate(), None);
        // Twenty minutes seen 70..89 s after their start; minute 10 missed until it was overtaken.
        for i in 0..20 {
            if i == 10 {
                e.observe(minute(i) + 100_000, minute(i - 1));
                e.observe(minute(i) + 130_000, minute(i - 1));
                continue;
            }
            e.observe(minute(i) + 70_000 + (i % 20) * 1_000, minute(i));
        }
        let est = e.estimate_ms().expect("an estimate");
        assert!((84_000..=89_000).contains(&est), "{est}");
    }

    #[test]
    fn misses_raise_the_estimate_to_the_new_lag() {
        let mut e = LagEstimator::default();
        for i in 0..20 {
            e.observe(minute(i) + 84_000, minute(i));
        }
        assert_eq!(e.estimate_ms(), Some(84_000));
        for i in 20..26 {
            e.observe(minute(i) + 84_000, minute(i - 1));
            e.observe(minute(i) + 96_000, minute(i));
        }
        assert_eq!(e.estimate_ms(), Some(96_000));
    }

    /// Drives an aligner against a constant lag, one minute at a time; returns how long after its
    /// publication each minute was seen (ms; a minute not seen in its cycle counts a minute) and the extra
    /// calls spent.
    fn drive(a: &mut Aligner, lag: i64, minutes: std::ops::Range<i64>) -> (Vec<i64>, usize) {
        let mut delays = Vec::new();
        let mut extra = 0;
        for i in minutes {
            a.refill(1.0);
            let m = minute(i);
            let first = a.first_attempt(m).expect("known");
            let mut at = first;
            let seen = loop {
                if at - m >= lag {
                    a.observe(at, m);
                    break Some(at);
                }
                a.observe(at, m - MINUTE_MS);
                match a.retry(m, at) {
                    Some(next) => {
                        extra += 1;
                        at = next;
                    }
                    None => break None,
                }
            };
            delays.push(seen.map_or(MINUTE_MS, |s| s - m - lag));
            a.settle(m, first, seen);
        }
        (delays, extra)
    }

    #[test]
    fn the_schedule_converges_to_a_changed_lag_within_the_budget() {
        let mut a = Aligner::default();
        a.set_budget(10.0, 500.0);
        // Started 35 s into a minute: minute 0 seen, minute 1 not (lag in (35, 95] s).
        a.observe(minute(1) + 35_000, minute(0));
        let close = |d: &[i64]| d.iter().all(|d| (0..=2_000).contains(d));
        let (delays, _) = drive(&mut a, 83_000, 1..12);
        assert!(close(&delays[6..]), "{delays:?}");
        // The lag grows, then shrinks: a few minutes each to follow it.
        let (delays, _) = drive(&mut a, 95_000, 12..18);
        assert!(close(&delays[3..]), "{delays:?}");
        let (delays, _) = drive(&mut a, 70_000, 18..30);
        assert!(delays[6..].iter().all(|d| *d <= 5_000), "{delays:?}");
        assert!(close(&delays[9..]), "{delays:?}");
        // Steady: at most one extra call per minute of a 10-call plan, on average.
        let (delays, extra) = drive(&mut a, 70_000, 30..90);
        assert!(close(&delays), "{delays:?}");
        assert!(extra <= 60, "{extra} extra calls in 60 minutes");
    }

    #[test]
    fn no_budget_no_retry_and_no_exploration() {
        let mut a = Aligner::default();
        a.set_budget(10.0, 10.0);
        a.observe(minute(1) + 35_000, minute(0));
        let (firsts, extra) = drive(&mut a, 83_000, 1..6);
        assert_eq!(extra, 0);
        assert!(firsts.iter().all(|f| *f == firsts[0]), "{firsts:?}");
    }

    #[test]
    fn the_rate_window_delays_calls_past_the_limit() {
        let t = Instant::now();
        let mut w = RateWindow::default();
        for i in 0..10 {
            w.record(t + Duration::from_secs(i));
        }
        let now = t + Duration::from_secs(30);
        assert_eq!(w.fits_at(now, 5, 15), now);
        assert_eq!(w.fits_at(now, 6, 15), t + Duration::from_secs(60));
        assert_eq!(w.fits_at(now, 8, 15), t + Duration::from_secs(62));
    }
}
