//! Crypto-shredding building blocks: personal fields are encrypted with a per-user data key
//! before they enter the immutable log, so that deleting the key erases them everywhere the
//! log was copied.
//!
//! - [`seal`] / [`open`]: XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`) with a random
//!   192-bit nonce and the user id as associated data, so that a ciphertext cannot be moved to
//!   another user. A sealed field is text: `fl1:` + base64url(nonce ‖ ciphertext), and fits the
//!   Avro string fields it replaces.
//! - [`KeyStore`]: the port for per-user keys, with Postgres, ScyllaDB and in-memory adapters;
//!   [`key_store`] opens the one `[keys]` configures. The persistent ones store each key only
//!   wrapped by a key-encryption key ([`KeyRing`]) kept outside the database. [`KeyCache`]
//!   keeps writers off the store on the hot path, and forgets a key as soon as its destruction
//!   is broadcast.
//!
//! Once a key is deleted, [`open`] answers [`Opened::Erased`]: a clean value to show, never an
//! error to retry.

mod kek;
#[cfg(feature = "scylla")]
mod scylla;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, KeyInit, OsRng, Payload},
};

/// Prefix of a sealed field.
pub const SEALED_PREFIX: &str = "fl1:";
/// What consumers show in place of a field whose key was destroyed.
pub const ERASED: &str = "[erased]";

pub use kek::{KeyRing, WRAPPED_LEN, Wrapped};
#[cfg(feature = "scylla")]
pub use scylla::ScyllaKeyStore;

/// A 256-bit data key, wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey([u8; 32]);

impl Drop for DataKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("encryption failed")]
    Seal,
    #[error("key store: {0}")]
    Store(String),
    #[error("key ring: {0}")]
    KeyRing(String),
    #[error("a data key is wrapped by KEK {0:?}, which this service's key ring lacks")]
    UnknownKek(String),
    #[error(
        "a data key wrapped by KEK {0:?} does not unwrap (another key under that id, or tampered)"
    )]
    Unwrap(String),
}

/// Encrypts bytes of `user` under `key`: nonce (24 bytes) ‖ ciphertext with its tag.
pub fn seal_bytes(key: &DataKey, user: &str, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    // A CSPRNG in user space (reseeded from the OS), not a system call per field: sealing is
    // on cdc's and the collector's hot paths.
    let nonce = XChaCha20Poly1305::generate_nonce(&mut rand::thread_rng());
    let ct = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: user.as_bytes(),
            },
        )
        .map_err(|_| CryptoError::Seal)?;
    let mut raw = Vec::with_capacity(nonce.len() + ct.len());
    raw.extend_from_slice(&nonce);
    raw.extend_from_slice(&ct);
    Ok(raw)
}

/// Decrypts what [`seal_bytes`] sealed; `None` if it is not `user`'s under `key`, or tampered.
pub fn open_bytes(key: &DataKey, user: &str, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 24 {
        return None;
    }
    let (nonce, ct) = sealed.split_at(24);
    let nonce = <[u8; 24]>::try_from(nonce).ok()?;
    XChaCha20Poly1305::new(key.as_bytes().into())
        .decrypt(
            &XNonce::from(nonce),
            Payload {
                msg: ct,
                aad: user.as_bytes(),
            },
        )
        .ok()
}

/// Key-store owner of the day's key for data whose user is not known (dead letters of
/// unreadable input): `feedloop:unattributed:YYYY-MM-DD` (UTC). The eraser destroys each after
/// `erasure.unattributed_retention_days`.
pub fn unattributed_owner(at_ms: i64) -> String {
    let day = chrono::DateTime::from_timestamp_millis(at_ms)
        .unwrap_or_default()
        .format("%Y-%m-%d");
    format!("{UNATTRIBUTED_PREFIX}{day}")
}

/// Prefix of [`unattributed_owner`]s.
pub const UNATTRIBUTED_PREFIX: &str = "feedloop:unattributed:";

