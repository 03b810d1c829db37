//! The README's configuration reference is every service's `default.toml`, verbatim. Run with
//! `FEEDLOOP_UPDATE_README=1` to rewrite the block after changing a default.

use std::path::Path;

const START: &str = "<!-- config-reference:start -->\n";
const END: &str = "<!-- config-reference:end -->";

/// The reference as the README must hold it.
fn reference() -> String {
    let services = [
        ("collector", feedloop_collector::config::DEFAULTS),
        ("cdc", feedloop_cdc::config::DEFAULTS),
        ("registry", feedloop_registry::config::DEFAULTS),
        ("labeler", feedloop_labeler::config::DEFAULTS),
        ("eraser", feedloop_eraser::config::DEFAULTS),
        ("trigger", feedloop_trigger::config::DEFAULTS),
    ];
    let mut out = String::new();
    for (name, defaults) in services {
        out.push_str(&format!(
            "<details><summary><code>{name}</code> (services/{name}/default.toml)</summary>\n\n```toml\n{}\n```\n\n</details>\n\n",
            defaults.trim_end()
        ));
    }
    out
}

#[test]
fn the_readme_configuration_reference_is_every_default_toml() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let start = readme
        .find(START)
        .expect("README has the config-reference start marker")
        + START.len();
    let end = readme
        .find(END)
        .expect("README has the config-reference end marker");
    let want = reference();
    if std::env::var_os("FEEDLOOP_UPDATE_README").is_some() {
        let updated = format!("{}{want}{}", &readme[..start], &readme[end..]);
        std::fs::write(&path, updated).expect("rewrite README.md");
        return;
    }
    assert!(
        readme[start..end] == want,
        "README.md's configuration reference differs from the services' default.toml: run \
         FEEDLOOP_UPDATE_README=1 cargo test -p feedloop --test readme"
    );
}
