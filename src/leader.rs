//! Leader election on a `coordination.k8s.io/v1` Lease, so several replicas run one collector.
//!
//! No maintained crate fits kube 5 / k8s-openapi 0.29 (`kube-leader-election` 0.44 needs kube 4,
//! `kube-coordinate` 2.0.0-rc.0 kube 2), so this follows client-go's `leaderelection` protocol itself:
//! read the Lease, then create it or `replace` it under its resourceVersion, so of two replicas writing
//! the same version one gets 409 Conflict. [`Elector`] is the pure core (the clock is passed in);
//! [`Election`] drives it against the apiserver.
//!
//! Timing (client-go's names): followers take over once they have seen no change of the Lease for
//! `lease_duration` (their own monotonic clock, so skew between nodes does not matter); the leader renews
//! every `retry_period` and steps down at once when it has not renewed for `renew_deadline`, which is
//! shorter than the lease, so a cut-off leader stops collecting before anyone else may start. On shutdown
//! the leader clears the holder (leaseDurationSeconds 1, as client-go's `ReleaseOnCancel`), so a follower
//! takes over at its next try. The start of the leader's last collection cycle is kept on the Lease
//! ([`LAST_CYCLE_ANNOTATION`]); a new leader starts no earlier than that plus the interval, so no interval
//! is collected twice across a handover.

use crate::clock::now_ms;
use crate::config::LeaderElection;
use crate::telemetry::Telemetry;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Unix milliseconds at which the holder's last collection cycle started.
pub const LAST_CYCLE_ANNOTATION: &str = "elb-exporter.huaweicloud.com/last-cycle-start-ms";
/// Where the holder serves its warm copy (`scheme://ip:port`), so followers can mirror its cloud series
/// and serve them from the moment they take over.
pub const PEER_URL_ANNOTATION: &str = "elb-exporter.huaweicloud.com/peer-url";
/// How long a release on shutdown may take before the process exits anyway (the Lease then expires).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// Failed lease requests in a row are logged at warn once, then every this many.
const LOG_EVERY: u32 = 30;

/// What the collector and the renderer need to know: collect (and export cloud series) or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leadership {
    /// This replica holds the Lease (or election is off) and collects.
    pub leading: bool,
    /// The first cycle of this term starts no earlier than this: the previous holder's last cycle start
    /// plus the interval.
    pub not_before: Option<Instant>,
}

/// The collector's side of the election.
pub struct Lead {
    /// Whether to collect, and from when.
    pub leadership: watch::Receiver<Leadership>,
    /// Start (unix ms) of the cycle the collector is about to run.
    pub started: watch::Sender<Option<i64>>,
    /// The newest cycle start stored on the Lease. A cycle calls CES only once its start is recorded,
    /// so a successor never misses a cycle a cut-off leader ran and collects its interval again.
    pub recorded: watch::Receiver<Option<i64>>,
}

/// Why a Lease call failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone else wrote the Lease since we read it (409), or created it first.
    #[error("lease changed by another writer (409 Conflict)")]
    Conflict,
    /// The apiserver refused or failed the request.
    #[error("lease request: {0}")]
    Api(#[source] Box<kube::Error>),
    /// The apiserver did not answer in time.
    #[error("lease request timed out after {0:?}")]
    Timeout(Duration),
}

impl From<kube::Error> for LeaseError {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.code == 409 => LeaseError::Conflict,
            _ => LeaseError::Api(Box::new(e)),
        }
    }
}

/// The Lease fields the protocol uses, independent of the wire type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// `None` (or empty on the wire): free.
    pub holder: Option<String>,
    /// `leaseDurationSeconds`: how long the holder's claim lasts without renewal.
    pub lease_duration_s: i32,
    /// `acquireTime`, Unix ms.
    pub acquire_ms: Option<i64>,
    /// `renewTime`, Unix ms: the claim runs from here.
    pub renew_ms: Option<i64>,
    /// `leaseTransitions`: incremented at each change of holder.
    pub transitions: i32,
    /// The last cycle start recorded by a leader (annotation), so a successor does not collect the
    /// same interval again.
    pub last_cycle_ms: Option<i64>,
    /// The holder's warm-copy address (annotation); cleared on release.
    pub peer_url: Option<String>,
    /// For the replace under optimistic concurrency.
    pub resource_version: Option<String>,
}

