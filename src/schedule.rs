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
/// A cycle whose first attempt missed without budget to ask again sends the rest this much later.
const FALLBACK_MS: i64 = 3 * RETRY_MAX_MS;
/// Missed this far past the estimate, a minute is a late one: stop re-asking, collect as usual.
const GIVE_UP_MS: i64 = 15_000;
/// After minutes seen at the first attempt, the next first attempt moves earlier by 2, 4, 8, 16 s, so a
/// shorter lag is found within a few minutes.
const DOWN_FIRST_MS: i64 = 2_000;
const DOWN_MAX_MS: i64 = 16_000;
/// Bounds of a schedule state taken from another replica: lags and offsets within 10 minutes, times
/// before 2100.
const MAX_STATE_LAG_MS: i64 = 600_000;
const MAX_STATE_TIME_MS: i64 = 4_102_444_800_000;
/// A miss this recent (minutes) bounds how early the first attempt moves: halfway to it (bisection).
const FLOOR_MINUTES: i64 = 2;
/// Extra calls allowed, as a share of the cycle's calls per minute (issue 16: ≤ 10 %).
pub const EXTRA_SHARE: f64 = 0.10;
/// The extra-call bucket holds this many minutes of budget and starts full, so learning the lag after a
/// start does not wait for it to fill; the long-run rate stays the budget.
const BUCKET_MINUTES: f64 = 10.0;
/// Re-ask step while the lag jitters: a minute is seen within this long of its publication.
const WIDE_STEP_MS: i64 = 8_000;
/// A lag jitters when, among the last this many seen minutes, one was missed later than another one
/// was seen.
const SPREAD_MINUTES: usize = 10;
const WIDE_MARGIN_MS: i64 = 2 * RETRY_MIN_MS;
/// Settled minutes needed before the budgeted first attempt is trusted.
const WIDE_SAMPLE: usize = 5;
/// Share of the re-ask budget the budgeted first attempt plans to spend; the rest absorbs bad luck.
const PLAN_SHARE: f64 = 0.8;
/// How far a full bucket stretches the planned re-asks (minutes seen at once count at their first
/// attempt, which overstates what an earlier one costs).
const FILL_MAX: f64 = 1.25;
/// Resolution of the budgeted first attempt's search.
const SEARCH_STEP_MS: i64 = 250;

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
        let cap = self.highest_pinned();
        let mut all = Vec::with_capacity(self.minutes.len());
        let mut pinned = Vec::with_capacity(self.minutes.len());
        for b in &self.minutes {
            match (b.upto, b.above) {
                (Some(u), Some(a)) if u - a <= PINNED_MS => {
                    all.push(u.max(a));
                    pinned.push(u.max(a));
                }
                (Some(u), a) => all.push(capped(u, cap).max(a.unwrap_or(i64::MIN))),
                (None, Some(a)) if b.minute_ms < newest => {
                    all.push(a);
                    pinned.push(a);
                }
                _ => {}
            }
        }
        if pinned.len() >= 3 { pinned } else { all }
    }

    /// The highest lag a recent minute was pinned at (between a miss and a hit shortly after).
    fn highest_pinned(&self) -> Option<i64> {
        self.minutes
            .iter()
            .filter_map(|b| match (b.upto, b.above) {
                (Some(u), Some(a)) if u - a <= PINNED_MS => Some(u.max(a)),
                _ => None,
            })
            .max()
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

    /// Recent minutes that are settled: (last miss, first hit) offsets; no hit for one overtaken by a
    /// newer minute before it showed.
    fn settled(&self) -> impl Iterator<Item = (Option<i64>, Option<i64>)> + '_ {
        let newest = self.newest_seen.unwrap_or(i64::MIN);
        self.minutes
            .iter()
            .filter(move |b| b.upto.is_some() || b.minute_ms < newest)
            .map(|b| (b.above, b.upto))
    }

    /// Whether the lag jitters more than a re-ask step: among the last minutes, one was missed more
    /// than `WIDE_MARGIN_MS` later than another one was seen. Minutes given up as late and never seen
    /// do not count.
    pub fn jitters(&self) -> bool {
        let recent = self.recent_seen();
        let Some(lowest_hit) = recent.iter().map(|(_, u)| *u).min() else {
            return false;
        };
        recent
            .iter()
            .any(|(a, _)| a.is_some_and(|a| a > lowest_hit + WIDE_MARGIN_MS))
    }

    /// The last seen minutes' (last miss, first hit) offsets, oldest first.
    fn recent_seen(&self) -> Vec<(Option<i64>, i64)> {
        let mut recent: Vec<(Option<i64>, i64)> = self
            .settled()
            .filter_map(|(a, u)| u.map(|u| (a, u)))
            .collect();
        recent.drain(..recent.len().saturating_sub(SPREAD_MINUTES));
        recent
    }

    /// Where one lag fits the newest minutes seen (two at least): above the latest miss, at most
    /// the earliest hit among them. A constant lag narrows it minute by minute.
    pub fn stable_bounds(&self) -> Option<(Option<i64>, i64)> {
        let (mut above, mut upto, mut n) = (None, i64::MAX, 0);
        for (a, u) in self.recent_seen().iter().rev() {
            let (a2, u2) = (above.max(*a), upto.min(*u));
            if a2.is_some_and(|a2| a2 >= u2) {
                break;
            }
            (above, upto, n) = (a2, u2, n + 1);
        }
        (n >= 2).then_some((above, upto))
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
    /// The latest offset at which each recent target minute was missed (minute, offset). Only the
    /// aligner knows which minute an ask was for: the estimator also sees the minute after it missed,
    /// asked long before it was due.
    misses: VecDeque<(i64, i64)>,
    /// The last minute showed far past its first attempt and did not move the edge.
    held_jump: bool,
    /// The last minute some of whose series were asked again (a probe's or late series' re-ask).
    reasked_minute: Option<i64>,
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
            misses: VecDeque::new(),
            held_jump: false,
            reasked_minute: None,
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

    /// When (Unix ms) to first ask for `minute_ms`; `None` while nothing is known: at the edge the
    /// last minutes found (which moves earlier after minutes seen at once), and while the lag jitters no
    /// later than the re-ask budget allows ([`Aligner::budgeted_offset`]).
    pub fn first_attempt(&self, minute_ms: i64) -> Option<i64> {
        let edge = self.offset_ms.or_else(|| self.est.estimate_ms());
        match (self.budgeted_offset(), edge) {
            // The edge search may explore below the budgeted attempt, but not below where recent
            // minutes were seen: a jittered minute asked far too early is re-asked until the
            // probe's deadline and then missed by the whole cycle.
            (Some(b), Some(e)) => Some(b.min(e.max(self.wide_floor().unwrap_or(e)))),
            (b, e) => b.or(e),
        }
        .map(|o| minute_ms.saturating_add(o))
    }

    /// Where minutes still missing are given up as late ones (offset after their timestamp).
    fn give_up_ms(&self) -> Option<i64> {
        self.est.estimate_ms().map(|e| e + GIVE_UP_MS)
    }

    /// While the lag jitters (and re-asks are budgeted): the earliest first attempt whose re-asks, every
    /// 8 s until the minute shows or is given up, would have fit the budget over the recent minutes.
    /// A minute seen at its first attempt counts as if its lag were that attempt (all that is known:
    /// at most that), so the offset only moves below where minutes were seen as far as the budget pays
    /// for the worst case; moving there shows where their lags really were. A minute never seen costs
    /// every re-ask until it is given up.
    pub fn budgeted_offset(&self) -> Option<i64> {
        if self.budget <= 0.0 || !self.est.jitters() {
            return None;
        }
        let give_up = self.give_up_ms()?;
        let cap = self.est.highest_pinned();
        let hits: Vec<Option<i64>> = self
            .est
            .settled()
            .map(|(a, u)| u.map(|u| capped(u, cap).max(a.unwrap_or(i64::MIN))))
            .collect();
        if hits.len() < WIDE_SAMPLE {
            return None;
        }
        // The cost counts minutes seen at once at their first attempt, so it overstates what moving
        // earlier costs: a bucket fuller than half says so, and lets the offset move further.
        let fill = (self.tokens / (self.capacity() / 2.0)).clamp(0.5, FILL_MAX);
        let target = self.budget * PLAN_SHARE * fill * hits.len() as f64;
        let cost = |o: i64| -> f64 {
            hits.iter()
                .map(|h| reasks(o, *h, give_up) as f64)
                .sum::<f64>()
        };
        let top = self.est.estimate_ms()?;
        let floor = self.wide_floor().unwrap_or(top);
        let mut best = top;
        let mut o = top - SEARCH_STEP_MS;
        while o >= floor && cost(o) <= target {
            best = o;
            o -= SEARCH_STEP_MS;
        }
        Some(best)
    }

    /// Notes that a target minute was missed at `offset`.
    fn missed(&mut self, minute_ms: i64, offset: i64) {
        match self.misses.back_mut() {
            Some((m, o)) if *m == minute_ms => *o = (*o).max(offset),
            _ => self.misses.push_back((minute_ms, offset)),
        }
        while self.misses.len() > FLOOR_MINUTES as usize + 1 {
            self.misses.pop_front();
        }
    }

    /// The latest offset at which a target minute from `minute_ms - FLOOR_MINUTES` to `minute_ms` was
    /// missed.
    fn recent_floor(&self, minute_ms: i64) -> Option<i64> {
        let from = minute_ms - FLOOR_MINUTES * MINUTE_MS;
        self.misses
            .iter()
            .filter(|(m, _)| (from..=minute_ms).contains(m))
            .map(|(_, o)| *o)
            .max()
    }

    /// Half a step below the earliest recent hit: as early as a first attempt can usefully go while
    /// the lag jitters.
    fn wide_floor(&self) -> Option<i64> {
        self.est
            .settled()
            .filter_map(|(_, u)| u)
            .min()
            .map(|h| h - WIDE_STEP_MS / 2)
    }

    /// After an attempt at `asked_ms` missed `minute_ms`: when to ask again, spending one extra call;
    /// `None` when the budget is empty or the minute is late past the estimate.
    pub fn retry(&mut self, minute_ms: i64, asked_ms: i64) -> Option<i64> {
        self.missed(minute_ms, asked_ms - minute_ms);
        self.reasked_minute = Some(minute_ms);
        if self.late(minute_ms, asked_ms) {
            return None;
        }
        if self.budgeted_offset().is_some() {
            // Land on where the last minutes were seen rather than step past it, and where one lag
            // fits the last minutes: its upper end, and its middle while wide (a bisection, so a lag
            // that stopped jittering is met closely).
            let (stable_mid, stable_top) = match self.est.stable_bounds() {
                Some((Some(a), u)) if u - a > 2 * RETRY_MIN_MS => (Some(a / 2 + u / 2), Some(u)),
                Some((_, u)) => (None, Some(u)),
                None => (None, None),
            };
            let next = [stable_mid, stable_top, self.offset_ms, self.last_seen_ms]
                .into_iter()
                .flatten()
                .map(|e| minute_ms + e)
                .filter(|e| *e > asked_ms)
                .fold(asked_ms + WIDE_STEP_MS, i64::min);
            return self.spend(1).then_some(next);
        }
        let missed = asked_ms - minute_ms;
        let good = self
            .last_seen_ms
            .or(self.est.estimate_ms())
            .unwrap_or(missed + RETRY_MAX_MS);
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

    /// Some series' new minute was not there at `asked_ms` while others' was: when to ask them again
    /// in `calls` calls, paid from the budget; `None` when it cannot pay or the minute is given up.
    pub fn reask_series(&mut self, minute_ms: i64, asked_ms: i64, calls: usize) -> Option<i64> {
        self.reasked_minute = Some(minute_ms);
        if self.late(minute_ms, asked_ms) {
            return None;
        }
        self.spend(calls).then_some(asked_ms + RETRY_MAX_MS)
    }

    /// Whether a minute still missing at `asked_ms` is a late one (past the estimate by a margin).
    pub fn late(&self, minute_ms: i64, asked_ms: i64) -> bool {
        self.est
            .estimate_ms()
            .is_some_and(|good| asked_ms - minute_ms >= good + GIVE_UP_MS)
    }

    /// When to send the rest of a cycle whose first attempt missed and cannot be repeated: a few
    /// re-ask steps later (the most a hit costs in delay), so the rest is not sent before the minute
    /// and left to the next cycle, where a newer minute would overtake it; at once when it is late.
    pub fn fallback(&self, minute_ms: i64, asked_ms: i64) -> i64 {
        match self.est.estimate_ms() {
            Some(_) if !self.late(minute_ms, asked_ms) => asked_ms + FALLBACK_MS,
            _ => asked_ms,
        }
    }

    /// The minute was first asked at `first_ms` and seen at `seen_ms` (`None`: not this cycle). Moves
    /// the next first attempt: earlier after a minute seen at once ([`Aligner::explore_below`]); to
    /// where it was seen after misses (a single minute seen far later does not move it).
    pub fn settle(&mut self, minute_ms: i64, first_ms: i64, seen_ms: Option<i64>) {
        let first = first_ms - minute_ms;
        if let Some(s) = seen_ms {
            self.last_seen_ms = Some(s - minute_ms);
        }
        match seen_ms {
            Some(s) if s <= first_ms => {
                self.held_jump = false;
                self.explore_below(minute_ms, first);
            }
            Some(s) => {
                // To where it showed; but a minute shown more than the give-up margin past its first
                // attempt was most likely a late one (the estimate that gives it up may still be
                // loose after a start): only a second one in a row says the lag jumped.
                let jump = s - first_ms > GIVE_UP_MS && self.offset_ms.is_some();
                if !jump || self.held_jump {
                    self.offset_ms = Some(s - minute_ms);
                }
                self.held_jump = jump && !self.held_jump;
                self.down_ms = DOWN_FIRST_MS;
            }
            None => {
                self.offset_ms.get_or_insert(first);
                self.down_ms = DOWN_FIRST_MS;
            }
        }
    }

    /// After a minute seen at once at offset `first`: where the next first attempt goes. Halfway to a
    /// recent miss (bisection) while that is more than a second away; at the edge so found (or with no
    /// recent miss), step down (2, 4, 8, 16 s over minutes seen at once) once the last miss is paid
    /// for twice over. Stepping below the edge is how a shorter lag is found, and the only way edge
    /// search sees a jittered lag's minutes below the edge, i.e. learns that it jitters. Never further
    /// than the budget in hand pays for.
    fn explore_below(&mut self, minute_ms: i64, first: i64) {
        self.offset_ms = Some(first);
        if self.tokens < 1.0 {
            return;
        }
        // Finding the lag again below costs about one re-ask per halving of the step.
        let affordable = (DOWN_FIRST_MS / 2) << (self.tokens.floor() as u32).min(5);
        // A step below a found edge costs a constant lag one re-ask when it misses: after a re-ask,
        // the next step waits until the budget has paid for two, so exploring leaves at least half
        // of it to minutes (or series) that come late.
        let wait = (2.0 / self.budget.max(1e-9) * MINUTE_MS as f64) as i64;
        let due = self.reasked_minute.is_none_or(|m| minute_ms - m >= wait);
        // Before any miss of its own, what the start showed bounds the search from below.
        let start_floor = || match self.misses.is_empty() {
            true => self.est.stable_bounds().and_then(|(a, _)| a),
            false => None,
        };
        let floor = self
            .recent_floor(minute_ms)
            .or_else(start_floor)
            .filter(|f| *f < first);
        let next = match floor {
            Some(f) if first - f > RETRY_MIN_MS => (first + f) / 2,
            _ if !due => {
                self.down_ms = DOWN_FIRST_MS;
                return;
            }
            _ => first - self.down_ms,
        };
        self.offset_ms = Some(next.max(first - affordable));
        self.down_ms = (self.down_ms * 2).min(DOWN_MAX_MS);
    }
}

/// A minute seen at once bounds its lag by when it was asked, which after a start (a search from far
/// above) can be much later than any lag seen since: above the highest pinned lag, it counts at that.
fn capped(upto: i64, highest_pinned: Option<i64>) -> i64 {
    highest_pinned.map_or(upto, |p| upto.min(p))
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn parse_opt(s: &str) -> Option<Option<i64>> {
    match s {
        "-" => Some(None),
        v => v.parse().ok().map(Some),
    }
}

impl Aligner {
    /// The schedule's state on one line, so a successor continues it where the previous leader left it
    /// (the warm copy): the lag evidence of the recent minutes, the first attempt's offset and the
    /// re-ask bucket (a new leader with a full bucket would spend the budget twice).
    pub fn to_line(&self) -> String {
        let mut line = format!(
            "{} {} {} {} {} {} {} {}",
            opt(self.offset_ms),
            self.down_ms,
            opt(self.last_seen_ms),
            self.tokens,
            self.budget,
            opt(self.est.newest_seen),
            u8::from(self.held_jump),
            opt(self.reasked_minute)
        );
        for b in &self.est.minutes {
            line.push_str(&format!(
                " b{},{},{}",
                b.minute_ms,
                opt(b.above),
                opt(b.upto)
            ));
        }
        for (minute, offset) in &self.misses {
            line.push_str(&format!(" m{minute},{offset}"));
        }
        line
    }

    /// The state [`Aligner::to_line`] wrote; `None` when the line does not parse.
    pub fn from_line(line: &str) -> Option<Aligner> {
        let mut f = line.split(' ');
        let mut next = || f.next();
        let offset_ms = parse_opt(next()?)?;
        let down_ms = next()?.parse().ok()?;
        let last_seen_ms = parse_opt(next()?)?;
        let (tokens, budget): (f64, f64) = (next()?.parse().ok()?, next()?.parse().ok()?);
        let newest_seen = parse_opt(next()?)?;
        let held_jump = next()? == "1";
        let reasked_minute = parse_opt(next()?)?;
        let (mut minutes, mut misses) = (VecDeque::new(), VecDeque::new());
        for item in f {
            let mut p = item.get(1..)?.split(',');
            match item.as_bytes().first()? {
                b'b' => minutes.push_back(Bounds {
                    minute_ms: p.next()?.parse().ok()?,
                    above: parse_opt(p.next()?)?,
                    upto: parse_opt(p.next()?)?,
                }),
                b'm' => misses.push_back((p.next()?.parse().ok()?, p.next()?.parse().ok()?)),
                _ => return None,
            }
        }
        // The line comes from another process: values no schedule of ours produces are refused, so an
        // adopted state can neither park collection (an offset of years) nor overflow the arithmetic.
        let lag =
            |v: Option<i64>| v.is_none_or(|v| v.unsigned_abs() <= MAX_STATE_LAG_MS.unsigned_abs());
        let time = |v: i64| (0..=MAX_STATE_TIME_MS).contains(&v);
        let sane = [offset_ms, last_seen_ms].into_iter().all(lag)
            && (0..=DOWN_MAX_MS).contains(&down_ms)
            && [tokens, budget]
                .iter()
                .all(|t| t.is_finite() && (0.0..=1e6).contains(t))
            && [newest_seen, reasked_minute]
                .into_iter()
                .all(|t| t.is_none_or(time))
            && minutes
                .iter()
                .all(|b: &Bounds| time(b.minute_ms) && lag(b.above) && lag(b.upto))
            && misses.iter().all(|(m, o)| time(*m) && lag(Some(*o)));
        if !sane {
            return None;
        }
        Some(Aligner {
            est: LagEstimator {
                minutes,
                newest_seen,
            },
            offset_ms,
            down_ms,
            last_seen_ms,
            tokens,
            budget,
            misses,
            held_jump,
            reasked_minute,
        })
    }
}

/// Re-asks a minute of lag `lag` (`None`: never seen) needs when first asked at offset `first`, then
/// every [`WIDE_STEP_MS`] while the last miss was before `give_up`.
fn reasks(first: i64, lag: Option<i64>, give_up: i64) -> i64 {
    // Steps to cover a positive span.
    let steps = |span: i64| (span.max(0) + WIDE_STEP_MS - 1) / WIDE_STEP_MS;
    let most = steps(give_up - first);
    match lag {
        Some(l) => steps(l - first).min(most),
        None => most,
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
        drive_with(a, |_| lag, minutes)
    }

    /// [`drive`] with a lag per minute (`lag(minute_ms)`, ms).
    fn drive_with(
        a: &mut Aligner,
        lag: impl Fn(i64) -> i64,
        minutes: std::ops::Range<i64>,
    ) -> (Vec<i64>, usize) {
        let mut delays = Vec::new();
        let mut extra = 0;
        for i in minutes {
            a.refill(1.0);
            let m = minute(i);
            let lag = lag(m);
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

    /// Issue 16's jittered lag: 68–98 s drawn per minute, about one minute in ten 60 s later still.
    #[cfg(feature = "sim")]
    fn jittered(seed: u64) -> crate::sim::publication::Publication {
        crate::sim::publication::Publication {
            base: Duration::from_secs(68),
            jitter: Duration::from_secs(30),
            late_every: 10,
            late_by: Duration::from_secs(60),
            seed,
        }
    }

    #[cfg(feature = "sim")]
    #[test]
    fn a_jittered_lag_is_met_by_budgeted_re_asks() {
        for seed in [16, 17, 18] {
            let p = jittered(seed);
            // A 26-call plan (1,000 listeners): 2.6 re-asks a minute.
            let mut a = Aligner::default();
            a.set_budget(26.0, 500.0);
            a.observe(minute(1) + 35_000, minute(0));
            let (_, warm) = drive_with(&mut a, |m| p.lag_ms(m), 1..13);
            let (delays, extra) = drive_with(&mut a, |m| p.lag_ms(m), 13..73);
            let mut on_time: Vec<i64> = (13..73)
                .zip(&delays)
                .filter(|(i, _)| !p.is_late(minute(*i)))
                .map(|(_, d)| *d)
                .collect();
            on_time.sort_unstable();
            let p90 = on_time[on_time.len() * 9 / 10];
            assert!(p90 <= 8_000, "seed {seed}: p90 {p90} ms of {delays:?}");
            // Never more than the budget: 2.6 a minute plus the bucket's 26 it starts with.
            assert!(
                (warm + extra) as f64 <= 2.6 * 72.0 + 26.0 + 1e-9,
                "seed {seed}: {} re-asks in 72 minutes",
                warm + extra
            );
        }
    }

    #[cfg(feature = "sim")]
    #[test]
    fn re_asks_never_exceed_the_budget() {
        for (calls, seed) in [(3.0, 16), (3.0, 17), (10.0, 18), (26.0, 19)] {
            let p = jittered(seed);
            let mut a = Aligner::default();
            a.set_budget(calls, 500.0);
            a.observe(minute(1) + 35_000, minute(0));
            // The lag jitters, then holds, then jitters again.
            let (_, e1) = drive_with(&mut a, |m| p.lag_ms(m), 1..31);
            let (_, e2) = drive(&mut a, 83_000, 31..51);
            let (_, e3) = drive_with(&mut a, |m| p.lag_ms(m), 51..91);
            let extra = (e1 + e2 + e3) as f64;
            let allowed = calls * EXTRA_SHARE * (90.0 + BUCKET_MINUTES);
            assert!(
                extra <= allowed + 1e-9,
                "{calls} calls: {extra} re-asks, {allowed} allowed"
            );
        }
    }

    /// One started exporter as the collector drives its aligner: a first cycle at once, `phase_ms` into
    /// minute 0; then one aligned cycle per minute, at least half a minute after the last one, whose
    /// probe re-asks within the budget until the probe's deadline (0.6 of the 60 s cycle), then sends
    /// the rest, which shows the minute if it is published by then. Returns, per minute asked, (minute
    /// index, delay from publication to when it was seen, whether the aligner was in the jittered
    /// regime when it planned that minute's first attempt).
    #[cfg(feature = "sim")]
    fn started_at(
        phase_ms: i64,
        p: &crate::sim::publication::Publication,
        calls: f64,
        minutes: i64,
    ) -> Vec<(i64, Option<i64>, bool)> {
        let mut a = Aligner::default();
        a.set_budget(calls, 500.0);
        let mut now = minute(0) + phase_ms;
        let (mut last_start, mut last_refill) = (now, now);
        let mut next = p.newest(now) + MINUTE_MS;
        a.observe(now, p.newest(now));
        let mut out = Vec::new();
        while next < minute(minutes) {
            let m = next;
            let Some(first) = a.first_attempt(m) else {
                break;
            };
            if first < last_start + MINUTE_MS / 2 {
                next += MINUTE_MS;
                continue;
            }
            let jittered = a.budgeted_offset().is_some();
            a.set_budget(calls, 500.0);
            a.refill((first - last_refill) as f64 / MINUTE_MS as f64);
            (last_start, last_refill, now) = (first, first, first);
            let deadline = first + MINUTE_MS * 6 / 10;
            let seen = loop {
                a.observe(now, p.newest(now));
                // As the collector counts it: a newer minute than the one asked for counts as seen.
                if p.newest(now) >= m {
                    break Some(now);
                }
                match a.retry(m, now) {
                    Some(at) if at < deadline => now = at,
                    retry => {
                        // The rest of the cycle: at the deadline, or a fallback's later send.
                        now = if retry.is_some() {
                            deadline
                        } else {
                            a.fallback(m, now)
                        };
                        a.observe(now, p.newest(now));
                        break (p.newest(now) >= m).then_some(now);
                    }
                }
            };
            a.settle(m, first, seen);
            out.push((
                (m - minute(0)) / MINUTE_MS,
                seen.map(|s| s - p.published_at(m)),
                jittered,
            ));
            next = m.max(p.newest(now)) + MINUTE_MS;
        }
        out
    }

    /// The 0.9 quantile of the delays (ms) of the on-time minutes from `from` to `to` (a minute never
    /// seen in its cycle counts a minute).
    #[cfg(feature = "sim")]
    fn p90(
        runs: &[(i64, Option<i64>, bool)],
        p: &crate::sim::publication::Publication,
        from: i64,
        to: i64,
    ) -> i64 {
        let mut d: Vec<i64> = runs
            .iter()
            .filter(|(i, _, _)| (from..to).contains(i) && !p.is_late(minute(*i)))
            .map(|(_, d, _)| d.unwrap_or(MINUTE_MS))
            .collect();
        d.sort_unstable();
        d.get(d.len() * 9 / 10).copied().unwrap_or(i64::MAX)
    }

    #[cfg(feature = "sim")]
    #[test]
    fn a_jittered_lag_is_met_from_any_start_phase() {
        // The benchmark's lag (seed 16) and two more; every start phase of issue 16's table. A 26-call
        // plan (1,000 listeners). Measured like the benchmark: after 10 minutes, 15 minutes.
        for seed in [16, 17, 18] {
            let p = jittered(seed);
            for phase in [0, 5, 10, 20, 30, 45, 55] {
                let runs = started_at(phase * 1_000, &p, 26.0, 26);
                let switched = runs.iter().find(|r| r.2).map(|r| r.0);
                assert!(
                    switched.is_some_and(|i| i <= 12),
                    "seed {seed}, phase {phase} s: jitter found at minute {switched:?}"
                );
                // Every on-time minute is in the figures (none skipped or cut off by the driver).
                let absent: Vec<i64> = (10..25)
                    .filter(|i| !p.is_late(minute(*i)) && !runs.iter().any(|r| r.0 == *i))
                    .collect();
                assert!(
                    absent.is_empty(),
                    "seed {seed}, phase {phase} s: {absent:?} absent"
                );
                let p90 = p90(&runs, &p, 10, 25);
                assert!(
                    p90 <= 10_000,
                    "seed {seed}, phase {phase} s: p90 {p90} ms over minutes 10..25: {runs:?}"
                );
                // No on-time minute is asked so early that its cycle misses it (a newer one would
                // overtake it).
                let missed: Vec<i64> = runs
                    .iter()
                    .filter(|(i, d, _)| *i >= 10 && d.is_none() && !p.is_late(minute(*i)))
                    .map(|r| r.0)
                    .collect();
                assert!(
                    missed.is_empty(),
                    "seed {seed}, phase {phase} s: {missed:?} missed"
                );
            }
        }
    }

    #[test]
    fn minutes_seen_at_once_far_above_the_lag_do_not_inflate_the_estimate() {
        // After a start 5 s into a minute the first attempts come down from 125 s, each seen at once;
        // then a minute is pinned between a miss at 95 s and a hit at 100 s, two more seen at once.
        let mut e = LagEstimator::default();
        for (i, at) in [(0, 125_000), (1, 123_000), (2, 119_000), (3, 111_000)] {
            e.observe(minute(i) + at, minute(i));
        }
        e.observe(minute(4) + 95_000, minute(3));
        e.observe(minute(4) + 100_000, minute(4));
        e.observe(minute(5) + 100_000, minute(5));
        e.observe(minute(6) + 98_000, minute(6));
        // Only upper bounds above 100 s said more: the estimate is the lag seen since.
        assert_eq!(e.estimate_ms(), Some(100_000));
    }

    #[test]
    fn one_minute_seen_far_past_its_first_attempt_does_not_drag_the_edge() {
        let mut a = Aligner::default();
        a.set_budget(26.0, 500.0);
        a.observe(minute(1) + 35_000, minute(0));
        let (delays, _) = drive(&mut a, 83_000, 1..12);
        assert!(delays[6..].iter().all(|d| *d <= 2_000), "{delays:?}");
        let edge = a.first_attempt(minute(12)).expect("known") - minute(12);
        // Minute 12 is a late one, missed until the rest of its cycle found it 40 s later.
        let first = minute(12) + edge;
        a.observe(first, minute(11));
        a.settle(minute(12), first, Some(first + 40_000));
        let next = a.first_attempt(minute(13)).expect("known") - minute(13);
        assert!(next <= edge, "edge {edge} ms, next first attempt {next} ms");
        // A second one in a row: the lag jumped, the edge follows.
        a.observe(minute(13) + next, minute(12));
        a.settle(
            minute(13),
            minute(13) + next,
            Some(minute(13) + next + 40_000),
        );
        let after = a.first_attempt(minute(14)).expect("known") - minute(14);
        assert_eq!(after, next + 40_000);
    }

    #[cfg(feature = "sim")]
    #[test]
    fn a_constant_lag_is_found_within_minutes_of_any_start() {
        // The search halves the way between the start's bounds: within 2 s of the lag from minute 3
        // on at 26 calls a cycle; at 3 (100 listeners) its steps are what the budget pays, minute 7.
        let p = crate::sim::publication::Publication::constant(Duration::from_secs(83));
        for (calls, from) in [(3.0, 7), (26.0, 3)] {
            for phase in [0, 5, 10, 20, 30, 45, 55] {
                let runs = started_at(phase * 1_000, &p, calls, 20);
                // A minute never seen in its cycle is as slow as any, and none may be left out.
                let slow = runs
                    .iter()
                    .filter(|r| r.0 >= from && r.1.is_none_or(|d| d > 2_000));
                assert_eq!(slow.count(), 0, "{calls} calls, phase {phase} s: {runs:?}");
                let asked: Vec<i64> = runs.iter().map(|r| r.0).filter(|i| *i >= from).collect();
                assert_eq!(
                    asked,
                    (from..20).collect::<Vec<_>>(),
                    "{calls} calls, phase {phase} s"
                );
            }
        }
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

    /// A state line from another replica round-trips, and values no schedule produces are refused:
    /// an offset of years would park the next cycle, huge ones overflow the arithmetic.
    #[test]
    fn a_schedule_line_from_another_process_is_checked() {
        let mut a = Aligner::default();
        a.set_budget(26.0, 300.0);
        for m in 0..5 {
            let minute = 1_800_000_000_000 + m * MINUTE_MS;
            a.observe(minute + 80_000, minute - MINUTE_MS);
            a.observe(minute + 86_000, minute);
            a.settle(minute, minute + 80_000, Some(minute + 86_000));
        }
        let line = a.to_line();
        let back = Aligner::from_line(&line).expect("its own line parses");
        assert_eq!(back.to_line(), line);
        let fields: Vec<&str> = line.split(' ').collect();
        let with = |i: usize, v: &str| {
            let mut f = fields.clone();
            f[i] = v;
            f.join(" ")
        };
        for (i, bad) in [
            (0, "9223372036854775807"),
            (1, "-1"),
            (1, "99999999"),
            (2, "-9223372036854775808"),
            (3, "NaN"),
            (3, "inf"),
            (4, "-1"),
            (5, "-5"),
            (7, "9223372036854775807"),
        ] {
            assert!(
                Aligner::from_line(&with(i, bad)).is_none(),
                "field {i} = {bad}"
            );
        }
        let minute = fields
            .iter()
            .position(|f| f.starts_with('b'))
            .expect("bounds");
        for bad in ["b-1,-,-", "b1800000000000,9223372036854775807,-", "bx,-,-"] {
            assert!(Aligner::from_line(&with(minute, bad)).is_none(), "{bad}");
        }
        assert!(Aligner::from_line(&format!("{line} m1800000000000,-700000")).is_none());
        assert!(Aligner::from_line(&format!("{line} m1800000000000,-7000")).is_some());
    }
}
