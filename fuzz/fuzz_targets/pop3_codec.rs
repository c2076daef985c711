#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailgate::fuzzing::pop3_codec(data));