/// Another replica holding the Lease, as a follower last read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its identity.
    pub identity: String,
    /// Its warm-copy address, if it advertises one.
    pub peer_url: Option<String>,
}

/// What to write after reading the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The Lease does not exist yet.
    Create(Record),
    /// A replace under the read resourceVersion.
    Update(Record),
}

/// The election's durations (`leader_election.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a claim lasts without renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew within this stops leading.
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl From<&LeaderElection> for Timing {
    fn from(c: &LeaderElection) -> Self {
        Timing {
            lease_duration: c.lease_duration,
            renew_deadline: c.renew_deadline,
            retry_period: c.retry_period,
        }
    }
}

/// The protocol's state for one replica. Pure: every method takes the time it is called at.
#[derive(Debug)]
pub struct Elector {
    identity: String,
    timing: Timing,
    /// The Lease as last seen, and when it was first seen like that (our clock, not the holder's).
    observed: Option<(Record, Instant)>,
    /// While leading: when the last successful write was sent.
    renewed: Option<Instant>,
    /// The newest cycle start of ours, recorded on the next write.
    last_cycle_ms: Option<i64>,
    /// Our warm-copy address, written with every claim and renewal.
    peer_url: Option<String>,
}

impl Elector {
    /// An elector for replica `identity`, not leading.
    pub fn new(identity: impl Into<String>, timing: Timing) -> Self {
        Elector {
            identity: identity.into(),
            timing,
            observed: None,
            renewed: None,
            last_cycle_ms: None,
            peer_url: None,
        }
    }

    /// Advertises `url` on the Lease while leading.
    pub fn with_peer_url(mut self, url: Option<String>) -> Self {
        self.peer_url = url;
        self
    }

    /// The Lease's holder when it is another replica, as last seen.
    pub fn other_holder(&self) -> Option<Holder> {
        let (r, _) = self.observed.as_ref()?;
        let identity = r.holder.clone().filter(|h| *h != self.identity)?;
        Some(Holder {
            identity,
            peer_url: r.peer_url.clone(),
        })
    }

    /// The holder name this replica writes (`leader_election.identity`, else the pod name or hostname).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Leading until `renew_deadline` after the last successful write.
    pub fn leading(&self, now: Instant) -> bool {
        self.renewed
            .is_some_and(|r| now < r + self.timing.renew_deadline)
    }

    /// When leadership ends unless a renewal succeeds first.
    pub fn step_down_at(&self) -> Option<Instant> {
        self.renewed.map(|r| r + self.timing.renew_deadline)
    }

    /// Drops a leadership whose renew deadline has passed; returns whether still leading.
    pub fn tick(&mut self, now: Instant) -> bool {
        if !self.leading(now) {
            self.renewed = None;
        }
        self.renewed.is_some()
    }

    /// Notes the start of a collection cycle, to be recorded on the Lease.
    pub fn record_cycle(&mut self, wall_ms: i64) {
        self.last_cycle_ms = self.last_cycle_ms.max(Some(wall_ms));
    }

    /// The previous cycle start recorded on the Lease as last seen.
    pub fn last_cycle_ms(&self) -> Option<i64> {
        self.observed
            .as_ref()
            .and_then(|(r, _)| r.last_cycle_ms)
            .max(self.last_cycle_ms)
    }

