//! The rules, without I/O: every input is a method call with the time passed in, every
//! output a value, so the rules are tested without sockets, threads or real clocks.

pub mod clock;
pub mod rate_limit;
pub mod rooms;