/// Destroys the unattributed keys of the days that ended more than `retention_days` before
/// `now_ms` (looking a year further back, for an eraser that was down); the key of a day is
/// destroyed once every letter sealed with it is at least that old. Returns how many.
pub async fn expire_unattributed(
    store: &dyn KeyStore,
    retention_days: u32,
    now_ms: i64,
) -> Result<u64, CryptoError> {
    const DAY_MS: i64 = 86_400_000;
    let retention = i64::from(retention_days);
    let mut expired = Vec::new();
    for days in retention + 1..=retention + 366 {
        let owner = unattributed_owner(now_ms - days * DAY_MS);
        if store.get(&owner).await?.is_some() {
            expired.push(owner);
        }
    }
    if expired.is_empty() {
        return Ok(0);
    }
    store.destroy(&expired).await
}

/// Encrypts `plaintext` of `user` under `key`.
pub fn seal(key: &DataKey, user: &str, plaintext: &str) -> Result<String, CryptoError> {
    let raw = seal_bytes(key, user, plaintext.as_bytes())?;
    let mut out = String::with_capacity(SEALED_PREFIX.len() + raw.len().div_ceil(3) * 4);
    out.push_str(SEALED_PREFIX);
    URL_SAFE_NO_PAD.encode_string(&raw, &mut out);
    Ok(out)
}

/// Seals `plaintext` for a writer: under the user's key, or, when the key was destroyed
/// already (the user is erased), as a bare [`SEALED_PREFIX`] that reads back as erased.
pub fn seal_for(key: Option<&DataKey>, user: &str, plaintext: &str) -> Result<String, CryptoError> {
    match key {
        Some(k) => seal(k, user, plaintext),
        None => Ok(SEALED_PREFIX.to_owned()),
    }
}

/// A field read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// It was never sealed.
    Plain(String),
    /// Decrypted.
    Clear(String),
    /// The user's key is gone: the value is erased for good.
    Erased,
    /// Sealed, but not for this user or tampered with.
    Invalid,
}

/// Reads a field that may be sealed; `key` is the user's key, `None` once destroyed.
pub fn open(key: Option<&DataKey>, user: &str, field: &str) -> Opened {
    let Some(encoded) = field.strip_prefix(SEALED_PREFIX) else {
        return Opened::Plain(field.to_owned());
    };
    let Some(key) = key else {
        return Opened::Erased;
    };
    let Ok(raw) = URL_SAFE_NO_PAD.decode(encoded) else {
        return Opened::Invalid;
    };
    match open_bytes(key, user, &raw) {
        Some(pt) => String::from_utf8(pt).map_or(Opened::Invalid, Opened::Clear),
        None => Opened::Invalid,
    }
}

/// Per-user data keys.
#[async_trait]
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// The user's key, created on first use; `None` once destroyed (never created again).
    async fn get_or_create(&self, user: &str) -> Result<Option<DataKey>, CryptoError>;
    /// [`KeyStore::get_or_create`] for many users at once (adapters answer in one round trip
    /// where they can).
    async fn get_or_create_many(
        &self,
        users: &[String],
    ) -> Result<HashMap<String, Option<DataKey>>, CryptoError> {
        let mut out = HashMap::with_capacity(users.len());
        for u in users {
            if !out.contains_key(u) {
                out.insert(u.clone(), self.get_or_create(u).await?);
            }
        }
        Ok(out)
    }
    /// The user's key, `None` if it never existed or was destroyed.
    async fn get(&self, user: &str) -> Result<Option<DataKey>, CryptoError>;
    /// Destroys the keys of `users` (crypto-shredding): their wrapped copies are deleted, and
    /// writers caching them are told. Returns how many existed.
    async fn destroy(&self, users: &[String]) -> Result<u64, CryptoError>;
    /// Re-wraps up to `limit` keys not wrapped by the current KEK (KEK rotation, and keys
    /// stored before envelope encryption); returns how many it re-wrapped: 0 once none is left.
    async fn rewrap(&self, limit: usize) -> Result<u64, CryptoError> {
        let _ = limit;
        Ok(0)
    }
    /// How long after [`KeyStore::destroy`] returns until no writer can still seal with a
    /// destroyed key: the broadcast's delivery, or the writers' cache lifetime where the store
    /// cannot broadcast.
    fn destruction_settles(&self) -> Duration {
        Duration::ZERO
    }
}

