//! Background collection: every interval, every attributed listener × metric is queried from CES in the
//! fewest batch calls (packed across all load balancers), the newest datapoint per series is kept, and
//! the whole result is swapped in atomically. Listeners that appear between ticks are collected at once.

use crate::clock::now_ms;
use crate::cloud::Operation;
use crate::cloud::{BatchQuery, CloudApi, CloudError, Datapoint, Lane, MetricQuery};
use crate::config::{Config, Filter};
use crate::discovery::inventory::Targets;
use crate::leader::{Lead, Leadership};
use crate::schedule::{Aligner, MINUTE_MS, RateWindow};
use crate::telemetry::Telemetry;
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The CES namespace of ELB metrics.
pub const NAMESPACE: &str = "SYS.ELB";
/// Debounce before collecting newly attributed listeners, so a burst of Services costs one call.
const NEW_LISTENER_DELAY: Duration = Duration::from_millis(200);

/// The newest datapoint of one series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The datapoint's value.
    pub value: f64,
    /// The minute it covers, Unix ms.
    pub timestamp_ms: i64,
    /// When CES last returned it: the staleness bound is an age, checked when the body is rendered.
    pub fetched: Instant,
}

/// Index into the configured metrics: `collection.metrics` for a listener, `collection.metrics.len()` +
/// the index into `collection.pool_metrics` for a pool. Two bytes, as a snapshot holds one per series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricIndex(pub u16);

impl MetricIndex {
    /// The index of position `i` in the metric lists (validated config keeps them far below 65536).
    pub fn new(i: usize) -> Self {
        MetricIndex(i as u16)
    }
}

/// One series: which listener or pool, which metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    /// Listener or pool id.
    pub id: Arc<str>,
    /// Which of the configured metrics.
    pub metric: MetricIndex,
}

impl SeriesKey {
    /// The series of metric position `metric` (see [`MetricIndex`]) of listener or pool `id`.
    pub fn new(id: Arc<str>, metric: usize) -> Self {
        SeriesKey {
            id,
            metric: MetricIndex::new(metric),
        }
    }
}

/// The result of collection, published as a whole.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Number of the last full cycle; prompt collections carry the current one.
    pub cycle: u64,
    /// Values of the last full cycle, shared (not copied) by the snapshots that follow it.
    pub values: Arc<HashMap<SeriesKey, Sample>>,
    /// Values of listeners collected promptly since the last full cycle (small).
    pub extra: Arc<HashMap<SeriesKey, Sample>>,
    /// A full collection cycle has finished (successfully or not).
    pub first_cycle_done: bool,
    /// The last full cycle succeeded completely.
    pub up: bool,
    /// How long a value is served after CES returned it: `stale_intervals` × the cycle period (the
    /// interval, or the longer period cycles are paced to); `None` leaves it to the renderer.
    pub stale_after: Option<Duration>,
    /// The aligned schedule as the last full cycle left it, handed to a successor with the warm copy.
    pub schedule: Option<Arc<Aligner>>,
}

impl Snapshot {
    /// The value of `key`, from a prompt collection since the last full cycle if it has one.
    pub fn get(&self, key: &SeriesKey) -> Option<&Sample> {
        self.extra.get(key).or_else(|| self.values.get(key))
    }

    /// Series with a value.
    pub fn len(&self) -> usize {
        self.values.len()
            + self
                .extra
                .keys()
                .filter(|k| !self.values.contains_key(*k))
                .count()
    }

    /// No series has a value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What to collect and how.
#[derive(Debug, Clone)]
pub struct CollectorSettings {
    /// `collection.metrics`: CES metric names collected for every attributed listener.
    pub metrics: Arc<Vec<String>>,
    /// `collection.pool_metrics`: collected for every attributed pool.
    pub pool_metrics: Arc<Vec<String>>,
    /// `collection.filter`: the CES aggregation asked for.
    pub filter: Filter,
    /// `collection.interval`: start to start of full cycles.
    pub interval: Duration,
    /// `collection.lookback`: the CES window each query covers.
    pub lookback: Duration,
    /// Metrics per CES call.
    pub batch_size: usize,
    /// `collection.stale_intervals`: cycle periods a value outlives its last fetch.
    pub stale_intervals: u32,
    /// CES calls in flight at once.
    pub concurrency: usize,
    /// The CES rate limit (calls per minute) the cycles are planned against.
    pub ces_per_minute: u32,
    /// `collection.absent_as_zero`: see [`ZeroGuard`].
    pub absent_as_zero: bool,
    /// `collection.align`: start cycles when Cloud Eye is expected to publish the next minute.
    pub align: bool,
    /// Wall time source for CES windows and the schedule.
    pub clock: WallClock,
}

/// Wall time, for CES windows and the schedule. `System` in production; tests and benchmarks on tokio's
/// paused clock use `Virtual`, a wall clock that advances with tokio time from a fixed reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WallClock {
    /// The system clock.
    System,
    /// A clock advancing with tokio time (paused in tests) from a fixed reading.
    Virtual {
        /// The reading at `at`, Unix ms.
        start_ms: i64,
        /// The tokio instant the clock was started at.
        at: Instant,
    },
}

impl WallClock {
    /// A virtual clock reading `start_ms` now.
    pub fn virtual_from(start_ms: i64) -> Self {
        WallClock::Virtual {
            start_ms,
            at: Instant::now(),
        }
    }

    /// Unix ms now, by this clock.
    pub fn now_ms(&self) -> i64 {
        match self {
            WallClock::System => now_ms(),
            WallClock::Virtual { start_ms, at } => {
                let since = i64::try_from(at.elapsed().as_millis()).unwrap_or(i64::MAX / 4);
                start_ms.saturating_add(since)
            }
        }
    }

    /// The instant at which the clock reads `ms` (now, when that is past).
    pub fn instant_at(&self, ms: i64) -> Instant {
        let ahead = ms.saturating_sub(self.now_ms()).max(0).unsigned_abs();
        Instant::now() + Duration::from_millis(ahead)
    }
}

impl CollectorSettings {
    /// The settings `c` configures, on the system clock.
    pub fn from_config(c: &Config) -> Self {
        CollectorSettings {
            metrics: Arc::new(c.collection.metrics.clone()),
            pool_metrics: Arc::new(c.collection.pool_metrics.clone()),
            filter: c.collection.filter,
            interval: c.collection.interval,
            lookback: c.collection.lookback,
            batch_size: c.effective_batch_size(),
            stale_intervals: c.collection.stale_intervals,
            concurrency: c.cloud.max_concurrency,
            ces_per_minute: c.cloud.rate_limit.ces_per_minute,
            absent_as_zero: c.collection.absent_as_zero,
            align: c.collection.align,
            clock: WallClock::System,
        }
    }

    /// Whether cycles follow Cloud Eye's publication: asked for, the interval a whole number of minutes,
    /// and the plan within the CES budget (a paced plan keeps its fixed period).
    pub fn aligned(&self, plan: &CyclePlan) -> bool {
        let secs = self.interval.as_secs();
        self.align
            && secs >= 60
            && secs.is_multiple_of(60)
            && self.interval.subsec_nanos() == 0
            && !plan.over_budget
    }

    /// How long a value keeps being served after CES last returned it, when cycles run every `period`.
    pub fn stale_after(&self, period: Duration) -> Duration {
        period.saturating_mul(self.stale_intervals)
    }
}

/// What a full cycle of `calls` CES calls may take, and how often it can run within the rate limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CyclePlan {
    /// CES calls one full cycle needs.
    pub calls: usize,
    /// A cycle still running after this is cut: the larger of the interval and the time the rate limit
    /// needs to let `calls` through at its steady rate, so pacing by the budget alone never cuts a cycle.
    pub deadline: Duration,
    /// Start to start: the interval, stretched when the calls do not fit the budget in one interval.
    pub period: Duration,
    /// The calls exceed the CES budget of one interval.
    pub over_budget: bool,
}

impl CyclePlan {
    /// Plans `calls` calls per `interval` under a limit of `per_minute`.
    pub fn new(calls: usize, interval: Duration, per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        // The steady rate the limit allows: a cycle that needs longer is paced, not cut.
        let needed = Duration::from_secs_f64((calls as f64 * 60.0 / per_minute).ceil());
        let period = interval.max(needed);
        CyclePlan {
            calls,
            deadline: period,
            period,
            over_budget: needed > interval,
        }
    }
}

/// The opt-in `collection.absent_as_zero`. A series without a datapoint is exported as 0 only when all hold:
/// the call succeeded (only answers reach `merge`); the same answer has a fresh datapoint (inside the lookback)
/// for another series, so CES is ingesting - an ingestion gap leaves every series empty and exports nothing;
/// and its listener has been answered continuously for longer than the lookback, so a new listener that CES
/// has no data for yet stays absent. A listener missing from a whole cycle (detached, or its batch failed)
/// starts afresh.
#[derive(Debug, Default)]
pub struct ZeroGuard {
    enabled: bool,
    lookback_ms: i64,
    /// Listener -> (first answered, unix ms; last cycle answered).
    seen: HashMap<Arc<str>, (i64, u64)>,
    pruned_at: u64,
}

impl ZeroGuard {
    /// A guard doing nothing unless `enabled`; listeners must be answered longer than `lookback`.
    pub fn new(enabled: bool, lookback: Duration) -> Self {
        ZeroGuard {
            enabled,
            lookback_ms: i64::try_from(lookback.as_millis()).unwrap_or(i64::MAX),
            ..ZeroGuard::default()
        }
    }

