//! stepgate: a PostgreSQL wire-protocol proxy that brings step-up authentication to databases.
//!
//! Clients connect to stepgate as if it were PostgreSQL; it relays their traffic to the upstream server.
//! Layers, bottom up (ARCHITECTURE.md): [`wire`] (sans-IO protocol) and [`config`]; then [`classify`],
//! [`token`], [`audit`], [`gate`], [`metrics`], [`check`], [`audit_tool`]; then [`proxy`] (the server),
//! [`devdb`] (the throwaway PostgreSQL of the demo, tests and benches) and [`logging`]. The binary's verbs,
//! the demo among them, live in the binary (`src/cli/`), the only place `anyhow` is used.
#![deny(unsafe_code)] // one exception: `proxy::judge::release_free_memory` (glibc malloc_trim)

pub mod audit;
pub mod audit_tool;
pub mod check;
pub mod classify;
pub mod config;
pub mod devdb;
pub mod gate;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod token;
pub mod wire;
