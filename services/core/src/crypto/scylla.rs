//! ScyllaDB `KeyStore`: one partition per user (`user_keys (user_id PRIMARY KEY, wrapped,
//! kek_id, destroyed_at)`; `key` holds keys stored before envelope encryption), so that keys
//! spread over the cluster like the users do. Keys are stored wrapped by the key ring's KEK.
//! First use, destruction and re-wrapping go through lightweight transactions, and reads are
//! SERIAL, so that two writers never agree on different keys and a destroyed key is never made
//! again. ScyllaDB cannot announce destructions: writers cache keys at most `cache_ttl_ms`
//! (bounded by [`super::SCYLLA_MAX_CACHE_TTL_MS`]), which is how long a destruction takes to
//! settle.

use scylla::{
    client::{session::Session, session_builder::SessionBuilder},
    statement::{Consistency, prepared::PreparedStatement},
};

use std::time::Duration;

use super::{CryptoError, DataKey, KeyRing, KeyStore, Wrapped};

fn err(e: impl std::fmt::Display) -> CryptoError {
    CryptoError::Store(e.to_string())
}

pub struct ScyllaKeyStore {
    session: Session,
    create: PreparedStatement,
    read: PreparedStatement,
    destroy: PreparedStatement,
    tombstone: PreparedStatement,
    scan: PreparedStatement,
    rewrap: PreparedStatement,
    ring: KeyRing,
    cache_ttl: Duration,
}

impl std::fmt::Debug for ScyllaKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScyllaKeyStore").finish_non_exhaustive()
    }
}

impl ScyllaKeyStore {
    /// Connects, creates the keyspace and table if missing, and prepares the statements.
    pub async fn connect(
        nodes: &[String],
        keyspace: &str,
        replication_factor: u32,
        ring: KeyRing,
        cache_ttl: Duration,
    ) -> Result<Self, CryptoError> {
        if keyspace.is_empty()
            || !keyspace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(CryptoError::Store(format!(
                "keyspace `{keyspace}`: letters, digits and _ only"
            )));
        }
        let session = SessionBuilder::new()
            .known_nodes(nodes)
            .build()
            .await
            .map_err(err)?;
        let ks = keyspace;
        for ddl in [
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {{'class': 'NetworkTopologyStrategy', 'replication_factor': {replication_factor}}}"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.user_keys (user_id text PRIMARY KEY, key blob, destroyed_at timestamp)"
            ),
        ] {
            session.query_unpaged(ddl, &[]).await.map_err(err)?;
        }
        // Tables made before envelope encryption gain its columns (an error says they exist).
        for column in ["wrapped blob", "kek_id text"] {
            let _ = session
                .query_unpaged(format!("ALTER TABLE {ks}.user_keys ADD {column}"), &[])
                .await;
        }
        let create = session
            .prepare(format!(
                "INSERT INTO {ks}.user_keys (user_id, wrapped, kek_id) VALUES (?, ?, ?) IF NOT EXISTS"
            ))
            .await
            .map_err(err)?;
        let mut read = session
            .prepare(format!(
                "SELECT wrapped, kek_id, key FROM {ks}.user_keys WHERE user_id = ?"
            ))
            .await
            .map_err(err)?;
        read.set_consistency(Consistency::Serial);
        let destroy = session
            .prepare(format!(
                "UPDATE {ks}.user_keys SET wrapped = null, kek_id = null, key = null, destroyed_at = toTimestamp(now()) WHERE user_id = ? IF EXISTS"
            ))
            .await
            .map_err(err)?;
        let scan = session
            .prepare(format!(
                "SELECT user_id, wrapped, kek_id, key, destroyed_at FROM {ks}.user_keys"
            ))
            .await
            .map_err(err)?;
        let rewrap = session
            .prepare(format!(
                "UPDATE {ks}.user_keys SET wrapped = ?, kek_id = ?, key = null WHERE user_id = ? IF destroyed_at = null AND kek_id = ? AND key = ?"
            ))
            .await
            .map_err(err)?;
        let tombstone = session
            .prepare(format!(
                "INSERT INTO {ks}.user_keys (user_id, destroyed_at) VALUES (?, toTimestamp(now())) IF NOT EXISTS"
            ))
            .await
            .map_err(err)?;
        Ok(Self {
            session,
            create,
            read,
            destroy,
            tombstone,
            scan,
            rewrap,
            ring,
            cache_ttl,
        })
    }

    fn unwrap_row(
        &self,
        user: &str,
        (wrapped, kek_id, legacy): (Option<Vec<u8>>, Option<String>, Option<Vec<u8>>),
    ) -> Result<Option<DataKey>, CryptoError> {
        match (wrapped, kek_id, legacy) {
            (Some(bytes), Some(kek_id), _) => {
                self.ring.unwrap(user, &Wrapped { kek_id, bytes }).map(Some)
            }
            (None, _, Some(legacy)) => DataKey::from_bytes(&legacy)
                .map(Some)
                .ok_or_else(|| CryptoError::Store("a stored key is not 32 bytes".into())),
            (None, _, None) => Ok(None),
            (Some(_), None, _) => Err(CryptoError::Store(
                "a wrapped key without its KEK id".into(),
            )),
        }
    }

    /// `None`: no row; `Some(None)`: destroyed.
    async fn row(&self, user: &str) -> Result<Option<Option<DataKey>>, CryptoError> {
        let rows = self
            .session
            .execute_unpaged(&self.read, (user,))
            .await
            .map_err(err)?
            .into_rows_result()
            .map_err(err)?;
        let mut it = rows
            .rows::<(Option<Vec<u8>>, Option<String>, Option<Vec<u8>>)>()
            .map_err(err)?;
        match it.next() {
            None => Ok(None),
            Some(row) => Ok(Some(self.unwrap_row(user, row.map_err(err)?)?)),
        }
    }
}

