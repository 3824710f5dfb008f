//! Retry delays that double up to a cap: quick to recover from a blip, gentle on a peer (Vault,
//! pcscd, the token) that stays away.

use std::time::Duration;

/// Doubling delays from a first one up to a cap; pure, so the caller decides how to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `first` and never exceeds `max` (nor starts above it).
    pub fn new(first: Duration, max: Duration) -> Self {
        let first = first.min(max);
        Self {
            first,
            max,
            current: first,
        }
    }

    /// The delay to wait now; the next call returns twice as much, up to the cap.
    #[expect(
        clippy::should_implement_trait,
        reason = "the delays never run out, so an Iterator's Option would only get in the way"
    )]
    pub fn next(&mut self) -> Duration {
        let now = self.current;
        self.current = now.saturating_mul(2).min(self.max);
        now
    }

    /// The delay the next call to [`Backoff::next`] will return, without advancing.
    pub fn peek(&self) -> Duration {
        self.current
    }

    /// Back to the first delay, once the peer answered again.
    pub fn reset(&mut self) {
        self.current = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_the_first_delay() {
        let mut b = Backoff::new(250 * MS, Duration::from_secs(60));
        let seq: Vec<Duration> = (0..5).map(|_| b.next()).collect();
        assert_eq!(seq, [250 * MS, 500 * MS, 1000 * MS, 2000 * MS, 4000 * MS]);
    }

    #[test]
    fn stops_at_the_cap() {
        let mut b = Backoff::new(500 * MS, Duration::from_secs(30));
        let seq: Vec<Duration> = (0..9).map(|_| b.next()).collect();
        assert_eq!(seq[6], Duration::from_secs(30), "{seq:?}");
        assert!(
            seq[..6].iter().all(|d| *d < Duration::from_secs(30)),
            "{seq:?}"
        );
        assert!(
            seq[6..].iter().all(|d| *d == Duration::from_secs(30)),
            "{seq:?}"
        );
        // A cap that is not a power-of-two multiple of the first delay is reached exactly.
        let mut b = Backoff::new(200 * MS, Duration::from_secs(5));
        let seq: Vec<Duration> = (0..7).map(|_| b.next()).collect();
        assert_eq!(seq[4..], [3200 * MS, 5000 * MS, 5000 * MS]);
    }

    #[test]
    fn a_first_delay_above_the_cap_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(5));
        assert_eq!(b.next(), Duration::from_secs(5));
        assert_eq!(b.next(), Duration::from_secs(5));
    }

    #[test]
    fn peek_does_not_advance_and_reset_starts_over() {
        let mut b = Backoff::new(MS, Duration::from_secs(1));
        b.next();
        b.next();
        assert_eq!(b.peek(), 4 * MS);
        assert_eq!(b.peek(), 4 * MS);
        assert_eq!(b.next(), 4 * MS);
        b.reset();
        assert_eq!(b.next(), MS);
        assert_eq!(b.next(), 2 * MS);
    }

    #[test]
    fn huge_delays_saturate_instead_of_overflowing() {
        let mut b = Backoff::new(Duration::MAX / 3, Duration::MAX);
        assert_eq!(b.next(), Duration::MAX / 3);
        // Doubling MAX/3 still fits; doubling that would overflow and saturates instead.
        assert_eq!(b.next(), (Duration::MAX / 3) * 2);
        assert_eq!(b.next(), Duration::MAX);
        assert_eq!(b.next(), Duration::MAX);
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(b.next(), Duration::MAX);
        assert_eq!(b.next(), Duration::MAX);
    }
}
