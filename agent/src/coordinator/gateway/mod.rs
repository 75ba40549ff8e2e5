//! The gateway in front of the engine: what the public API checks and enforces before a request
//! reaches rank 0.

pub mod request;