    fn observe(&mut self, keys: &[SeriesKey], cycle: u64, now_ms: i64) {
        if !self.enabled {
            return;
        }
        if cycle > self.pruned_at {
            self.seen.retain(|_, (_, last)| *last + 1 >= cycle);
            self.pruned_at = cycle;
        }
        for SeriesKey { id: listener, .. } in keys {
            let e = self.seen.entry(listener.clone()).or_insert((now_ms, cycle));
            if e.1 + 1 < cycle {
                e.0 = now_ms;
            }
            e.1 = e.1.max(cycle);
        }
    }

    fn zero_allowed(&self, listener: &str, now_ms: i64) -> bool {
        self.enabled
            && self
                .seen
                .get(listener)
                .is_some_and(|(first, _)| now_ms.saturating_sub(*first) > self.lookback_ms)
    }
}

/// Records the datapoints of one answered batch. A series without a datapoint stays absent, unless the
/// [`ZeroGuard`] allows a 0 (stamped with the answer's newest fresh datapoint, so it never looks fresher
/// than the data that proved CES was ingesting).
fn merge(
    values: &mut HashMap<SeriesKey, Sample>,
    keys: Vec<SeriesKey>,
    points: Vec<Option<Datapoint>>,
    fetched: Instant,
    cycle: u64,
    zeros: &Mutex<ZeroGuard>,
    now_ms: i64,
) {
    let mut zeros = zeros.lock().unwrap_or_else(|e| e.into_inner());
    zeros.observe(&keys, cycle, now_ms);
    let fresh_since = now_ms.saturating_sub(zeros.lookback_ms);
    let fresh = points
        .iter()
        .flatten()
        .map(|p| p.timestamp_ms)
        .filter(|t| *t >= fresh_since)
        .max();
    for (key, p) in keys.into_iter().zip(points) {
        let (value, timestamp_ms) = match (p, fresh) {
            (Some(p), _) => (p.value, p.timestamp_ms),
            (None, Some(ts)) if zeros.zero_allowed(&key.id, now_ms) => (0.0, ts),
            (None, _) => continue,
        };
        values.insert(
            key,
            Sample {
                value,
                timestamp_ms,
                fetched,
            },
        );
    }
}

/// Runs `work` while leading (always without leader election); `None` when leadership ended first,
/// which cancels the work and its CES calls in flight.
async fn while_leading<T>(
    lead: &mut Option<watch::Receiver<Leadership>>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let Some(l) = lead.as_mut() else {
        return Some(work.await);
    };
    tokio::select! {
        out = work => Some(out),
        _ = async { l.wait_for(|l| !l.leading).await.is_ok() } => None,
    }
}

/// Resolves when leadership ends (never without leader election).
async fn lost(lead: &mut Option<watch::Receiver<Leadership>>) {
    match lead.as_mut() {
        Some(l) => {
            let _ = l.wait_for(|l| !l.leading).await;
        }
        None => std::future::pending().await,
    }
}

/// The series of one cycle: every listener × `collection.metrics`, then every pool ×
/// `collection.pool_metrics`, numbered flat so batches are cut across both (the minimum number of calls).
#[derive(Debug, Clone, Copy)]
struct Work<'a> {
    listeners: &'a [(Arc<str>, Arc<str>)],
    pools: &'a [(Arc<str>, Arc<str>)],
    per_listener: usize,
    per_pool: usize,
    /// Only these series (flat numbers of the whole work), numbered in this order.
    only: Option<&'a [usize]>,
}

impl<'a> Work<'a> {
    fn total(&self) -> usize {
        match self.only {
            Some(only) => only.len(),
            None => self.listeners.len() * self.per_listener + self.pools.len() * self.per_pool,
        }
    }

    /// The same work cut down to series `only` (flat numbers), packed into as few batches as they fill.
    fn only(self, only: &'a [usize]) -> Self {
        Work {
            only: Some(only),
            ..self
        }
    }

    /// (ELB, listener or pool id, its CES dimension, metric index of its series key) of series `i`.
    fn series(&self, i: usize) -> (&'a (Arc<str>, Arc<str>), &'static str, usize) {
        let i = self.only.map_or(i, |only| only[i]);
        let in_listeners = self.listeners.len() * self.per_listener;
        if i < in_listeners {
            let l = &self.listeners[i / self.per_listener];
            (l, "lbaas_listener_id", i % self.per_listener)
        } else {
            let j = i - in_listeners;
            let p = &self.pools[j / self.per_pool];
            (p, "lbaas_pool_id", self.per_listener + j % self.per_pool)
        }
    }

    /// The series of batch `batch` when cut into batches of `size`.
    fn batch(
        self,
        size: usize,
        batch: usize,
    ) -> impl Iterator<Item = (&'a (Arc<str>, Arc<str>), &'static str, usize)> {
        (batch * size..((batch + 1) * size).min(self.total())).map(move |i| self.series(i))
    }

    /// Every listener and pool id.
    fn ids(&self) -> impl Iterator<Item = &'a Arc<str>> {
        self.listeners.iter().chain(self.pools).map(|(_, id)| id)
    }
}

/// CES calls one cycle needs for `listeners` listeners: ceil(listeners × metrics / batch size).
pub fn calls_per_cycle(listeners: usize, metrics: usize, batch_size: usize) -> usize {
    (listeners * metrics).div_ceil(batch_size.max(1))
}

/// The distinct (ELB, pool) pairs of the targets, in target order.
pub fn distinct_pools(targets: &Targets) -> Vec<(Arc<str>, Arc<str>)> {
    let mut seen = HashSet::with_capacity(targets.pools.len());
    targets
        .pools
        .iter()
        .filter(|p| seen.insert(p.pool_id.clone()))
        .map(|p| (p.elb_id.clone(), p.pool_id.clone()))
        .collect()
}

/// The distinct (ELB, listener) pairs of the targets, in target order.
pub fn distinct_listeners(targets: &Targets) -> Vec<(Arc<str>, Arc<str>)> {
    let mut seen = HashSet::with_capacity(targets.listeners.len());
    targets
        .listeners
        .iter()
        .filter(|t| seen.insert(t.listener_id.clone()))
        .map(|t| (t.elb_id.clone(), t.listener_id.clone()))
        .collect()
}

/// Share of a cycle's deadline the aligned probe may take; the rest of the cycle has the remainder.
const PROBE_SHARE: f64 = 0.6;

/// Collects every attributed listener and pool from CES per interval (and new ones promptly), and
/// publishes each result as a [`Snapshot`].
pub struct Collector<C: CloudApi> {
    cloud: Arc<C>,
    settings: CollectorSettings,
    telemetry: Telemetry,
    tx: watch::Sender<Arc<Snapshot>>,
    /// Listener ids that have been part of a collection (full or prompt).
    attempted: HashSet<Arc<str>>,
    /// The last plan was over the CES budget (logged when this changes).
    over_budget: bool,
    zeros: Mutex<ZeroGuard>,
    /// Under leader election: collect only while leading; each cycle's start is recorded first.
    lead: Option<Lead>,
    /// Under leader election: the leader's series as this replica mirrored them while following.
    warm: Option<watch::Receiver<Option<Arc<Snapshot>>>>,
    align: Mutex<Alignment>,
    /// CES calls sent in the last minute: aligned cycles and re-asks start only when they fit the limit.
    sent: Mutex<RateWindow>,
}

/// The aligned schedule's state.
#[derive(Default)]
struct Alignment {
    aligner: Aligner,
    /// The minute (Unix ms) the next full cycle is for; `None` until a cycle has seen data.
    next_minute: Option<i64>,
    last_refill_ms: Option<i64>,
    /// The newest minute exposed so far (for the exposure delay).
    exposed_ms: Option<i64>,
}

/// Which full cycle ended, and how.
struct CycleDone {
    cycle: u64,
    started: Instant,
    cut: bool,
    stale_after: Duration,
}

/// How a full cycle went, batch by batch.
#[derive(Default)]
struct CycleOutcome {
    ok_calls: usize,
    failed_calls: usize,
    kept_stale: usize,
    /// Batches that got an answer (data or error); the rest were cut by the deadline.
    answered: Vec<bool>,
    first_error: Option<CloudError>,
}

/// A full cycle in progress.
struct CycleState {
    prev: Arc<Snapshot>,
    started: Instant,
    stale_after: Duration,
    cycle: u64,
    values: HashMap<SeriesKey, Sample>,
    out: CycleOutcome,
    /// Newest datapoint of the answers since the last reset (one probe attempt, or the rest).
    newest: Option<i64>,
    /// Newest datapoint of the whole cycle.
    cycle_newest: Option<i64>,
    /// Aligned: the minute this cycle is for, when it was first asked, and first seen.
    target: Option<i64>,
    first_ms: Option<i64>,
    seen_ms: Option<i64>,
}

impl CycleState {
    /// Keeps serving a series' last value when it is within the staleness bound.
    fn keep(&mut self, key: SeriesKey) -> bool {
        match self.prev.get(&key) {
            Some(old)
                if self.started.saturating_duration_since(old.fetched) <= self.stale_after =>
            {
                self.values.insert(key, *old);
                true
            }
            _ => false,
        }
    }
}

