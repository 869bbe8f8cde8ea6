//! A minimal hand-driven protocol client for what tokio-postgres cannot send: malformed packets,
//! FunctionCall, arbitrary startup parameters, exact bytes.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

pub fn startup_packet(params: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v);
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

#[allow(unused_imports)]
pub use stepgate::wire::build::{message as msg, query};

/// Field `kind` of an ErrorResponse/NoticeResponse body.
pub fn field(body: &[u8], kind: u8) -> Option<String> {
    let mut rest = body;
    while let Some((&k, after)) = rest.split_first() {
        if k == 0 {
            return None;
        }
        let nul = after.iter().position(|&b| b == 0)?;
        if k == kind {
            return Some(String::from_utf8_lossy(&after[..nul]).into_owned());
        }
        rest = &after[nul + 1..];
    }
    None
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and logs in (trust) as `user`, with extra startup parameters; returns after ReadyForQuery.
    pub async fn login(addr: SocketAddr, user: &str, db: &str, extra: &[(&str, &[u8])]) -> Raw {
        let mut raw = Raw::connect(addr).await;
        let mut params: Vec<(&str, &[u8])> =
            vec![("user", user.as_bytes()), ("database", db.as_bytes())];
        params.extend_from_slice(extra);
        raw.send(&startup_packet(&params)).await;
        let msgs = raw.until_ready().await;
        assert!(
            msgs.iter().any(|(t, _)| *t == b'Z'),
            "login failed: {msgs:?}"
        );
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Reads exactly `n` raw bytes (e.g. the answer to an SSLRequest).
    pub async fn read_bytes(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(15), self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no answer within 15 s"),
        }
    }

    /// The next message, or None when the connection is closed.
    pub async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() > len {
                    let m: Vec<u8> = self.buf.drain(..len + 1).collect();
                    return Some((m[0], m[5..].to_vec()));
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Messages up to and including ReadyForQuery (or until close).
    pub async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// Reads until the server closes; returns what arrived. Panics if it stays open for 15 s.
    pub async fn until_closed(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            out.push(m);
        }
        out
    }

    /// The SQLSTATE of the first ErrorResponse among `msgs`.
    pub fn error_code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
        msgs.iter()
            .find(|(t, _)| *t == b'E')
            .and_then(|(_, b)| field(b, b'C'))
    }

    pub fn error_message(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
        msgs.iter()
            .find(|(t, _)| *t == b'E')
            .and_then(|(_, b)| field(b, b'M'))
    }
}
