//! Key-encryption keys (envelope encryption): data keys are stored only wrapped by a KEK that
//! lives outside the database (a file or an environment variable), so that a copy of the key
//! store alone never yields a usable data key.
//!
//! A key ring holds one or more KEKs by id. The first is current: new data keys are wrapped
//! with it, and [`super::KeyStore::rewrap`] moves keys wrapped by the others onto it (online
//! rotation). Retiring a KEK (removing it from the ring once nothing is wrapped by it) makes
//! every copy of the store taken before — backups, replicas, WAL — useless at once.

use std::{collections::HashMap, sync::Arc};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, KeyInit, OsRng, Payload},
};
use zeroize::Zeroizing;

use super::{CryptoError, DataKey};

/// Associated data of a wrapped key: binds it to its user and to this use.
fn aad(user: &str) -> Vec<u8> {
    let mut aad = b"feedloop/data-key/v1\0".to_vec();
    aad.extend_from_slice(user.as_bytes());
    aad
}

/// A data key as stored: wrapped by the KEK `kek_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    pub kek_id: String,
    /// nonce (24 bytes) ‖ ciphertext of the 32-byte key with its 16-byte tag.
    pub bytes: Vec<u8>,
}

/// Length of [`Wrapped::bytes`].
pub const WRAPPED_LEN: usize = 24 + 32 + 16;

