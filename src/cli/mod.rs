//! The binary's commands: each verb's arguments beside what it prints. The library does the work; these
//! modules parse, call and render (and are the only place `anyhow` is used).

pub mod audit;
pub mod check;
pub mod demo;
pub mod serve;
pub mod token;
pub mod token_ops;
