//! The `cdc` binary refuses bad configuration with errors that name the key.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cdc");

#[test]
fn names_the_key_of_a_bad_value() {
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_SOURCE__SNAPSHOT", "sometimes")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("source.snapshot"), "{err}");
}

#[test]
fn refuses_tables_outside_the_capture_list() {
    let out = Command::new(BIN)
        .env_clear()
        .env("FEEDLOOP_REGISTRY__PASSWORD", "pw")
        .env(
            "FEEDLOOP_KEYS__KEK",
            "k1=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
        .env("FEEDLOOP_OUTBOX__TABLE", "app.elsewhere")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outbox.table"), "{err}");
}
