//! One timer per client connection for the header and response timeouts.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// One timer per connection for the header and response timeouts. Re-arming a timer on
/// every request would cost two timer-wheel updates each; this one is only moved when it
/// fires early, at most once per timeout period.
pub(super) struct Timer {
    sleep: Pin<Box<Sleep>>,
}

impl Timer {
    pub(super) fn new() -> Self {
        Timer {
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(24 * 3600))),
        }
    }

    /// Runs `fut` for at most `limit` from when it first has to wait; `None` if it took
    /// longer. A future that is ready at once costs no clock reading.
    pub(super) async fn within<F: Future>(&mut self, limit: Duration, fut: F) -> Option<F::Output> {
        let mut fut = pin!(fut);
        let mut until = None;
        poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            let until = match until {
                Some(u) => u,
                None => {
                    let u = Instant::now() + limit;
                    if self.sleep.deadline() > u {
                        self.sleep.as_mut().reset(u);
                    }
                    *until.insert(u)
                }
            };
            self.expired(cx, until).map(|()| None)
        })
        .await
    }

    /// Ready once `until` has passed; an early wake moves the timer to `until`.
    fn expired(&mut self, cx: &mut std::task::Context<'_>, until: Instant) -> Poll<()> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            if Instant::now() >= until {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(until);
        }
        Poll::Pending
    }

    /// Runs `fut` until `until` at the latest; `None` if it was not done by then.
    pub(super) async fn before<F: Future>(&mut self, until: Instant, fut: F) -> Option<F::Output> {
        if self.sleep.deadline() > until {
            self.sleep.as_mut().reset(until);
        }
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            self.expired(cx, until).map(|()| None)
        })
        .await
    }
}
