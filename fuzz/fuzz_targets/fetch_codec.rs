#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(line) = mailgate_fuzz::line(data) {
        mailgate_fuzz::compare(&line);
    }
});
