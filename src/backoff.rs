//! Exponential backoff with jitter, between tries of something that failed for a reason that may
//! pass: a platform API that cannot be reached or answers 5xx, a store that is locked.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::shutdown::Shutdown;

/// The delays between tries: `first`, doubling after each failure up to `max`, each drawn from
/// the upper half of its step ("equal jitter"), so that many clients that failed together (every
/// channel of a bot when its platform went down) do not all come back in the same instant.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
    rng: ChaCha8Rng,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max: max.max(first),
            failures: 0,
            rng: ChaCha8Rng::from_os_rng(),
        }
    }

    /// The delay before the next try, counting one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let half = self.next_step() / 2;
        let jitter_ms = self.rng.random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter_ms)
    }

    /// The step itself, without jitter (`first`, doubling up to `max`), counting one more
    /// failure: for waits that must come out the same each time, such as a rate limit's when
    /// the server did not say how long.
    pub fn next_step(&mut self) -> Duration {
        let step = self
            .first
            .saturating_mul(2u32.saturating_pow(self.failures.min(20)))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        step
    }

    /// Sleeps for [`Backoff::next_delay`], or until shutdown; `false` when shutdown came first.
    pub async fn wait(&mut self, shutdown: &mut Shutdown) -> bool {
        let delay = self.next_delay();
        shutdown.sleep(delay).await
    }

    /// After a success: the next failure starts again from `first`.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_within_the_upper_half_of_each_step() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        for step_ms in [500u64, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000] {
            let d = b.next_delay().as_millis() as u64;
            assert!(
                (step_ms / 2..=step_ms).contains(&d),
                "{d} ms for a {step_ms} ms step"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }

    #[test]
    fn steps_without_jitter_double_up_to_the_cap_and_count_as_failures() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let steps: Vec<u64> = (0..6).map(|_| b.next_step().as_secs()).collect();
        assert_eq!(steps, [1, 2, 4, 8, 8, 8]);
        assert_eq!(b.failures(), 6);
    }

    #[tokio::test]
    async fn a_wait_ends_early_at_shutdown() {
        let (trigger, mut shutdown) = crate::shutdown::shutdown_channel();
        let mut b = Backoff::new(Duration::from_millis(2), Duration::from_millis(2));
        assert!(b.wait(&mut shutdown).await);
        let mut long = Backoff::new(Duration::from_secs(600), Duration::from_secs(600));
        trigger.trigger();
        assert!(!long.wait(&mut shutdown).await);
    }

    #[test]
    fn clients_that_failed_together_come_back_apart() {
        let delays: std::collections::HashSet<Duration> = (0..20)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(30));
                b.next_delay()
            })
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }
}
