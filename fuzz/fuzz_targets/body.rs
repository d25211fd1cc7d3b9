//! The request-body parser behind the `Fields` extractor (src/http/body.rs).
//! The first byte picks the content type (even: JSON, odd: form); the rest is the
//! body. It must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    if let Ok(fields) = wxauth::fuzzing::fuzz_decode(kind % 2 == 0, body) {
        // What the handlers ask of it next.
        let _ = fields.required_str("code");
        let _ = fields.optional_str("appid");
        let _ = fields.required_str("refresh");
    }
});
