//! fedlink coordinator
#![forbid(unsafe_code)]
