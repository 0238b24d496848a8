#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| signaling_server::fuzzing::create_room_body(data));
