//! A label spec file (TOML), parsed and validated as the labeler does at start; a spec that
//! validates must answer the questions the labeler asks of it.
#![no_main]

use feedloop_labeler::spec::LabelSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = LabelSpec::parse("fuzz.toml", text) {
        let _ = (
            spec.longest_window(),
            spec.close_after_ms(),
            spec.retention_after_close_ms(),
            spec.hash(),
            spec.cdc_tables(),
        );
    }
});
