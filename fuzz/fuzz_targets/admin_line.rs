//! The admin socket's request line (src/admin.rs): the bounded line reader, then
//! the request parser. Must never panic, never hold more than the bound, and a
//! parsed request must survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wxauth::fuzzing::{parse_request, read_request_line, MAX_REQUEST_LINE};

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let Ok(Some(line)) = read_request_line(&mut input) else {
        return;
    };
    assert!(line.len() <= MAX_REQUEST_LINE);
    assert!(!line.contains(&b'\n'));
    if let Ok(request) = parse_request(&line) {
        let again = serde_json::to_vec(&request).expect("a request serializes");
        assert!(parse_request(&again).is_ok(), "round trip failed: {request:?}");
    }
});
