//! Write keys and per-application rate limits.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::HeaderMap;
use feedloop_core::http::basic_credentials;
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, LimitsConfig};

/// Header that may carry the write key instead of HTTP Basic.
pub const WRITE_KEY_HEADER: &str = "x-write-key";

/// Write keys by digest. Looking up a digest reveals nothing usable about other keys, so no
/// comparison ever runs over the secret itself.
#[derive(Debug)]
pub struct Keys {
    by_digest: HashMap<[u8; 32], String>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Keys {
    pub fn new(cfg: &AuthConfig) -> Self {
        let by_digest = cfg
            .apps
            .iter()
            .flat_map(|(app, a)| {
                a.keys
                    .iter()
                    .map(move |k| (digest(k.expose()), app.clone()))
            })
            .collect();
        Self { by_digest }
    }

    /// The application whose key the request carries: HTTP Basic user (Segment's convention),
    /// the `X-Write-Key` header, or `writeKey` in a Segment body.
    pub fn app(&self, headers: &HeaderMap, body_key: Option<&str>) -> Option<&str> {
        let key = header_key(headers).or_else(|| body_key.map(str::to_owned))?;
        self.by_digest.get(&digest(&key)).map(String::as_str)
    }

    /// Whether a request must be refused before its body is read: its headers carry a key,
    /// and it is not a valid one. (A request without a key in its headers may carry one in a
    /// Segment body.)
    pub fn refuses_headers(&self, headers: &HeaderMap) -> bool {
        header_key(headers).is_some() && self.app(headers, None).is_none()
    }
}

/// The write key of the request's headers: the HTTP Basic user, or `X-Write-Key`.
fn header_key(headers: &HeaderMap) -> Option<String> {
    basic_credentials(headers).map(|c| c.user).or_else(|| {
        headers
            .get(WRITE_KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

/// A token bucket per application, in events.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(cfg: &LimitsConfig) -> Self {
        Self {
            rate: f64::from(cfg.events_per_second),
            burst: f64::from(cfg.burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `cost` events from `app`'s bucket, or says how long to wait.
    pub fn take(&self, app: &str, cost: usize) -> Result<(), Duration> {
        let cost = cost as f64;
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = buckets.entry(app.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= cost {
            *tokens -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                ((cost - *tokens) / self.rate).max(0.001),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AppConfig;
    use axum::http::HeaderValue;
    use feedloop_core::config::Secret;
    use std::collections::BTreeMap;

    #[test]
    fn finds_the_app_by_basic_header_or_body() {
        let keys = Keys::new(&AuthConfig {
            apps: BTreeMap::from([(
                "ios".to_owned(),
                AppConfig {
                    keys: vec![Secret::new("k-ios-0123456789abcdef")],
                },
            )]),
        });
        let mut h = HeaderMap::new();
        // "k-ios-0123456789abcdef:" in base64
        h.insert(
            "authorization",
            HeaderValue::from_static("Basic ay1pb3MtMDEyMzQ1Njc4OWFiY2RlZjo="),
        );
        assert_eq!(keys.app(&h, None), Some("ios"));
        let mut h = HeaderMap::new();
        h.insert(
            WRITE_KEY_HEADER,
            HeaderValue::from_static("k-ios-0123456789abcdef"),
        );
        assert_eq!(keys.app(&h, None), Some("ios"));
        assert_eq!(
            keys.app(&HeaderMap::new(), Some("k-ios-0123456789abcdef")),
            Some("ios")
        );
        assert_eq!(keys.app(&HeaderMap::new(), Some("wrong")), None);
        assert_eq!(keys.app(&HeaderMap::new(), None), None);
    }

    #[test]
    fn limits_bursts_and_refills() {
        let rl = RateLimiter::new(&LimitsConfig {
            events_per_second: 1000,
            burst: 100,
        });
        assert!(rl.take("a", 100).is_ok());
        let wait = rl.take("a", 50).expect_err("empty bucket");
        assert!(wait <= Duration::from_millis(60), "{wait:?}");
        assert!(rl.take("b", 100).is_ok(), "buckets are per app");
        std::thread::sleep(Duration::from_millis(60));
        assert!(rl.take("a", 50).is_ok());
    }
}
