//! Personal columns are sealed with their owner's data key before a change leaves the process
//! (crypto-shredding): the log keeps ciphertext, and destroying the key erases every copy.
//!
//! `[pii.tables."schema.table"]` names the column that holds the owning user's id and the
//! columns to seal. A sealed column must be a text type (its Avro type stays `string`).

use feedloop_core::crypto::{CryptoError, KeyCache, SEALED_PREFIX};
use serde_json::Value as Json;

use crate::{
    config::PiiTable,
    tables::Shape,
    types::{Datum, Kind},
};

/// Column indexes of a table's owner and personal columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pii {
    pub user: usize,
    pub columns: Vec<usize>,
}

impl Pii {
    /// Resolves a table's configuration against its current shape. Personal columns the table
    /// does not have (any more) are skipped; a missing owner or a non-text personal column is
    /// an error (the table cannot be captured without leaking or losing data).
    pub fn resolve(cfg: &PiiTable, shape: &Shape) -> Result<Self, String> {
        let index = |name: &str| shape.relation.columns.iter().position(|c| c.name == name);
        let user = index(&cfg.user_column).ok_or_else(|| {
            format!(
                "pii: owner column `{}` is not a column of the table",
                cfg.user_column
            )
        })?;
        let mut columns = Vec::new();
        for name in &cfg.columns {
            let Some(i) = index(name) else { continue };
            if shape.kinds[i] != Kind::String {
                return Err(format!(
                    "pii: column `{name}` must be a text type to be sealed"
                ));
            }
            columns.push(i);
        }
        Ok(Self { user, columns })
    }

    /// The owner of a raw tuple (before it is converted), to look its key up ahead.
    pub fn owner_of(&self, tuple: &crate::pgoutput::Tuple) -> Option<String> {
        match tuple.get(self.user)? {
            crate::pgoutput::Value::Text(b) | crate::pgoutput::Value::Binary(b) => {
                Some(String::from_utf8_lossy(b).into_owned())
            }
            _ => None,
        }
    }

    /// The owner of a converted row: its user column's value.
    pub fn row_owner(&self, values: &[Datum]) -> Option<String> {
        Self::owner(values, self.user)
    }

    fn owner(values: &[Datum], i: usize) -> Option<String> {
        match values.get(i)? {
            Datum::String(s) => Some(s.clone()),
            Datum::Int(v) => Some(v.to_string()),
            Datum::Long(v) => Some(v.to_string()),
            Datum::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// Seals the personal values of a row in place; `unchanged` columns (TOAST placeholders)
    /// are left as they are. A row without an owner keeps no personal value. Returns how many
    /// values were sealed.
    pub async fn seal_row(
        &self,
        keys: &KeyCache,
        shape: &Shape,
        values: &mut [Datum],
        unchanged: &[String],
    ) -> Result<u64, CryptoError> {
        let owner = Self::owner(values, self.user);
        let mut n = 0;
        for &i in &self.columns {
            if unchanged
                .iter()
                .any(|u| shape.relation.columns.get(i).is_some_and(|c| &c.name == u))
            {
                continue;
            }
            if let Some(Datum::String(v)) = values.get_mut(i) {
                *v = match &owner {
                    Some(user) => keys.seal(user, v).await?,
                    None => SEALED_PREFIX.to_owned(),
                };
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The owner of a dead-lettered row image (a JSON array per column): its user column's text.
pub fn owner_of_json(cfg: &PiiTable, shape: &Shape, row: &Json) -> Option<String> {
    let i = shape
        .relation
        .columns
        .iter()
        .position(|c| c.name == cfg.user_column)?;
    row.as_array()?.get(i)?.as_str().map(str::to_owned)
}

/// Seals the personal values of a dead-lettered change (a JSON array per row image, as the
/// dead-letter record keeps it), so that dead letters hold no plaintext either. When the
/// table's configuration does not resolve, the configured columns are made unreadable.
pub async fn seal_json(
    keys: &KeyCache,
    cfg: &PiiTable,
    shape: &Shape,
    row: &mut Json,
) -> Result<(), CryptoError> {
    let owner = owner_of_json(cfg, shape, row);
    let Json::Array(values) = row else {
        return Ok(());
    };
    let index = |name: &str| shape.relation.columns.iter().position(|c| c.name == name);
    for name in &cfg.columns {
        let Some(i) = index(name) else { continue };
        if let Some(v) = values.get_mut(i)
            && let Some(text) = v.as_str()
        {
            *v = Json::String(match &owner {
                Some(user) => keys.seal(user, text).await?,
                None => SEALED_PREFIX.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use feedloop_core::crypto::{KeyStore, MemoryKeyStore, Opened, open};

    use super::*;
    use crate::pgoutput::{Column, Relation};

    fn shape() -> Shape {
        let col = |name: &str, type_oid: u32| Column {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            key: name == "id",
        };
        Shape::new(Relation {
            oid: 1,
            namespace: "app".into(),
            name: "users".into(),
            replica_identity: crate::pgoutput::ReplicaIdentity::Full,
            columns: vec![
                col("id", 25),
                col("email", 25),
                col("age", 23),
                col("bio", 25),
            ],
        })
    }

    fn cfg(columns: &[&str]) -> PiiTable {
        PiiTable {
            user_column: "id".into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[tokio::test]
    async fn personal_columns_are_sealed_for_the_row_owner() {
        let store = Arc::new(MemoryKeyStore::default());
        let keys = KeyCache::new(store.clone(), Duration::from_secs(60));
        let shape = shape();
        let pii = Pii::resolve(&cfg(&["email", "bio", "gone"]), &shape).unwrap();
        assert_eq!(
            pii,
            Pii {
                user: 0,
                columns: vec![1, 3]
            }
        );
        let mut row = vec![
            Datum::String("u-1".into()),
            Datum::String("a@example.com".into()),
            Datum::Int(30),
            Datum::String("__unchanged__".into()),
        ];
        let n = pii
            .seal_row(&keys, &shape, &mut row, &["bio".into()])
            .await
            .unwrap();
        assert_eq!(n, 1, "the unchanged TOAST placeholder stays");
        let Datum::String(sealed) = &row[1] else {
            panic!("{row:?}")
        };
        let key = store.get("u-1").await.unwrap();
        assert_eq!(
            open(key.as_ref(), "u-1", sealed),
            Opened::Clear("a@example.com".into())
        );
        assert_eq!(row[2], Datum::Int(30));
        assert_eq!(row[3], Datum::String("__unchanged__".into()));
        assert!(Pii::resolve(&cfg(&["age"]), &shape).is_err(), "not text");
        let mut no_owner = cfg(&["email"]);
        no_owner.user_column = "nope".into();
        assert!(Pii::resolve(&no_owner, &shape).is_err());
    }
}
