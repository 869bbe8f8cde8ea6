//! The console's side of the protocol after the login: the simple query protocol and the extended one
//! (Parse/Bind/Describe/Execute/Close/Sync), answered by stepgate itself. A RELOAD that removes this user from
//! `[admin] users` ends the session at once, idle or not.

use std::collections::HashMap;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::command::{parse, Invocation};
use super::commands::ALL;
use super::result::{self, ConsoleError};
use super::session::Console;
use crate::wire::frame::{self, cstr, FrameScanner, Step};

/// Largest message accepted from a console client or during the login relay.
const MAX_MESSAGE: usize = 64 * 1024;

/// Reads whole tagged messages from a stream with the proxy's one framer ([`FrameScanner`], every message
/// inspected, at most [`MAX_MESSAGE`] bytes), keeping what it read beyond them. Cancel-safe: what was read
/// stays in `buf`.
pub(super) struct Reader<'a, S> {
    pub stream: &'a mut S,
    pub buf: BytesMut,
    scanner: FrameScanner,
}

impl<'a, S: AsyncRead + Unpin> Reader<'a, S> {
    pub fn new(stream: &'a mut S, buf: BytesMut) -> Self {
        Reader {
            stream,
            buf,
            scanner: FrameScanner::new(MAX_MESSAGE),
        }
    }

    pub async fn next(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            match self.scanner.step(&self.buf, |_| true) {
                Ok(Step::Message { tag, len }) => {
                    let body = frame::body(&self.buf[..len]).to_vec();
                    self.buf.advance(len);
                    return Ok(Some((tag, body)));
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ))
                }
            }
            self.buf.reserve(4096);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }
}

/// Describe and Close name a statement (`S`) or a portal (`P`).
fn kind_and_name(body: &[u8]) -> (u8, &[u8]) {
    let kind = body.first().copied().unwrap_or(b'S');
    let name = body.get(1..).and_then(cstr).map(|(n, _)| n).unwrap_or(b"");
    (kind, name)
}

/// A prepared console statement or a bound portal.
#[derive(Clone)]
struct Prepared {
    text: String,
    inv: Invocation,
}

pub(super) async fn serve<S>(console: &Console<'_>, client: &mut S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut statements: HashMap<Vec<u8>, Prepared> = HashMap::new();
    let mut portals: HashMap<Vec<u8>, Prepared> = HashMap::new();
    let mut skipping = false;
    let mut out = BytesMut::new();
    let mut reloads = console.shared.reloaded.subscribe();
    let mut reader = Reader::new(client, BytesMut::new());
    loop {
        if !out.is_empty() {
            reader.stream.write_all(&out).await?;
            reader.stream.flush().await?;
            out.clear();
        }
        let next = loop {
            tokio::select! {
                next = reader.next() => break next?,
                changed = reloads.changed() => {
                    if changed.is_err() {
                        break reader.next().await?;
                    }
                    if let Some(fatal) = console.revoked() {
                        reader.stream.write_all(&fatal.to_bytes()).await?;
                        reader.stream.flush().await?;
                        return Ok(());
                    }
                }
            }
        };
        // Before every command too: the user must still be an admin under the policy in force.
        if let Some(fatal) = console.revoked() {
            reader.stream.write_all(&fatal.to_bytes()).await?;
            reader.stream.flush().await?;
            return Ok(());
        }
        let Some((tag, body)) = next else {
            return Ok(());
        };
        if skipping && tag != b'S' {
            continue;
        }
        match tag {
            b'X' => return Ok(()),
            b'Q' => {
                let text = String::from_utf8_lossy(cstr(&body).map(|(q, _)| q).unwrap_or(&body))
                    .into_owned();
                match parse(ALL, &text) {
                    Ok(inv) if inv.is_empty() => result::empty_query(&mut out),
                    Ok(inv) => match console.run(&inv, &text) {
                        Ok(t) => {
                            if !t.columns.is_empty() {
                                result::row_description(&mut out, &t.columns);
                            }
                            result::rows_and_tag(&mut out, &t);
                        }
                        Err(e) => e.encode(&mut out),
                    },
                    Err(e) => {
                        console.audit(text.trim(), &format!("error: {e}"), None);
                        e.encode(&mut out);
                    }
                }
                result::ready(&mut out);
            }
            b'P' => {
                let (name, rest) = cstr(&body).unwrap_or((b"", b""));
                let text =
                    String::from_utf8_lossy(cstr(rest).map(|(q, _)| q).unwrap_or(b"")).into_owned();
                match parse(ALL, &text) {
                    Ok(inv) => {
                        statements.insert(name.to_vec(), Prepared { text, inv });
                        result::parse_complete(&mut out);
                    }
                    Err(e) => {
                        e.encode(&mut out);
                        skipping = true;
                    }
                }
            }
            b'B' => {
                let (portal, rest) = cstr(&body).unwrap_or((b"", b""));
                let stmt = cstr(rest).map(|(s, _)| s).unwrap_or(b"");
                match statements.get(stmt) {
                    Some(p) => {
                        portals.insert(portal.to_vec(), p.clone());
                        result::bind_complete(&mut out);
                    }
                    None => {
                        ConsoleError::not_found("unknown prepared statement").encode(&mut out);
                        skipping = true;
                    }
                }
            }
            b'D' => {
                let (kind, name) = kind_and_name(&body);
                let found = if kind == b'S' {
                    statements.get(name)
                } else {
                    portals.get(name)
                };
                match found {
                    Some(p) => {
                        if kind == b'S' {
                            result::no_parameters(&mut out);
                        }
                        result::row_description(&mut out, p.inv.columns());
                    }
                    None => {
                        ConsoleError::not_found("unknown statement or portal").encode(&mut out);
                        skipping = true;
                    }
                }
            }
            b'E' => {
                let name = cstr(&body).map(|(n, _)| n).unwrap_or(b"");
                match portals.get(name).cloned() {
                    Some(p) if p.inv.is_empty() => result::empty_query(&mut out),
                    Some(p) => match console.run(&p.inv, &p.text) {
                        Ok(t) => result::rows_and_tag(&mut out, &t),
                        Err(e) => {
                            e.encode(&mut out);
                            skipping = true;
                        }
                    },
                    None => {
                        ConsoleError::not_found("unknown portal").encode(&mut out);
                        skipping = true;
                    }
                }
            }
            b'C' => {
                let (kind, name) = kind_and_name(&body);
                if kind == b'S' {
                    statements.remove(name);
                } else {
                    portals.remove(name);
                }
                result::close_complete(&mut out);
            }
            b'S' => {
                skipping = false;
                portals.remove(&b""[..]);
                result::ready(&mut out);
            }
            b'H' => {}
            _ => {
                ConsoleError::protocol(format!(
                    "message type {:?} is not supported by the console",
                    tag as char
                ))
                .encode(&mut out);
                result::ready(&mut out);
            }
        }
    }
}