/// In-memory keys, for tests.
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    /// `None`: destroyed.
    keys: Mutex<HashMap<String, Option<DataKey>>>,
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn get_or_create(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(keys
            .entry(user.to_owned())
            .or_insert_with(|| Some(DataKey::generate()))
            .clone())
    }

    async fn get(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        let keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(keys.get(user).cloned().flatten())
    }

    async fn destroy(&self, users: &[String]) -> Result<u64, CryptoError> {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut n = 0;
        for u in users {
            if keys.insert(u.clone(), None).flatten().is_some() {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The channel a Postgres key store announces destroyed keys on (payload: the user id).
pub const DESTROYED_CHANNEL: &str = "feedloop_keys_destroyed";

/// Keys in Postgres (`keys.user_keys`), wrapped by the key ring's KEKs. Concurrent first uses
/// agree on one key. Destruction deletes the wrapped key (the row stays, without it, so that
/// no key is ever made again for the user) and is announced on [`DESTROYED_CHANNEL`].
#[derive(Debug, Clone)]
pub struct PostgresKeyStore {
    pool: sqlx::PgPool,
    ring: KeyRing,
}

impl PostgresKeyStore {
    pub fn new(pool: sqlx::PgPool, ring: KeyRing) -> Self {
        Self { pool, ring }
    }
}

fn store_err(e: sqlx::Error) -> CryptoError {
    CryptoError::Store(e.to_string())
}

/// A `keys.user_keys` row as read: the wrapped key and its KEK id, or the key stored before
/// envelope encryption (re-wrapped by [`KeyStore::rewrap`]); all `None` once destroyed.
type KeyRow = (Option<Vec<u8>>, Option<String>, Option<Vec<u8>>);

impl PostgresKeyStore {
    fn unwrap_row(&self, user: &str, row: KeyRow) -> Result<Option<DataKey>, CryptoError> {
        match row {
            (Some(bytes), Some(kek_id), _) => {
                self.ring.unwrap(user, &Wrapped { kek_id, bytes }).map(Some)
            }
            (None, None, Some(legacy)) => DataKey::from_bytes(&legacy)
                .map(Some)
                .ok_or_else(|| CryptoError::Store("a stored key is not 32 bytes".into())),
            (None, None, None) => Ok(None),
            _ => Err(CryptoError::Store(
                "a wrapped key without its KEK id".into(),
            )),
        }
    }
}

#[async_trait]
impl KeyStore for PostgresKeyStore {
    async fn get_or_create(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        let fresh = self.ring.wrap(user, &DataKey::generate())?;
        let row: KeyRow = sqlx::query_as(
            "INSERT INTO keys.user_keys (user_id, wrapped, kek_id) VALUES ($1, $2, $3)
             ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id
             RETURNING wrapped, kek_id, key",
        )
        .bind(user)
        .bind(&fresh.bytes)
        .bind(&fresh.kek_id)
        .fetch_one(&self.pool)
        .await
        .map_err(store_err)?;
        self.unwrap_row(user, row)
    }

    async fn get_or_create_many(
        &self,
        users: &[String],
    ) -> Result<HashMap<String, Option<DataKey>>, CryptoError> {
        // Sorted and distinct: one row per user in the statement, and concurrent writers lock
        // rows in the same order.
        let mut users: Vec<String> = users.to_vec();
        users.sort();
        users.dedup();
        let fresh = users
            .iter()
            .map(|u| self.ring.wrap(u, &DataKey::generate()).map(|w| w.bytes))
            .collect::<Result<Vec<Vec<u8>>, _>>()?;
        let rows: Vec<(String, Option<Vec<u8>>, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
            "INSERT INTO keys.user_keys (user_id, wrapped, kek_id)
                 SELECT u, w, $3 FROM UNNEST($1::text[], $2::bytea[]) AS t(u, w) ORDER BY u
                 ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id
                 RETURNING user_id, wrapped, kek_id, key",
        )
        .bind(&users)
        .bind(&fresh)
        .bind(self.ring.current_id())
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        rows.into_iter()
            .map(|(u, w, k, legacy)| {
                let key = self.unwrap_row(&u, (w, k, legacy))?;
                Ok((u, key))
            })
            .collect()
    }

    async fn get(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        let row: Option<KeyRow> =
            sqlx::query_as("SELECT wrapped, kek_id, key FROM keys.user_keys WHERE user_id = $1")
                .bind(user)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_err)?;
        match row {
            Some(row) => self.unwrap_row(user, row),
            None => Ok(None),
        }
    }

    async fn destroy(&self, users: &[String]) -> Result<u64, CryptoError> {
        let mut tx = self.pool.begin().await.map_err(store_err)?;
        let destroyed = sqlx::query(
            "UPDATE keys.user_keys SET wrapped = NULL, kek_id = NULL, key = NULL,
                 destroyed_at = now()
             WHERE user_id = ANY($1) AND destroyed_at IS NULL",
        )
        .bind(users)
        .execute(&mut *tx)
        .await
        .map_err(store_err)?
        .rows_affected();
        // Users who never had a key get a destroyed one, so that none is made for them later.
        sqlx::query(
            "INSERT INTO keys.user_keys (user_id, destroyed_at)
             SELECT unnest($1::text[]), now() ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(users)
        .execute(&mut *tx)
        .await
        .map_err(store_err)?;
        // Delivered to every listening writer when the transaction commits.
        sqlx::query("SELECT pg_notify($1, u) FROM unnest($2::text[]) AS t(u)")
            .bind(DESTROYED_CHANNEL)
            .bind(users)
            .execute(&mut *tx)
            .await
            .map_err(store_err)?;
        tx.commit().await.map_err(store_err)?;
        Ok(destroyed)
    }

    async fn rewrap(&self, limit: usize) -> Result<u64, CryptoError> {
        let rows: Vec<(String, Option<Vec<u8>>, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT user_id, wrapped, kek_id, key FROM keys.user_keys
                 WHERE destroyed_at IS NULL AND (key IS NOT NULL OR kek_id <> $1)
                 LIMIT $2",
        )
        .bind(self.ring.current_id())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        let mut n = 0;
        for (user, wrapped, kek_id, legacy) in rows {
            let Some(key) =
                self.unwrap_row(&user, (wrapped.clone(), kek_id.clone(), legacy.clone()))?
            else {
                continue;
            };
            let fresh = self.ring.wrap(&user, &key)?;
            // Only if the row is still what was read: a key destroyed meanwhile stays so.
            n += sqlx::query(
                "UPDATE keys.user_keys SET wrapped = $2, kek_id = $3, key = NULL
                 WHERE user_id = $1 AND destroyed_at IS NULL
                   AND wrapped IS NOT DISTINCT FROM $4 AND kek_id IS NOT DISTINCT FROM $5
                   AND key IS NOT DISTINCT FROM $6",
            )
            .bind(&user)
            .bind(&fresh.bytes)
            .bind(&fresh.kek_id)
            .bind(&wrapped)
            .bind(&kek_id)
            .bind(&legacy)
            .execute(&self.pool)
            .await
            .map_err(store_err)?
            .rows_affected();
        }
        Ok(n)
    }

    fn destruction_settles(&self) -> Duration {
        DESTRUCTION_BROADCAST_GRACE
    }
}

/// How long the eraser allows a destruction's notification to reach every listening writer.
pub const DESTRUCTION_BROADCAST_GRACE: Duration = Duration::from_secs(1);

/// Writers' view of a key store: keys by user, cached so that sealing does not cost a round
/// trip per record.
///
/// A cache that follows the store's destruction broadcast ([`KeyCache::follow_destructions`])
/// forgets a key as soon as it is destroyed, and caches nothing while it is not listening;
/// otherwise entries live for the TTL. A lookup that raced a destruction is not cached.
#[derive(Debug)]
pub struct KeyCache {
    store: Arc<dyn KeyStore>,
    ttl: Duration,
    entries: Mutex<HashMap<String, (Option<DataKey>, Instant)>>,
    /// Bumped by every forgotten key: a lookup that started before keeps its answer uncached.
    epoch: AtomicU64,
    /// `Some` for a cache fed by a broadcast: whether it is listening now.
    listening: Option<AtomicBool>,
}

/// Entries kept before the cache starts over.
const MAX_CACHED_KEYS: usize = 100_000;

impl KeyCache {
    /// A cache whose entries live for `ttl` (for stores that do not broadcast destructions).
    pub fn new(store: Arc<dyn KeyStore>, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            entries: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            listening: None,
        }
    }

    /// A cache that caches only while [`KeyCache::follow_destructions`] listens.
    pub fn broadcast(store: Arc<dyn KeyStore>, ttl: Duration) -> Self {
        Self {
            listening: Some(AtomicBool::new(false)),
            ..Self::new(store, ttl)
        }
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Option<DataKey>, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a broadcast cache is following destructions now (always `false` for a TTL
    /// cache).
    pub fn is_listening(&self) -> bool {
        self.listening
            .as_ref()
            .is_some_and(|l| l.load(Ordering::Acquire))
    }

    fn caching(&self) -> bool {
        self.listening
            .as_ref()
            .is_none_or(|l| l.load(Ordering::Acquire))
    }

    /// Drops `user`'s key (its destruction was announced).
    pub fn forget(&self, user: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries().remove(user);
    }

    /// Drops every key.
    pub fn forget_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries().clear();
    }

    fn cached(&self, user: &str) -> Option<Option<DataKey>> {
        if !self.caching() {
            return None;
        }
        self.entries()
            .get(user)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(k, _)| k.clone())
    }

    fn remember(&self, epoch: u64, found: impl IntoIterator<Item = (String, Option<DataKey>)>) {
        if !self.caching() {
            return;
        }
        let mut entries = self.entries();
        // Checked under the lock that `forget` takes after bumping the epoch.
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        let now = Instant::now();
        for (u, k) in found {
            if entries.len() >= MAX_CACHED_KEYS {
                entries.clear();
            }
            entries.insert(u, (k, now));
        }
    }

    /// The key to seal `user`'s fields with (created on first use); `None` once destroyed.
    pub async fn sealing_key(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        if let Some(key) = self.cached(user) {
            return Ok(key);
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let key = self.store.get_or_create(user).await?;
        self.remember(epoch, [(user.to_owned(), key.clone())]);
        Ok(key)
    }

    /// Looks up (creating where missing) the keys of `users` not cached, in one call to the
    /// store, so that sealing a batch of records costs one round trip.
    pub async fn prefetch(
        &self,
        users: impl IntoIterator<Item = String>,
    ) -> Result<(), CryptoError> {
        if !self.caching() {
            return Ok(());
        }
        let missing: Vec<String> = users
            .into_iter()
            .filter(|u| self.cached(u).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let found = self.store.get_or_create_many(&missing).await?;
        self.remember(epoch, found);
        Ok(())
    }

    /// Seals `plaintext` of `user` (see [`seal_for`]).
    pub async fn seal(&self, user: &str, plaintext: &str) -> Result<String, CryptoError> {
        let key = self.sealing_key(user).await?;
        seal_for(key.as_ref(), user, plaintext)
    }

    /// Follows the Postgres key store's destruction broadcast until `shutdown`: each destroyed
    /// key is forgotten as soon as its destruction commits. While not listening (connecting,
    /// or after the connection dropped) the cache holds nothing and every lookup goes to the
    /// store, so a destruction is never missed.
    pub async fn follow_destructions(
        self: Arc<Self>,
        pool: sqlx::PgPool,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let Some(listening) = self.listening.as_ref() else {
            return;
        };
        loop {
            let connected = async {
                let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
                l.listen(DESTROYED_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            }
            .await;
            let mut listener = match connected {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "Key destructions cannot be followed; not caching keys meanwhile");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            // Listening from here on: whatever was cached before may be stale.
            self.forget_all();
            listening.store(true, Ordering::Release);
            let stopped = loop {
                tokio::select! {
                    () = shutdown.cancelled() => break true,
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => self.forget(n.payload()),
                        Ok(None) | Err(_) => {
                            tracing::warn!("Key destruction notifications lost; reconnecting");
                            break false;
                        }
                    },
                }
            };
            listening.store(false, Ordering::Release);
            self.forget_all();
            if stopped {
                return;
            }
        }
    }
}

/// `[keys]`: where per-user data keys live, and the key-encryption keys that wrap them.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// `postgres` (the service's control database) or `scylla`.
    pub store: KeyStoreKind,
    pub scylla_nodes: Vec<String>,
    pub scylla_keyspace: String,
    pub scylla_replication_factor: u32,
    /// How long writers reuse a key they looked up (with Postgres, destroyed keys are
    /// forgotten at once by notification; with ScyllaDB this bounds it).
    pub cache_ttl_ms: u64,
    /// The key ring: `ID=BASE64KEY` entries, the first current (see [`KeyRing::parse`]).
    pub kek: crate::config::Secret,
    /// A file holding the key ring instead (one entry per line).
    pub kek_file: String,
}

/// The longest cache lifetime allowed with ScyllaDB, which cannot broadcast destructions.
pub const SCYLLA_MAX_CACHE_TTL_MS: u64 = 2_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStoreKind {
    Postgres,
    Scylla,
}

impl KeysConfig {
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        if self.store == KeyStoreKind::Scylla && !cfg!(feature = "scylla") {
            return Err(crate::config::ConfigError::invalid(
                "keys.store",
                "\"scylla\": this binary was built without ScyllaDB support",
            ));
        }
        if self.store == KeyStoreKind::Scylla && self.scylla_nodes.is_empty() {
            return Err(crate::config::ConfigError::invalid(
                "keys.scylla_nodes",
                "needs at least one node when keys.store = \"scylla\"",
            ));
        }
        if self.cache_ttl_ms == 0 {
            return Err(crate::config::ConfigError::invalid(
                "keys.cache_ttl_ms",
                "must be positive",
            ));
        }
        if self.store == KeyStoreKind::Scylla && self.cache_ttl_ms > SCYLLA_MAX_CACHE_TTL_MS {
            return Err(crate::config::ConfigError::invalid(
                "keys.cache_ttl_ms",
                format!(
                    "must be at most {SCYLLA_MAX_CACHE_TTL_MS} with keys.store = \"scylla\" \
                     (ScyllaDB cannot announce destroyed keys: writers re-check them this often)"
                ),
            ));
        }
        self.key_ring()
            .map_err(|e| crate::config::ConfigError::invalid("keys.kek", e.to_string()))?;
        Ok(())
    }

    pub fn cache_ttl(&self) -> Duration {
        Duration::from_millis(self.cache_ttl_ms)
    }

    /// The key ring, from `kek` or `kek_file` (exactly one must be set).
    pub fn key_ring(&self) -> Result<KeyRing, CryptoError> {
        match (self.kek.expose().is_empty(), self.kek_file.is_empty()) {
            (false, true) => KeyRing::parse(self.kek.expose()),
            (true, false) => {
                let text =
                    zeroize::Zeroizing::new(std::fs::read_to_string(&self.kek_file).map_err(
                        |e| CryptoError::KeyRing(format!("cannot read {}: {e}", self.kek_file)),
                    )?);
                KeyRing::parse(&text)
            }
            (true, true) => Err(CryptoError::KeyRing(
                "no key-encryption key: set keys.kek (FEEDLOOP_KEYS__KEK) or keys.kek_file \
                 (`feedloop keys generate-kek` makes one)"
                    .into(),
            )),
            (false, false) => Err(CryptoError::KeyRing(
                "set keys.kek or keys.kek_file, not both".into(),
            )),
        }
    }
}

/// Opens the configured key store (`control` holds `keys.user_keys` for the Postgres one).
pub async fn key_store(
    cfg: &KeysConfig,
    control: &sqlx::PgPool,
) -> Result<Arc<dyn KeyStore>, CryptoError> {
    let ring = cfg.key_ring()?;
    Ok(match cfg.store {
        KeyStoreKind::Postgres => Arc::new(PostgresKeyStore::new(control.clone(), ring)),
        #[cfg(feature = "scylla")]
        KeyStoreKind::Scylla => Arc::new(
            ScyllaKeyStore::connect(
                &cfg.scylla_nodes,
                &cfg.scylla_keyspace,
                cfg.scylla_replication_factor,
                ring,
                cfg.cache_ttl(),
            )
            .await?,
        ),
        #[cfg(not(feature = "scylla"))]
        KeyStoreKind::Scylla => {
            return Err(CryptoError::Store(
                "this binary was built without ScyllaDB support".into(),
            ));
        }
    })
}

/// A writer's key cache on the configured store: with Postgres it follows destructions (a
/// task until `shutdown`); with ScyllaDB its entries live `cache_ttl_ms`.
pub async fn key_cache(
    cfg: &KeysConfig,
    control: &sqlx::PgPool,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Arc<KeyCache>, CryptoError> {
    let store = key_store(cfg, control).await?;
    Ok(match cfg.store {
        KeyStoreKind::Postgres => {
            let cache = Arc::new(KeyCache::broadcast(store, cfg.cache_ttl()));
            tokio::spawn(
                cache
                    .clone()
                    .follow_destructions(control.clone(), shutdown.clone()),
            );
            cache
        }
        KeyStoreKind::Scylla => Arc::new(KeyCache::new(store, cfg.cache_ttl())),
    })
}

/// The contract every `KeyStore` adapter passes (run against a fresh store).
pub async fn key_store_contract(store: &dyn KeyStore) -> Result<(), String> {
    let created = |k: Result<Option<DataKey>, CryptoError>| match k {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err("no key for a new user".to_owned()),
        Err(e) => Err(e.to_string()),
    };
    let a = created(store.get_or_create("alice").await)?;
    if created(store.get_or_create("alice").await)? != a {
        return Err("get_or_create returned a second key for the same user".into());
    }
    let b = created(store.get_or_create("bob").await)?;
    if a == b {
        return Err("two users share a key".into());
    }
    let many = store
        .get_or_create_many(&["bob".into(), "dave".into(), "dave".into()])
        .await
        .map_err(|e| e.to_string())?;
    if many.len() != 2 || many.get("bob") != Some(&Some(b.clone())) {
        return Err(format!(
            "get_or_create_many disagrees with get_or_create: {many:?}"
        ));
    }
    let dave = many.get("dave").cloned().flatten();
    if dave.is_none() || store.get("dave").await.map_err(|e| e.to_string())? != dave {
        return Err("get_or_create_many did not create and keep a new key".into());
    }
    if store.get("alice").await.map_err(|e| e.to_string())? != Some(a.clone()) {
        return Err("get does not return the created key".into());
    }
    if store
        .get("carol")
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err("get invented a key".into());
    }
    let sealed = seal(&a, "alice", "alice@example.com").map_err(|e| e.to_string())?;
    let n = store
        .destroy(&["alice".to_owned(), "carol".to_owned()])
        .await
        .map_err(|e| e.to_string())?;
    if n != 1 {
        return Err(format!("destroy reported {n} keys, expected 1"));
    }
    let gone = store.get("alice").await.map_err(|e| e.to_string())?;
    if open(gone.as_ref(), "alice", &sealed) != Opened::Erased {
        return Err("a destroyed key still opens the field".into());
    }
    if store.get("bob").await.map_err(|e| e.to_string())? != Some(b) {
        return Err("destroying alice touched bob".into());
    }
    for user in ["alice", "carol"] {
        if store
            .get_or_create(user)
            .await
            .map_err(|e| e.to_string())?
            .is_some()
        {
            return Err(format!("a key was created again for erased user {user}"));
        }
    }
    let again = store
        .get_or_create_many(&["alice".into(), "carol".into(), "bob".into()])
        .await
        .map_err(|e| e.to_string())?;
    if again.get("alice") != Some(&None) || again.get("carol") != Some(&None) {
        return Err(format!(
            "get_or_create_many made keys for erased users: {again:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_fields_open_only_with_their_key_and_user() {
        let key = DataKey::generate();
        let sealed = seal(&key, "u1", "+33 6 12 34 56 78").unwrap();
        assert!(sealed.starts_with(SEALED_PREFIX));
        assert!(!sealed.contains("12 34"));
        assert_eq!(
            open(Some(&key), "u1", &sealed),
            Opened::Clear("+33 6 12 34 56 78".into())
        );
        assert_eq!(
            open(Some(&key), "u2", &sealed),
            Opened::Invalid,
            "bound to the user"
        );
        assert_eq!(
            open(Some(&DataKey::generate()), "u1", &sealed),
            Opened::Invalid
        );
        assert_eq!(open(None, "u1", &sealed), Opened::Erased);
        assert_eq!(open(None, "u1", "plain"), Opened::Plain("plain".into()));
        assert_eq!(open(Some(&key), "u1", "fl1:!!!"), Opened::Invalid);
        assert_eq!(open(Some(&key), "u1", "fl1:AAAA"), Opened::Invalid);
        // Sealing for a user whose key is gone writes nothing readable.
        assert_eq!(
            open(None, "u1", &seal_for(None, "u1", "secret").unwrap()),
            Opened::Erased
        );
        // Same plaintext, different ciphertexts (random nonces).
        assert_ne!(
            seal(&key, "u1", "x").unwrap(),
            seal(&key, "u1", "x").unwrap()
        );
    }

    #[tokio::test]
    async fn the_cache_seals_with_the_stored_key_and_stops_after_destruction() {
        let store = Arc::new(MemoryKeyStore::default());
        let cache = KeyCache::new(store.clone(), Duration::from_millis(1));
        let sealed = cache.seal("u1", "hello").await.unwrap();
        let key = store.get("u1").await.unwrap();
        assert_eq!(
            open(key.as_ref(), "u1", &sealed),
            Opened::Clear("hello".into())
        );
        store.destroy(&["u1".into()]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let after = cache.seal("u1", "hello").await.unwrap();
        assert_eq!(open(None, "u1", &after), Opened::Erased);
        assert_eq!(open(None, "u1", &sealed), Opened::Erased);
    }

    #[tokio::test]
    async fn unattributed_keys_are_destroyed_once_their_day_is_older_than_the_retention() {
        const DAY: i64 = 86_400_000;
        let store = MemoryKeyStore::default();
        let now = 1_765_000_000_000; // 2025-12-06T05:46:40Z
        for days in [0, 1, 7, 8, 30, 400] {
            store
                .get_or_create(&unattributed_owner(now - days * DAY))
                .await
                .unwrap();
        }
        assert_eq!(expire_unattributed(&store, 7, now).await.unwrap(), 2);
        for (days, kept) in [(0, true), (1, true), (7, true), (8, false), (30, false)] {
            let key = store
                .get(&unattributed_owner(now - days * DAY))
                .await
                .unwrap();
            assert_eq!(key.is_some(), kept, "{days} days ago");
        }
        // Beyond the year it looks back, a key is left (documented).
        assert!(
            store
                .get(&unattributed_owner(now - 400 * DAY))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            expire_unattributed(&store, 7, now).await.unwrap(),
            0,
            "idempotent"
        );
        // A day later, the day 7 days ago expires too.
        assert_eq!(expire_unattributed(&store, 7, now + DAY).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn the_memory_key_store_passes_the_contract() {
        key_store_contract(&MemoryKeyStore::default())
            .await
            .unwrap();
    }
}
