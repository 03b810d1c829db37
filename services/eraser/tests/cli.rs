//! The `eraser` binary refuses to start without its secrets, naming the key.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_eraser");

#[test]
fn refuses_to_start_without_an_admin_token() {
    let out = Command::new(BIN).env_clear().output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.admin_token"), "{err}");
}

#[test]
fn refuses_to_start_without_a_hash_key() {
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_AUTH__ADMIN_TOKEN", "0123456789abcdef0123")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("erasure.hash_key"), "{err}");
}
