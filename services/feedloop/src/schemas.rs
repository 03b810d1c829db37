//! `feedloop schemas check`: every catalogue record, composed as it would be registered, must
//! stay compatible with its previous committed version in git.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use feedloop_core::{
    avro::{
        compat::{CompatibilityLevel, check_level},
        parse_schema,
    },
    catalogue::Catalogue,
};

/// Why the check could not run (as opposed to finding a breaking change).
#[derive(Debug, thiserror::Error)]
pub enum SchemasError {
    #[error("git {args}: {message}")]
    Git { args: String, message: String },
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the working tree's catalogue is invalid: {0}")]
    Catalogue(String),
}

/// The verdict on one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Full record name.
    pub record: String,
    /// The commit holding the previous version, if the record has history.
    pub previous: Option<String>,
    /// Confluent-style reasons; empty when compatible.
    pub violations: Vec<String>,
}

fn git(repo: &Path, args: &[&str]) -> Result<String, SchemasError> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| SchemasError::Git {
            args: args.join(" "),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SchemasError::Git {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `.avsc` files of the working tree, relative to `schemas/`.
pub fn working_tree(repo: &Path) -> Result<Vec<(String, String)>, SchemasError> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) -> Result<(), SchemasError> {
        let read = |e| SchemasError::Read {
            path: dir.display().to_string(),
            source: e,
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, root, out)?;
            } else if path.extension().is_some_and(|e| e == "avsc") {
                let text = std::fs::read_to_string(&path).map_err(|e| SchemasError::Read {
                    path: path.display().to_string(),
                    source: e,
                })?;
                let rel = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                out.push((rel, text));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    let root = repo.join("schemas");
    walk(&root, &root, &mut out)?;
    Ok(out)
}

/// The `.avsc` files at `commit`, relative to `schemas/`.
fn at_commit(repo: &Path, commit: &str) -> Result<Vec<(String, String)>, SchemasError> {
    let listing = git(
        repo,
        &["ls-tree", "-r", "--name-only", commit, "--", "schemas/"],
    )?;
    let mut out = Vec::new();
    for path in listing.lines().filter(|p| p.ends_with(".avsc")) {
        let text = git(repo, &["show", &format!("{commit}:{path}")])?;
        out.push((path.trim_start_matches("schemas/").to_owned(), text));
    }
    Ok(out)
}

/// Checks every record of the working tree's catalogue against the most recent committed
/// version of it that differs, under `level`.
pub fn check(repo: &Path, level: CompatibilityLevel) -> Result<Vec<Outcome>, SchemasError> {
    let current = Catalogue::from_files(working_tree(repo)?)
        .map_err(|e| SchemasError::Catalogue(e.to_string()))?;
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    for file in current.files() {
        let composed = current
            .composed(&file.full_name)
            .map_err(|e| SchemasError::Catalogue(e.to_string()))?;
        pending.insert(file.full_name.clone(), composed);
    }
    let log = git(repo, &["log", "--format=%H", "--", "schemas/"]).unwrap_or_default();
    let mut outcomes = Vec::new();
    for commit in log.lines() {
        if pending.is_empty() {
            break;
        }
        let Ok(old) = at_commit(repo, commit).map(Catalogue::from_files) else {
            continue;
        };
        let Ok(old) = old else {
            tracing::warn!(commit, "Skipping a commit whose catalogue does not parse");
            continue;
        };
        let resolved: Vec<String> = pending
            .iter()
            .filter_map(|(record, new_text)| {
                let old_text = old.composed(record).ok()?;
                (old_text != *new_text).then(|| record.clone())
            })
            .collect();
        for record in resolved {
            let Some(new_text) = pending.remove(&record) else {
                continue;
            };
            let old_text = old.composed(&record).unwrap_or_default();
            let violations = match (parse_schema(&new_text), parse_schema(&old_text)) {
                (Ok(new), Ok(prev)) => check_level(level, &new, &[(1, &prev)])
                    .iter()
                    .map(|v| v.describe())
                    .collect(),
                (Err(e), _) => vec![format!("the new schema does not parse: {e}")],
                (_, Err(_)) => Vec::new(),
            };
            outcomes.push(Outcome {
                record,
                previous: Some(commit.chars().take(12).collect()),
                violations,
            });
        }
    }
    outcomes.extend(pending.into_keys().map(|record| Outcome {
        record,
        previous: None,
        violations: Vec::new(),
    }));
    outcomes.sort_by(|a, b| a.record.cmp(&b.record));
    Ok(outcomes)
}
