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
    /// Cycle in which CES last returned it (for the staleness bound).
    pub cycle: u64,
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
            absent_as_zero: c.collection.absent_as_zero,
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
                cycle,
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
    zeros: Mutex<ZeroGuard>,
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
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let t = targets.borrow_and_update().clone();
                    self.full_cycle(&t).await;
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

    /// Queries `listeners` × metrics and hands each batch's outcome to `sink` as it arrives. Batches are
    /// built only when a call slot is free, so a 10k-listener cycle never holds its 260 requests at once.
    async fn query(
        &self,
        listeners: &[(Arc<str>, Arc<str>)],
        mut sink: impl FnMut(Vec<SeriesKey>, Result<Vec<Option<Datapoint>>, CloudError>),
    ) {
        let (from_ms, to_ms) = self.window();
        let metrics = &self.settings.metrics;
        let per_listener = metrics.len();
        let total = listeners.len() * per_listener;
        let size = self.settings.batch_size.max(1);
        let filter = self.settings.filter;
        let cloud = &self.cloud;
        let build = |batch: usize| {
            let range = batch * size..((batch + 1) * size).min(total);
            let mut keys = Vec::with_capacity(range.len());
            let mut queries = Vec::with_capacity(range.len());
            for i in range {
                let (elb, l) = &listeners[i / per_listener];
                let m = i % per_listener;
                keys.push((l.clone(), m as u16));
                queries.push(MetricQuery {
                    namespace: NAMESPACE.to_string(),
                    metric_name: metrics[m].clone(),
                    dimensions: vec![
                        ("lbaas_instance_id".to_string(), elb.to_string()),
                        ("lbaas_listener_id".to_string(), l.to_string()),
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
                (keys, r)
            }
        };
        let mut outcomes = futures::stream::iter(0..total.div_ceil(size))
            .map(build)
            .buffer_unordered(self.settings.concurrency.max(1));
        while let Some((keys, result)) = outcomes.next().await {
            sink(keys, result);
        }
    }

    async fn full_cycle(&mut self, targets: &Targets) {
        let started = Instant::now();
        let listeners = distinct_listeners(targets);
        let prev = self.tx.borrow().clone();
        let cycle = prev.cycle + 1;
        let mut values: HashMap<SeriesKey, Sample> =
            HashMap::with_capacity(listeners.len() * self.settings.metrics.len());
        let (mut ok_calls, mut failed_calls, mut kept_stale) = (0usize, 0usize, 0usize);
        let mut first_error: Option<CloudError> = None;
        let stale_bound = u64::from(self.settings.stale_intervals);
        self.query(&listeners, |keys, result| match result {
            Ok(points) => {
                ok_calls += 1;
                merge(&mut values, keys, points, cycle, &self.zeros, wall_ms());
            }
            Err(e) => {
                failed_calls += 1;
                // Keep serving the last good values of this batch, within the staleness bound.
                for key in keys {
                    if let Some(old) = prev.get(&key)
                        && cycle - old.cycle <= stale_bound
                    {
                        values.insert(key, *old);
                        kept_stale += 1;
                    }
                }
                first_error.get_or_insert(e);
            }
        })
        .await;
        // Down when a batch failed, or when an ELB could not be looked up at all (a wrong key fails
        // every lookup, leaving no batch to fail).
        let lookups_failed = targets
            .problems
            .get("elb_lookup_failed")
            .copied()
            .unwrap_or(0);
        let up = failed_calls == 0 && lookups_failed == 0;
        for (_, l) in &listeners {
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
        let calls = calls_per_cycle(
            listeners.len(),
            self.settings.metrics.len(),
            self.settings.batch_size,
        );
        let per_minute = calls as f64 * 60.0 / self.settings.interval.as_secs_f64().max(0.001);
        self.telemetry
            .planned_calls
            .with_label_values(&[Api::CesBatchQuery.as_str()])
            .set(per_minute.ceil() as i64);
        self.telemetry.series.set(values.len() as i64);
        match &first_error {
            None => info!(
                cycle,
                listeners = listeners.len(),
                calls = ok_calls,
                series = values.len(),
                elapsed_ms = elapsed.as_millis() as u64,
                "collection done"
            ),
            Some(e) => warn!(
                cycle,
                listeners = listeners.len(),
                ok_calls,
                failed_calls,
                kept_stale,
                code = e.metric_code(),
                cloud_code = e.cloud_code().unwrap_or(""),
                error = %e,
                "collection failed in part; serving last good values within the staleness bound"
            ),
        }
        drop(prev);
        self.tx.send_replace(Arc::new(Snapshot {
            cycle,
            values: Arc::new(values),
            extra: Arc::default(),
            finished: true,
            up,
        }));
        // The cycle's answers are garbage now: return them before the new body is rendered on top.
        crate::app::release_memory();
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
        let prev = self.tx.borrow().clone();
        let mut extra: HashMap<SeriesKey, Sample> = (*prev.extra).clone();
        self.query(&fresh, |keys, result| match result {
            Ok(points) => merge(&mut extra, keys, points, prev.cycle, &self.zeros, wall_ms()),
            Err(e) => {
                warn!(error = %e, "prompt collection of new listeners failed; the next cycle retries")
            }
        })
        .await;
        for (_, l) in &fresh {
            self.attempted.insert(l.clone());
        }
        let snapshot = Snapshot {
            cycle: prev.cycle,
            values: prev.values.clone(),
            extra: Arc::new(extra),
            finished: prev.finished,
            up: prev.up,
        };
        self.telemetry.series.set(snapshot.len() as i64);
        self.tx.send_replace(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(idle.cycle, 10);
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
                cycle,
                &zeros,
                now,
            );
        }
        let seen = &zeros.lock().expect("lock").seen;
        assert_eq!(seen.keys().map(|k| &**k).collect::<Vec<_>>(), ["busy"]);
    }
}
