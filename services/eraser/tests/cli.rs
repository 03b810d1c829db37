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

#[test]
fn refuses_to_start_without_a_key_encryption_key() {
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_AUTH__ADMIN_TOKEN", "0123456789abcdef0123")
        .env("FEEDLOOP_ERASURE__HASH_KEY", "0123456789abcdef0123")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keys.kek"), "{err}");
    assert!(err.contains("generate-kek"), "says how to make one: {err}");
}

#[test]
fn refuses_a_malformed_key_ring_without_echoing_it() {
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_AUTH__ADMIN_TOKEN", "0123456789abcdef0123")
        .env("FEEDLOOP_ERASURE__HASH_KEY", "0123456789abcdef0123")
        .env("FEEDLOOP_KEYS__KEK", "k1=c2hvcnQtc2VjcmV0LWtleQ")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("32 bytes"), "{err}");
    assert!(
        !err.contains("c2hvcnQtc2VjcmV0LWtleQ"),
        "the key is echoed: {err}"
    );
}
