//! The `trigger` binary refuses to start without its API token, or with a policy that has no
//! rule, naming the key.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_trigger");

#[test]
fn refuses_to_start_without_an_api_token() {
    let out = Command::new(BIN).env_clear().output().expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.token"), "{err}");
}

#[test]
fn refuses_a_policy_without_a_rule() {
    let dir = std::env::temp_dir().join(format!("trigger-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("trigger.toml");
    std::fs::write(
        &file,
        "[auth]\ntoken = \"0123456789abcdef0123\"\n[policies.ds]\ncooldown_s = 60\n",
    )
    .expect("config");
    let out = Command::new(BIN)
        .env_clear()
        .arg("--config")
        .arg(&file)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policies.ds"), "{err}");
}
