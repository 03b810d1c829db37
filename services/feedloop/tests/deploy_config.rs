//! The deploy kit configures every service with settings its config loader accepts: for each
//! feedloop service of `deploy/compose.yaml` and of `deploy/k8s/`, its `FEEDLOOP_*` variables
//! (and in Kubernetes its ConfigMap's `config.toml`) are loaded the way the binary loads them
//! (embedded defaults, then the file, then the environment; unknown keys are errors) and
//! validated. The environment is passed explicitly: the process environment is not touched.
//!
//! Kubernetes secrets (`secretKeyRef`) take their values from `deploy/k8s/secrets.example.yaml`,
//! whose placeholders have the shape the real values need (the collector's write keys are a
//! TOML array, tokens have 16 characters or more).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use feedloop_core::config::{ConfigError, load};
use serde::{Deserialize, de::DeserializeOwned};
use serde_yaml_ng::Value;

const SERVICES: [&str; 6] = [
    "registry",
    "collector",
    "cdc",
    "labeler",
    "eraser",
    "trigger",
];

/// A `valueFrom` other than a known secret (a field or resource reference).
const PLACEHOLDER: &str = "placeholder-value-from-the-cluster";

/// One service as the kit runs it.
#[derive(Debug)]
struct Deployed {
    /// Where it was found, for messages.
    origin: String,
    service: String,
    /// The `--config` file's contents, if any.
    file: Option<String>,
    env: Vec<(String, String)>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file.
fn documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// The service an image of the kit runs: `feedloop/<service>:<tag>`.
fn service_of_image(image: &str) -> Option<String> {
    let name = image.strip_prefix("feedloop/")?.split(':').next()?;
    SERVICES.contains(&name).then(|| name.to_owned())
}

fn from_compose() -> Vec<Deployed> {
    let compose = documents(&deploy_dir().join("compose.yaml")).remove(0);
    SERVICES
        .iter()
        .map(|&service| {
            let env = compose["services"][service]["environment"]
                .as_mapping()
                .unwrap_or_else(|| panic!("compose.yaml: {service} has no environment map"))
                .iter()
                .map(|(k, v)| (scalar(k), scalar(v)))
                .collect();
            Deployed {
                origin: format!("compose.yaml service {service}"),
                service: service.to_owned(),
                file: None,
                env,
            }
        })
        .collect()
}

/// The objects of `kind`, by name.
fn named<'a>(objects: &'a [Value], kind: &str) -> BTreeMap<String, &'a Value> {
    objects
        .iter()
        .filter(|o| o["kind"].as_str() == Some(kind))
        .map(|o| (scalar(&o["metadata"]["name"]), o))
        .collect()
}

fn from_k8s() -> Vec<Deployed> {
    let dir = deploy_dir().join("k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    let objects: Vec<Value> = files.iter().flat_map(|f| documents(f.as_path())).collect();
    let config_maps = named(&objects, "ConfigMap");
    let secrets = named(&objects, "Secret");
    let secret = |reference: &Value| -> String {
        let (name, key) = (scalar(&reference["name"]), scalar(&reference["key"]));
        let value = secrets.get(&name).map(|s| &s["stringData"][key.as_str()]);
        match value {
            Some(v) if !v.is_null() => scalar(v),
            _ => panic!("secretKeyRef {name}/{key} is not in secrets.example.yaml"),
        }
    };

    let mut deployed = Vec::new();
    for workload in objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
    {
        let pod = &workload["spec"]["template"]["spec"];
        let config_map = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find_map(|v| v["configMap"]["name"].as_str())
            .and_then(|name| config_maps.get(name))
            .map(|cm| scalar(&cm["data"]["config.toml"]));
        for container in pod["containers"].as_sequence().into_iter().flatten() {
            let Some(service) = container["image"].as_str().and_then(service_of_image) else {
                continue;
            };
            let env = container["env"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|e| {
                    let value = if !e["value"].is_null() {
                        scalar(&e["value"])
                    } else if !e["valueFrom"]["secretKeyRef"].is_null() {
                        secret(&e["valueFrom"]["secretKeyRef"])
                    } else {
                        PLACEHOLDER.to_owned()
                    };
                    (scalar(&e["name"]), value)
                })
                .collect();
            deployed.push(Deployed {
                origin: format!(
                    "k8s {}/{}",
                    scalar(&workload["kind"]),
                    scalar(&workload["metadata"]["name"])
                ),
                service,
                file: config_map.clone(),
                env,
            });
        }
    }
    deployed
}

/// Loads `T` the way its binary does (defaults, `file`, `env`), then validates it.
fn load_with<T: DeserializeOwned>(
    defaults: &str,
    file: Option<&Path>,
    env: Vec<(String, String)>,
    validate: fn(&T) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    validate(&load::<T>(defaults, file, env)?)
}

/// Loads and validates `d` with its service's own config type and defaults.
fn load_config(d: &Deployed) -> Result<(), ConfigError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    if let Some(text) = &d.file {
        std::fs::write(&path, text).expect("write config.toml");
    }
    let file = d.file.as_ref().map(|_| path.as_path());
    let env = d.env.clone();
    match d.service.as_str() {
        "registry" => load_with(
            feedloop_registry::config::DEFAULTS,
            file,
            env,
            feedloop_registry::Config::validate,
        ),
        "collector" => load_with(
            feedloop_collector::config::DEFAULTS,
            file,
            env,
            feedloop_collector::Config::validate,
        ),
        "cdc" => load_with(
            feedloop_cdc::config::DEFAULTS,
            file,
            env,
            feedloop_cdc::Config::validate,
        ),
        "labeler" => load_with(
            feedloop_labeler::config::DEFAULTS,
            file,
            env,
            feedloop_labeler::Config::validate,
        ),
        "eraser" => load_with(
            feedloop_eraser::config::DEFAULTS,
            file,
            env,
            feedloop_eraser::Config::validate,
        ),
        "trigger" => load_with(
            feedloop_trigger::config::DEFAULTS,
            file,
            env,
            feedloop_trigger::Config::validate,
        ),
        other => panic!("no config loader for {other}"),
    }
}

fn assert_all_load(deployed: &[Deployed], kit: &str) {
    for service in SERVICES {
        assert!(
            deployed.iter().any(|d| d.service == service),
            "{kit} does not run {service}"
        );
    }
    let failures: Vec<String> = deployed
        .iter()
        .filter_map(|d| load_config(d).err().map(|e| format!("{}: {e}", d.origin)))
        .collect();
    assert!(failures.is_empty(), "{kit}:\n{}", failures.join("\n"));
}

#[test]
fn compose_environment_loads_into_every_service_config() {
    assert_all_load(&from_compose(), "deploy/compose.yaml");
}

#[test]
fn kubernetes_config_maps_and_environment_load_into_every_service_config() {
    assert_all_load(&from_k8s(), "deploy/k8s");
}
