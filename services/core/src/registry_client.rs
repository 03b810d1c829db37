//! Client of a Confluent-compatible schema registry, with caches: a schema id, once fetched,
//! is compiled once and reused; a (subject, schema) registration is asked for once.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    avro::{CodecError, CompiledSchema, wire},
    config::Secret,
    error::{Classify, ErrorClass},
};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryClientError {
    #[error("schema registry unreachable at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("schema registry answered {status} (error {code}): {message}")]
    Api {
        status: u16,
        code: i64,
        message: String,
    },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("invalid registry url {0:?}")]
    BadUrl(String),
    #[error("schema registry CA: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl Classify for RegistryClientError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Unreachable { .. } => ErrorClass::Unavailable,
            Self::Api { status, .. } if *status >= 500 => ErrorClass::Unavailable,
            Self::Api { .. } | Self::Codec(_) | Self::BadUrl(_) | Self::Tls(_) => {
                ErrorClass::BadInput
            }
        }
    }
}

impl RegistryClientError {
    /// The Confluent error code, for API errors.
    pub fn code(&self) -> Option<i64> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A subject version as the registry returns it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SubjectVersion {
    pub subject: String,
    pub id: u32,
    pub version: i32,
    pub schema: String,
}

#[derive(Serialize)]
struct SchemaBody<'a> {
    schema: &'a str,
}

#[derive(Deserialize)]
struct IdBody {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaByIdBody {
    schema: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error_code: i64,
    message: String,
}

/// A schema registry client. Cheap to share behind an `Arc`.
pub struct RegistryClient {
    base: String,
    http: reqwest::Client,
    auth: Option<(String, Secret)>,
    by_id: RwLock<HashMap<u32, Arc<CompiledSchema>>>,
    registered: RwLock<HashMap<(String, String), u32>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client for the registry at `url`, optionally with HTTP Basic credentials, trusting
    /// the CAs of the PEM file `ca` beside the system's roots (empty: the system's only).
    pub fn new(
        url: &str,
        auth: Option<(String, Secret)>,
        ca: &str,
        timeout: Duration,
    ) -> Result<Self, RegistryClientError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(RegistryClientError::BadUrl(url.to_owned()));
        }
        let http = crate::tls::client_builder([ca])?
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|source| RegistryClientError::Unreachable {
                url: url.to_owned(),
                source,
            })?;
        Ok(Self {
            base: url.trim_end_matches('/').to_owned(),
            http,
            auth,
            by_id: RwLock::default(),
            registered: RwLock::default(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, Some(password.expose()));
        }
        req
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, RegistryClientError> {
        let unreachable = |source| RegistryClientError::Unreachable {
            url: self.base.clone(),
            source,
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        if status.is_success() {
            return resp.json::<T>().await.map_err(unreachable);
        }
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => (body.error_code, body.message),
            Err(_) => (i64::from(status.as_u16()), text),
        };
        Err(RegistryClientError::Api {
            status: status.as_u16(),
            code,
            message,
        })
    }

    /// Registers `schema` under `subject` (idempotent) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryClientError> {
        let key = (subject.to_owned(), schema.to_owned());
        if let Some(id) = self
            .registered
            .read()
            .ok()
            .and_then(|m| m.get(&key).copied())
        {
            return Ok(id);
        }
        let body: IdBody = self
            .send(
                self.request(
                    reqwest::Method::POST,
                    &format!("/subjects/{}/versions", encode(subject)),
                )
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .json(&SchemaBody { schema }),
            )
            .await?;
        if let Ok(mut m) = self.registered.write() {
            m.insert(key, body.id);
        }
        Ok(body.id)
    }

    /// Registers `schema` under `subject` and returns it compiled, ready to encode with.
    pub async fn register_compiled(
        &self,
        subject: &str,
        schema: &str,
    ) -> Result<Arc<CompiledSchema>, RegistryClientError> {
        let id = self.register(subject, schema).await?;
        let compiled = Arc::new(CompiledSchema::new(id, schema)?);
        if let Ok(mut m) = self.by_id.write() {
            m.entry(id).or_insert_with(|| compiled.clone());
        }
        Ok(compiled)
    }

    /// The schema with `id`, compiled; fetched once, then served from the cache.
    pub async fn schema(&self, id: u32) -> Result<Arc<CompiledSchema>, RegistryClientError> {
        if let Some(s) = self.by_id.read().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(s);
        }
        let body: SchemaByIdBody = match self
            .send(self.request(reqwest::Method::GET, &format!("/schemas/ids/{id}")))
            .await
        {
            Err(RegistryClientError::Api { code: 40403, .. }) => {
                return Err(CodecError::UnknownSchemaId(id).into());
            }
            other => other?,
        };
        let compiled = Arc::new(CompiledSchema::new(id, &body.schema)?);
        if let Ok(mut m) = self.by_id.write() {
            m.insert(id, compiled.clone());
        }
        Ok(compiled)
    }

    /// Decodes a Confluent frame, fetching its writer schema if not cached yet.
    pub async fn decode<T: DeserializeOwned>(
        &self,
        bytes: &[u8],
    ) -> Result<T, RegistryClientError> {
        let frame = wire::split(bytes).map_err(CodecError::from)?;
        let schema = self.schema(frame.schema_id).await?;
        Ok(schema.decode_body(frame.body)?)
    }

    /// The latest version of `subject`.
    pub async fn latest(&self, subject: &str) -> Result<SubjectVersion, RegistryClientError> {
        self.send(self.request(
            reqwest::Method::GET,
            &format!("/subjects/{}/versions/latest", encode(subject)),
        ))
        .await
    }

    /// All subjects.
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryClientError> {
        self.send(self.request(reqwest::Method::GET, "/subjects"))
            .await
    }

    /// Sets the compatibility level of `subject`, or the global one when `None`.
    pub async fn set_compatibility(
        &self,
        subject: Option<&str>,
        level: &str,
    ) -> Result<(), RegistryClientError> {
        let path = match subject {
            Some(s) => format!("/config/{}", encode(s)),
            None => "/config".to_owned(),
        };
        let _: serde_json::Value = self
            .send(
                self.request(reqwest::Method::PUT, &path)
                    .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                    .json(&serde_json::json!({ "compatibility": level })),
            )
            .await?;
        Ok(())
    }
}

/// Percent-encodes a subject for a URL path segment.
fn encode(subject: &str) -> String {
    let mut out = String::with_capacity(subject.len());
    for b in subject.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_subjects_for_paths() {
        assert_eq!(encode("feedloop.events-io.x.Y"), "feedloop.events-io.x.Y");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn rejects_non_http_urls() {
        assert!(matches!(
            RegistryClient::new("localhost:8081", None, "", Duration::from_secs(1)),
            Err(RegistryClientError::BadUrl(_))
        ));
    }
}
