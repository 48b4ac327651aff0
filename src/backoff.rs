//! Exponential backoff with jitter, pure: attempt `n` waits
//! `min(base * 2^(n-1), max)` scaled by a jitter factor in `[1 - j, 1 + j]`.
//!
//! Shared by the retry queue (redelivery after a missed deadline or a
//! `nack`) and the client SDK's reconnect. The caller supplies the random
//! number, so the function is deterministic and table-testable.

use std::time::Duration;

/// A backoff schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Relative jitter, 0.2 = ±20 %.
    pub jitter: f64,
}

impl Backoff {
    /// The broker's retry schedule: ±20 % jitter.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            jitter: 0.2,
        }
    }

    /// The delay before attempt `attempt + 1` after attempt `attempt` failed
    /// (`attempt` ≥ 1), before jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(62);
        let factor = 1u64 << doublings;
        let factor = u32::try_from(factor).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The delay with jitter; `unit` is a uniform random number in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let nominal = self.nominal(attempt);
        let spread = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - spread + 2.0 * spread * unit.clamp(0.0, 1.0);
        nominal.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_base_and_caps_at_max() {
        let b = Backoff::new(100 * MS, 1000 * MS);
        let table = [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (6, 1000),
            (60, 1000),
            (u32::MAX, 1000),
        ];
        for (attempt, ms) in table {
            assert_eq!(b.nominal(attempt), ms * MS, "attempt {attempt}");
        }
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(b.delay(1, 0.0), 800 * MS);
        assert_eq!(b.delay(1, 0.5), 1000 * MS);
        assert!(b.delay(1, 0.999_999) <= 1200 * MS);
        assert_eq!(b.delay(3, 0.5), 4000 * MS);
        assert_eq!(
            b.delay(30, 0.5),
            Duration::from_secs(300),
            "capped before jitter"
        );
    }

    #[test]
    fn no_jitter_is_exact_and_huge_bases_do_not_overflow() {
        let b = Backoff {
            base: 10 * MS,
            max: Duration::from_secs(1),
            jitter: 0.0,
        };
        assert_eq!(b.delay(2, 0.9), 20 * MS);
        let huge = Backoff::new(
            Duration::from_secs(u64::MAX / 4),
            Duration::from_secs(u64::MAX / 2),
        );
        assert_eq!(huge.nominal(40), Duration::from_secs(u64::MAX / 2));
    }
}
