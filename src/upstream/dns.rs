//! Instance addresses that are host names: resolved once per TTL, not on every connect.
//! `getaddrinfo` gives no TTL, so the router's own (`consul.dns_ttl`) applies. When an entry
//! expires, one connect resolves again while the others keep using the old addresses; a
//! failed lookup keeps them too (logged once until a lookup succeeds).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

/// After a failed lookup, the old addresses are kept this long at most before the next try.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// One lookup's answer.
#[derive(Debug)]
pub struct Resolved {
    /// The addresses, in the resolver's order; never empty.
    pub addrs: Box<[SocketAddr]>,
    expires: Instant,
}

/// An instance's resolved addresses. Empty (one pointer and three words) for an instance
/// whose address is an IP: it is never used then.
#[derive(Debug)]
pub struct DnsCache {
    ttl_ms: AtomicU64,
    resolved: ArcSwapOption<Resolved>,
    /// A connect is resolving again now.
    refreshing: AtomicBool,
    /// The last lookup failed and was logged.
    warned: AtomicBool,
}

impl Default for DnsCache {
    fn default() -> Self {
        DnsCache {
            ttl_ms: AtomicU64::new(30_000),
            resolved: ArcSwapOption::empty(),
            refreshing: AtomicBool::new(false),
            warned: AtomicBool::new(false),
        }
    }
}

/// Clears `refreshing` however the lookup ends, a cancelled connect included.
struct Refreshing<'a>(&'a AtomicBool);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
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
            Some(r) if now < r.expires => return Ok(r.clone()),
            // Expired: one connect resolves, the others go on with the old addresses.
            Some(r) => match self.refreshing.swap(true, Ordering::AcqRel) {
                true => return Ok(r.clone()),
                false => Some(Refreshing(&self.refreshing)),
            },
            None => None,
        };
        let ttl = Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed));
        let failure = match lookup(host.to_owned(), port).await {
            Ok(addrs) if !addrs.is_empty() => {
                let fresh = Arc::new(Resolved {
                    addrs: addrs.into(),
                    expires: now + ttl,
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
        let Some(old) = old else {
            return Err(failure);
        };
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(host, error = %failure, "cannot resolve an instance address; keeping its last addresses");
        }
        let kept = Arc::new(Resolved {
            addrs: old.addrs.clone(),
            expires: now + ttl.min(RETRY_AFTER_FAILURE),
        });
        self.resolved.store(Some(kept.clone()));
        Ok(kept)
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
