//! The `registry` binary refuses to start without a user, or with an empty password, naming
//! the key. (The fault suite runs this binary too: this test is also what has
//! `cargo test --workspace` build it.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_registry");

#[test]
fn refuses_to_start_without_a_user() {
    let out = Command::new(BIN).env_clear().output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.users"), "{err}");
}

#[test]
fn refuses_an_empty_password() {
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_AUTH__USERS", "{ feedloop = \"\" }")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.users.feedloop"), "{err}");
}
