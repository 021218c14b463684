//! A single-flight cache of the connection's access token. Medplum allows 160 token requests a
//! minute per IP, shared by everything on that IP, so a token is reused until most of its lifetime
//! has passed, and concurrent callers wait for one refresh instead of each asking for a token.

use std::future::Future;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::MedplumError;

struct CachedToken {
    token: SecretString,
    refresh_at: Instant,
}

#[derive(Default)]
pub(super) struct TokenCache {
    slot: Mutex<Option<CachedToken>>,
}

/// Whether a token came from the cache or from Medplum (for metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    Cache,
    Fetched,
}

/// When to refresh a token of this lifetime: after 80% of it, so that a token is never used in its
/// last minutes, where clock skew or a slow request could see it expire.
fn refresh_after(lifetime: Duration) -> Duration {
    lifetime.mul_f64(0.8)
}

impl TokenCache {
    /// The cached token, or a new one from `fetch` if there is none or it is due for refresh.
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<(SecretString, Source), MedplumError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(SecretString, Duration), MedplumError>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(cached) = slot.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok((cached.token.clone(), Source::Cache));
        }
        let (token, lifetime) = fetch().await?;
        *slot = Some(CachedToken { token: token.clone(), refresh_at: Instant::now() + refresh_after(lifetime) });
        Ok((token, Source::Fetched))
    }

    /// Drops `rejected` if it is still the cached token (Medplum answered 401 to it).
    pub async fn invalidate(&self, rejected: &SecretString) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|c| c.token.expose_secret() == rejected.expose_secret()) {
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn fetch_counted(
        counter: Arc<AtomicU32>,
        lifetime: Duration,
    ) -> Result<(SecretString, Duration), MedplumError> {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok((SecretString::from(format!("token-{n}")), lifetime))
    }

    #[tokio::test(start_paused = true)]
    async fn reuses_a_token_until_80_percent_of_its_lifetime() {
        let cache = TokenCache::default();
        let fetches = Arc::new(AtomicU32::new(0));
        let hour = Duration::from_secs(3600);
        let (first, source) = cache.get(|| fetch_counted(fetches.clone(), hour)).await.unwrap();
        assert_eq!(source, Source::Fetched);
        tokio::time::advance(Duration::from_secs(2000)).await;
        let (again, source) = cache.get(|| fetch_counted(fetches.clone(), hour)).await.unwrap();
        assert_eq!((again.expose_secret(), source), (first.expose_secret(), Source::Cache));
        tokio::time::advance(Duration::from_secs(900)).await; // 2900 s > 80% of 3600 s
        let (renewed, source) = cache.get(|| fetch_counted(fetches.clone(), hour)).await.unwrap();
        assert_eq!(source, Source::Fetched);
        assert_ne!(renewed.expose_secret(), first.expose_secret());
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let cache = Arc::new(TokenCache::default());
        let fetches = Arc::new(AtomicU32::new(0));
        let calls = (0..20).map(|_| {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tokio::spawn(async move { cache.get(|| fetch_counted(fetches, Duration::from_secs(60))).await.unwrap() })
        });
        for call in futures::future::join_all(calls).await {
            assert_eq!(call.unwrap().0.expose_secret(), "token-0");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn invalidate_only_drops_the_rejected_token() {
        let cache = TokenCache::default();
        let fetches = Arc::new(AtomicU32::new(0));
        let (token, _) = cache.get(|| fetch_counted(fetches.clone(), Duration::from_secs(60))).await.unwrap();
        cache.invalidate(&SecretString::from("some-older-token")).await;
        assert_eq!(
            cache.get(|| fetch_counted(fetches.clone(), Duration::from_secs(60))).await.unwrap().1,
            Source::Cache
        );
        cache.invalidate(&token).await;
        assert_eq!(
            cache.get(|| fetch_counted(fetches.clone(), Duration::from_secs(60))).await.unwrap().1,
            Source::Fetched
        );
    }
}