    /// Given the Lease as just read (`None`: it does not exist), what to write, if anything. Seeing
    /// another holder ends our leadership at once.
    pub fn plan(&mut self, now: Instant, wall_ms: i64, current: Option<Record>) -> Option<Write> {
        let Some(cur) = current else {
            self.observed = None;
            return Some(Write::Create(self.claim(wall_ms, None)));
        };
        if self.observed.as_ref().is_none_or(|(o, _)| *o != cur) {
            self.observed = Some((cur.clone(), now));
        }
        let holder = cur.holder.as_deref().filter(|h| !h.is_empty());
        // Ours and still held by this process: renew, keeping the acquire time. A Lease under our name
        // that this process did not write (a container restarted after a crash or an OOM kill, or a term
        // that ran past its renew deadline) is waited out like another holder's, and `renew_deadline`
        // longer: a follower, which saw the last renewal before this process started, takes over first
        // with its warm copy of the series; a process that just started has none and would serve nothing
        // until its first cycle.
        let ours = holder == Some(self.identity.as_str());
        if ours && self.renewed.is_some() {
            return Some(Write::Update(Record {
                renew_ms: Some(wall_ms),
                lease_duration_s: self.lease_seconds(),
                last_cycle_ms: cur.last_cycle_ms.max(self.last_cycle_ms),
                peer_url: self.peer_url.clone(),
                ..cur
            }));
        }
        self.renewed = None;
        let grace = if ours {
            self.timing.renew_deadline
        } else {
            Duration::ZERO
        };
        if holder.is_some() && !self.expired(now, grace) {
            return None;
        }
        Some(Write::Update(self.claim(wall_ms, Some(&cur))))
    }

    /// The Lease was written as planned at `sent`; returns true when this starts a term.
    pub fn written(&mut self, sent: Instant, stored: Record) -> bool {
        let ours = stored.holder.as_deref() == Some(self.identity.as_str());
        self.observed = Some((stored, sent));
        if !ours {
            self.renewed = None;
            return false;
        }
        let new_term = self.renewed.is_none();
        self.renewed = Some(self.renewed.map_or(sent, |r| r.max(sent)));
        new_term
    }

    /// Another writer got in first (409): whoever that was, we no longer know that we lead.
    pub fn conflict(&mut self) {
        self.renewed = None;
    }

    /// On shutdown: stops leading and returns the record that frees the Lease, if we held it.
    pub fn release(&mut self, wall_ms: i64) -> Option<Record> {
        self.renewed.take()?;
        let (cur, _) = self.observed.as_ref()?;
        if cur.holder.as_deref() != Some(self.identity.as_str()) {
            return None;
        }
        Some(Record {
            holder: None,
            lease_duration_s: 1,
            acquire_ms: Some(wall_ms),
            renew_ms: Some(wall_ms),
            last_cycle_ms: cur.last_cycle_ms.max(self.last_cycle_ms),
            peer_url: None,
            ..cur.clone()
        })
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Nobody renewed it for its lease duration (+ `grace`), counted from when we first saw its current
    /// state.
    fn expired(&self, now: Instant, grace: Duration) -> bool {
        self.observed.as_ref().is_none_or(|(r, at)| {
            let d = Duration::from_secs(u64::try_from(r.lease_duration_s).unwrap_or(0));
            now >= *at + d + grace
        })
    }

    fn claim(&self, wall_ms: i64, prev: Option<&Record>) -> Record {
        let transitions = prev.map_or(0, |p| {
            let same = p.holder.as_deref() == Some(self.identity.as_str());
            p.transitions + i32::from(!same)
        });
        Record {
            holder: Some(self.identity.clone()),
            lease_duration_s: self.lease_seconds(),
            acquire_ms: Some(wall_ms),
            renew_ms: Some(wall_ms),
            transitions,
            last_cycle_ms: prev.and_then(|p| p.last_cycle_ms).max(self.last_cycle_ms),
            peer_url: self.peer_url.clone(),
            resource_version: prev.and_then(|p| p.resource_version.clone()),
        }
    }
}

/// How long after acquiring the first cycle must wait: until the previous cycle start plus `interval`,
/// and never longer than one interval, so a start recorded in the future (a skewed clock, a hand-edited
/// Lease) cannot park collection. Collecting at once instead would re-read the minute the previous
/// leader already had and double that minute's CES calls (over the account throttle at 10,000
/// listeners); the price is a gap of up to one interval after a handover early in the interval
/// (docs/PERFORMANCE.md, *High availability*).
pub fn first_cycle_delay(last_cycle_ms: Option<i64>, interval: Duration, wall_ms: i64) -> Duration {
    let Some(last) = last_cycle_ms else {
        return Duration::ZERO;
    };
    let due = last.saturating_add(i64::try_from(interval.as_millis()).unwrap_or(i64::MAX));
    Duration::from_millis(u64::try_from(due.saturating_sub(wall_ms)).unwrap_or(0)).min(interval)
}

fn micro(ms: Option<i64>) -> Option<MicroTime> {
    ms.and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map(MicroTime)
}

/// The protocol's view of a Lease.
pub fn record_of(lease: &Lease) -> Record {
    let spec = lease.spec.clone().unwrap_or_default();
    Record {
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        lease_duration_s: spec.lease_duration_seconds.unwrap_or(0),
        acquire_ms: spec.acquire_time.map(|t| t.0.as_millisecond()),
        renew_ms: spec.renew_time.map(|t| t.0.as_millisecond()),
        transitions: spec.lease_transitions.unwrap_or(0),
        last_cycle_ms: lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LAST_CYCLE_ANNOTATION))
            .and_then(|v| v.parse().ok()),
        peer_url: lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PEER_URL_ANNOTATION))
            .cloned(),
        resource_version: lease.metadata.resource_version.clone(),
    }
}

