//! Service configuration: embedded defaults, then a TOML file, then environment variables
//! `FEEDLOOP_<SECTION>__<KEY>` (double underscore between levels). Unknown keys are errors,
//! and every error names the key it is about.

use std::{fmt, path::Path};

use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use toml::{Table, Value};

/// `[registry]`: the schema registry a service registers and resolves schemas with. An empty
/// `user` means no authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub url: String,
    pub user: String,
    pub password: Secret,
    /// PEM file of the CA that signed an `https://` registry's certificate, when it is not
    /// one the system trusts; empty: the system's roots.
    #[serde(default, deserialize_with = "path")]
    pub ca: String,
}

impl RegistryConfig {
    /// A registry at `url` with these credentials, trusting the system's roots.
    pub fn new(url: impl Into<String>, user: impl Into<String>, password: Secret) -> Self {
        Self {
            url: url.into(),
            user: user.into(),
            password,
            ca: String::new(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.user.is_empty() && self.password.is_empty() {
            return Err(ConfigError::invalid(
                "registry.password",
                "required when registry.user is set",
            ));
        }
        Ok(())
    }

    /// A client with these credentials.
    pub fn client(
        &self,
    ) -> Result<crate::registry_client::RegistryClient, crate::registry_client::RegistryClientError>
    {
        let auth = (!self.user.is_empty()).then(|| (self.user.clone(), self.password.clone()));
        crate::registry_client::RegistryClient::new(
            &self.url,
            auth,
            &self.ca,
            std::time::Duration::from_secs(10),
        )
    }
}

/// `[control]`: the control-plane database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    pub url: Secret,
}

/// `[log]`: JSON lines (production) or human-readable text.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub json: bool,
}

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "FEEDLOOP_";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    /// An invalid value for `key`, for use in `validate()`.
    pub fn invalid(key: &str, message: impl fmt::Display) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            message: message.to_string(),
        }
    }
}

/// Loads `T` from `defaults`, overlaid by `file` and then by the environment `env`.
pub fn load<T: DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let file = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            Some((path.display().to_string(), text))
        }
        None => None,
    };
    load_text(
        defaults,
        file.as_ref()
            .map(|(origin, text)| (origin.as_str(), text.as_str())),
        env,
    )
}

/// [`load`] with the file's text already read: `(origin, text)`, where `origin` names it in
/// errors.
pub fn load_text<T: DeserializeOwned>(
    defaults: &str,
    file: Option<(&str, &str)>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut table = parse("embedded defaults", defaults)?;
    if let Some((origin, text)) = file {
        merge(&mut table, parse(origin, text)?);
    }
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.len() < 2 || path.iter().any(String::is_empty) {
            continue;
        }
        set_path(&mut table, &path, &raw)?;
    }
    let de = Value::Table(table);
    serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Invalid {
        key: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

/// Loads with the process environment.
pub fn load_from_env<T: DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
) -> Result<T, ConfigError> {
    load(defaults, file, std::env::vars())
}

fn parse(origin: &str, text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError::Syntax {
        origin: origin.to_owned(),
        message: e.to_string(),
    })
}

fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Sets `path` to `raw`, typed like the value it replaces (so `FEEDLOOP_HTTP__PORT=80` is an
/// integer and `FEEDLOOP_APP__NAME=80` stays a string).
fn set_path(table: &mut Table, path: &[String], raw: &str) -> Result<(), ConfigError> {
    let key = path.join(".");
    let (last, parents) = match path.split_last() {
        Some(split) => split,
        None => return Ok(()),
    };
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = match entry {
            Value::Table(t) => t,
            _ => {
                return Err(ConfigError::invalid(
                    &key,
                    format!("`{p}` is not a section"),
                ));
            }
        };
    }
    let value =
        match cur.get(last) {
            Some(Value::String(_)) => Value::String(raw.to_owned()),
            Some(Value::Integer(_)) => Value::Integer(raw.trim().parse().map_err(|_| {
                ConfigError::invalid(&key, format!("expected an integer, got {raw:?}"))
            })?),
            Some(Value::Float(_)) => Value::Float(raw.trim().parse().map_err(|_| {
                ConfigError::invalid(&key, format!("expected a number, got {raw:?}"))
            })?),
            Some(Value::Boolean(_)) => Value::Boolean(raw.trim().parse().map_err(|_| {
                ConfigError::invalid(&key, format!("expected true or false, got {raw:?}"))
            })?),
            _ => parse_scalar(raw),
        };
    cur.insert(last.clone(), value);
    Ok(())
}

