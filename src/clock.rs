//! The time the daemon's day-bound rules read ([`Clock`]): the system's, or one a test sets and
//! moves, so a day can pass in a test without sleeping through it.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Milliseconds in a day; days are counted in UTC from the Unix epoch.
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// The system's clock, or a manual one (tests) that stays where it is set. Cheap to clone;
/// clones of a manual clock move together.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Clock::default()
    }

    /// A clock that shows `at_ms` (Unix milliseconds) until it is moved.
    pub fn manual(at_ms: i64) -> Self {
        Clock {
            manual: Some(Arc::new(AtomicI64::new(at_ms))),
        }
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(at) => at.load(Ordering::SeqCst),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        }
    }

    /// Moves a manual clock on by `by`; the system's clock cannot be moved (nothing happens).
    pub fn advance(&self, by: Duration) {
        if let Some(at) = &self.manual {
            at.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
        }
    }

    /// Today's number: days since 1970-01-01, in UTC.
    pub fn utc_day(&self) -> i64 {
        self.now_ms().div_euclid(DAY_MS)
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            Some(at) => write!(f, "Clock::manual({})", at.load(Ordering::SeqCst)),
            None => f.write_str("Clock::system()"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_its_clones_with_it() {
        let clock = Clock::manual(DAY_MS - 1);
        let other = clock.clone();
        assert_eq!(clock.utc_day(), 0);
        other.advance(Duration::from_millis(1));
        assert_eq!((clock.now_ms(), clock.utc_day()), (DAY_MS, 1));
        assert!(Clock::system().utc_day() > 20_000);
    }
}
