//! stepgate: a PostgreSQL wire-protocol proxy that brings step-up authentication to databases.
//!
//! Clients connect to stepgate as if it were PostgreSQL; it relays their traffic to the upstream server.
//! Module map (see DESIGN.md "Layout"): [`wire`] is sans-IO framing, [`proxy`] the listener and session
//! driver, [`config`] the TOML configuration, [`devdb`] the throwaway PostgreSQL used by the demo and the
//! tests.
#![forbid(unsafe_code)]

pub mod audit;
pub mod audit_tool;
pub mod check;
pub mod classify;
pub mod config;
pub mod demo;
pub mod devdb;
pub mod gate;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod token;
pub mod wire;
