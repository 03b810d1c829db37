//! Registry configuration (defaults in `default.toml`).

use std::{collections::BTreeMap, path::Path, time::Duration};

use feedloop_core::config::{self, ConfigError, Secret};
use serde::Deserialize;

pub use feedloop_core::config::LogConfig;

pub const DEFAULTS: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub postgres: PostgresConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    /// `[http.tls]`: HTTPS, when a certificate is set.
    pub tls: feedloop_core::tls::ServerTls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub url: Secret,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub users: BTreeMap<String, Secret>,
}

impl Config {
    /// Defaults, then `file`, then the environment; validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg: Self = config::load_from_env(DEFAULTS, file)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.http.tls.validate("http.tls")?;
        if self.auth.users.is_empty() {
            return Err(ConfigError::invalid(
                "auth.users",
                "at least one user is required (name = \"password\")",
            ));
        }
        if let Some((name, _)) = self.auth.users.iter().find(|(_, p)| p.is_empty()) {
            return Err(ConfigError::invalid(
                &format!("auth.users.{name}"),
                "password must not be empty",
            ));
        }
        if self.http.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "http.max_body_bytes",
                "must be positive",
            ));
        }
        if self.postgres.max_connections == 0 {
            return Err(ConfigError::invalid(
                "postgres.max_connections",
                "must be positive",
            ));
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.http.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_but_require_a_user() {
        let cfg: Config = config::load(DEFAULTS, None, Vec::new()).expect("defaults parse");
        let err = cfg.validate().expect_err("no users");
        assert!(err.to_string().contains("auth.users"), "{err}");
        let cfg: Config = config::load(
            DEFAULTS,
            None,
            vec![("FEEDLOOP_AUTH__USERS__OPS".to_owned(), "pw".to_owned())],
        )
        .expect("parses");
        cfg.validate().expect("valid with a user");
    }

    #[test]
    fn the_deploy_example_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/registry.toml");
        let cfg: Config = config::load(DEFAULTS, Some(&path), Vec::new()).expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.http.listen, "0.0.0.0:8081");
    }
}
