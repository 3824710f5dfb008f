//! A stop request (SIGTERM, Ctrl-C) that the work itself decides when to honour.
//!
//! The program is never stopped by dropping its work: a `sys/init` request in flight must be
//! answered, and keys Vault just handed out must reach the journal and the store, or they are
//! gone. So a signal only sets this flag; waits ([`Shutdown::sleep_or_stop`]) end early, and
//! the code between `sys/init` and the last stored key reads it only to stop retrying once
//! the grace period is over.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Shared stop flag.
#[derive(Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The time passed.
    Elapsed,
    /// A stop was requested.
    Stop,
}

impl Wake {
    /// True when a stop was requested.
    pub fn is_stop(self) -> bool {
        self == Wake::Stop
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A flag nobody has raised yet.
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            tx: Arc::new(tx),
            rx,
        }
    }

    /// Raises the flag.
    pub fn request(&self) {
        self.tx.send_replace(true);
    }

    /// True once a stop was requested.
    pub fn requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves when a stop is requested.
    pub async fn stopped(&self) {
        let mut rx = self.rx.clone();
        // An error means every sender is gone: nobody can ask to stop any more.
        if rx.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Sleeps for `d`, or less if a stop is requested meanwhile.
    pub async fn sleep_or_stop(&self, d: Duration) -> Wake {
        if self.requested() {
            return Wake::Stop;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => Wake::Elapsed,
            _ = self.stopped() => Wake::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_ends_waits_early_and_stays_raised() {
        let s = Shutdown::new();
        assert!(!s.requested());
        assert_eq!(
            s.sleep_or_stop(Duration::from_millis(1)).await,
            Wake::Elapsed
        );
        let clone = s.clone();
        let waiter =
            tokio::spawn(async move { clone.sleep_or_stop(Duration::from_secs(600)).await });
        s.request();
        assert_eq!(waiter.await.expect("join"), Wake::Stop);
        assert!(s.requested());
        assert!(s.sleep_or_stop(Duration::from_secs(600)).await.is_stop());
    }
}
