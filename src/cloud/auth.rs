//! The gate that keeps the exporter from locking its access key. The API gateway locks an AK for five
//! minutes after five consecutive bad signatures, counted across every API, so there is one gate per
//! credential (not per API):
//! - any 401 closes it for every API; while it is closed nothing is sent but, once a doubling cooldown
//!   has passed, a single probe to the API that failed, and only that probe's success reopens it;
//! - while an API has not yet accepted the credential (start, reload, after any 401) at most one request
//!   of it is in flight: the probe;
//! - requests in flight plus rejections in the last five minutes never exceed four, so even a key revoked
//!   while requests are in flight cannot collect the five failures that lock it;
//! - every request carries the credential generation it was signed with: answers to an older credential
//!   neither close nor reopen the gate of a newer one.
//!
//! [`GateCore`] is the pure state machine with the clock passed in; [`AuthGate`] wraps it for async callers.

use super::{CloudError, Operation};
use crate::config::Credentials;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// First cooldown after a 401; doubles per consecutive rejection up to `COOLDOWN_MAX`.
pub const COOLDOWN: Duration = Duration::from_secs(60);
/// Longest pause after repeated 401s: credentials fixed by an operator are picked up within it.
pub const COOLDOWN_MAX: Duration = Duration::from_secs(15 * 60);
/// The gateway's lockout: this many consecutive failures within `LOCK_WINDOW` lock the AK.
pub const LOCK_FAILURES: usize = 5;
/// The window of [`LOCK_FAILURES`].
pub const LOCK_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Requests that could still fail (in flight) plus failures inside the window stay below the lockout.
pub const AT_RISK_MAX: usize = LOCK_FAILURES - 1;

/// How a sent request ended, as far as the credential is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 401: the signature or key was rejected.
    Rejected,
    /// Any other HTTP answer: the request passed authentication.
    Accepted,
    /// No answer that says anything (timeout, connection error, 5xx).
    Unknown,
}

impl Verdict {
    /// Classifies a call's outcome for the gate.
    pub fn of<T>(result: &Result<T, CloudError>) -> Verdict {
        match result {
            Ok(_) => Verdict::Accepted,
            Err(CloudError::Unauthorized(..)) => Verdict::Rejected,
            Err(
                CloudError::Forbidden(..)
                | CloudError::NotFound(..)
                | CloudError::BadRequest(..)
                | CloudError::Throttled(..)
                | CloudError::Http(..)
                | CloudError::Malformed(..),
            ) => Verdict::Accepted,
            Err(_) => Verdict::Unknown,
        }
    }
}

/// What `admit` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send; `probe` when this request decides whether the credential works for its API.
    Send {
        /// The credential generation the request is signed under (see [`GateCore::generation`]).
        generation: u64,
        /// This request decides whether the credential works for its API.
        probe: bool,
    },
    /// Another request's answer decides first: ask again when the gate changes.
    Wait,
    /// Not sent: the credential was rejected; the pause has this much left (zero: until a probe of
    /// another API succeeds).
    Refuse(Duration),
}

#[derive(Debug, Clone, Copy)]
struct Closed {
    /// The API whose 401 closed the gate: only it may probe.
    api: Operation,
    until: Instant,
}

/// The gate's state machine. Every method takes the current time; nothing here sleeps or reads a clock.
#[derive(Debug, Default)]
pub struct GateCore {
    generation: u64,
    closed: Option<Closed>,
    /// Consecutive rejected probes: the cooldown doubles with each.
    strikes: u32,
    /// APIs that accepted this credential since it was last proven wrong.
    proven: Vec<Operation>,
    /// APIs with a probe in flight.
    probing: Vec<Operation>,
    in_flight: usize,
    /// 401s of this access key inside `LOCK_WINDOW`.
    failures: VecDeque<Instant>,
    /// The previous generation used the same access key: its late 401s still count towards the lockout.
    same_key_as_previous: bool,
}

impl GateCore {
    /// An open gate with no credential proven yet.
    pub fn new() -> Self {
        GateCore::default()
    }

    /// New credentials: a fresh, unproven gate. Rejections of the same access key keep counting
    /// towards its lockout; a new access key starts clean.
    pub fn reset(&mut self, same_access_key: bool) {
        let failures = if same_access_key {
            std::mem::take(&mut self.failures)
        } else {
            VecDeque::new()
        };
        *self = GateCore {
            generation: self.generation + 1,
            failures,
            same_key_as_previous: same_access_key,
            ..GateCore::default()
        };
    }

