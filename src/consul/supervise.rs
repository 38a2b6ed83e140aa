//! Keeping background tasks alive: restart on panic or exit, back off with jitter on errors.

use std::future::Future;
use std::time::Duration;

use tokio::task::AbortHandle;

/// Aborts the task when dropped, so a task's lifetime follows its owner.
#[derive(Debug)]
pub struct AbortOnDrop(pub AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns `make()` and restarts it whenever it panics or returns, one second apart.
/// Dropping the returned guard stops the task and its current run.
pub fn supervise<F, Fut>(name: String, mut make: F) -> AbortOnDrop
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(async move {
        loop {
            let run = tokio::spawn(make());
            // If the supervisor is aborted, this guard aborts the run with it.
            let guard = AbortOnDrop(run.abort_handle());
            let result = run.await;
            drop(guard);
            match result {
                Ok(()) => tracing::warn!(task = %name, "task stopped; restarting"),
                Err(e) if e.is_panic() => {
                    tracing::error!(task = %name, "task panicked; restarting")
                }
                Err(_) => return,
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    AbortOnDrop(handle.abort_handle())
}

/// Exponential backoff with jitter: 250 ms doubling to 30 s (or the cap given to
/// [`Backoff::with_max`]), each delay scaled by 0.5–1.0.
#[derive(Debug)]
pub struct Backoff {
    failures: u32,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::with_max(Duration::from_secs(30))
    }
}

impl Backoff {
    /// A backoff whose delays never exceed `max`.
    pub fn with_max(max: Duration) -> Self {
        Backoff { failures: 0, max }
    }

    /// The next delay; grows with each call until [`Backoff::reset`].
    pub fn next_delay(&mut self) -> Duration {
        let base = Duration::from_millis(250) * 2u32.saturating_pow(self.failures.min(7));
        self.failures = self.failures.saturating_add(1);
        base.min(self.max).mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// Sleeps for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Forgets past failures after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(250));
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        assert!(b.next_delay() >= Duration::from_secs(15));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(250));
        let mut capped = Backoff::with_max(Duration::from_secs(2));
        for _ in 0..20 {
            assert!(capped.next_delay() <= Duration::from_secs(2));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn restarts_after_panic() {
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let guard = supervise("t".into(), move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
                std::future::pending::<()>().await;
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        drop(guard);
    }
}