/// `base` (the Lease as read, keeping whatever else is on it) with `r` applied.
pub fn lease_of(mut base: Lease, r: &Record) -> Lease {
    let spec = base.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = Some(r.holder.clone().unwrap_or_default());
    spec.lease_duration_seconds = Some(r.lease_duration_s);
    spec.acquire_time = micro(r.acquire_ms);
    spec.renew_time = micro(r.renew_ms);
    spec.lease_transitions = Some(r.transitions);
    if let Some(ms) = r.last_cycle_ms {
        base.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(LAST_CYCLE_ANNOTATION.to_string(), ms.to_string());
    }
    let annotations = base
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    match &r.peer_url {
        Some(url) => annotations.insert(PEER_URL_ANNOTATION.to_string(), url.clone()),
        None => annotations.remove(PEER_URL_ANNOTATION),
    };
    base.metadata.resource_version = r.resource_version.clone();
    base
}

/// The Lease as stored now (`None`: not created yet), for `check`.
pub async fn describe(api: &Api<Lease>, name: &str) -> Result<Option<Record>, LeaseError> {
    let got = tokio::time::timeout(RELEASE_TIMEOUT * 5, api.get_opt(name))
        .await
        .map_err(|_| LeaseError::Timeout(RELEASE_TIMEOUT * 5))??;
    Ok(got.as_ref().map(record_of))
}

/// The running election of one replica.
pub struct Election {
    /// The Lease's API (namespace of `leader_election.lease_namespace`).
    pub api: Api<Lease>,
    /// `leader_election` settings.
    pub config: LeaderElection,
    /// `collection.interval`: the least time between two cycle starts across leaders.
    pub interval: Duration,
    /// For `elb_exporter_leader`.
    pub telemetry: Telemetry,
    /// Publishes whether to collect.
    pub leadership: watch::Sender<Leadership>,
    /// Cycle starts (unix ms) reported by the collector.
    pub cycles: watch::Receiver<Option<i64>>,
    /// The newest cycle start written to the Lease while leading.
    pub recorded: watch::Sender<Option<i64>>,
    /// Turns true on shutdown: the Lease is released, then `released` fires.
    pub stop: watch::Receiver<bool>,
    /// Fired once the Lease is released on shutdown.
    pub released: oneshot::Sender<()>,
    /// Our warm-copy address, advertised on the Lease while leading.
    pub peer_url: Option<String>,
    /// The other replica holding the Lease, for the warm copy.
    pub holder: watch::Sender<Option<Holder>>,
}

