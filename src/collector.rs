//! Background collection: every interval, every attributed listener × metric is queried from CES in the
//! fewest batch calls (packed across all load balancers), the newest datapoint per series is kept, and
//! the whole result is swapped in atomically. Listeners that appear between ticks are collected at once.

use crate::cloud::{BatchQuery, CloudApi, CloudError, Datapoint, MetricQuery};
use crate::config::{Config, Filter};
use crate::discovery::inventory::Targets;
use crate::telemetry::{Api, Telemetry};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub const NAMESPACE: &str = "SYS.ELB";
/// Debounce before collecting newly attributed listeners, so a burst of Services costs one call.
const NEW_LISTENER_DELAY: Duration = Duration::from_millis(200);

/// The newest datapoint of one series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub value: f64,
    pub timestamp_ms: i64,
    /// When CES last returned it: the staleness bound is an age, checked when the body is rendered.
    pub fetched: Instant,
}

/// Series key: listener id and index into the configured metric list.
pub type SeriesKey = (Arc<str>, u16);

/// The result of collection, published as a whole.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub cycle: u64,
    /// Values of the last full cycle, shared (not copied) by the snapshots that follow it.
    pub values: Arc<HashMap<SeriesKey, Sample>>,
    /// Values of listeners collected promptly since the last full cycle (small).
    pub extra: Arc<HashMap<SeriesKey, Sample>>,
    /// A full collection cycle has finished (successfully or not).
    pub finished: bool,
    /// The last full cycle succeeded completely.
    pub up: bool,
    /// How long a value is served after CES returned it: `stale_intervals` × the cycle period (the
    /// interval, or the longer period cycles are paced to); `None` leaves it to the renderer.
    pub stale_after: Option<Duration>,
}

impl Snapshot {
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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What to collect and how.
#[derive(Debug, Clone)]
pub struct CollectorSettings {
    pub metrics: Arc<Vec<String>>,
    pub filter: Filter,
    pub interval: Duration,
    pub lookback: Duration,
    pub batch_size: usize,
    pub stale_intervals: u32,
    pub concurrency: usize,
    /// The CES rate limit (calls per minute) the cycles are planned against.
    pub ces_per_minute: u32,
    /// `collection.absent_as_zero`: see [`ZeroGuard`].
    pub absent_as_zero: bool,
}

impl CollectorSettings {
    pub fn from_config(c: &Config) -> Self {
        CollectorSettings {
            metrics: Arc::new(c.collection.metrics.clone()),
            filter: c.collection.filter,
            interval: c.collection.interval,
            lookback: c.collection.lookback,
            batch_size: c.effective_batch_size(),
            stale_intervals: c.collection.stale_intervals,
            concurrency: c.cloud.max_concurrency,
            ces_per_minute: c.cloud.rate_limit.ces_per_minute,
            absent_as_zero: c.collection.absent_as_zero,
        }
    }