impl<C: CloudApi> Collector<C> {
    /// A collector and the receiver of its snapshots (an empty one until the first cycle).
    pub fn new(
        cloud: Arc<C>,
        settings: CollectorSettings,
        telemetry: Telemetry,
    ) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let zeros = Mutex::new(ZeroGuard::new(settings.absent_as_zero, settings.lookback));
        (
            Collector {
                zeros,
                cloud,
                settings,
                telemetry,
                tx,
                attempted: HashSet::new(),
                over_budget: false,
                lead: None,
                warm: None,
                align: Mutex::default(),
                sent: Mutex::default(),
            },
            rx,
        )
    }

    /// Collects only while `lead` says so; a full cycle calls CES once its start is on the Lease.
    pub fn with_leadership(mut self, lead: Lead) -> Self {
        self.lead = Some(lead);
        self
    }

    /// At the start of each term, serves `warm` (the previous leader's series, mirrored) until the
    /// term's first cycle replaces them.
    pub fn with_warm_copy(mut self, warm: watch::Receiver<Option<Arc<Snapshot>>>) -> Self {
        self.warm = Some(warm);
        self
    }

    /// A new term: serve the previous leader's series as mirrored, rather than none until this term's
    /// first cycle (which waits for the previous leader's interval to end). The values keep their age,
    /// so they go stale when the leader's would have.
    fn adopt_warm_copy(&mut self) {
        let Some(copy) = self.warm.as_ref().and_then(|w| w.borrow().clone()) else {
            return;
        };
        let prev = self.tx.borrow().clone();
        if !prev.values.is_empty() || copy.is_empty() {
            return;
        }
        info!(
            series = copy.len(),
            "serving the previous leader's series until this term's first cycle"
        );
        self.telemetry.up.set(i64::from(copy.up));
        // The schedule continues where the previous leader left it: aligned from the next cycle, on
        // the re-ask budget it had left.
        if let Some(aligner) = &copy.schedule {
            self.alignment().aligner = (**aligner).clone();
        }
        self.tx.send_replace(Arc::new(Snapshot {
            cycle: prev.cycle,
            values: copy.values.clone(),
            extra: copy.extra.clone(),
            first_cycle_done: prev.first_cycle_done,
            up: copy.up,
            stale_after: copy.stale_after,
            schedule: copy.schedule.clone(),
        }));
    }

    /// Not leading any more: drop the cloud values at once (the successor exports its own).
    fn step_down(&mut self) {
        let prev = self.tx.borrow().clone();
        self.attempted.clear();
        self.tx.send_replace(Arc::new(Snapshot {
            cycle: prev.cycle,
            first_cycle_done: prev.first_cycle_done,
            ..Snapshot::default()
        }));
    }

    fn alignment(&self) -> std::sync::MutexGuard<'_, Alignment> {
        self.align.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rate(&self) -> std::sync::MutexGuard<'_, RateWindow> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs until the targets channel closes.
    pub async fn run(mut self, mut targets: watch::Receiver<Arc<Targets>>) {
        // The first cycle waits for discovery, so it collects every Service rather than none.
        loop {
            if targets.borrow_and_update().synced {
                break;
            }
            if targets.changed().await.is_err() {
                return;
            }
        }
        let mut next = Instant::now();
        let (mut lead, mut log) = self
            .lead
            .take()
            .map(|l| (l.leadership, (l.started, l.recorded)))
            .unzip();
        loop {
            // A follower makes no CES call; a new term starts after the last leader's interval.
            if let Some(l) = lead.as_mut() {
                match l.wait_for(|l| l.leading).await {
                    Ok(l) => next = next.max(l.not_before.unwrap_or(next)),
                    Err(_) => return,
                }
                if self.attempted.is_empty() {
                    self.adopt_warm_copy();
                    // The term's first full cycle collects every listener known now; collecting them
                    // promptly before it would collect the previous leader's interval again.
                    let t = targets.borrow_and_update().clone();
                    let (l, p) = (distinct_listeners(&t), distinct_pools(&t));
                    self.attempted.extend(self.work(&l, &p).ids().cloned());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    let started = Instant::now();
                    let t = targets.borrow_and_update().clone();
                    let cycle = async {
                        if let Some((started, recorded)) = log.as_mut() {
                            let ms = self.settings.clock.now_ms();
                            started.send_replace(Some(ms));
                            let _ = recorded.wait_for(|r| *r >= Some(ms)).await;
                        }
                        self.full_cycle(&t).await
                    };
                    let Some((plan, aligned)) = while_leading(&mut lead, cycle).await else {
                        self.step_down();
                        continue;
                    };
                    next = self.next_start(started, &plan, aligned);
                }
                changed = targets.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let prompt = async {
                        tokio::time::sleep(NEW_LISTENER_DELAY).await;
                        let t = targets.borrow_and_update().clone();
                        self.prompt_cycle(&t).await;
                    };
                    if while_leading(&mut lead, prompt).await.is_none() {
                        self.step_down();
                    }
                }
                () = lost(&mut lead) => self.step_down(),
            }
        }
    }

    /// When the next full cycle starts: just after the next minute's expected publication when aligned
    /// (and its calls fit the rate limit), else a period after this one began. Never in the past: a long
    /// cycle delays the next, it does not double it.
    fn next_start(&self, started: Instant, plan: &CyclePlan, aligned: bool) -> Instant {
        let now = Instant::now();
        let clock = self.settings.clock;
        // An aligned start moves with the lag, but cycles never crowd: at least half a period apart.
        let earliest = (started + plan.period / 2).max(now);
        let interval = i64::try_from(self.settings.interval.as_millis()).unwrap_or(MINUTE_MS);
        let at = {
            let mut a = self.alignment();
            let mut at = None;
            while let Some(m) = a.next_minute.filter(|_| aligned) {
                let Some(ms) = a.aligner.first_attempt(m) else {
                    break;
                };
                if clock.instant_at(ms) >= earliest || ms > clock.now_ms() + 2 * interval {
                    at = Some(clock.instant_at(ms));
                    break;
                }
                // Behind (a long cycle): skip to a minute still ahead rather than catch up in a burst.
                a.next_minute = Some(m + interval);
            }
            at.unwrap_or(started + plan.period)
        };
        let limit = self.settings.ces_per_minute as usize;
        self.rate().fits_at(at.max(now), plan.calls, limit)
    }

    fn window(&self) -> (i64, i64) {
        let now = self.settings.clock.now_ms();
        (now - self.settings.lookback.as_millis() as i64, now)
    }

    /// The work of a cycle over `listeners` and `pools`.
    fn work<'a>(
        &self,
        listeners: &'a [(Arc<str>, Arc<str>)],
        pools: &'a [(Arc<str>, Arc<str>)],
    ) -> Work<'a> {
        Work {
            listeners,
            pools,
            per_listener: self.settings.metrics.len(),
            per_pool: self.settings.pool_metrics.len(),
            only: None,
        }
    }

    /// The CES metric name of a series key's metric index.
    fn metric_name(&self, m: usize) -> &str {
        let listener = &self.settings.metrics;
        match listener.get(m) {
            Some(name) => name,
            None => &self.settings.pool_metrics[m - listener.len()],
        }
    }

    /// Queries `batches` of the work's series and hands each batch's outcome to `sink` as it arrives,
    /// with the batch's index and when it was sent (Unix ms). Batches are built only when a call slot is
    /// free, so a 10k-listener cycle never holds its 260 requests at once.
    async fn query(
        &self,
        work: Work<'_>,
        batches: Vec<usize>,
        lane: Lane,
        mut sink: impl FnMut(usize, Vec<SeriesKey>, i64, Result<Vec<Option<Datapoint>>, CloudError>),
    ) {
        let size = self.settings.batch_size.max(1);
        let filter = self.settings.filter;
        let cloud = &self.cloud;
        let build = |batch: usize| {
            let mut keys = Vec::with_capacity(size);
            let mut queries = Vec::with_capacity(size);
            for ((elb, id), dimension, m) in work.batch(size, batch) {
                keys.push(SeriesKey::new(id.clone(), m));
                queries.push(MetricQuery {
                    namespace: NAMESPACE.to_string(),
                    metric_name: self.metric_name(m).to_string(),
                    dimensions: vec![
                        ("lbaas_instance_id".to_string(), elb.to_string()),
                        (dimension.to_string(), id.to_string()),
                    ],
                });
            }
            // The window ends when the call is sent, so its answer says what was published by then.
            let (from_ms, to_ms) = self.window();
            self.rate().record(Instant::now());
            let query = BatchQuery {
                metrics: queries,
                from_ms,
                to_ms,
                period: "1",
                filter,
                lane,
            };
            let cloud = cloud.clone();
            async move {
                let r = cloud.batch_query(&query).await.map(|r| r.newest);
                (batch, keys, to_ms, r)
            }
        };
        let mut outcomes = futures::stream::iter(batches)
            .map(build)
            .buffer_unordered(self.settings.concurrency.max(1));
        while let Some((batch, keys, asked_ms, result)) = outcomes.next().await {
            sink(batch, keys, asked_ms, result);
        }
    }

    /// Plans a cycle of `series` series (listeners and pools), exports the plan and says when it does
    /// not fit the CES budget.
    fn plan(&mut self, series: usize) -> CyclePlan {
        self.learn_batch_size();
        let s = &self.settings;
        let calls = calls_per_cycle(series, 1, s.batch_size);
        let plan = CyclePlan::new(calls, s.interval, s.ces_per_minute);
        let per_minute = calls as f64 * 60.0 / s.interval.as_secs_f64().max(0.001);
        self.telemetry
            .planned_calls
            .with_label_values(&[Operation::CesBatchQuery.as_str()])
            .set(per_minute.ceil() as i64);
        self.telemetry
            .effective_interval
            .set(plan.period.as_secs_f64());
        if plan.over_budget != self.over_budget {
            self.over_budget = plan.over_budget;
            if plan.over_budget {
                warn!(
                    calls,
                    interval_s = s.interval.as_secs_f64(),
                    ces_per_minute = s.ces_per_minute,
                    effective_interval_s = plan.period.as_secs_f64(),
                    "planned CES calls exceed cloud.rate_limit.ces_per_minute; cycles are paced (longer interval): collect fewer metrics or raise collection.interval"
                );
            } else {
                info!(calls, "planned CES calls fit the rate limit again");
            }
        }
        plan
    }

    /// The batch size CES turned out to accept (e.g. 10 on Open Telekom Cloud), read per cycle.
    fn learn_batch_size(&mut self) {
        if let Some(limit) = self.cloud.ces_batch_limit() {
            self.settings.batch_size = self.settings.batch_size.min(limit);
        }
    }

    /// One full cycle; returns its plan and whether it was aligned.
    async fn full_cycle(&mut self, targets: &Targets) -> (CyclePlan, bool) {
        let started = Instant::now();
        let listeners = distinct_listeners(targets);
        let pools = distinct_pools(targets);
        let work = self.work(&listeners, &pools);
        let plan = self.plan(work.total());
        let prev = self.tx.borrow().clone();
        let mut st = CycleState {
            cycle: prev.cycle + 1,
            prev,
            started,
            stale_after: self.settings.stale_after(plan.period),
            values: HashMap::with_capacity(work.total()),
            out: CycleOutcome {
                answered: vec![false; plan.calls],
                ..CycleOutcome::default()
            },
            newest: None,
            cycle_newest: None,
            target: None,
            first_ms: None,
            seen_ms: None,
        };
        let aligned = self.settings.aligned(&plan);
        st.target = self.prepare_alignment(&plan, aligned);
        let run = async {
            let all = || (0..plan.calls).collect::<Vec<usize>>();
            let rest = match st.target {
                // The probe's re-asks never keep the rest of the cycle from its deadline; they may
                // span a lag that jitters over half a minute (first attempt near its low end, 8 s
                // steps past its high end).
                Some(m) if plan.calls > 0 => {
                    let probe = self.probe(work, &mut st, m, plan.calls);
                    tokio::time::timeout(plan.deadline.mul_f64(PROBE_SHARE), probe)
                        .await
                        .unwrap_or_else(|_| all())
                }
                _ => all(),
            };
            self.query(work, rest, Lane::Background, |b, k, a, r| {
                self.absorb(&mut st, b, k, a, r)
            })
            .await;
        };
        let cut = tokio::time::timeout(plan.deadline, run).await.is_err();
        if cut {
            self.keep_unanswered(work, &mut st);
        }
        self.settle_alignment(&st);
        let behind = self.behind(work, &st);
        let done = CycleDone {
            cycle: st.cycle,
            started,
            cut,
            stale_after: st.stale_after,
        };
        let (cycle_newest, target) = (st.cycle_newest, st.target);
        self.finish_cycle(targets, work, done, st.values, st.out);
        self.note_exposure(cycle_newest);
        if let Some(m) = target {
            self.reask_behind(work, behind, m).await;
        }
        (plan, aligned)
    }

    /// An aligned cycle that saw its minute: the series answered this cycle with the minute before it
    /// (their new minute not there yet), by flat number. Series further behind are not late, they
    /// stopped reporting.
    fn behind(&self, work: Work<'_>, st: &CycleState) -> Vec<usize> {
        let (Some(minute), Some(_)) = (st.target, st.seen_ms) else {
            return Vec::new();
        };
        (0..work.total())
            .filter(|i| {
                let ((_, id), _, m) = work.series(*i);
                st.values
                    .get(&SeriesKey::new(id.clone(), m))
                    .is_some_and(|v| {
                        v.fetched >= st.started && v.timestamp_ms == minute - MINUTE_MS
                    })
            })
            .collect()
    }

    /// Asks the series `behind` of `minute` again, packed, shortly after the cycle was published, while
    /// the re-ask budget pays for it and the minute is not given up; each answer is published at once.
    async fn reask_behind(&self, work: Work<'_>, mut behind: Vec<usize>, minute: i64) {
        let size = self.settings.batch_size.max(1);
        let limit = self.settings.ces_per_minute as usize;
        let clock = self.settings.clock;
        while !behind.is_empty() {
            let calls = behind.len().div_ceil(size);
            let asked = clock.now_ms();
            let Some(at) = self.alignment().aligner.reask_series(minute, asked, calls) else {
                break;
            };
            let at = self.rate().fits_at(clock.instant_at(at), calls, limit);
            tokio::time::sleep_until(at).await;
            let prev = self.tx.borrow().clone();
            let mut extra: HashMap<SeriesKey, Sample> = (*prev.extra).clone();
            let mut still = Vec::new();
            let part = work.only(&behind);
            self.query(
                part,
                (0..calls).collect(),
                Lane::Background,
                |b, keys, _, r| {
                    // A failed re-ask leaves the cycle's values served.
                    let Ok(points) = r else { return };
                    for (j, p) in points.iter().enumerate() {
                        if p.is_some_and(|p| p.timestamp_ms < minute) {
                            still.extend(behind.get(b * size + j));
                        }
                    }
                    let now_ms = clock.now_ms();
                    let (fetched, cycle) = (Instant::now(), prev.cycle);
                    merge(
                        &mut extra,
                        keys,
                        points,
                        fetched,
                        cycle,
                        &self.zeros,
                        now_ms,
                    );
                },
            )
            .await;
            self.tx.send_replace(Arc::new(Snapshot {
                cycle: prev.cycle,
                values: prev.values.clone(),
                extra: Arc::new(extra),
                first_cycle_done: prev.first_cycle_done,
                up: prev.up,
                stale_after: prev.stale_after,
                schedule: prev.schedule.clone(),
            }));
            behind = still;
        }
    }

    /// Records one batch's outcome in the cycle.
    fn absorb(
        &self,
        st: &mut CycleState,
        batch: usize,
        keys: Vec<SeriesKey>,
        asked_ms: i64,
        result: Result<Vec<Option<Datapoint>>, CloudError>,
    ) {
        if let Some(a) = st.out.answered.get_mut(batch) {
            *a = true;
        }
        match result {
            Ok(points) => {
                st.out.ok_calls += 1;
                // A datapoint stamped after the moment we asked cannot be a published minute: it
                // must not steer the schedule (a far-future stamp would park it for good).
                let newest = points
                    .iter()
                    .flatten()
                    .map(|p| p.timestamp_ms)
                    .filter(|t| *t <= asked_ms.saturating_add(MINUTE_MS))
                    .max();
                if let Some(n) = newest {
                    self.alignment().aligner.observe(asked_ms, n);
                    st.newest = st.newest.max(Some(n));
                    st.cycle_newest = st.cycle_newest.max(Some(n));
                    if st.target.is_some_and(|m| n >= m) {
                        st.seen_ms = Some(st.seen_ms.map_or(asked_ms, |s| s.min(asked_ms)));
                    }
                }
                let now_ms = self.settings.clock.now_ms();
                merge(
                    &mut st.values,
                    keys,
                    points,
                    Instant::now(),
                    st.cycle,
                    &self.zeros,
                    now_ms,
                );
            }
            Err(e) => {
                st.out.failed_calls += 1;
                // Keep serving the last good values of this batch, within the staleness bound.
                for key in keys {
                    st.out.kept_stale += usize::from(st.keep(key));
                }
                st.out.first_error.get_or_insert(e);
            }
        }
    }

    /// Refills the re-ask budget and says which minute an aligned cycle is for (`None`: not aligned).
    fn prepare_alignment(&self, plan: &CyclePlan, aligned: bool) -> Option<i64> {
        let now_ms = self.settings.clock.now_ms();
        let mut a = self.alignment();
        let per_minute = plan.calls as f64 * 60.0 / self.settings.interval.as_secs_f64().max(1.0);
        a.aligner
            .set_budget(per_minute, f64::from(self.settings.ces_per_minute));
        let since = a.last_refill_ms.map_or(0, |t| now_ms - t);
        a.aligner.refill(since as f64 / MINUTE_MS as f64);
        a.last_refill_ms = Some(now_ms);
        a.next_minute.filter(|_| aligned)
    }

    /// An aligned cycle's start: asks one batch (a different one each cycle) until it shows `minute`,
    /// re-asking within the budget of extra calls; a miss that cannot be re-asked waits for the minute's
    /// expected publication. Returns the batches still to send.
    async fn probe(
        &self,
        work: Work<'_>,
        st: &mut CycleState,
        minute: i64,
        batches: usize,
    ) -> Vec<usize> {
        let probe = (st.cycle as usize) % batches;
        let limit = self.settings.ces_per_minute as usize;
        loop {
            st.newest = None;
            let asked = self.settings.clock.now_ms();
            st.first_ms.get_or_insert(asked);
            self.query(work, vec![probe], Lane::Background, |b, k, a, r| {
                self.absorb(st, b, k, a, r)
            })
            .await;
            let next = match st.newest {
                // No datapoint (or no answer): nothing to wait for.
                None => break,
                Some(n) if n >= minute => break,
                Some(_) => self.alignment().aligner.retry(minute, asked),
            };
            let Some(at) = next else {
                // The probe's series wait for the next cycle: re-asking them is over the budget.
                let at = self.alignment().aligner.fallback(minute, asked);
                tokio::time::sleep_until(self.settings.clock.instant_at(at)).await;
                break;
            };
            let at = self.settings.clock.instant_at(at);
            let at = self.rate().fits_at(at, 1, limit);
            tokio::time::sleep_until(at).await;
        }
        (0..batches).filter(|b| *b != probe).collect()
    }

    /// Moves the aligned schedule on after a cycle: where the next first attempt goes, and which
    /// minute the next cycle is for.
    fn settle_alignment(&self, st: &CycleState) {
        let mut a = self.alignment();
        if let (Some(m), Some(first)) = (st.target, st.first_ms) {
            a.aligner.settle(m, first, st.seen_ms);
        }
        if let Some(n) = st.cycle_newest {
            let interval = i64::try_from(self.settings.interval.as_millis()).unwrap_or(MINUTE_MS);
            let base = a.next_minute.map_or(n, |m| m.max(n));
            a.next_minute = Some((base.div_euclid(MINUTE_MS) * MINUTE_MS).saturating_add(interval));
        }
        if let Some(lag) = a.aligner.estimator().estimate() {
            self.telemetry.ces_publication_lag.set(lag.as_secs_f64());
        }
    }

    /// After a cut, the batches that never answered keep their last values within the staleness bound.
    fn keep_unanswered(&self, work: Work<'_>, st: &mut CycleState) {
        let size = self.settings.batch_size.max(1);
        let unanswered: Vec<usize> = (0..st.out.answered.len())
            .filter(|b| !st.out.answered[*b])
            .collect();
        for batch in unanswered {
            for ((_, id), _, m) in work.batch(size, batch) {
                let key = SeriesKey::new(id.clone(), m);
                st.out.kept_stale += usize::from(st.keep(key));
            }
        }
    }

    /// Observes the delay the exporter added to a newly exposed minute: from its expected publication
    /// (minute + estimated lag) to now, when the body carrying it is rendered.
    fn note_exposure(&self, newest: Option<i64>) {
        let mut a = self.alignment();
        let (Some(n), Some(lag)) = (newest, a.aligner.estimator().estimate_ms()) else {
            return;
        };
        if a.exposed_ms.is_some_and(|e| e >= n) {
            return;
        }
        let first = a.exposed_ms.is_none();
        a.exposed_ms = Some(n);
        // The first exposure after a start measures the start, not the schedule.
        if !first {
            let delay = (self.settings.clock.now_ms() - n - lag).max(0);
            self.telemetry.exposure_delay.observe(delay as f64 / 1000.0);
        }
    }

    /// Publishes a full cycle's values and says how it went (metrics, log).
    fn finish_cycle(
        &mut self,
        targets: &Targets,
        work: Work<'_>,
        done: CycleDone,
        values: HashMap<SeriesKey, Sample>,
        out: CycleOutcome,
    ) {
        let CycleDone {
            cycle,
            started,
            cut,
            stale_after,
        } = done;
        // Down when a batch failed or was cut, or when an ELB could not be looked up at all (a wrong
        // key fails every lookup, leaving no batch to fail).
        let lookups_failed = targets
            .problems
            .get(&crate::discovery::Problem::ElbLookupFailed)
            .copied()
            .unwrap_or(0);
        let up = out.failed_calls == 0 && !cut && lookups_failed == 0;
        for id in work.ids() {
            self.attempted.insert(id.clone());
        }
        let live: HashSet<&Arc<str>> = work.ids().collect();
        self.attempted.retain(|l| live.contains(l));

        let elapsed = started.elapsed();
        self.telemetry
            .collection_duration
            .set(elapsed.as_secs_f64());
        self.telemetry.up.set(i64::from(up));
        self.telemetry
            .collections
            .with_label_values(&[if up { "success" } else { "failure" }])
            .inc();
        if up {
            self.telemetry.last_success.set(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
        }
        let unanswered = out.answered.iter().filter(|a| !**a).count();
        match (&out.first_error, cut) {
            (None, false) => info!(
                cycle,
                listeners = work.listeners.len(),
                pools = work.pools.len(),
                calls = out.ok_calls,
                series = values.len(),
                elapsed_ms = elapsed.as_millis() as u64,
                "collection done"
            ),
            (e, _) => warn!(
                cycle,
                listeners = work.listeners.len(),
                pools = work.pools.len(),
                ok_calls = out.ok_calls,
                failed_calls = out.failed_calls,
                cut_calls = unanswered,
                kept_stale = out.kept_stale,
                code = e.as_ref().map_or("deadline", |e| e.metric_code()),
                cloud_code = e.as_ref().and_then(|e| e.cloud_code()).unwrap_or(""),
                error = %e.as_ref().map(|e| e.to_string()).unwrap_or_else(|| "cycle cut at its deadline".into()),
                "collection failed in part; serving last good values within the staleness bound"
            ),
        }
        self.tx.send_replace(Arc::new(Snapshot {
            cycle,
            values: Arc::new(values),
            extra: Arc::default(),
            first_cycle_done: true,
            up,
            stale_after: Some(stale_after),
            schedule: Some(Arc::new(self.alignment().aligner.clone())),
        }));
        // The cycle's answers are garbage now: return them before the new body is rendered on top.
        crate::memory::release_memory();
    }

    /// Collects listeners that appeared since the last cycle, merging them into the current snapshot.
    async fn prompt_cycle(&mut self, targets: &Targets) {
        let fresh: Vec<(Arc<str>, Arc<str>)> = distinct_listeners(targets)
            .into_iter()
            .filter(|(_, l)| !self.attempted.contains(l))
            .collect();
        let fresh_pools: Vec<(Arc<str>, Arc<str>)> = distinct_pools(targets)
            .into_iter()
            .filter(|(_, p)| !self.attempted.contains(p))
            .collect();
        if fresh.is_empty() && fresh_pools.is_empty() {
            return;
        }
        debug!(
            listeners = fresh.len(),
            pools = fresh_pools.len(),
            "collecting new listeners and pools now"
        );
        let work = self.work(&fresh, &fresh_pools);
        self.learn_batch_size();
        let prev = self.tx.borrow().clone();
        let mut extra: HashMap<SeriesKey, Sample> = (*prev.extra).clone();
        // Bounded like a full cycle, so new listeners never hold back the next full cycle for long;
        // what it did not finish, the next full cycle collects.
        let batches = calls_per_cycle(work.total(), 1, self.settings.batch_size);
        let plan = CyclePlan::new(
            batches,
            self.settings.interval,
            self.settings.ces_per_minute,
        );
        let clock = self.settings.clock;
        let run = self.query(work, (0..batches).collect(), Lane::Priority, |_, keys, _, result| match result {
            Ok(points) => merge(
                &mut extra,
                keys,
                points,
                Instant::now(),
                prev.cycle,
                &self.zeros,
                clock.now_ms(),
            ),
            Err(e) => {
                warn!(error = %e, "prompt collection of new listeners failed; the next cycle retries")
            }
        });
        if tokio::time::timeout(plan.deadline, run).await.is_err() {
            warn!(
                listeners = fresh.len(),
                pools = fresh_pools.len(),
                "prompt collection of new listeners cut at its deadline; the next cycle collects them"
            );
        }
        for id in work.ids() {
            self.attempted.insert(id.clone());
        }
        let snapshot = Snapshot {
            cycle: prev.cycle,
            values: prev.values.clone(),
            extra: Arc::new(extra),
            first_cycle_done: prev.first_cycle_done,
            up: prev.up,
            stale_after: prev.stale_after,
            schedule: prev.schedule.clone(),
        };
        self.tx.send_replace(Arc::new(snapshot));
    }
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use crate::discovery::inventory::Target;
    use crate::sim::fake::{FakeCloud, Script};

    const METRICS: [&str; 3] = ["m1_cps", "m7_in_Bps", "m4_ncps"];

    fn settings(batch_size: usize, concurrency: usize) -> CollectorSettings {
        CollectorSettings {
            metrics: Arc::new(METRICS.iter().map(|m| m.to_string()).collect()),
            pool_metrics: Arc::new(Vec::new()),
            filter: Filter::Average,
            interval: Duration::from_secs(60),
            lookback: Duration::from_secs(300),
            batch_size,
            stale_intervals: 3,
            concurrency,
            ces_per_minute: 300,
            absent_as_zero: false,
            align: false,
            clock: WallClock::System,
        }
    }

    fn listener(i: usize) -> String {
        format!("l{i}")
    }

    /// `n` listeners on two ELBs, attributed and synced; the cloud answers `value` for each series.
    fn world(n: usize, value: f64) -> (Arc<FakeCloud>, Arc<Targets>) {
        let cloud = Arc::new(FakeCloud::default());
        let targets = (0..n)
            .map(|i| {
                for m in METRICS {
                    cloud.set_value(&listener(i), m, value);
                }
                Target {
                    owner: crate::discovery::Owner::Service,
                    namespace: "default".into(),
                    service: format!("svc{i}").into(),
                    elb_id: format!("elb{}", i % 2).into(),
                    listener_id: listener(i).into(),
                    listener_name: "k8s_TCP_80".into(),
                    port: 80,
                    protocol: "TCP".into(),
                    uid: format!("uid-{i}").into(),
                    elb_name: "".into(),
                }
            })
            .collect();
        let targets = Targets {
            synced: true,
            listeners: targets,
            ..Targets::default()
        };
        (cloud, Arc::new(targets))
    }

    fn set_all(cloud: &FakeCloud, n: usize, value: f64) {
        for i in 0..n {
            for m in METRICS {
                cloud.set_value(&listener(i), m, value);
            }
        }
    }

    async fn next_full(rx: &mut watch::Receiver<Arc<Snapshot>>, after: u64) -> Arc<Snapshot> {
        rx.wait_for(|s| s.cycle > after).await.unwrap().clone()
    }

    fn spawn(
        cloud: Arc<FakeCloud>,
        settings: CollectorSettings,
        targets: Arc<Targets>,
    ) -> (watch::Receiver<Arc<Snapshot>>, Telemetry) {
        let telemetry = Telemetry::new();
        let (collector, rx) = Collector::new(cloud, settings, telemetry.clone());
        let (tx, trx) = watch::channel(targets);
        tokio::spawn(async move {
            collector.run(trx).await;
            drop(tx);
        });
        (rx, telemetry)
    }

    #[tokio::test(start_paused = true)]
    async fn batches_are_packed_across_listeners_and_load_balancers() {
        let (cloud, targets) = world(7, 1.0);
        let (mut rx, _) = spawn(cloud.clone(), settings(5, 2), targets);
        let snap = next_full(&mut rx, 0).await;
        let sizes: Vec<usize> = cloud.calls().iter().map(|c| c.series.len()).collect();
        // 7 listeners x 3 metrics = 21 series: ceil(21 / 5) = 5 calls, all full but the last.
        assert_eq!(sizes, [5, 5, 5, 5, 1]);
        assert!(snap.up);
        assert_eq!(snap.len(), 21);
        for i in 0..7 {
            for m in 0..3 {
                assert_eq!(
                    snap.get(&SeriesKey::new(listener(i).into(), m))
                        .map(|s| s.value),
                    Some(1.0)
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cycle_past_its_deadline_is_cut_and_keeps_what_finished() {
        let (cloud, targets) = world(4, 1.0);
        let (mut rx, telemetry) = spawn(cloud.clone(), settings(3, 1), targets);
        let start = Instant::now();
        let first = next_full(&mut rx, 0).await;
        assert!(first.up);
        // Cycle 2: the first batch answers new values, the second hangs for an hour.
        set_all(&cloud, 4, 2.0);
        // (Cycle 3 starts right at the cut; its first call takes 10 s so cycle 2 is seen on its own.)
        cloud.script([
            Script::Delay(Duration::ZERO),
            Script::Delay(Duration::from_secs(3600)),
            Script::Delay(Duration::from_secs(10)),
        ]);
        let second = next_full(&mut rx, 1).await;
        assert_eq!(second.cycle, 2);
        // Cut at the interval (60 s after the cycle began at 60 s), not after the hung call.
        assert_eq!(start.elapsed().as_secs(), 120);
        assert!(!second.up, "a cut cycle is a failed one");
        let fresh = SeriesKey::new(listener(0).into(), 0);
        assert_eq!(second.get(&fresh).map(|s| s.value), Some(2.0));
        // The hung and unsent batches keep their last values (within the staleness bound).
        let kept = SeriesKey::new(listener(3).into(), 2);
        assert_eq!(second.get(&kept).map(|s| s.value), Some(1.0));
        assert_eq!(second.len(), 12);
        let cycle_two = cloud
            .calls()
            .iter()
            .filter(|c| c.at.duration_since(start) < Duration::from_secs(120))
            .count();
        assert_eq!(cycle_two, 4 + 2, "the unsent batches are not sent late");
        let failures = telemetry.collections.with_label_values(&["failure"]).get();
        assert_eq!(failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cycles_over_the_ces_budget_are_paced_not_failed() {
        let (cloud, targets) = world(10, 1.0);
        let s = CollectorSettings {
            ces_per_minute: 10,
            ..settings(1, 4)
        };
        let (mut rx, telemetry) = spawn(cloud.clone(), s, targets);
        let start = Instant::now();
        next_full(&mut rx, 0).await;
        let second = next_full(&mut rx, 1).await;
        // 30 calls at 10/minute need 3 minutes: the next cycle starts then, and is not failed.
        let second_call = &cloud.calls()[30];
        assert_eq!(second_call.at.duration_since(start).as_secs(), 180);
        assert!(second.up);
        assert_eq!(telemetry.effective_interval.get(), 180.0);
        // Values outlive a paced period: the staleness bound counts periods, not the configured interval.
        assert_eq!(second.stale_after, Some(Duration::from_secs(3 * 180)));
    }

    /// Under leader election: a follower makes no call; a new term waits for `not_before`, then for the
    /// cycle's start to be on the Lease; losing leadership drops the values at once and stops the calls.
    #[tokio::test(start_paused = true)]
    async fn only_the_leader_collects_from_its_recorded_start() {
        let (cloud, targets) = world(4, 1.0);
        let (collector, mut rx) = Collector::new(cloud.clone(), settings(100, 1), Telemetry::new());
        let (lead, leadership) = watch::channel(Leadership::default());
        let (started, mut starts) = watch::channel(None);
        let (record, recorded) = watch::channel(None);
        let collector = collector.with_leadership(Lead {
            leadership,
            started,
            recorded,
        });
        let (_targets, trx) = watch::channel(targets);
        tokio::spawn(collector.run(trx));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(cloud.calls().is_empty(), "a follower calls CES");

        let t0 = Instant::now();
        lead.send_replace(Leadership {
            leading: true,
            not_before: Some(t0 + Duration::from_secs(30)),
        });
        starts.changed().await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            cloud.calls().is_empty(),
            "called before the start was recorded"
        );
        record.send_replace(*starts.borrow());
        let snap = next_full(&mut rx, 0).await;
        assert_eq!((snap.len(), cloud.calls().len()), (12, 1));

        lead.send_replace(Leadership::default());
        let dropped = rx.wait_for(|s| s.is_empty()).await.unwrap().clone();
        assert!(!dropped.up);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(cloud.calls().len(), 1, "called CES after losing the lead");
    }

    /// A follower that mirrored the leader's series serves them from the moment its term begins, with
    /// the leader's `up` and their ages, without a CES call, until its first cycle (which still waits for
    /// `not_before`) replaces them; a later term without a copy serves nothing until its cycle.
    #[tokio::test(start_paused = true)]
    async fn a_new_term_serves_the_mirrored_copy_until_its_first_cycle() {
        let (cloud, targets) = world(4, 1.0);
        let telemetry = Telemetry::new();
        let (collector, mut rx) =
            Collector::new(cloud.clone(), settings(100, 1), telemetry.clone());
        let (lead, leadership) = watch::channel(Leadership::default());
        let (started, mut starts) = watch::channel(None);
        let (record, recorded) = watch::channel(None);
        let (copy_tx, copy_rx) = watch::channel(None);
        let collector = collector
            .with_leadership(Lead {
                leadership,
                started,
                recorded,
            })
            .with_warm_copy(copy_rx);
        let (_targets, trx) = watch::channel(targets);
        tokio::spawn(collector.run(trx));
        tokio::time::sleep(Duration::from_secs(600)).await;
        let fetched = Instant::now() - Duration::from_secs(20);
        let copied: HashMap<SeriesKey, Sample> = (0..5)
            .map(|i| {
                let key = SeriesKey::new(Arc::from(format!("copied-{i}")), 0);
                (
                    key,
                    Sample {
                        value: f64::from(i),
                        timestamp_ms: 60_000,
                        fetched,
                    },
                )
            })
            .collect();
        copy_tx.send_replace(Some(Arc::new(Snapshot {
            values: Arc::new(copied.clone()),
            up: true,
            ..Snapshot::default()
        })));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(rx.borrow().is_empty(), "a follower serves its copy");
        let t0 = Instant::now();
        lead.send_replace(Leadership {
            leading: true,
            not_before: Some(t0 + Duration::from_secs(30)),
        });
        let adopted = tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|s| !s.is_empty()))
            .await
            .expect("the copy is served at the start of the term")
            .unwrap()
            .clone();
        assert_eq!(*adopted.values, copied, "values and ages as mirrored");
        assert!(adopted.up && telemetry.up.get() == 1);
        assert!(cloud.calls().is_empty());
        starts.changed().await.unwrap();
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(30),
            "the first cycle still waits"
        );
        record.send_replace(*starts.borrow());
        let own = next_full(&mut rx, 0).await;
        assert_eq!(own.len(), 12);
        assert!(
            own.values.keys().all(|k| !k.id.starts_with("copied")),
            "the cycle replaces the copy"
        );

        lead.send_replace(Leadership::default());
        rx.wait_for(|s| s.is_empty()).await.unwrap();
        copy_tx.send_replace(None);
        lead.send_replace(Leadership {
            leading: true,
            not_before: Some(Instant::now() + Duration::from_secs(30)),
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            rx.borrow().is_empty(),
            "no copy, nothing to serve before the cycle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_prompt_collection_does_not_hold_back_the_next_cycle() {
        let (cloud, targets) = world(2, 1.0);
        let telemetry = Telemetry::new();
        let (collector, mut rx) = Collector::new(cloud.clone(), settings(3, 1), telemetry);
        let one = Targets {
            synced: true,
            listeners: targets.listeners[..1].to_vec(),
            ..Targets::default()
        };
        let (ttx, trx) = watch::channel(Arc::new(one));
        tokio::spawn(collector.run(trx));
        let start = Instant::now();
        next_full(&mut rx, 0).await;
        // A new listener appears; its prompt call hangs for an hour.
        cloud.script([Script::Delay(Duration::from_secs(3600))]);
        ttx.send_replace(targets);
        let second = next_full(&mut rx, 1).await;
        assert!(
            start.elapsed() < Duration::from_secs(62),
            "the next cycle waited {:?}",
            start.elapsed()
        );
        // Full cycles ask in the background lane; the new listener's prompt call goes first.
        let lanes: Vec<Lane> = cloud.calls().iter().map(|c| c.lane).collect();
        assert_eq!(lanes[0], Lane::Background);
        assert_eq!(lanes[1], Lane::Priority);
        assert!(
            lanes[2..].iter().all(|l| *l == Lane::Background),
            "{lanes:?}"
        );
        assert_eq!(
            second.len(),
            6,
            "the full cycle collected the new listener too"
        );
    }

    /// A pool that appears behind an Ingress listener is collected at once in the priority lane (its
    /// series key after the listener metrics), then by full cycles in the background lane.
    #[tokio::test(start_paused = true)]
    async fn a_new_pool_is_collected_promptly_then_in_the_background() {
        let (cloud, targets) = world(1, 1.0);
        cloud.set_value("p1", "mb_l7_qps", 7.0);
        let s = CollectorSettings {
            pool_metrics: Arc::new(vec!["mb_l7_qps".to_string()]),
            ..settings(100, 1)
        };
        let (collector, mut rx) = Collector::new(cloud.clone(), s, Telemetry::new());
        let (ttx, trx) = watch::channel(targets.clone());
        tokio::spawn(collector.run(trx));
        next_full(&mut rx, 0).await;
        let pool = crate::discovery::pools::PoolTarget {
            namespace: "default".into(),
            service: "backend".into(),
            ingress: "web".into(),
            uid: "uid-1".into(),
            elb_name: "".into(),
            elb_id: "elb0".into(),
            pool_id: "p1".into(),
            pool_name: "k8s_default_backend-80_HTTP-80".into(),
            port: 80,
        };
        ttx.send_replace(Arc::new(Targets {
            pools: vec![pool],
            ..(*targets).clone()
        }));
        let key = SeriesKey::new("p1".into(), METRICS.len());
        let prompt = rx
            .wait_for(|s| s.get(&key).is_some())
            .await
            .unwrap()
            .clone();
        assert_eq!(prompt.cycle, 1, "collected before the next full cycle");
        assert_eq!(prompt.get(&key).map(|s| s.value), Some(7.0));
        let calls = cloud.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].lane, Lane::Priority);
        assert_eq!(
            calls[1].series,
            [("p1".to_string(), "mb_l7_qps".to_string())]
        );
        let full = next_full(&mut rx, 1).await;
        assert_eq!(full.get(&key).map(|s| s.value), Some(7.0));
        let calls = cloud.calls();
        assert_eq!(
            calls.len(),
            3,
            "one call for 3 listener series and the pool's"
        );
        assert_eq!(calls[2].lane, Lane::Background);
        assert_eq!(calls[2].series.len(), METRICS.len() + 1);
    }

    /// Runs an aligned collector over `minutes` of virtual time against a lag that changes at the given
    /// minutes; returns (minute, delay from its publication to its exposure in a snapshot, ms) and the calls.
    async fn aligned_run(
        ces_per_minute: u32,
        lags: &[(i64, u64)],
        minutes: i64,
    ) -> (Vec<(i64, i64)>, Vec<crate::sim::fake::FakeCall>) {
        use crate::sim::publication::Publication;
        // 40 listeners x 3 metrics in batches of 12: 10 calls a cycle.
        let (cloud, targets) = world(40, 1.0);
        let start_ms = T0 + 35_000;
        let clock = WallClock::virtual_from(start_ms);
        let s = CollectorSettings {
            align: true,
            clock,
            ces_per_minute,
            ..settings(12, 4)
        };
        let (mut rx, _) = spawn(cloud.clone(), s, targets);
        let mut exposed: Vec<(i64, i64)> = Vec::new();
        let mut model = Publication::constant(Duration::ZERO);
        let mut changes = lags.iter().peekable();
        while clock.now_ms() < start_ms + minutes * MIN {
            let minute = (clock.now_ms() - start_ms) / MIN;
            if let Some((_, lag)) = changes.next_if(|(at, _)| *at <= minute) {
                model = Publication::constant(Duration::from_secs(*lag));
                cloud.set_publication(model);
            }
            let next_minute = start_ms + (minute + 1) * MIN;
            record_exposures(&mut rx, clock, model, next_minute, &mut exposed).await;
        }
        (exposed, cloud.calls())
    }

    /// Until `until_ms`, notes each snapshot whose oldest minute is new: (minute, ms from its publication
    /// under `model` to the snapshot).
    async fn record_exposures(
        rx: &mut watch::Receiver<Arc<Snapshot>>,
        clock: WallClock,
        model: crate::sim::publication::Publication,
        until_ms: i64,
        exposed: &mut Vec<(i64, i64)>,
    ) {
        loop {
            let snap = tokio::select! {
                r = rx.changed() => { r.expect("collector runs"); rx.borrow_and_update().clone() }
                _ = tokio::time::sleep_until(clock.instant_at(until_ms)) => return,
            };
            let Some(oldest) = snap.values.values().map(|v| v.timestamp_ms).min() else {
                continue;
            };
            if exposed.last().is_none_or(|(m, _)| *m < oldest) {
                exposed.push((oldest, clock.now_ms() - model.published_at(oldest)));
            }
        }
    }

    /// The most calls any sliding minute saw.
    fn busiest_minute(calls: &[crate::sim::fake::FakeCall]) -> usize {
        calls
            .iter()
            .map(|c| {
                calls
                    .iter()
                    .filter(|d| d.at >= c.at && d.at < c.at + Duration::from_secs(60))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn aligned_cycles_follow_a_changing_lag() {
        let (exposed, calls) = aligned_run(300, &[(0, 83), (12, 95), (24, 70)], 36).await;
        let at = |from: i64, to: i64| -> Vec<i64> {
            exposed
                .iter()
                .filter(|(m, _)| (T0 + from * MIN..T0 + to * MIN).contains(m))
                .map(|(_, d)| *d)
                .collect()
        };
        // Each lag is followed within a few minutes: every minute then shows within 3 s of publication.
        for (from, to) in [(7, 11), (17, 23), (30, 35)] {
            let d = at(from, to);
            assert!(
                !d.is_empty() && d.iter().all(|d| (0..=3_000).contains(d)),
                "minutes {from}..{to}: {d:?} of {exposed:?}"
            );
        }
        // The first cycle ran at once; the re-asks stayed within 10 % of the 10 calls a minute (plus the
        // bucket of 10 the start may spend).
        assert_eq!(calls.first().map(|c| c.to_ms), Some(T0 + 35_000));
        assert!(
            calls.len() <= 36 * 11 + 10,
            "{} calls in 36 minutes",
            calls.len()
        );
        assert!(busiest_minute(&calls) <= 300);
    }

    /// A successor continues the aligned schedule it adopts with the previous leader's copy: after a
    /// takeover off the minute's phase (a kill late in the interval), its first cycle runs then and the
    /// next ones are aligned again at once, with no minutes of relearning.
    #[tokio::test(start_paused = true)]
    async fn a_successor_continues_the_aligned_schedule() {
        use crate::sim::publication::Publication;
        let (cloud, targets) = world(40, 1.0);
        let model = Publication::constant(Duration::from_secs(83));
        cloud.set_publication(model);
        let clock = WallClock::virtual_from(T0 + 35_000);
        let s = CollectorSettings {
            align: true,
            clock,
            ..settings(12, 4)
        };
        let (a, a_rx) = Collector::new(cloud.clone(), s.clone(), Telemetry::new());
        let (_ta, trx) = watch::channel(targets.clone());
        let a_task = tokio::spawn(a.run(trx));
        tokio::time::sleep(Duration::from_secs(12 * 60)).await;
        let copy = a_rx.borrow().clone();
        a_task.abort();
        assert!(copy.schedule.is_some(), "the snapshot carries the schedule");
        let (b, mut b_rx) = Collector::new(cloud.clone(), s, Telemetry::new());
        let (lead, leadership) = watch::channel(Leadership::default());
        let (started, mut starts) = watch::channel(None);
        let (record, recorded) = watch::channel(None);
        let (_copy_tx, copy_rx) = watch::channel(Some(copy));
        let b = b.with_leadership(Lead {
            leadership,
            started,
            recorded,
        });
        let (_tb, trx) = watch::channel(targets);
        tokio::spawn(b.with_warm_copy(copy_rx).run(trx));
        tokio::spawn(async move {
            while starts.changed().await.is_ok() {
                let at = *starts.borrow_and_update();
                record.send_replace(at);
            }
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        lead.send_replace(Leadership {
            leading: true,
            not_before: None,
        });
        let mut exposed: Vec<(i64, i64)> = Vec::new();
        let end = clock.now_ms() + 5 * MIN;
        record_exposures(&mut b_rx, clock, model, end, &mut exposed).await;
        // The adopted copy, the first cycle at the takeover, then aligned cycles.
        let aligned: Vec<i64> = exposed.iter().skip(2).map(|(_, d)| *d).collect();
        assert!(
            aligned.len() >= 3 && aligned.iter().all(|d| (0..=3_000).contains(d)),
            "{exposed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn aligned_cycles_never_exceed_the_ces_rate_limit() {
        // 10 calls a cycle under a limit of 11: moving a cycle earlier must wait for the sliding minute.
        let (exposed, calls) = aligned_run(11, &[(0, 83), (8, 70), (16, 90)], 24).await;
        assert!(
            busiest_minute(&calls) <= 11,
            "{} calls in a minute",
            busiest_minute(&calls)
        );
        assert!(exposed.len() >= 20, "{exposed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_ces_stamp_does_not_steer_the_schedule() {
        use crate::sim::publication::Publication;
        let (cloud, targets) = world(40, 1.0);
        cloud.set_publication(Publication::constant(Duration::from_secs(83)));
        // One listener's datapoints come stamped an hour ahead: no minute Cloud Eye published.
        cloud.shift_stamps(&listener(7), 3_600_000);
        let start_ms = T0 + 35_000;
        let clock = WallClock::virtual_from(start_ms);
        let s = CollectorSettings {
            align: true,
            clock,
            ..settings(12, 4)
        };
        let (_rx, telemetry) = spawn(cloud.clone(), s, targets);
        tokio::time::sleep(Duration::from_secs(12 * 60)).await;
        // Every minute still has its cycle, not parked an hour out, and the lag learnt is the real one.
        let calls = cloud.calls();
        let per_minute: Vec<usize> = (1..12)
            .map(|k| {
                let (from, to) = (start_ms + k * MIN, start_ms + (k + 1) * MIN);
                calls
                    .iter()
                    .filter(|c| (from..to).contains(&c.to_ms))
                    .count()
            })
            .collect();
        assert!(per_minute.iter().all(|n| *n >= 10), "{per_minute:?}");
        let lag = telemetry.ces_publication_lag.get();
        assert!((80.0..90.0).contains(&lag), "{lag}");
    }

    #[tokio::test(start_paused = true)]
    async fn series_whose_minute_comes_later_are_asked_again_alone() {
        use crate::sim::publication::Publication;
        // 40 listeners x 3 metrics in batches of 12; l7's minutes come 5 s after everyone else's.
        let (cloud, targets) = world(40, 1.0);
        let lag = Publication::constant(Duration::from_secs(83));
        let late = Publication::constant(Duration::from_secs(88));
        cloud.set_publication(lag);
        cloud.set_listener_publication(&listener(7), late);
        let start_ms = T0 + 35_000;
        let clock = WallClock::virtual_from(start_ms);
        let s = CollectorSettings {
            align: true,
            clock,
            ..settings(12, 4)
        };
        let (mut rx, _) = spawn(cloud.clone(), s, targets);
        let l7: SeriesKey = SeriesKey::new(listener(7).into(), 0);
        let other: SeriesKey = SeriesKey::new(listener(8).into(), 0);
        // (minute, when l7 showed it, when l8 did).
        let mut shown: HashMap<i64, (Option<i64>, Option<i64>)> = HashMap::new();
        while clock.now_ms() < start_ms + 12 * MIN {
            rx.changed().await.expect("collector runs");
            let snap = rx.borrow_and_update().clone();
            let now = clock.now_ms();
            for (key, slot) in [(&l7, 0), (&other, 1)] {
                if let Some(v) = snap.get(key) {
                    let e = shown.entry(v.timestamp_ms).or_default();
                    let at = if slot == 0 { &mut e.0 } else { &mut e.1 };
                    at.get_or_insert(now);
                }
            }
        }
        for i in 6..12 {
            let m = T0 + i * MIN;
            let (Some(l7_at), Some(other_at)) = shown.get(&m).copied().unwrap_or_default() else {
                panic!("minute {i} not shown: {shown:?}");
            };
            assert!(
                other_at - lag.published_at(m) <= 3_000,
                "minute {i}: {shown:?}"
            );
            assert!(
                (0..=8_000).contains(&(l7_at - late.published_at(m))),
                "minute {i}: l7 at {} s after its publication",
                (l7_at - late.published_at(m)) / 1000
            );
        }
        // The re-asks carry l7's series only, packed in one call.
        let alone = cloud
            .calls()
            .iter()
            .filter(|c| c.series.iter().all(|(l, _)| *l == listener(7)))
            .map(|c| c.series.len())
            .collect::<Vec<_>>();
        assert!(
            alone.len() >= 6 && alone.iter().all(|n| *n == METRICS.len()),
            "{alone:?}"
        );
    }

    #[test]
    fn plans_stretch_only_when_the_budget_needs_it() {
        let minute = Duration::from_secs(60);
        let p = CyclePlan::new(260, minute, 300);
        assert_eq!(
            (p.deadline, p.period, p.over_budget),
            (minute, minute, false)
        );
        // 600 calls at 300/minute: two minutes to send them; neither cut nor crowded.
        let p = CyclePlan::new(600, minute, 300);
        assert_eq!(p.period, 2 * minute);
        assert_eq!(p.deadline, 2 * minute);
        assert!(p.over_budget);
        // A 5-minute interval with a 2-minute plan keeps its interval.
        let p = CyclePlan::new(600, 5 * minute, 300);
        assert_eq!(
            (p.deadline, p.period, p.over_budget),
            (5 * minute, 5 * minute, false)
        );
    }

    const MIN: i64 = 60_000;
    const T0: i64 = 1_800_000_000_000;

    fn key(listener: &str, metric: usize) -> SeriesKey {
        SeriesKey::new(Arc::from(listener), metric)
    }

    fn point(timestamp_ms: i64, value: f64) -> Option<Datapoint> {
        Some(Datapoint {
            timestamp_ms,
            value,
        })
    }

    /// One answer per minute, cycles 1..=minutes, for an idle listener "idle" (metric 0, never a datapoint)
    /// next to a busy one ("busy", metric 0, a datapoint one minute old); returns the last cycle's values.
    fn run(zeros: &Mutex<ZeroGuard>, minutes: u64, busy_age_ms: i64) -> HashMap<SeriesKey, Sample> {
        let mut values = HashMap::new();
        for cycle in 1..=minutes {
            let now = T0 + i64::try_from(cycle).expect("small") * MIN;
            values.clear();
            merge(
                &mut values,
                vec![key("idle", 0), key("busy", 0)],
                vec![None, point(now - busy_age_ms, 42.0)],
                Instant::now(),
                cycle,
                zeros,
                now,
            );
        }
        values
    }

    fn guard(enabled: bool) -> Mutex<ZeroGuard> {
        Mutex::new(ZeroGuard::new(enabled, Duration::from_secs(300)))
    }

    #[test]
    fn absent_stays_absent_by_default() {
        let values = run(&guard(false), 10, MIN);
        assert_eq!(values.get(&key("busy", 0)).map(|s| s.value), Some(42.0));
        assert!(!values.contains_key(&key("idle", 0)), "{values:?}");
    }

    #[test]
    fn zero_for_a_listener_attributed_longer_than_the_lookback_while_others_have_data() {
        let values = run(&guard(true), 10, MIN);
        let now = T0 + 10 * MIN;
        let idle = values
            .get(&key("idle", 0))
            .expect("a 0 for the idle listener");
        assert_eq!(idle.value, 0.0);
        // Stamped with the answer's fresh datapoint, never fresher than real data.
        assert_eq!(idle.timestamp_ms, now - MIN);
        assert_eq!(values.get(&key("busy", 0)).map(|s| s.value), Some(42.0));
    }

    #[test]
    fn no_zero_for_a_new_listener() {
        // First answered at minute 1: at minute 6 it has been attributed for exactly the 5-minute lookback.
        let values = run(&guard(true), 6, MIN);
        assert!(!values.contains_key(&key("idle", 0)), "{values:?}");
        // One more minute and it qualifies.
        let values = run(&guard(true), 7, MIN);
        assert_eq!(values.get(&key("idle", 0)).map(|s| s.value), Some(0.0));
    }

    #[test]
    fn no_zero_during_an_ingestion_gap() {
        // The other series' newest datapoint is older than the lookback: CES is not ingesting.
        let values = run(&guard(true), 10, 6 * MIN);
        assert!(!values.contains_key(&key("idle", 0)), "{values:?}");
        // An answer without any datapoint at all: nothing is made up either.
        let zeros = guard(true);
        run(&zeros, 10, MIN);
        let mut values = HashMap::new();
        let now = T0 + 11 * MIN;
        merge(
            &mut values,
            vec![key("idle", 0), key("busy", 0)],
            vec![None, None],
            Instant::now(),
            11,
            &zeros,
            now,
        );
        assert!(values.is_empty(), "{values:?}");
    }

    #[test]
    fn no_zero_after_a_cycle_without_an_answer() {
        // The listener's batch failed (no answer reaches merge) in cycle 11: it starts afresh in cycle 12,
        // as does a listener that was detached and attributed again.
        let zeros = guard(true);
        run(&zeros, 10, MIN);
        let mut values = HashMap::new();
        let now = T0 + 12 * MIN;
        merge(
            &mut values,
            vec![key("idle", 0), key("busy", 0)],
            vec![None, point(now - MIN, 1.0)],
            Instant::now(),
            12,
            &zeros,
            now,
        );
        assert!(!values.contains_key(&key("idle", 0)), "{values:?}");
    }

    #[test]
    fn a_prompt_answer_starts_the_attribution_and_same_cycle_answers_keep_it() {
        // "new" appears after cycle 10 and is collected promptly, merged with the current cycle number 10.
        let zeros = guard(true);
        run(&zeros, 10, MIN);
        let first = T0 + 10 * MIN + 30_000;
        let mut values = HashMap::new();
        merge(
            &mut values,
            vec![key("new", 0)],
            vec![None],
            Instant::now(),
            10,
            &zeros,
            first,
        );
        let idle_new = |cycle: u64| {
            let now = T0 + i64::try_from(cycle).expect("small") * MIN;
            let mut values = HashMap::new();
            merge(
                &mut values,
                vec![key("new", 0), key("busy", 0)],
                vec![None, point(now - MIN, 42.0)],
                Instant::now(),
                cycle,
                &zeros,
                now,
            );
            values.get(&key("new", 0)).map(|s| s.value)
        };
        // Minute 15: 4.5 minutes since its first answer; minute 16: 5.5, longer than the lookback.
        for cycle in 11..=15 {
            assert_eq!(idle_new(cycle), None, "cycle {cycle}");
        }
        assert_eq!(idle_new(16), Some(0.0));
    }

    #[test]
    fn detached_listeners_are_forgotten() {
        let zeros = guard(true);
        run(&zeros, 3, MIN);
        let mut values = HashMap::new();
        // "idle" is gone from cycle 4 on; only "busy" is answered.
        for cycle in 4..=5 {
            let now = T0 + i64::try_from(cycle).expect("small") * MIN;
            merge(
                &mut values,
                vec![key("busy", 0)],
                vec![point(now - MIN, 1.0)],
                Instant::now(),
                cycle,
                &zeros,
                now,
            );
        }
        let seen = &zeros.lock().expect("lock").seen;
        assert_eq!(seen.keys().map(|k| &**k).collect::<Vec<_>>(), ["busy"]);
    }
}