impl Election {
    /// Runs until shutdown, then releases the Lease and stays idle (so the task never ends while the
    /// process serves).
    pub async fn run(mut self) {
        let timing = Timing::from(&self.config);
        let mut elector =
            Elector::new(self.config.identity.clone(), timing).with_peer_url(self.peer_url.clone());
        // Our own last write: while leading, renewals replace it without reading first.
        let mut cached: Option<Lease> = None;
        let mut failures: u32 = 0;
        info!(
            lease = %self.config.lease_name,
            namespace = %self.config.lease_namespace,
            identity = %self.config.identity,
            "leader election started"
        );
        loop {
            let started = Instant::now();
            // An attempt never outlives the leadership it renews.
            let limit = elector
                .step_down_at()
                .map_or(timing.renew_deadline, |d| {
                    d.saturating_duration_since(started)
                })
                .min(timing.renew_deadline);
            let attempt = self.attempt(&mut elector, &mut cached, started);
            let result = match tokio::time::timeout(limit, attempt).await {
                Ok(r) => r,
                Err(_) => Err(LeaseError::Timeout(limit)),
            };
            match result {
                Ok(()) if failures > 0 => {
                    info!(failures, "lease requests succeed again");
                    failures = 0;
                }
                Ok(()) => {}
                Err(e) => {
                    if matches!(e, LeaseError::Conflict) {
                        elector.conflict();
                    }
                    cached = None;
                    failures += 1;
                    // A conflict is the protocol at work; anything else (RBAC, an unreachable apiserver)
                    // keeps this replica from ever leading, so it is logged, without flooding the log.
                    if matches!(e, LeaseError::Conflict) || failures % LOG_EVERY != 1 {
                        debug!(error = %e, failures, "lease attempt failed");
                    } else {
                        warn!(error = %e, failures, lease = %self.config.lease_name, namespace = %self.config.lease_namespace, "lease request failed; retrying every retry_period");
                    }
                }
            }
            self.publish(&mut elector);
            let holder = elector.other_holder();
            self.holder.send_if_modified(|h| {
                let changed = *h != holder;
                *h = holder;
                changed
            });
            let next = started + timing.retry_period;
            let wake = elector.step_down_at().map_or(next, |d| d.min(next));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                changed = self.cycles.changed() => {
                    let started = changed.is_ok().then(|| *self.cycles.borrow_and_update());
                    if let Some(ms) = started.flatten() {
                        elector.record_cycle(ms);
                    }
                    if changed.is_err() {
                        // The collector is gone; keep renewing on the period alone.
                        tokio::time::sleep_until(wake).await;
                    }
                }
                _ = async { self.stop.wait_for(|s| *s).await.is_ok() } => break,
            }
        }
        self.release(&mut elector, cached).await;
        std::future::pending::<()>().await;
    }

    /// One read (skipped while a renewal can reuse our own last write) and at most one write.
    async fn attempt(
        &self,
        elector: &mut Elector,
        cached: &mut Option<Lease>,
        started: Instant,
    ) -> Result<(), LeaseError> {
        let name = &self.config.lease_name;
        let current = match cached.take() {
            Some(l) if elector.leading(started) => Some(l),
            _ => self.api.get_opt(name).await?,
        };
        let record = current.as_ref().map(record_of);
        let Some(write) = elector.plan(started, now_ms(), record) else {
            return Ok(());
        };
        let pp = PostParams::default();
        let stored = match write {
            Write::Create(r) => {
                let base = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(self.config.lease_namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                };
                self.api.create(&pp, &lease_of(base, &r)).await?
            }
            Write::Update(r) => {
                let base = current.unwrap_or_default();
                self.api.replace(name, &pp, &lease_of(base, &r)).await?
            }
        };
        let rec = record_of(&stored);
        let (transitions, last_cycle_ms) = (rec.transitions, rec.last_cycle_ms);
        if elector.written(started, rec) {
            info!(
                identity = %elector.identity(),
                transitions,
                "acquired the lease; collecting"
            );
        }
        if elector.leading(started) {
            self.recorded.send_if_modified(|r| {
                let newer = last_cycle_ms > *r;
                *r = (*r).max(last_cycle_ms);
                newer
            });
        }
        *cached = Some(stored);
        Ok(())
    }

    /// Tells the collector and the renderer whether to collect, and from when.
    fn publish(&self, elector: &mut Elector) {
        let now = Instant::now();
        let leading = elector.tick(now);
        self.telemetry.leader.set(i64::from(leading));
        let interval = self.interval;
        let last = elector.last_cycle_ms();
        self.leadership.send_if_modified(|l| {
            if l.leading == leading {
                return false;
            }
            *l = if leading {
                let delay = first_cycle_delay(last, interval, now_ms());
                info!(
                    first_cycle_in_ms = delay.as_millis() as u64,
                    "leading: the first cycle waits for the previous leader's interval to end"
                );
                Leadership {
                    leading,
                    not_before: Some(now + delay),
                }
            } else {
                warn!("not leading (lost, not renewed within renew_deadline, or released); no CES calls, no cloud series");
                Leadership::default()
            };
            true
        });
    }

    /// Stops collecting first, then frees the Lease so a follower takes over at its next try.
    async fn release(&mut self, elector: &mut Elector, cached: Option<Lease>) {
        let record = elector.release(now_ms());
        self.publish(elector);
        if let Some(r) = record {
            let base = cached.unwrap_or_default();
            let name = &self.config.lease_name;
            let (pp, lease) = (PostParams::default(), lease_of(base, &r));
            let call = self.api.replace(name, &pp, &lease);
            match tokio::time::timeout(RELEASE_TIMEOUT, call).await {
                Ok(Ok(_)) => info!("lease released"),
                Ok(Err(e)) => warn!(error = %e, "releasing the lease failed; it expires instead"),
                Err(_) => warn!("releasing the lease timed out; it expires instead"),
            }
        }
        let (tx, _) = oneshot::channel();
        let _ = std::mem::replace(&mut self.released, tx).send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn timing() -> Timing {
        Timing {
            lease_duration: 15 * S,
            renew_deadline: 10 * S,
            retry_period: 2 * S,
        }
    }

    /// What the apiserver stores for a write: the record with a new resourceVersion.
    fn stored(w: Write, rv: u64) -> Record {
        let (Write::Create(r) | Write::Update(r)) = w;
        Record {
            resource_version: Some(rv.to_string()),
            ..r
        }
    }

    fn held_by(holder: &str, rv: u64) -> Record {
        Record {
            holder: Some(holder.into()),
            lease_duration_s: 15,
            acquire_ms: Some(1),
            renew_ms: Some(1),
            transitions: 3,
            last_cycle_ms: Some(500),
            peer_url: Some(format!("http://{holder}:8087")),
            resource_version: Some(rv.to_string()),
        }
    }

    #[test]
    fn acquires_a_missing_lease_by_creating_it() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", timing());
        let w = e.plan(t0, 1_000, None).expect("writes");
        let Write::Create(r) = &w else {
            panic!("{w:?}")
        };
        assert_eq!(r.holder.as_deref(), Some("a"));
        assert_eq!((r.lease_duration_s, r.transitions), (15, 0));
        assert!(!e.leading(t0), "not before the write succeeded");
        assert!(e.written(t0, stored(w, 1)), "a new term");
        assert!(e.leading(t0));
    }

    #[test]
    fn acquires_a_free_lease_and_counts_the_transition() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", timing());
        let free = Record {
            holder: None,
            ..held_by("x", 7)
        };
        let w = e
            .plan(t0, 1_000, Some(free))
            .expect("free: take it at once");
        let Write::Update(r) = &w else {
            panic!("{w:?}")
        };
        assert_eq!(r.holder.as_deref(), Some("a"));
        assert_eq!(r.transitions, 4);
        assert_eq!(
            r.resource_version.as_deref(),
            Some("7"),
            "optimistic concurrency"
        );
        assert_eq!(r.last_cycle_ms, Some(500), "the annotation survives");
        assert!(e.written(t0, stored(w, 8)));
    }

    #[test]
    fn waits_out_a_held_lease_then_takes_it_over_once_expired() {
        let t0 = Instant::now();
        let mut e = Elector::new("b", timing());
        assert_eq!(e.plan(t0, 0, Some(held_by("a", 5))), None);
        // The holder renews: the lease stays valid, counted from when we saw the change.
        assert_eq!(e.plan(t0 + 10 * S, 0, Some(held_by("a", 6))), None);
        assert_eq!(e.plan(t0 + 24 * S, 0, Some(held_by("a", 6))), None);
        let w = e
            .plan(t0 + 25 * S, 9, Some(held_by("a", 6)))
            .expect("expired 15 s after the last change we saw");
        let Write::Update(r) = &w else {
            panic!("{w:?}")
        };
        assert_eq!((r.holder.as_deref(), r.transitions), (Some("b"), 4));
        assert_eq!(r.acquire_ms, Some(9));
        assert!(e.written(t0 + 25 * S, stored(w, 7)));
        assert!(e.leading(t0 + 25 * S));
    }

    #[test]
    fn renews_its_own_lease_without_a_new_term() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", timing());
        let cur = stored(e.plan(t0, 1, None).unwrap(), 1);
        e.written(t0, cur.clone());
        e.record_cycle(1_234);
        let w = e.plan(t0 + 2 * S, 2_000, Some(cur)).expect("renews");
        let Write::Update(r) = &w else {
            panic!("{w:?}")
        };
        assert_eq!((r.renew_ms, r.acquire_ms), (Some(2_000), Some(1)));
        assert_eq!(r.transitions, 0);
        assert_eq!(r.last_cycle_ms, Some(1_234), "the cycle start is recorded");
        assert!(!e.written(t0 + 2 * S, stored(w, 2)), "same term");
        assert!(
            e.leading(t0 + 11 * S),
            "renew deadline counts from the renewal"
        );
    }

    #[test]
    fn loses_on_conflict() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", timing());
        let w = e.plan(t0, 1, None).unwrap();
        e.written(t0, stored(w, 1));
        e.conflict();
        assert!(!e.leading(t0));
        assert_eq!(e.step_down_at(), None);
    }

    #[test]
    fn steps_down_when_another_holder_shows_up() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", timing());
        let w = e.plan(t0, 1, None).unwrap();
        e.written(t0, stored(w, 1));
        assert_eq!(e.plan(t0 + S, 2, Some(held_by("b", 9))), None);
        assert!(!e.leading(t0 + S));
    }

    #[test]
    fn steps_down_when_not_renewed_within_the_deadline() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", timing());
        let w = e.plan(t0, 1, None).unwrap();
        e.written(t0, stored(w, 1));
        assert_eq!(e.step_down_at(), Some(t0 + 10 * S));
        assert!(e.tick(t0 + 10 * S - Duration::from_millis(1)));
        // Renewals failed meanwhile (nothing written): leadership ends at the deadline, 5 s before the
        // lease can expire for the others.
        assert!(!e.tick(t0 + 10 * S));
        assert!(!e.leading(t0 + 10 * S));
        assert_eq!(e.release(3), None, "nothing to release after stepping down");
    }

    #[test]
    fn releases_on_shutdown_with_the_holder_cleared() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", timing());
        let w = e.plan(t0, 1, None).unwrap();
        e.written(t0, stored(w, 4));
        e.record_cycle(777);
        let r = e.release(5_000).expect("held: released");
        assert_eq!(r.holder, None);
        assert_eq!(r.lease_duration_s, 1);
        assert_eq!(r.resource_version.as_deref(), Some("4"));
        assert_eq!(r.last_cycle_ms, Some(777));
        assert!(
            !e.leading(t0),
            "stops collecting before the release is written"
        );
        // A follower takes a released Lease at its next try, counting a transition.
        let mut f = Elector::new("b", timing());
        let w = f
            .plan(t0 + S, 6_000, Some(stored(Write::Update(r), 5)))
            .expect("free");
        let Write::Update(taken) = w else {
            panic!("update")
        };
        assert_eq!((taken.holder.as_deref(), taken.transitions), (Some("b"), 1));
        assert_eq!(taken.last_cycle_ms, Some(777));
    }

    /// A process restarted under the holder's name (a container restarted after an OOM kill) does not
    /// take the Lease back at once: it waits it out like another holder's, and `renew_deadline` longer,
    /// so the follower, which saw the last renewal earlier and holds the warm copy, takes over first.
    #[test]
    fn a_restarted_holder_waits_out_its_old_lease() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", timing());
        assert_eq!(e.plan(t0, 1, Some(held_by("a", 3))), None, "not at once");
        assert_eq!(
            e.plan(t0 + 15 * S, 1, Some(held_by("a", 3))),
            None,
            "a follower's turn"
        );
        assert_eq!(e.plan(t0 + 24 * S, 1, Some(held_by("a", 3))), None);
        let w = e
            .plan(t0 + 25 * S, 2, Some(held_by("a", 3)))
            .expect("nobody took it: ours again");
        let Write::Update(r) = &w else {
            panic!("{w:?}")
        };
        assert_eq!((r.holder.as_deref(), r.transitions), (Some("a"), 3));
        assert_eq!(r.acquire_ms, Some(2), "a new term");
        assert!(
            e.written(t0 + 25 * S, stored(w, 4)),
            "a new term for this process"
        );
        // From then on it renews its own Lease as usual.
        let cur = held_by("a", 4);
        assert!(matches!(
            e.plan(t0 + 26 * S, 3, Some(cur)),
            Some(Write::Update(_))
        ));
    }

    #[test]
    fn the_first_cycle_waits_for_the_previous_leaders_interval() {
        let min = Duration::from_secs(60);
        assert_eq!(first_cycle_delay(None, min, 1_000), Duration::ZERO);
        assert_eq!(
            first_cycle_delay(Some(10_000), min, 25_000),
            Duration::from_secs(45)
        );
        assert_eq!(first_cycle_delay(Some(10_000), min, 90_000), Duration::ZERO);
        // A start recorded a day ahead (skewed clock, edited Lease) waits one interval at most.
        assert_eq!(first_cycle_delay(Some(86_400_000), min, 0), min);
    }

    #[test]
    fn lease_round_trips_through_the_wire_type() {
        let r = Record {
            holder: Some("pod-1".into()),
            lease_duration_s: 15,
            acquire_ms: Some(1_700_000_000_123),
            renew_ms: Some(1_700_000_001_456),
            transitions: 2,
            last_cycle_ms: Some(1_700_000_000_999),
            peer_url: Some("https://10.0.0.7:8087".into()),
            resource_version: Some("42".into()),
        };
        assert_eq!(record_of(&lease_of(Lease::default(), &r)), r);
        let freed = Record {
            holder: None,
            last_cycle_ms: None,
            peer_url: None,
            ..r.clone()
        };
        let lease = lease_of(Lease::default(), &freed);
        assert_eq!(
            lease.spec.as_ref().unwrap().holder_identity.as_deref(),
            Some(""),
            "client-go clears the holder to the empty string"
        );
        assert_eq!(record_of(&lease), freed);
        // Freeing a Lease written with a peer URL removes the annotation.
        let freed_again = lease_of(lease_of(Lease::default(), &r), &freed);
        assert_eq!(record_of(&freed_again).peer_url, None);
    }

    /// The holder's warm-copy address travels on the Lease: a follower sees the holder's, a claim or a
    /// renewal writes ours, a release removes it.
    #[test]
    fn the_peer_url_is_advertised_while_leading_and_seen_by_followers() {
        let t0 = Instant::now();
        let ours = Some("http://10.0.0.2:8087".to_string());
        let mut e = Elector::new("b", timing()).with_peer_url(ours.clone());
        assert_eq!(e.plan(t0, 0, Some(held_by("a", 5))), None);
        assert_eq!(
            e.other_holder(),
            Some(Holder {
                identity: "a".into(),
                peer_url: Some("http://a:8087".into())
            })
        );
        let w = e
            .plan(t0 + 15 * S, 9, Some(held_by("a", 5)))
            .expect("claim");
        let Write::Update(r) = &w else {
            panic!("{w:?}")
        };
        assert_eq!(r.peer_url, ours, "a claim advertises our address");
        assert!(e.written(t0 + 15 * S, stored(w, 6)));
        assert_eq!(e.other_holder(), None, "we hold it");
        let cur = record_of(&lease_of(
            Lease::default(),
            &stored(Write::Update(held_by("b", 6)), 6),
        ));
        let Some(Write::Update(renewal)) = e.plan(t0 + 16 * S, 10, Some(cur)) else {
            panic!("renews")
        };
        assert_eq!(renewal.peer_url, ours, "a renewal keeps it current");
        assert!(
            !e.written(t0 + 16 * S, renewal),
            "a renewal, not a new term"
        );
        let released = e.release(11).expect("ours to release");
        assert_eq!((released.holder, released.peer_url), (None, None));
    }
}
