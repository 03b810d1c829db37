//! The one place that retries with backoff. Everything else calls [`retry`]; the `backoff`
//! crate (flagged as unmaintained) stays confined to this file, so replacing it is a one-file
//! change.

use std::{future::Future, time::Duration};

/// How long and how often to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_interval: Duration,
    /// Give up after this long; `None` retries forever.
    pub max_elapsed: Option<Duration>,
}

impl RetryPolicy {
    /// A short policy for start-up dependencies (databases, brokers coming up).
    pub const fn startup() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max_interval: Duration::from_secs(2),
            max_elapsed: Some(Duration::from_secs(60)),
        }
    }

    /// Retries for up to `max_elapsed`.
    pub const fn within(max_elapsed: Duration) -> Self {
        Self {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_secs(10),
            max_elapsed: Some(max_elapsed),
        }
    }
}

/// The outcome of one attempt that failed.
#[derive(Debug)]
pub enum Attempt<E> {
    /// Worth trying again (dependency down, timeout).
    Retry(E),
    /// Will fail the same way again (bad input, bug).
    Fail(E),
}

/// Runs `op` until it succeeds, fails permanently, or the policy gives up (returning the last
/// error).
pub async fn retry<T, E, F, Fut>(policy: RetryPolicy, mut op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    let backoff = backoff::ExponentialBackoff {
        initial_interval: policy.initial,
        current_interval: policy.initial,
        max_interval: policy.max_interval,
        max_elapsed_time: policy.max_elapsed,
        ..backoff::ExponentialBackoff::default()
    };
    backoff::future::retry(backoff, || {
        let fut = op();
        async move {
            fut.await.map_err(|e| match e {
                Attempt::Retry(e) => backoff::Error::transient(e),
                Attempt::Fail(e) => backoff::Error::permanent(e),
            })
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn retries_transient_errors_until_success() {
        let calls = AtomicU32::new(0);
        let out: Result<u32, &str> = retry(RetryPolicy::startup(), || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(Attempt::Retry("not yet"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(out, Ok(2));
    }

    #[tokio::test]
    async fn stops_at_permanent_errors() {
        let calls = AtomicU32::new(0);
        let out: Result<(), &str> = retry(RetryPolicy::startup(), || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Attempt::Fail("bad input")) }
        })
        .await;
        assert_eq!(out, Err("bad input"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn gives_up_after_max_elapsed() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(5),
            max_interval: Duration::from_millis(10),
            max_elapsed: Some(Duration::from_millis(60)),
        };
        let out: Result<(), &str> = retry(policy, || async { Err(Attempt::Retry("down")) }).await;
        assert_eq!(out, Err("down"));
    }
}
