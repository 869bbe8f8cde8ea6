//! tracing setup: human-readable text or JSON lines on stderr, filtered by `RUST_LOG` (default `info`).
//! Tokens and passwords are never passed to tracing in full; see the session code for what is logged. Libraries
//! that log SQL text are capped at `warn` regardless of `RUST_LOG`.

use std::io::IsTerminal;

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Directives that always apply: see [`init`].
const QUIET_LIBRARIES: &[&str] = &["sqlparser=warn"];

/// Installs the global subscriber. Calling it twice is harmless (the second call does nothing).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Libraries that log the SQL they are given (sqlparser at debug) would write tokens and password
    // literals to the log: they are capped at warn whatever RUST_LOG says.
    let filter = QUIET_LIBRARIES.iter().fold(filter, |f, d| {
        f.add_directive(d.parse().expect("a valid directive"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        // Text lines carry what clients sent (SQL, user and application names): escaped, so no value can
        // end a line and forge another, or move a terminal's cursor.
        LogFormat::Text => builder
            .with_writer(|| OneLine(std::io::stderr()))
            .with_target(false)
            .try_init(),
        // JSON strings are escaped by the encoder.
        LogFormat::Json => builder
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .try_init(),
    };
}

/// A writer for text log lines: each write is one whole formatted event, written out with its control
/// characters escaped (`\n`, `\r`, `\t`, `\x1b`, …) except the newline that ends it.
pub struct OneLine<W>(pub W);

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        if !body.iter().any(|&b| b < 0x20 || b == 0x7f) {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b if b < 0x20 || b == 0x7f => {
                    out.extend_from_slice(format!("\\x{b:02x}").as_bytes())
                }
                b => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::OneLine;
    use std::io::Write;

    #[test]
    fn a_value_cannot_end_its_line() {
        let mut out = OneLine(Vec::new());
        out.write_all(b"WARN statement held sql=DROP TABLE t\n INFO authorized user=alice token_id=\"forged\"\x1b[2K\n")
            .unwrap();
        let text = String::from_utf8(out.0).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with("\\x1b[2K\n"), "{text}");
        assert!(text.contains("DROP TABLE t\\n INFO authorized"), "{text}");
        let mut plain = OneLine(Vec::new());
        plain.write_all(b"INFO session ended\n").unwrap();
        assert_eq!(plain.0, b"INFO session ended\n");
    }
}
