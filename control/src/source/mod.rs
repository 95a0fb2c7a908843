//! Configuration sources. Only the static file exists so far.

pub mod file;
