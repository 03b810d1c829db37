//! A configuration file (TOML), loaded over each service's embedded defaults and validated, as
//! every binary does at start.
#![no_main]

use feedloop_core::config::{ConfigError, load_text};
use libfuzzer_sys::fuzz_target;

fn check<T: serde::de::DeserializeOwned>(
    defaults: &str,
    text: &str,
    validate: impl Fn(&T) -> Result<(), ConfigError>,
) {
    if let Ok(cfg) = load_text::<T>(defaults, Some(("fuzz.toml", text)), Vec::new()) {
        let _ = validate(&cfg);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    use feedloop_cdc::config as cdc;
    use feedloop_collector::config as collector;
    use feedloop_eraser::config as eraser;
    use feedloop_labeler::config as labeler;
    use feedloop_registry::config as registry;
    use feedloop_trigger::config as trigger;
    check(collector::DEFAULTS, text, collector::Config::validate);
    check(cdc::DEFAULTS, text, cdc::Config::validate);
    check(labeler::DEFAULTS, text, labeler::Config::validate);
    check(eraser::DEFAULTS, text, eraser::Config::validate);
    check(trigger::DEFAULTS, text, trigger::Config::validate);
    check(registry::DEFAULTS, text, registry::Config::validate);
});
