#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailgate::fuzzing::proxy_header(data));
