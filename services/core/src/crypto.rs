//! Crypto-shredding building blocks: personal fields are encrypted with a per-user data key
//! before they enter the immutable log, so that deleting the key erases them everywhere the
//! log was copied.
//!
//! - [`seal`] / [`open`]: XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`) with a random
//!   192-bit nonce and the user id as associated data, so that a ciphertext cannot be moved to
//!   another user. A sealed field is text: `fl1:` + base64url(nonce ‖ ciphertext), and fits the
//!   Avro string fields it replaces.
//! - [`KeyStore`]: the port for per-user keys, with Postgres, ScyllaDB and in-memory adapters;
//!   [`key_store`] opens the one `[keys]` configures. [`KeyCache`] keeps writers off the store
//!   on the hot path.
//!
//! Once a key is deleted, [`open`] answers [`Opened::Erased`]: a clean value to show, never an
//! error to retry.

#[cfg(feature = "scylla")]
mod scylla;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
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

#[cfg(feature = "scylla")]
pub use scylla::ScyllaKeyStore;

/// A 256-bit data key.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey([u8; 32]);

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
}

/// Encrypts `plaintext` of `user` under `key`.
pub fn seal(key: &DataKey, user: &str, plaintext: &str) -> Result<String, CryptoError> {
    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    // A CSPRNG in user space (reseeded from the OS), not a system call per field: sealing is
    // on cdc's and the collector's hot paths.
    let nonce = XChaCha20Poly1305::generate_nonce(&mut rand::thread_rng());
    let ct = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext.as_bytes(),
                aad: user.as_bytes(),
            },
        )
        .map_err(|_| CryptoError::Seal)?;
    let mut raw = Vec::with_capacity(nonce.len() + ct.len());
    raw.extend_from_slice(&nonce);
    raw.extend_from_slice(&ct);
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
    if raw.len() < 24 {
        return Opened::Invalid;
    }
    let (nonce, ct) = raw.split_at(24);
    let Ok(nonce) = <[u8; 24]>::try_from(nonce) else {
        return Opened::Invalid;
    };
    let cipher = XChaCha20Poly1305::new(key.as_bytes().into());
    match cipher.decrypt(
        &XNonce::from(nonce),
        Payload {
            msg: ct,
            aad: user.as_bytes(),
        },
    ) {
        Ok(pt) => String::from_utf8(pt).map_or(Opened::Invalid, Opened::Clear),
        Err(_) => Opened::Invalid,
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
    /// Destroys the keys of `users` (crypto-shredding); returns how many existed.
    async fn destroy(&self, users: &[String]) -> Result<u64, CryptoError>;
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

/// Keys in Postgres (`keys.user_keys`). Concurrent first uses agree on one key.
#[derive(Debug, Clone)]
pub struct PostgresKeyStore {
    pool: sqlx::PgPool,
}

impl PostgresKeyStore {
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool }
    }
}

fn store_err(e: sqlx::Error) -> CryptoError {
    CryptoError::Store(e.to_string())
}

