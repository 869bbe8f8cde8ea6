//! Sans-IO PostgreSQL wire protocol pieces: framing, the startup packet, and the few messages stepgate
//! builds itself.
//!
//! Data flow: the proxy's session driver reads bytes from a socket into a buffer and asks
//! [`frame::FrameScanner`] where the message boundaries are. Most messages are forwarded as the original
//! bytes without being decoded; only the messages the proxy must look at are handed over whole. Nothing
//! here performs I/O, so everything can be unit tested, fuzzed and benchmarked on plain byte slices.

pub mod build;
pub mod frame;
pub mod reply;
pub mod startup;

pub use frame::{FrameError, FrameScanner, Step};
pub use reply::ErrorReply;
pub use startup::{StartupError, StartupPacket};
