#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| signaling_server::fuzzing::turn_framing(data));