/// The KEKs a service knows, by id; the first configured is current.
#[derive(Clone)]
pub struct KeyRing {
    current: String,
    keks: Arc<HashMap<String, Zeroizing<[u8; 32]>>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.keks.keys().collect();
        ids.sort();
        f.debug_struct("KeyRing")
            .field("current", &self.current)
            .field("ids", &ids)
            .finish()
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl KeyRing {
    /// Parses `ID=KEY` entries separated by commas, spaces or newlines (KEY: 32 bytes in
    /// base64, standard or URL-safe); the first entry is the current KEK. Lines starting with
    /// `#` are comments.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let bad = |m: String| CryptoError::KeyRing(m);
        let mut keks = HashMap::new();
        let mut current = None;
        let entries = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split([',', ' ', '\t']))
            .map(str::trim)
            .filter(|e| !e.is_empty());
        for entry in entries {
            let Some((id, key)) = entry.split_once('=') else {
                return Err(bad("an entry is not ID=BASE64KEY".into()));
            };
            if !valid_id(id) {
                return Err(bad(format!(
                    "KEK id {id:?} must be 1-64 letters, digits, '-', '_' or '.'"
                )));
            }
            let raw = Zeroizing::new(
                URL_SAFE_NO_PAD
                    .decode(key.trim_end_matches('='))
                    .or_else(|_| STANDARD.decode(key))
                    .map_err(|_| bad(format!("KEK {id}: the key is not base64")))?,
            );
            let key: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| bad(format!("KEK {id}: the key must be 32 bytes")))?;
            if keks.insert(id.to_owned(), Zeroizing::new(key)).is_some() {
                return Err(bad(format!("KEK id {id} appears twice")));
            }
            current.get_or_insert_with(|| id.to_owned());
        }
        let current = current.ok_or_else(|| bad("no KEK given".into()))?;
        Ok(Self {
            current,
            keks: Arc::new(keks),
        })
    }

    /// A new random KEK as a key-ring entry, `ID=BASE64KEY` (`feedloop keys generate-kek`, the
    /// dev stack, tests).
    pub fn generate_entry(id: &str) -> String {
        let key = Zeroizing::new(<[u8; 32]>::from(XChaCha20Poly1305::generate_key(
            &mut OsRng,
        )));
        format!("{id}={}", URL_SAFE_NO_PAD.encode(key.as_slice()))
    }

    /// Every KEK id of the ring, the current first.
    pub fn ids(&self) -> Vec<String> {
        let mut rest: Vec<String> = self
            .keks
            .keys()
            .filter(|id| **id != self.current)
            .cloned()
            .collect();
        rest.sort();
        let mut ids = vec![self.current.clone()];
        ids.extend(rest);
        ids
    }

    /// Id of the KEK new keys are wrapped with.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    fn cipher(&self, kek_id: &str) -> Result<XChaCha20Poly1305, CryptoError> {
        let kek = self
            .keks
            .get(kek_id)
            .ok_or_else(|| CryptoError::UnknownKek(kek_id.to_owned()))?;
        Ok(XChaCha20Poly1305::new(kek.as_slice().into()))
    }

    /// Wraps `user`'s data key with the current KEK.
    pub fn wrap(&self, user: &str, key: &DataKey) -> Result<Wrapped, CryptoError> {
        let cipher = self.cipher(&self.current)?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = aad(user);
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: key.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Seal)?;
        let mut bytes = Vec::with_capacity(WRAPPED_LEN);
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&ct);
        Ok(Wrapped {
            kek_id: self.current.clone(),
            bytes,
        })
    }

    /// Unwraps `user`'s data key. A key wrapped by a KEK the ring lacks, or not for this user,
    /// is an error: never mistaken for a destroyed key.
    pub fn unwrap(&self, user: &str, wrapped: &Wrapped) -> Result<DataKey, CryptoError> {
        let cipher = self.cipher(&wrapped.kek_id)?;
        if wrapped.bytes.len() != WRAPPED_LEN {
            return Err(CryptoError::Unwrap(wrapped.kek_id.clone()));
        }
        let (nonce, ct) = wrapped.bytes.split_at(24);
        let nonce =
            <[u8; 24]>::try_from(nonce).map_err(|_| CryptoError::Unwrap(wrapped.kek_id.clone()))?;
        let aad = aad(user);
        let plain = Zeroizing::new(
            cipher
                .decrypt(&XNonce::from(nonce), Payload { msg: ct, aad: &aad })
                .map_err(|_| CryptoError::Unwrap(wrapped.kek_id.clone()))?,
        );
        DataKey::from_bytes(&plain).ok_or_else(|| CryptoError::Unwrap(wrapped.kek_id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_with_the_current_kek_and_unwraps_with_any_in_the_ring() {
        let old = KeyRing::generate_entry("k1");
        let new = KeyRing::generate_entry("k2");
        let ring1 = KeyRing::parse(&old).unwrap();
        let ring2 = KeyRing::parse(&format!("{new}\n# the old one\n{old}")).unwrap();
        assert_eq!(ring2.current_id(), "k2");
        let key = DataKey::generate();
        let w1 = ring1.wrap("u1", &key).unwrap();
        assert_eq!(w1.kek_id, "k1");
        assert_eq!(w1.bytes.len(), WRAPPED_LEN);
        assert!(!w1.bytes.windows(32).any(|w| w == key.as_bytes().as_slice()));
        assert_eq!(ring2.unwrap("u1", &w1).unwrap(), key);
        let w2 = ring2.wrap("u1", &key).unwrap();
        assert_eq!(w2.kek_id, "k2");
        assert!(matches!(
            ring1.unwrap("u1", &w2),
            Err(CryptoError::UnknownKek(id)) if id == "k2"
        ));
        // Bound to the user.
        assert!(matches!(
            ring2.unwrap("u2", &w2),
            Err(CryptoError::Unwrap(_))
        ));
        // The same id with another key does not open it.
        let other = KeyRing::parse(&KeyRing::generate_entry("k2")).unwrap();
        assert!(matches!(
            other.unwrap("u1", &w2),
            Err(CryptoError::Unwrap(_))
        ));
    }

    #[test]
    fn refuses_malformed_rings() {
        for bad in [
            "",
            "# only a comment",
            "k1",
            "k1=notbase64!!",
            "k1=AAAA",
            "bad id=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(KeyRing::parse(bad).is_err(), "{bad:?}");
        }
        let e = KeyRing::generate_entry("k1");
        assert!(KeyRing::parse(&format!("{e},{e}")).is_err(), "duplicate id");
        let ring = KeyRing::parse(&format!(" {e} ")).unwrap();
        assert!(!format!("{ring:?}").contains(e.split_once('=').unwrap().1));
    }
}
