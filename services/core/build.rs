//! Embeds every `.avsc` under the workspace's `schemas/` directory and every migration under
//! `sql/migrations/`, so that binaries carry the event catalogue and the control-plane schema
//! without reading the source tree at run time (and without sqlx's proc macros, whose
//! build-time copy of sqlx, rustls and aws-lc cost minutes of every cold build).

use std::{env, fs, io::Write, path::Path};

fn collect(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            println!("cargo:rerun-if-changed={}", path.display());
            collect(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "avsc") {
            let rel = path
                .strip_prefix(root)
                .map(|p| p.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default();
            out.push((rel, path.to_string_lossy().into_owned()));
        }
    }
}

fn main() {
    let manifest = env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let schemas = Path::new(&manifest).join("../../schemas");
    println!("cargo:rerun-if-changed={}", schemas.display());
    embed_migrations(&Path::new(&manifest).join("../../sql/migrations"));
    let mut files = Vec::new();
    collect(&schemas, &schemas, &mut files);
    for (_, abs) in &files {
        println!("cargo:rerun-if-changed={abs}");
    }
    let out_dir = env::var("OUT_DIR").unwrap_or_default();
    let mut f = match fs::File::create(Path::new(&out_dir).join("catalogue_files.rs")) {
        Ok(f) => f,
        Err(e) => panic!("cannot write catalogue_files.rs: {e}"),
    };
    let mut body = String::from(
        "/// (path relative to schemas/, contents) of every embedded schema file.\npub const FILES: &[(&str, &str)] = &[\n",
    );
    for (rel, abs) in &files {
        body.push_str(&format!("    ({rel:?}, include_str!({abs:?})),\n"));
    }
    body.push_str("];\n");
    if let Err(e) = f.write_all(body.as_bytes()) {
        panic!("cannot write catalogue_files.rs: {e}");
    }
}

/// Writes `migrations.rs`: (file name, contents) of every `*.sql` in `dir`, sorted by name.
fn embed_migrations(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .collect(),
        Err(e) => panic!("cannot read {}: {e}", dir.display()),
    };
    files.sort();
    let mut body = String::from(
        "/// (file name, contents) of every control-plane migration, in order.\npub const MIGRATIONS: &[(&str, &str)] = &[\n",
    );
    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // What sqlx::migrate! accepted: `<version>_<description>.sql`, simple (no up/down).
        let valid = name
            .strip_suffix(".sql")
            .filter(|stem| !stem.ends_with(".up") && !stem.ends_with(".down"))
            .and_then(|stem| stem.split_once('_'))
            .is_some_and(|(version, _)| version.parse::<i64>().is_ok());
        if !valid {
            panic!("sql/migrations/{name}: not named <version>_<description>.sql");
        }
        body.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.to_string_lossy()
        ));
    }
    body.push_str("];\n");
    let out_dir = env::var("OUT_DIR").unwrap_or_default();
    if let Err(e) = fs::write(Path::new(&out_dir).join("migrations.rs"), body) {
        panic!("cannot write migrations.rs: {e}");
    }
}
