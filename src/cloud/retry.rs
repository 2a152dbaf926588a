//! Retry policy (exponential backoff with full jitter, `Retry-After`, bounded attempts and time) and a
//! per-API sliding-window rate limiter, so the exporter stays well under the cloud's throttling line.

use super::Lane;
use crate::config::RetrySettings;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The delay before attempt `attempt + 1` (attempt counts from 0 for the first retry): a uniformly random
/// duration in [floor, min(max, initial·2^attempt)] with a floor of half the initial backoff, so a
/// throttled call is never retried at once, or the server's `Retry-After` if that is longer.
pub fn backoff(
    settings: &RetrySettings,
    attempt: u32,
    retry_after: Option<Duration>,
    unit_random: f64,
) -> Duration {
    let exp = settings
        .initial_backoff
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    let cap = exp.min(settings.max_backoff);
    let floor = settings.initial_backoff.min(cap) / 2;
    let jittered = floor + (cap - floor).mul_f64(unit_random.clamp(0.0, 1.0));
    match retry_after {
        Some(ra) => ra
            .min(settings.max_backoff.max(Duration::from_secs(60)))
            .max(jittered),
        None => jittered,
    }
}

/// At most `per_minute` calls in any 60-second window. Callers wait (without holding anything else)
/// until the window has room; the limiter itself never fails.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: usize,
    window: Duration,
    sent: Mutex<VecDeque<Instant>>,
    /// Priority callers waiting for room; background callers step aside while any is.
    priority_waiting: AtomicUsize,
}

/// Counts a priority caller as waiting until it leaves (booked or cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RateLimiter {
    /// A limiter allowing `per_minute` calls in any minute.
    pub fn new(per_minute: u32) -> Self {
        Self::with_window(per_minute, Duration::from_secs(60))
    }

    /// As [`RateLimiter::new`] over a `window` other than a minute (tests).
    pub fn with_window(per_minute: u32, window: Duration) -> Self {
        RateLimiter {
            per_minute: per_minute.max(1) as usize,
            window,
            sent: Mutex::new(VecDeque::new()),
            priority_waiting: AtomicUsize::new(0),
        }
    }

    /// Waits until a call may be sent, and books it.
    pub async fn acquire(&self) {
        self.acquire_in(Lane::Priority).await
    }

    /// As [`Self::acquire`], in a lane: a background call is booked only while no priority call waits, so
    /// a long re-listing never delays the lookup of a new Service by more than one booking.
    pub async fn acquire_in(&self, lane: Lane) {
        let _waiting = (lane == Lane::Priority).then(|| {
            self.priority_waiting.fetch_add(1, Ordering::AcqRel);
            Waiting(&self.priority_waiting)
        });
        loop {
            let wait = {
                let mut sent = self.sent.lock().await;
                let now = Instant::now();
                while sent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.window)
                {
                    sent.pop_front();
                }
                let yield_to_priority =
                    lane == Lane::Background && self.priority_waiting.load(Ordering::Acquire) > 0;
                if sent.len() < self.per_minute && !yield_to_priority {
                    sent.push_back(now);
                    return;
                }
                match sent.front() {
                    // Room, but a priority call is waiting: look again once it had its turn.
                    _ if sent.len() < self.per_minute => Duration::from_millis(5),
                    // Full: the oldest booking leaves the window first.
                    Some(oldest) => self.window.saturating_sub(now.duration_since(*oldest)),
                    None => Duration::ZERO,
                }
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RetrySettings {
        RetrySettings {
            max_attempts: 4,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_elapsed: Duration::from_secs(120),
        }
    }

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let s = settings();
        assert_eq!(backoff(&s, 0, None, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&s, 1, None, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(&s, 2, None, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(&s, 10, None, 1.0), Duration::from_secs(30));
        assert_eq!(backoff(&s, 40, None, 1.0), Duration::from_secs(30));
        assert_eq!(backoff(&s, 3, None, 0.5), Duration::from_millis(4250));
    }

    #[test]
    fn jitter_has_a_floor_so_no_retry_is_immediate() {
        let s = settings();
        for attempt in [0, 1, 3, 10, 40] {
            assert_eq!(
                backoff(&s, attempt, None, 0.0),
                Duration::from_millis(500),
                "attempt {attempt}: half the initial backoff at least"
            );
        }
        // A Retry-After of 0 (or a past date) does not make it immediate either.
        assert_eq!(
            backoff(&s, 0, Some(Duration::ZERO), 0.0),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn retry_after_is_honoured() {
        let s = settings();
        assert_eq!(
            backoff(&s, 0, Some(Duration::from_secs(7)), 0.1),
            Duration::from_secs(7)
        );
        // An absurd Retry-After is bounded, so one answer cannot stall the exporter for hours.
        assert_eq!(
            backoff(&s, 0, Some(Duration::from_secs(86_400)), 0.1),
            Duration::from_secs(60)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_allows_a_window_then_waits() {
        let l = RateLimiter::new(3);
        let start = Instant::now();
        for _ in 0..3 {
            l.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        l.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn background_calls_wait_while_a_priority_call_waits() {
        let l = std::sync::Arc::new(RateLimiter::new(10));
        // A priority caller is waiting (as it does while the window is full): the window has room, yet a
        // background call is not booked until the priority caller has had its turn.
        let waiting = {
            l.priority_waiting.fetch_add(1, Ordering::AcqRel);
            Waiting(&l.priority_waiting)
        };
        let bg = tokio::spawn({
            let l = l.clone();
            async move { l.acquire_in(Lane::Background).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !bg.is_finished(),
            "background booked ahead of a waiting priority call"
        );
        l.acquire().await;
        drop(waiting);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(bg.is_finished());
        assert_eq!(l.sent.lock().await.len(), 2);
    }
}
