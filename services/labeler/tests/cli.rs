//! The `labeler` binary refuses bad configuration and bad label specs with errors that name
//! the key.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_labeler");

#[test]
fn names_the_key_of_a_bad_value() {
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_STATE__STORE", "cassandra")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state.store"), "{err}");
}

#[test]
fn names_the_key_of_a_bad_spec() {
    let dir = tempfile::tempdir().expect("dir");
    let spec = dir.path().join("bad.toml");
    let text =
        feedloop_labeler::spec::EXAMPLE_SPEC.replace("window = \"10m\"", "window = \"-10m\"");
    std::fs::write(&spec, text).expect("write");
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_SPECS__FILES", format!("[\"{}\"]", spec.display()))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("specs.files") && err.contains("window"),
        "{err}"
    );
}