#[async_trait]
impl KeyStore for PostgresKeyStore {
    async fn get_or_create(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        let fresh = DataKey::generate();
        let bytes: Option<Vec<u8>> = sqlx::query_scalar(
            "INSERT INTO keys.user_keys (user_id, key) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id
             RETURNING key",
        )
        .bind(user)
        .bind(fresh.as_bytes().as_slice())
        .fetch_one(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(bytes.as_deref().and_then(DataKey::from_bytes))
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
        let fresh: Vec<Vec<u8>> = users
            .iter()
            .map(|_| DataKey::generate().as_bytes().to_vec())
            .collect();
        let rows: Vec<(String, Option<Vec<u8>>)> = sqlx::query_as(
            "INSERT INTO keys.user_keys (user_id, key)
             SELECT u, k FROM UNNEST($1::text[], $2::bytea[]) AS t(u, k) ORDER BY u
             ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id
             RETURNING user_id, key",
        )
        .bind(&users)
        .bind(&fresh)
        .fetch_all(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(rows
            .into_iter()
            .map(|(u, k)| (u, k.as_deref().and_then(DataKey::from_bytes)))
            .collect())
    }

    async fn get(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        let bytes: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT key FROM keys.user_keys WHERE user_id = $1")
                .bind(user)
                .fetch_optional(&self.pool)
                .await
                .map_err(store_err)?;
        Ok(bytes.flatten().as_deref().and_then(DataKey::from_bytes))
    }

    async fn destroy(&self, users: &[String]) -> Result<u64, CryptoError> {
        let destroyed = sqlx::query(
            "UPDATE keys.user_keys SET key = NULL, destroyed_at = now()
             WHERE user_id = ANY($1) AND key IS NOT NULL",
        )
        .bind(users)
        .execute(&self.pool)
        .await
        .map_err(store_err)?
        .rows_affected();
        // Users who never had a key get a destroyed one, so that none is made for them later.
        sqlx::query(
            "INSERT INTO keys.user_keys (user_id, key, destroyed_at)
             SELECT unnest($1::text[]), NULL, now() ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(users)
        .execute(&self.pool)
        .await
        .map_err(store_err)?;
        Ok(destroyed)
    }
}

/// Writers' view of a key store: keys by user, cached for a while so that sealing does not
/// cost a round trip per record. A key destroyed while cached keeps sealing for at most the
/// TTL, which is harmless: nothing can open what it seals once the store forgot it.
#[derive(Debug)]
pub struct KeyCache {
    store: Arc<dyn KeyStore>,
    ttl: Duration,
    entries: Mutex<HashMap<String, (Option<DataKey>, Instant)>>,
}

/// Entries kept before the cache starts over.
const MAX_CACHED_KEYS: usize = 100_000;

impl KeyCache {
    pub fn new(store: Arc<dyn KeyStore>, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// The key to seal `user`'s fields with (created on first use); `None` once destroyed.
    pub async fn sealing_key(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        {
            let entries = self
                .entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((key, at)) = entries.get(user)
                && at.elapsed() < self.ttl
            {
                return Ok(key.clone());
            }
        }
        let key = self.store.get_or_create(user).await?;
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= MAX_CACHED_KEYS {
            entries.clear();
        }
        entries.insert(user.to_owned(), (key.clone(), Instant::now()));
        Ok(key)
    }

    /// Looks up (creating where missing) the keys of `users` not cached, in one call to the
    /// store, so that sealing a batch of records costs one round trip.
    pub async fn prefetch(
        &self,
        users: impl IntoIterator<Item = String>,
    ) -> Result<(), CryptoError> {
        let missing: Vec<String> = {
            let entries = self
                .entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            users
                .into_iter()
                .filter(|u| {
                    entries
                        .get(u)
                        .is_none_or(|(_, at)| at.elapsed() >= self.ttl)
                })
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let found = self.store.get_or_create_many(&missing).await?;
        let now = Instant::now();
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() + found.len() > MAX_CACHED_KEYS {
            entries.clear();
        }
        for (u, k) in found {
            entries.insert(u, (k, now));
        }
        Ok(())
    }

    /// Seals `plaintext` of `user` (see [`seal_for`]).
    pub async fn seal(&self, user: &str, plaintext: &str) -> Result<String, CryptoError> {
        let key = self.sealing_key(user).await?;
        seal_for(key.as_ref(), user, plaintext)
    }
}

/// `[keys]`: where per-user data keys live.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// `postgres` (the service's control database) or `scylla`.
    pub store: KeyStoreKind,
    pub scylla_nodes: Vec<String>,
    pub scylla_keyspace: String,
    pub scylla_replication_factor: u32,
    /// How long writers reuse a key they looked up.
    pub cache_ttl_ms: u64,
}

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
        Ok(())
    }

    pub fn cache_ttl(&self) -> Duration {
        Duration::from_millis(self.cache_ttl_ms)
    }
}

/// Opens the configured key store (`control` holds `keys.user_keys` for the Postgres one).
pub async fn key_store(
    cfg: &KeysConfig,
    control: &sqlx::PgPool,
) -> Result<Arc<dyn KeyStore>, CryptoError> {
    Ok(match cfg.store {
        KeyStoreKind::Postgres => Arc::new(PostgresKeyStore::new(control.clone())),
        #[cfg(feature = "scylla")]
        KeyStoreKind::Scylla => Arc::new(
            ScyllaKeyStore::connect(
                &cfg.scylla_nodes,
                &cfg.scylla_keyspace,
                cfg.scylla_replication_factor,
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
    async fn the_memory_key_store_passes_the_contract() {
        key_store_contract(&MemoryKeyStore::default())
            .await
            .unwrap();
    }
}