    /// How long a value keeps being served after CES last returned it, when cycles run every `period`.
    pub fn stale_after(&self, period: Duration) -> Duration {
        period.saturating_mul(self.stale_intervals)
    }
}

/// What a full cycle of `calls` CES calls may take, and how often it can run within the rate limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CyclePlan {
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
        for (listener, _) in keys {
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
            (None, Some(ts)) if zeros.zero_allowed(&key.0, now_ms) => (0.0, ts),
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

fn wall_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}

/// (listener index, metric index) of each series in batch `batch`, when `listeners` × `per_listener`
/// metrics are cut into batches of `size`.
fn batch_series(
    listeners: usize,
    per_listener: usize,
    size: usize,
    batch: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let total = listeners * per_listener;
    (batch * size..((batch + 1) * size).min(total))
        .map(move |i| (i / per_listener, i % per_listener))
}

/// CES calls one cycle needs for `listeners` listeners: ceil(listeners × metrics / batch size).
pub fn calls_per_cycle(listeners: usize, metrics: usize, batch_size: usize) -> usize {
    (listeners * metrics).div_ceil(batch_size.max(1))
}

/// The distinct (ELB, listener) pairs of the targets, in target order.
pub fn distinct_listeners(targets: &Targets) -> Vec<(Arc<str>, Arc<str>)> {
    let mut seen = HashSet::with_capacity(targets.targets.len());
    targets
        .targets
        .iter()
        .filter(|t| seen.insert(t.listener_id.clone()))
        .map(|t| (t.elb_id.clone(), t.listener_id.clone()))
        .collect()
}

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

impl<C: CloudApi> Collector<C> {
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
            },
            rx,
        )
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
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    let started = Instant::now();
                    let t = targets.borrow_and_update().clone();
                    let period = self.full_cycle(&t).await;
                    // Never start a cycle in the past: a long cycle delays the next, it does not double it.
                    next = (started + period).max(Instant::now());
                }
                changed = targets.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(NEW_LISTENER_DELAY).await;
                    let t = targets.borrow_and_update().clone();
                    self.prompt_cycle(&t).await;
                }
            }
        }
    }

    fn window(&self) -> (i64, i64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        (now - self.settings.lookback.as_millis() as i64, now)
    }

    /// Queries `listeners` × metrics and hands each batch's outcome to `sink` as it arrives, with the
    /// batch's index. Batches are built only when a call slot is free, so a 10k-listener cycle never
    /// holds its 260 requests at once.
    async fn query(
        &self,
        listeners: &[(Arc<str>, Arc<str>)],
        mut sink: impl FnMut(usize, Vec<SeriesKey>, Result<Vec<Option<Datapoint>>, CloudError>),
    ) {
        let (from_ms, to_ms) = self.window();
        let metrics = &self.settings.metrics;
        let per_listener = metrics.len();
        let size = self.settings.batch_size.max(1);
        let filter = self.settings.filter;
        let cloud = &self.cloud;
        let build = |batch: usize| {
            let mut keys = Vec::with_capacity(size);
            let mut queries = Vec::with_capacity(size);
            for (l, m) in batch_series(listeners.len(), per_listener, size, batch) {
                let (elb, listener) = &listeners[l];
                keys.push((listener.clone(), m as u16));
                queries.push(MetricQuery {
                    namespace: NAMESPACE.to_string(),
                    metric_name: metrics[m].clone(),
                    dimensions: vec![
                        ("lbaas_instance_id".to_string(), elb.to_string()),
                        ("lbaas_listener_id".to_string(), listener.to_string()),
                    ],
                });
            }
            let query = BatchQuery {
                metrics: queries,
                from_ms,
                to_ms,
                period: "1",
                filter,
            };
            let cloud = cloud.clone();
            async move {
                let r = cloud.batch_query(&query).await.map(|r| r.newest);
                (batch, keys, r)
            }
        };
        let total = listeners.len() * per_listener;
        let mut outcomes = futures::stream::iter(0..total.div_ceil(size))
            .map(build)
            .buffer_unordered(self.settings.concurrency.max(1));
        while let Some((batch, keys, result)) = outcomes.next().await {
            sink(batch, keys, result);
        }
    }

    /// Plans a cycle for `listeners`, exports the plan and says when it does not fit the CES budget.
    fn plan(&mut self, listeners: usize) -> CyclePlan {
        self.learn_batch_size();
        let s = &self.settings;
        let calls = calls_per_cycle(listeners, s.metrics.len(), s.batch_size);
        let plan = CyclePlan::new(calls, s.interval, s.ces_per_minute);
        let per_minute = calls as f64 * 60.0 / s.interval.as_secs_f64().max(0.001);
        self.telemetry
            .planned_calls
            .with_label_values(&[Api::CesBatchQuery.as_str()])
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

    /// One full cycle; returns how long after its start the next one may begin.
    async fn full_cycle(&mut self, targets: &Targets) -> Duration {
        let started = Instant::now();
        let listeners = distinct_listeners(targets);
        let plan = self.plan(listeners.len());
        let prev = self.tx.borrow().clone();
        let cycle = prev.cycle + 1;
        let mut values: HashMap<SeriesKey, Sample> =
            HashMap::with_capacity(listeners.len() * self.settings.metrics.len());
        let mut out = CycleOutcome {
            answered: vec![false; plan.calls],
            ..CycleOutcome::default()
        };
        let stale_after = self.settings.stale_after(plan.period);
        let keep = |values: &mut HashMap<SeriesKey, Sample>, key: SeriesKey| -> bool {
            match prev.get(&key) {
                Some(old) if started.saturating_duration_since(old.fetched) <= stale_after => {
                    values.insert(key, *old);
                    true
                }
                _ => false,
            }
        };
        let run = self.query(&listeners, |batch, keys, result| {
            if let Some(a) = out.answered.get_mut(batch) {
                *a = true;
            }
            match result {
                Ok(points) => {
                    out.ok_calls += 1;
                    let now = Instant::now();
                    merge(
                        &mut values,
                        keys,
                        points,
                        now,
                        cycle,
                        &self.zeros,
                        wall_ms(),
                    );
                }
                Err(e) => {
                    out.failed_calls += 1;
                    // Keep serving the last good values of this batch, within the staleness bound.
                    for key in keys {
                        out.kept_stale += usize::from(keep(&mut values, key));
                    }
                    out.first_error.get_or_insert(e);
                }
            }
        });
        let cut = tokio::time::timeout(plan.deadline, run).await.is_err();
        if cut {
            self.keep_unanswered(&listeners, &mut out, &mut values, keep);
        }
        let done = CycleDone {
            cycle,
            started,
            cut,
            stale_after,
        };
        self.finish_cycle(targets, &listeners, done, values, out);
        plan.period
    }

    /// After a cut, the batches that never answered keep their last values within the staleness bound.
    fn keep_unanswered(
        &self,
        listeners: &[(Arc<str>, Arc<str>)],
        out: &mut CycleOutcome,
        values: &mut HashMap<SeriesKey, Sample>,
        mut keep: impl FnMut(&mut HashMap<SeriesKey, Sample>, SeriesKey) -> bool,
    ) {
        let per_listener = self.settings.metrics.len();
        let size = self.settings.batch_size.max(1);
        for (batch, _) in out.answered.iter().enumerate().filter(|(_, a)| !**a) {
            for (l, m) in batch_series(listeners.len(), per_listener, size, batch) {
                let key = (listeners[l].1.clone(), m as u16);
                out.kept_stale += usize::from(keep(values, key));
            }
        }
    }

    /// Publishes a full cycle's values and says how it went (metrics, log).
    fn finish_cycle(
        &mut self,
        targets: &Targets,
        listeners: &[(Arc<str>, Arc<str>)],
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
        for (_, l) in listeners {
            self.attempted.insert(l.clone());
        }
        let live: HashSet<&Arc<str>> = listeners.iter().map(|(_, l)| l).collect();
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
                listeners = listeners.len(),
                calls = out.ok_calls,
                series = values.len(),
                elapsed_ms = elapsed.as_millis() as u64,
                "collection done"
            ),
            (e, _) => warn!(
                cycle,
                listeners = listeners.len(),
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
            finished: true,
            up,
            stale_after: Some(stale_after),
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
        if fresh.is_empty() {
            return;
        }
        debug!(listeners = fresh.len(), "collecting new listeners now");
        self.learn_batch_size();
        let prev = self.tx.borrow().clone();
        let mut extra: HashMap<SeriesKey, Sample> = (*prev.extra).clone();
        // Bounded like a full cycle, so new listeners never hold back the next full cycle for long;
        // what it did not finish, the next full cycle collects.
        let plan = CyclePlan::new(
            calls_per_cycle(
                fresh.len(),
                self.settings.metrics.len(),
                self.settings.batch_size,
            ),
            self.settings.interval,
            self.settings.ces_per_minute,
        );
        let run = self.query(&fresh, |_, keys, result| match result {
            Ok(points) => merge(
                &mut extra,
                keys,
                points,
                Instant::now(),
                prev.cycle,
                &self.zeros,
                wall_ms(),
            ),
            Err(e) => {
                warn!(error = %e, "prompt collection of new listeners failed; the next cycle retries")
            }
        });
        if tokio::time::timeout(plan.deadline, run).await.is_err() {
            warn!(
                listeners = fresh.len(),
                "prompt collection of new listeners cut at its deadline; the next cycle collects them"
            );
        }
        for (_, l) in &fresh {
            self.attempted.insert(l.clone());
        }
        let snapshot = Snapshot {
            cycle: prev.cycle,
            values: prev.values.clone(),
            extra: Arc::new(extra),
            finished: prev.finished,
            up: prev.up,
            stale_after: prev.stale_after,
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
            filter: Filter::Average,
            interval: Duration::from_secs(60),
            lookback: Duration::from_secs(300),
            batch_size,
            stale_intervals: 3,
            concurrency,
            ces_per_minute: 300,
            absent_as_zero: false,
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
                    namespace: "default".into(),
                    service: format!("svc{i}").into(),
                    elb_id: format!("elb{}", i % 2).into(),
                    listener_id: listener(i).into(),
                    listener_name: "k8s_TCP_80".into(),
                    port: 80,
                    protocol: "TCP".into(),
                }
            })
            .collect();
        let targets = Targets {
            synced: true,
            targets,
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
            for m in 0..3u16 {
                assert_eq!(
                    snap.get(&(listener(i).into(), m)).map(|s| s.value),
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
        let fresh = (listener(0).into(), 0u16);
        assert_eq!(second.get(&fresh).map(|s| s.value), Some(2.0));
        // The hung and unsent batches keep their last values (within the staleness bound).
        let kept = (listener(3).into(), 2u16);
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

    #[tokio::test(start_paused = true)]
    async fn a_hung_prompt_collection_does_not_hold_back_the_next_cycle() {
        let (cloud, targets) = world(2, 1.0);
        let telemetry = Telemetry::new();
        let (collector, mut rx) = Collector::new(cloud.clone(), settings(3, 1), telemetry);
        let one = Targets {
            synced: true,
            targets: targets.targets[..1].to_vec(),
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
        assert_eq!(
            second.len(),
            6,
            "the full cycle collected the new listener too"
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

    fn key(listener: &str, metric: u16) -> SeriesKey {
        (Arc::from(listener), metric)
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