#[async_trait::async_trait]
impl KeyStore for ScyllaKeyStore {
    async fn get_or_create(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        if let Some(existing) = self.row(user).await? {
            return Ok(existing);
        }
        let fresh = self.ring.wrap(user, &DataKey::generate())?;
        self.session
            .execute_unpaged(&self.create, (user, fresh.bytes, fresh.kek_id))
            .await
            .map_err(err)?;
        // Whoever won the transaction, the row now says which key (or that it is destroyed).
        Ok(self.row(user).await?.flatten())
    }

    async fn get(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        Ok(self.row(user).await?.flatten())
    }

    async fn destroy(&self, users: &[String]) -> Result<u64, CryptoError> {
        let mut destroyed = 0;
        for user in users {
            match self.row(user).await? {
                Some(Some(_)) => {
                    self.session
                        .execute_unpaged(&self.destroy, (user,))
                        .await
                        .map_err(err)?;
                    destroyed += 1;
                }
                Some(None) => {}
                None => {
                    // No key yet: leave a destroyed row so that none is made later. If a key was
                    // created meanwhile, the transaction does nothing; destroy that one.
                    self.session
                        .execute_unpaged(&self.tombstone, (user,))
                        .await
                        .map_err(err)?;
                    if let Some(Some(_)) = self.row(user).await? {
                        self.session
                            .execute_unpaged(&self.destroy, (user,))
                            .await
                            .map_err(err)?;
                        destroyed += 1;
                    }
                }
            }
        }
        Ok(destroyed)
    }

    async fn rewrap(&self, limit: usize) -> Result<u64, CryptoError> {
        type Row = (
            String,
            Option<Vec<u8>>,
            Option<String>,
            Option<Vec<u8>>,
            Option<scylla::value::CqlTimestamp>,
        );
        let mut rows = self
            .session
            .execute_iter(self.scan.clone(), &[])
            .await
            .map_err(err)?
            .rows_stream::<Row>()
            .map_err(err)?;
        let mut n = 0u64;
        while let Some(row) = futures_util::TryStreamExt::try_next(&mut rows)
            .await
            .map_err(err)?
        {
            if n as usize >= limit {
                break;
            }
            let (user, wrapped, kek_id, legacy, destroyed_at) = row;
            let current = kek_id.as_deref() == Some(self.ring.current_id()) && legacy.is_none();
            if destroyed_at.is_some() || current {
                continue;
            }
            let Some(key) = self.unwrap_row(&user, (wrapped, kek_id.clone(), legacy.clone()))?
            else {
                continue;
            };
            let fresh = self.ring.wrap(&user, &key)?;
            self.session
                .execute_unpaged(
                    &self.rewrap,
                    (fresh.bytes, fresh.kek_id, &user, kek_id, legacy),
                )
                .await
                .map_err(err)?;
            n += 1;
        }
        Ok(n)
    }

    fn destruction_settles(&self) -> Duration {
        self.cache_ttl
    }
}
