//! ScyllaDB `KeyStore`: one partition per user (`user_keys (user_id PRIMARY KEY, key,
//! destroyed_at)`), so that keys spread over the cluster like the users do. First use and
//! destruction go through lightweight transactions, and reads are SERIAL, so that two writers
//! never agree on different keys and a destroyed key is never made again.

use scylla::{
    client::{session::Session, session_builder::SessionBuilder},
    statement::{Consistency, prepared::PreparedStatement},
};

use super::{CryptoError, DataKey, KeyStore};

fn err(e: impl std::fmt::Display) -> CryptoError {
    CryptoError::Store(e.to_string())
}

pub struct ScyllaKeyStore {
    session: Session,
    create: PreparedStatement,
    read: PreparedStatement,
    destroy: PreparedStatement,
    tombstone: PreparedStatement,
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
        let create = session
            .prepare(format!(
                "INSERT INTO {ks}.user_keys (user_id, key) VALUES (?, ?) IF NOT EXISTS"
            ))
            .await
            .map_err(err)?;
        let mut read = session
            .prepare(format!("SELECT key FROM {ks}.user_keys WHERE user_id = ?"))
            .await
            .map_err(err)?;
        read.set_consistency(Consistency::Serial);
        let destroy = session
            .prepare(format!(
                "UPDATE {ks}.user_keys SET key = null, destroyed_at = toTimestamp(now()) WHERE user_id = ? IF EXISTS"
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
        })
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
        let mut it = rows.rows::<(Option<Vec<u8>>,)>().map_err(err)?;
        match it.next() {
            None => Ok(None),
            Some(row) => {
                let (key,) = row.map_err(err)?;
                Ok(Some(key.as_deref().and_then(DataKey::from_bytes)))
            }
        }
    }
}

#[async_trait::async_trait]
impl KeyStore for ScyllaKeyStore {
    async fn get_or_create(&self, user: &str) -> Result<Option<DataKey>, CryptoError> {
        if let Some(existing) = self.row(user).await? {
            return Ok(existing);
        }
        let fresh = DataKey::generate();
        self.session
            .execute_unpaged(&self.create, (user, fresh.as_bytes().to_vec()))
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
}
