//! Instance addresses that are host names: resolved once per TTL, not on every connect.
//! `getaddrinfo` gives no TTL, so the router's own (`consul.dns_ttl`) applies. When an entry
//! expires, one connect resolves again while the others keep using the old addresses; a
//! failed lookup keeps them too (logged once until a lookup succeeds). With nothing cached
//! (at start), one connect resolves while the others wait for its answer, and a failure
//! there is cached a few seconds too, so a name that never resolves costs one lookup per
//! few seconds, not one per connect.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;

/// After a failed lookup, the old addresses (or the failure) are kept this long at most
/// before the next try.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// One lookup's answer.
#[derive(Debug)]
pub struct Resolved {
    /// The addresses, in the resolver's order; never empty in an answer given out.
    pub addrs: Box<[SocketAddr]>,
    expires: Instant,
    /// A failed lookup with nothing older to keep: its error, given out until `expires`.
    failed: Option<(io::ErrorKind, Box<str>)>,
}

impl Resolved {
    fn answer(self: &Arc<Self>) -> io::Result<Arc<Resolved>> {
        match &self.failed {
            None => Ok(self.clone()),
            Some((kind, msg)) => Err(io::Error::new(*kind, &**msg)),
        }
    }
}

/// An instance's resolved addresses. Small (a pointer, three words and an idle `Notify`)
/// for an instance whose address is an IP: it is never used then.
#[derive(Debug)]
pub struct DnsCache {
    ttl_ms: AtomicU64,
    resolved: ArcSwapOption<Resolved>,
    /// A connect is resolving now.
    refreshing: AtomicBool,
    /// Woken when a lookup ends; connects with nothing to use wait on it.
    resolved_now: Notify,
    /// The last lookup failed and was logged.
    warned: AtomicBool,
}

impl Default for DnsCache {
    fn default() -> Self {
        DnsCache {
            ttl_ms: AtomicU64::new(30_000),
            resolved: ArcSwapOption::empty(),
            refreshing: AtomicBool::new(false),
            resolved_now: Notify::new(),
            warned: AtomicBool::new(false),
        }
    }
}

/// Clears `refreshing` and wakes the waiting connects however the lookup ends, a cancelled
/// connect included.
struct Refreshing<'a>(&'a DnsCache);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
        self.0.resolved_now.notify_waiters();
    }
}

/// Whether `answer` is not the `old` one this connect started from.
fn is_new(answer: &Arc<Resolved>, old: &Option<Arc<Resolved>>) -> bool {
    old.as_ref().is_none_or(|o| !Arc::ptr_eq(o, answer))
}