    /// Bumped at each credential change, so answers to requests signed with older keys are ignored.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn at_risk(&mut self, now: Instant) -> usize {
        while self
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= LOCK_WINDOW)
        {
            self.failures.pop_front();
        }
        self.failures.len() + self.in_flight
    }

    /// Until the oldest failure leaves the lockout window.
    fn window_wait(&self, now: Instant) -> Duration {
        self.failures.front().map_or(Duration::ZERO, |t| {
            (*t + LOCK_WINDOW).saturating_duration_since(now)
        })
    }

    /// Whether a call to `api` would be refused now because the gate is closed (no state change).
    pub fn refusal(&self, api: Operation, now: Instant) -> Option<Duration> {
        let c = self.closed?;
        let left = c.until.saturating_duration_since(now);
        (c.api != api || !left.is_zero() || !self.probing.is_empty()).then_some(left)
    }

    /// Decides whether a call to `api` may be sent now, and whether it probes the credential.
    pub fn admit(&mut self, api: Operation, now: Instant) -> Decision {
        let full = self.at_risk(now) >= AT_RISK_MAX;
        if self.closed.is_some() {
            if let Some(left) = self.refusal(api, now) {
                return Decision::Refuse(left);
            }
            if full {
                return Decision::Refuse(self.window_wait(now));
            }
            return self.send(api, true);
        }
        let probe = !self.proven.contains(&api);
        if probe && self.probing.contains(&api) {
            return Decision::Wait;
        }
        if full {
            return if self.in_flight > 0 {
                Decision::Wait
            } else {
                Decision::Refuse(self.window_wait(now))
            };
        }
        self.send(api, probe)
    }

    fn send(&mut self, api: Operation, probe: bool) -> Decision {
        self.in_flight += 1;
        if probe {
            self.probing.push(api);
        }
        Decision::Send {
            generation: self.generation,
            probe,
        }
    }

    /// Records the end of a request admitted with `generation`; returns the cooldown when this answer
    /// closed the gate (for the log).
    pub fn record(
        &mut self,
        api: Operation,
        generation: u64,
        probe: bool,
        verdict: Verdict,
        now: Instant,
    ) -> Option<Duration> {
        if generation != self.generation {
            // Signed with credentials since replaced: the new ones are not judged by it, but a rejection
            // still counts towards the lockout when the access key stayed the same.
            if verdict == Verdict::Rejected
                && self.same_key_as_previous
                && generation + 1 == self.generation
            {
                self.failures.push_back(now);
            }
            return None;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        if probe {
            self.probing.retain(|a| *a != api);
        }
        match verdict {
            Verdict::Unknown => None,
            Verdict::Accepted => {
                match self.closed {
                    // Only the probe of the API that failed reopens the gate; answers to requests sent
                    // before it closed say nothing about the rejection.
                    Some(c) if probe && c.api == api => {
                        self.closed = None;
                        self.strikes = 0;
                        self.proven = vec![api];
                    }
                    Some(_) => {}
                    None => {
                        if !self.proven.contains(&api) {
                            self.proven.push(api);
                        }
                        if probe {
                            self.strikes = 0;
                        }
                    }
                }
                None
            }
            Verdict::Rejected => {
                self.failures.push_back(now);
                // Requests already in flight when the gate closed: one rejection is one strike.
                if self.closed.is_some() && !probe {
                    return None;
                }
                self.strikes = self.strikes.saturating_add(1);
                let cooldown = COOLDOWN
                    .saturating_mul(1u32 << (self.strikes - 1).min(8))
                    .min(COOLDOWN_MAX);
                self.closed = Some(Closed {
                    api,
                    until: now + cooldown,
                });
                self.proven.clear();
                Some(cooldown)
            }
        }
    }

    /// A request ended without an answer (its future was dropped).
    pub fn abandon(&mut self, api: Operation, generation: u64, probe: bool, now: Instant) {
        self.record(api, generation, probe, Verdict::Unknown, now);
    }
}

/// The gate shared by every request of one client, plus the credentials it guards.
pub struct AuthGate {
    state: Mutex<(GateCore, Arc<Credentials>)>,
    changed: Notify,
}

/// Permission to send one request, signed with `credentials`. Dropping it without [`Ticket::finish`]
/// (a cancelled request) frees its place and lets the next request probe.
pub struct Ticket<'a> {
    gate: &'a AuthGate,
    api: Operation,
    generation: u64,
    /// This request decides whether the credential works for its API.
    pub probe: bool,
    /// The credentials to sign this request with (those current when admitted).
    pub credentials: Arc<Credentials>,
    open: bool,
}

impl Ticket<'_> {
    /// Records the answer; returns the cooldown when it closed the gate.
    pub fn finish(mut self, verdict: Verdict) -> Option<Duration> {
        self.open = false;
        let (api, generation, probe) = (self.api, self.generation, self.probe);
        let cooldown = self
            .gate
            .with(|core| core.record(api, generation, probe, verdict, Instant::now()));
        self.gate.changed.notify_waiters();
        cooldown
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.open {
            let (api, generation, probe) = (self.api, self.generation, self.probe);
            self.gate
                .with(|core| core.abandon(api, generation, probe, Instant::now()));
            self.gate.changed.notify_waiters();
        }
    }
}

