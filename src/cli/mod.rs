//! The binary's commands: each verb's arguments beside what it prints. The library does the work; these
//! modules parse, call and render (and are the only place `anyhow` is used).

pub mod approve;
pub mod audit;
pub mod check;
pub mod demo;
pub mod plan;
pub mod serve;
pub mod token;
pub mod token_ops;

/// An error and its causes on one line, each said once: a cause whose text its parent already quotes
/// (`…: Is a directory (os error 21)`) is not repeated.
pub fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
