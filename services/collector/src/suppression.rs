//! Users under erasure, whose events are dropped. The list lives in Postgres
//! (`collector.suppressed_users`, filled by the eraser); this keeps an in-memory copy that
//! follows inserts within moments (LISTEN/NOTIFY) and reloads in full periodically.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rustc_hash::FxHashSet;
use sqlx::{PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;

/// The notification channel the table's trigger announces inserts on.
pub const CHANNEL: &str = "feedloop_suppression";

#[derive(Debug, Default)]
pub struct Suppression {
    users: RwLock<FxHashSet<String>>,
    loaded: AtomicBool,
}

impl Suppression {
    pub fn contains(&self, user_id: &str) -> bool {
        self.users
            .read()
            .map(|u| u.contains(user_id))
            .unwrap_or(false)
    }

    /// Whether the list was loaded at least once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.users.read().map(|u| u.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn replace(&self, users: FxHashSet<String>) {
        if let Ok(mut u) = self.users.write() {
            *u = users;
        }
        self.loaded.store(true, Ordering::Release);
    }

    fn add(&self, user: String) {
        if let Ok(mut u) = self.users.write() {
            u.insert(user);
        }
    }

    async fn reload(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let users: Vec<String> =
            sqlx::query_scalar("SELECT user_id FROM collector.suppressed_users")
                .fetch_all(pool)
                .await?;
        self.replace(users.into_iter().collect());
        Ok(())
    }

    /// Loads the list, then follows it until `shutdown`.
    pub async fn follow(
        self: Arc<Self>,
        pool: PgPool,
        refresh: Duration,
        shutdown: CancellationToken,
    ) {
        loop {
            let listener = async {
                let mut l = PgListener::connect_with(&pool).await?;
                l.listen(CHANNEL).await?;
                // Load after listening, so nothing inserted in between is missed.
                self.reload(&pool).await?;
                Ok::<_, sqlx::Error>(l)
            }
            .await;
            let mut listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "Suppression list unavailable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut tick = tokio::time::interval(refresh);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = listener.recv() => match n {
                        Ok(n) => self.add(n.payload().to_owned()),
                        Err(e) => {
                            tracing::warn!(error = %e, "Suppression notifications lost; reconnecting");
                            break;
                        }
                    },
                    _ = tick.tick() => {
                        if let Err(e) = self.reload(&pool).await {
                            tracing::warn!(error = %e, "Suppression reload failed");
                        }
                    }
                }
            }
        }
    }
}
