//! Where the rooms live and how messages reach connections: [`hub`], the in-process
//! backend (the default: the state machine of [`crate::core::rooms`] behind one mutex),
//! or [`cluster`], the Redis backend (`--redis`). [`store`] keeps the in-process
//! backend's meetings in SQLite.

pub mod cluster;
pub mod hub;
pub mod store;