impl AuthGate {
    /// A gate for `credentials`, open and unproven.
    pub fn new(credentials: Credentials) -> Self {
        AuthGate {
            state: Mutex::new((GateCore::new(), Arc::new(credentials))),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (GateCore, Arc<Credentials>)> {
        // The state stays consistent between statements, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with<R>(&self, f: impl FnOnce(&mut GateCore) -> R) -> R {
        f(&mut self.lock().0)
    }

    /// Swaps in rotated credentials: a fresh, unproven gate.
    pub fn set_credentials(&self, credentials: Credentials) {
        {
            let mut s = self.lock();
            let same = s.1.access_key == credentials.access_key;
            s.0.reset(same);
            s.1 = Arc::new(credentials);
        }
        self.changed.notify_waiters();
    }

    /// The current access key id (not secret), for logs.
    pub fn access_key(&self) -> String {
        self.lock().1.access_key.clone()
    }

    /// See [`GateCore::generation`].
    pub fn generation(&self) -> u64 {
        self.with(|core| core.generation())
    }

    /// The refusal a call to `api` would get now, if the gate is closed to it.
    pub fn refusal(&self, api: Operation) -> Option<CloudError> {
        self.with(|core| core.refusal(api, Instant::now()))
            .map(|left| CloudError::AuthBackoff(api, left))
    }

    /// Waits for permission to send a request to `api`.
    pub async fn admit(&self, api: Operation) -> Result<Ticket<'_>, CloudError> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let decision = {
                let mut s = self.lock();
                let d = s.0.admit(api, Instant::now());
                match d {
                    Decision::Send { generation, probe } => {
                        return Ok(Ticket {
                            gate: self,
                            api,
                            generation,
                            probe,
                            credentials: s.1.clone(),
                            open: true,
                        });
                    }
                    other => other,
                }
            };
            match decision {
                Decision::Refuse(left) => return Err(CloudError::AuthBackoff(api, left)),
                // Woken by any answer or a credential change; in-flight requests are bounded by the
                // request timeout, so this wait is too.
                _ => changed.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CES: Operation = Operation::CesBatchQuery;
    const ELB: Operation = Operation::ElbListListeners;
    const IAM: Operation = Operation::IamListProjects;

    fn send(core: &mut GateCore, api: Operation, now: Instant) -> (u64, bool) {
        match core.admit(api, now) {
            Decision::Send { generation, probe } => (generation, probe),
            other => panic!("{api:?} at {now:?}: expected Send, got {other:?}"),
        }
    }

    /// A world where IAM and ELB accept the key and CES rejects it, driven with paused time.
    #[tokio::test(start_paused = true)]
    async fn ces_only_rejection_probes_once_per_cooldown_and_never_risks_the_lock() {
        let start = Instant::now();
        let mut core = GateCore::new();
        let mut bad: Vec<Instant> = Vec::new();
        let mut probes_per_cooldown: Vec<usize> = Vec::new();
        // Every simulated second, a cycle asks IAM/ELB once and CES eight times (the default
        // concurrency), all at once; answers come back one second later.
        let mut in_flight: Vec<(Operation, u64, bool)> = Vec::new();
        let mut ces_sent_since_close = 0;
        let mut cooldowns = Vec::new();
        for _ in 0..(60 + 120 + 240 + 30) {
            let now = Instant::now();
            // CES answers first, so the IAM and ELB successes arrive after it closed the gate.
            for (api, g, probe) in in_flight.drain(..).rev() {
                let verdict = if api == CES {
                    bad.push(now);
                    Verdict::Rejected
                } else {
                    Verdict::Accepted
                };
                if let Some(c) = core.record(api, g, probe, verdict, now) {
                    cooldowns.push(c);
                    probes_per_cooldown.push(ces_sent_since_close);
                    ces_sent_since_close = 0;
                }
            }
            for api in [IAM, ELB, CES, CES, CES, CES, CES, CES, CES, CES] {
                if let Decision::Send { generation, probe } = core.admit(api, now) {
                    if api == CES {
                        ces_sent_since_close += 1;
                    }
                    in_flight.push((api, generation, probe));
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(
            cooldowns,
            [60, 120, 240, 480].map(Duration::from_secs),
            "the cooldown doubles"
        );
        // The first CES request is the probe of an unproven API; each of the three cooldowns then lets
        // exactly one probe through, at its end, and nothing after the last rejection.
        assert_eq!(probes_per_cooldown, [1, 1, 1, 1]);
        assert_eq!(ces_sent_since_close, 0);
        let secs: Vec<u64> = bad.iter().map(|t| (*t - start).as_secs()).collect();
        assert_eq!(secs, [1, 62, 183, 424], "bad signatures (s after start)");
        for (i, t) in bad.iter().enumerate() {
            let within = bad[i..].iter().filter(|u| **u - *t < LOCK_WINDOW).count();
            assert!(
                within < LOCK_FAILURES,
                "{within} bad signatures within 5 min"
            );
        }
        // IAM and ELB keep being refused while CES's probe has not succeeded.
        assert!(matches!(
            core.admit(ELB, Instant::now()),
            Decision::Refuse(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_does_not_reopen_a_closed_gate() {
        let mut core = GateCore::new();
        let t0 = Instant::now();
        let (g, p) = send(&mut core, ELB, t0);
        core.record(ELB, g, p, Verdict::Accepted, t0);
        // Two ELB requests in flight; the first is rejected, the second (sent before) succeeds later.
        let a = send(&mut core, ELB, t0);
        let b = send(&mut core, ELB, t0);
        assert!(core.record(ELB, a.0, a.1, Verdict::Rejected, t0).is_some());
        core.record(ELB, b.0, b.1, Verdict::Accepted, t0);
        assert!(matches!(core.admit(ELB, t0), Decision::Refuse(_)));
        // A success of another API does not reopen it either, nor may other APIs probe.
        assert!(matches!(
            core.admit(CES, t0 + COOLDOWN),
            Decision::Refuse(_)
        ));
        // After the cooldown, one probe of the API that failed; its success reopens the gate.
        let (g, p) = send(&mut core, ELB, t0 + COOLDOWN);
        assert!(p);
        assert!(matches!(
            core.admit(ELB, t0 + COOLDOWN),
            Decision::Refuse(_)
        ));
        core.record(ELB, g, p, Verdict::Accepted, t0 + COOLDOWN);
        assert!(!send(&mut core, ELB, t0 + COOLDOWN).1, "proven again");
        assert!(send(&mut core, CES, t0 + COOLDOWN).1, "CES probes first");
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_old_key_rejection_does_not_pause_a_new_key() {
        let mut core = GateCore::new();
        let t0 = Instant::now();
        let old = send(&mut core, CES, t0);
        core.reset(false);
        let new = send(&mut core, CES, t0);
        assert_ne!(old.0, new.0);
        assert!(
            core.record(CES, old.0, old.1, Verdict::Rejected, t0)
                .is_none()
        );
        assert_eq!(
            core.admit(CES, t0),
            Decision::Wait,
            "the new key's probe decides"
        );
        core.record(CES, new.0, new.1, Verdict::Accepted, t0);
        assert!(matches!(
            core.admit(CES, t0),
            Decision::Send { probe: false, .. }
        ));
        // And a late old-key success does not reopen a gate the new key closed.
        let mut core = GateCore::new();
        let old = send(&mut core, ELB, t0);
        core.reset(true);
        let new = send(&mut core, ELB, t0);
        core.record(ELB, new.0, new.1, Verdict::Rejected, t0);
        core.record(ELB, old.0, old.1, Verdict::Accepted, t0);
        assert!(matches!(core.admit(ELB, t0), Decision::Refuse(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn unproven_apis_send_one_request_and_in_flight_stays_below_the_lockout() {
        let mut core = GateCore::new();
        let t0 = Instant::now();
        let probe = send(&mut core, CES, t0);
        assert!(probe.1);
        assert_eq!(core.admit(CES, t0), Decision::Wait);
        // Another unproven API may probe beside it.
        let elb = send(&mut core, ELB, t0);
        core.record(ELB, elb.0, elb.1, Verdict::Accepted, t0);
        core.record(CES, probe.0, probe.1, Verdict::Accepted, t0);
        let sent: Vec<_> = (0..8).map(|_| core.admit(CES, t0)).collect();
        let n = sent
            .iter()
            .filter(|d| matches!(d, Decision::Send { .. }))
            .count();
        assert_eq!(n, AT_RISK_MAX, "{sent:?}");
        assert_eq!(sent[AT_RISK_MAX], Decision::Wait);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_needs_room_in_the_lockout_window() {
        let mut core = GateCore::new();
        let t0 = Instant::now();
        let p = send(&mut core, CES, t0);
        core.record(CES, p.0, p.1, Verdict::Accepted, t0);
        // Four requests in flight, all rejected (a key revoked under load).
        let sent: Vec<_> = (0..4).map(|_| send(&mut core, CES, t0)).collect();
        for (g, probe) in sent {
            core.record(CES, g, probe, Verdict::Rejected, t0);
        }
        // The cooldown is over, but a probe now would be the fifth failure within five minutes.
        let later = t0 + COOLDOWN;
        assert_eq!(
            core.admit(CES, later),
            Decision::Refuse(LOCK_WINDOW - COOLDOWN)
        );
        assert!(send(&mut core, CES, t0 + LOCK_WINDOW).1);
    }
}