impl DnsCache {
    /// Sets the TTL (each table build passes `consul.dns_ttl`); a load first, so an
    /// unchanged value does not take the cache line.
    pub fn set_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if self.ttl_ms.load(Ordering::Relaxed) != ms {
            self.ttl_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// `host:port`'s addresses, from the cache while fresh, else from the system resolver.
    pub async fn addrs(&self, host: &str, port: u16) -> io::Result<Arc<Resolved>> {
        self.addrs_with(host, port, Instant::now(), system_lookup)
            .await
    }

    /// [`DnsCache::addrs`] with the clock and the resolver given (tests count lookups).
    pub async fn addrs_with<F, Fut>(
        &self,
        host: &str,
        port: u16,
        now: Instant,
        lookup: F,
    ) -> io::Result<Arc<Resolved>>
    where
        F: FnOnce(String, u16) -> Fut,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>>,
    {
        let old = self.resolved.load_full();
        let _guard = match &old {
            Some(r) if now < r.expires => return r.answer(),
            // Expired: one connect resolves, the others go on with the old addresses.
            Some(r) if r.failed.is_none() => match self.refreshing.swap(true, Ordering::AcqRel) {
                true => return Ok(r.clone()),
                false => Refreshing(self),
            },
            // Nothing to use: one connect resolves, the others wait for its answer.
            _ => match self.resolver_or_answer(&old).await {
                Ok(guard) => guard,
                Err(answer) => return answer.answer(),
            },
        };
        let ttl = Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed));
        let failure = match lookup(host.to_owned(), port).await {
            Ok(addrs) if !addrs.is_empty() => {
                let fresh = Arc::new(Resolved {
                    addrs: addrs.into(),
                    expires: now + ttl,
                    failed: None,
                });
                self.resolved.store(Some(fresh.clone()));
                if self.warned.swap(false, Ordering::Relaxed) {
                    tracing::info!(host, "instance address resolves again");
                }
                return Ok(fresh);
            }
            Ok(_) => io::Error::new(io::ErrorKind::NotFound, "no address"),
            Err(e) => e,
        };
        let retry = now + ttl.min(RETRY_AFTER_FAILURE);
        let Some(old) = old.filter(|o| o.failed.is_none()) else {
            self.resolved.store(Some(Arc::new(Resolved {
                addrs: Box::new([]),
                expires: retry,
                failed: Some((failure.kind(), failure.to_string().into())),
            })));
            return Err(failure);
        };
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(host, error = %failure, "cannot resolve an instance address; keeping its last addresses");
        }
        let kept = Arc::new(Resolved {
            addrs: old.addrs.clone(),
            expires: retry,
            failed: None,
        });
        self.resolved.store(Some(kept.clone()));
        Ok(kept)
    }

    /// With nothing usable cached (`old`): the right to resolve, or the answer another
    /// connect's lookup stored meanwhile.
    async fn resolver_or_answer(
        &self,
        old: &Option<Arc<Resolved>>,
    ) -> Result<Refreshing<'_>, Arc<Resolved>> {
        loop {
            // Registered before the flag is tried, so the resolver's wake-up is not lost.
            let done = self.resolved_now.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if !self.refreshing.swap(true, Ordering::AcqRel) {
                let guard = Refreshing(self);
                return match self.resolved.load_full() {
                    // A lookup ended between our load and the flag.
                    Some(answer) if is_new(&answer, old) => Err(answer),
                    _ => Ok(guard),
                };
            }
            done.await;
            // No new answer: that lookup was cancelled; try for the flag again.
            if let Some(answer) = self.resolved.load_full().filter(|a| is_new(a, old)) {
                return Err(answer);
            }
        }
    }
}

