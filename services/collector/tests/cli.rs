//! The `collector` binary refuses bad configuration with errors that name the key.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_collector");

#[test]
fn refuses_to_start_without_write_keys() {
    let out = Command::new(BIN).env_clear().output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.apps"), "{err}");
}

#[test]
fn names_the_key_of_a_bad_value() {
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_HTTP__MAX_BATCH_LEN", "many")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.max_batch_len"), "{err}");
}

#[test]
fn rejects_short_write_keys() {
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_AUTH__APPS__IOS__KEYS", "[\"short\"]")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.apps.ios.keys"), "{err}");
}