/// A key the defaults do not have: an array or inline table if it looks like one, otherwise a
/// string (a map of passwords must not turn "123" into a number).
fn parse_scalar(raw: &str) -> Value {
    let trimmed = raw.trim_start();
    if (trimmed.starts_with('[') || trimmed.starts_with('{'))
        && let Some(v) = format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
    {
        return v;
    }
    Value::String(raw.to_owned())
}

/// `text` as an absolute path, resolved against the working directory (canonical, when it
/// exists: no `..`, symlinks resolved); empty (unset) stays empty. Every file path a
/// configuration names goes through it when loaded, so that a relative path works and later
/// uses and logs name one file whatever the process does afterwards.
pub fn absolute_path(text: &str) -> std::io::Result<String> {
    if text.is_empty() {
        return Ok(String::new());
    }
    let path = match std::fs::canonicalize(text) {
        Ok(canonical) => canonical,
        Err(_) => std::path::absolute(text)?,
    };
    Ok(path.display().to_string())
}

/// Serde `deserialize_with` for a file path: see [`absolute_path`].
pub fn path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = String::deserialize(d)?;
    absolute_path(&text).map_err(|e| serde::de::Error::custom(format!("path {text:?}: {e}")))
}

/// Serde `deserialize_with` for a directory: see [`absolute_path`].
pub fn path_buf<'de, D: Deserializer<'de>>(d: D) -> Result<std::path::PathBuf, D::Error> {
    path(d).map(std::path::PathBuf::from)
}

/// Serde `deserialize_with` for a list of file paths: see [`absolute_path`].
pub fn paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            absolute_path(text).map_err(|e| serde::de::Error::custom(format!("path {text:?}: {e}")))
        })
        .collect()
}

/// A secret value: never printed, logged or serialized back.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used (an auth header, a comparison).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        http: Http,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Http {
        listen: String,
        max_body_bytes: u64,
        token: Secret,
    }

    const DEFAULTS: &str =
        "[http]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 10\ntoken = \"s3cret\"\n";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn env_overrides_defaults_with_types_of_the_defaults() {
        let cfg: Cfg = load(
            DEFAULTS,
            None,
            env(&[
                ("FEEDLOOP_HTTP__MAX_BODY_BYTES", "2048"),
                ("FEEDLOOP_HTTP__LISTEN", "8080"),
                ("OTHER", "x"),
            ]),
        )
        .expect("loads");
        assert_eq!(cfg.http.max_body_bytes, 2048);
        assert_eq!(cfg.http.listen, "8080");
    }

    #[test]
    fn file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("feedloop-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "[http]\nmax_body_bytes = 99\n").expect("write");
        let cfg: Cfg = load(DEFAULTS, Some(&path), env(&[])).expect("loads");
        assert_eq!(cfg.http.max_body_bytes, 99);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = load::<Cfg>(DEFAULTS, None, env(&[("FEEDLOOP_HTTP__NOPE", "1")]))
            .expect_err("unknown key");
        assert!(err.to_string().contains("http"), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
        let err = load::<Cfg>(
            DEFAULTS,
            None,
            env(&[("FEEDLOOP_HTTP__MAX_BODY_BYTES", "lots")]),
        )
        .expect_err("bad int");
        assert!(err.to_string().contains("http.max_body_bytes"), "{err}");
    }

    #[test]
    fn secrets_do_not_print() {
        let cfg: Cfg = load(DEFAULTS, None, env(&[])).expect("loads");
        assert!(!format!("{cfg:?}").contains("s3cret"));
        assert_eq!(cfg.http.token.expose(), "s3cret");
    }

    #[derive(Debug, Deserialize)]
    struct Files {
        #[serde(deserialize_with = "path")]
        ca: String,
        #[serde(deserialize_with = "path")]
        unset: String,
        #[serde(deserialize_with = "path_buf")]
        dir: std::path::PathBuf,
        #[serde(deserialize_with = "paths")]
        specs: Vec<String>,
    }

    /// Relative paths are resolved against the working directory when a configuration loads;
    /// existing ones are canonical (no `..`); an empty path stays unset.
    #[test]
    fn file_paths_load_absolute() {
        let cwd = std::env::current_dir().expect("cwd");
        let files: Files = load_text(
            "ca = \"Cargo.toml\"\nunset = \"\"\ndir = \"spool/../spool2\"\nspecs = [\"src/../src/config.rs\", \"/abs/x\"]\n",
            None,
            env(&[]),
        )
        .expect("loads");
        assert_eq!(files.ca, cwd.join("Cargo.toml").display().to_string());
        assert_eq!(files.unset, "");
        assert_eq!(
            files.dir,
            cwd.join("spool/../spool2"),
            "not created: absolute as given"
        );
        assert_eq!(
            files.specs,
            [
                cwd.join("src/config.rs").display().to_string(),
                "/abs/x".into()
            ]
        );
    }
}