async fn system_lookup(host: String, port: u16) -> io::Result<Vec<SocketAddr>> {
    Ok(tokio::net::lookup_host((host.as_str(), port))
        .await?
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], 80))
    }

    #[tokio::test]
    async fn resolves_once_per_ttl_and_keeps_the_last_good_answer() {
        let cache = DnsCache::default();
        cache.set_ttl(Duration::from_secs(30));
        let calls = AtomicUsize::new(0);
        let answer = std::sync::Mutex::new(Ok(vec![addr(1)]));
        let lookup = |_: String, _: u16| {
            calls.fetch_add(1, Ordering::SeqCst);
            let a = match &*answer.lock().unwrap() {
                Ok(v) => Ok(v.clone()),
                Err(()) => Err(io::Error::other("servfail")),
            };
            async move { a }
        };
        let t0 = Instant::now();
        let s = Duration::from_secs;
        for at in [0, 1, 29] {
            let r = cache
                .addrs_with("svc", 80, t0 + s(at), lookup)
                .await
                .unwrap();
            assert_eq!(&*r.addrs, [addr(1)]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one lookup within the TTL");
        // Expired: resolved again.
        *answer.lock().unwrap() = Ok(vec![addr(2), addr(3)]);
        let r = cache
            .addrs_with("svc", 80, t0 + s(31), lookup)
            .await
            .unwrap();
        assert_eq!(&*r.addrs, [addr(2), addr(3)]);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // A failed lookup keeps the last addresses, and tries again a few seconds later.
        *answer.lock().unwrap() = Err(());
        let r = cache
            .addrs_with("svc", 80, t0 + s(62), lookup)
            .await
            .unwrap();
        assert_eq!(&*r.addrs, [addr(2), addr(3)]);
        let r = cache
            .addrs_with("svc", 80, t0 + s(63), lookup)
            .await
            .unwrap();
        assert_eq!(&*r.addrs, [addr(2), addr(3)]);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "no lookup on every connect"
        );
        *answer.lock().unwrap() = Ok(vec![]);
        let r = cache
            .addrs_with("svc", 80, t0 + s(68), lookup)
            .await
            .unwrap();
        assert_eq!(&*r.addrs, [addr(2), addr(3)], "an empty answer too");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // Never resolved: the error comes back.
        let fresh = DnsCache::default();
        assert!(fresh.addrs_with("svc", 80, t0, lookup).await.is_err());
    }

    #[tokio::test]
    async fn while_one_connect_resolves_the_others_use_the_old_addresses() {
        let cache = DnsCache::default();
        cache.set_ttl(Duration::from_secs(1));
        let t0 = Instant::now();
        let first = |_: String, _: u16| async { Ok(vec![addr(1)]) };
        cache.addrs_with("svc", 80, t0, first).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let later = t0 + Duration::from_secs(2);
        let slow = |_: String, _: u16| async move {
            let _ = rx.await;
            Ok(vec![addr(9)])
        };
        let refresh = cache.addrs_with("svc", 80, later, slow);
        let others = async {
            let never = |_: String, _: u16| async { panic!("a second lookup") };
            let r = cache.addrs_with("svc", 80, later, never).await.unwrap();
            assert_eq!(&*r.addrs, [addr(1)], "stale while refreshing");
            let _ = tx.send(());
        };
        let (r, ()) = tokio::join!(refresh, others);
        assert_eq!(&*r.unwrap().addrs, [addr(9)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cold_cache_makes_one_lookup_for_many_connects() {
        let cache = Arc::new(DnsCache::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let (cache, calls) = (cache.clone(), calls.clone());
            connects.spawn(async move {
                let lookup = |_: String, _: u16| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(vec![addr(1)])
                };
                cache.addrs_with("svc", 80, t0, lookup).await
            });
        }
        while let Some(r) = connects.join_next().await {
            assert_eq!(&*r.unwrap().unwrap().addrs, [addr(1)]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failure_with_nothing_cached_is_cached_a_few_seconds() {
        let cache = DnsCache::default();
        let calls = AtomicUsize::new(0);
        let failing = |_: String, _: u16| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(io::Error::new(io::ErrorKind::NotFound, "nxdomain")) }
        };
        let t0 = Instant::now();
        for at in [0, 1, 4] {
            let e = cache
                .addrs_with("svc", 80, t0 + Duration::from_secs(at), failing)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound);
            assert!(e.to_string().contains("nxdomain"), "{e}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one lookup in 5 s");
        // Retried after it, and a success replaces the failure.
        let ok = |_: String, _: u16| async { Ok(vec![addr(2)]) };
        let r = cache
            .addrs_with("svc", 80, t0 + Duration::from_secs(6), ok)
            .await
            .unwrap();
        assert_eq!(&*r.addrs, [addr(2)]);
    }

    #[tokio::test]
    async fn a_cancelled_cold_lookup_lets_a_waiting_connect_resolve() {
        let cache = DnsCache::default();
        let t0 = Instant::now();
        let stuck = |_: String, _: u16| std::future::pending::<io::Result<Vec<SocketAddr>>>();
        // Boxed, so that dropping it drops the lookup (a connect cancelled).
        let mut first = Box::pin(cache.addrs_with("svc", 80, t0, stuck));
        let ok = |_: String, _: u16| async { Ok(vec![addr(3)]) };
        let mut second = Box::pin(cache.addrs_with("svc", 80, t0, ok));
        // The first takes the lookup, the second waits on it.
        assert!(futures_poll_once(first.as_mut()).await.is_none());
        assert!(futures_poll_once(second.as_mut()).await.is_none());
        drop(first);
        let r = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the waiter resolves itself")
            .unwrap();
        assert_eq!(&*r.addrs, [addr(3)]);
    }

    /// Polls `f` once: its output if it was ready.
    async fn futures_poll_once<F: Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }

    #[tokio::test]
    async fn localhost_resolves_through_the_system() {
        let cache = DnsCache::default();
        let r = cache.addrs("localhost", 8080).await.unwrap();
        assert!(r
            .addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 8080));
    }
}
