//! Background collection: every interval, every attributed listener × metric is queried from CES in the
//! fewest batch calls (packed across all load balancers), the newest datapoint per series is kept, and
//! the whole result is swapped in atomically. Listeners that appear between ticks are collected at once.

use crate::cloud::{BatchQuery, CloudApi, CloudError, Datapoint, MetricQuery};
use crate::config::{Config, Filter};
use crate::discovery::inventory::Targets;
use crate::telemetry::{Api, Telemetry};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
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
        }
    }
}

/// Records the datapoints of one answered batch; a series without a datapoint stays absent.
fn merge(
    values: &mut HashMap<SeriesKey, Sample>,
    keys: Vec<SeriesKey>,
    points: Vec<Option<Datapoint>>,
    cycle: u64,
) {
    for (key, p) in keys.into_iter().zip(points) {
        if let Some(p) = p {
            values.insert(
                key,
                Sample {
                    value: p.value,
                    timestamp_ms: p.timestamp_ms,
                    cycle,
                },
            );
        }
    }
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
}

impl<C: CloudApi> Collector<C> {
    pub fn new(
        cloud: Arc<C>,
        settings: CollectorSettings,
        telemetry: Telemetry,
    ) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        (
            Collector {
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
                merge(&mut values, keys, points, cycle);
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
            .get(&crate::discovery::Problem::ElbLookupFailed)
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
            Ok(points) => merge(&mut extra, keys, points, prev.cycle),
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
