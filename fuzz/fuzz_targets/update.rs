#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fedlink_protocol_fuzz::update(data));
