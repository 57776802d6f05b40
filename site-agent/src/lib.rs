//! fedlink site agent
#![forbid(unsafe_code)]
