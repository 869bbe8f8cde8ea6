//! Messages stepgate writes itself (errors it reports to a client), encoded with pgwire's message types.

use bytes::BytesMut;
use pgwire::messages::response::{ErrorResponse, NoticeResponse};
use pgwire::messages::Message;

/// An ErrorResponse stepgate sends on its own behalf. Messages are prefixed `stepgate:` by the caller so a
/// person can tell them from the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorReply {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        ErrorReply {
            severity: "FATAL",
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        ErrorReply {
            severity: "ERROR",
            ..Self::fatal(code, message)
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A notice (severity NOTICE, SQLSTATE 00000), sent with [`ErrorReply::to_notice_bytes`].
    pub fn notice(message: impl Into<String>) -> Self {
        ErrorReply {
            severity: "NOTICE",
            ..Self::fatal("00000", message)
        }
    }

    /// The encoded NoticeResponse with these fields.
    pub fn to_notice_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        let _ = NoticeResponse::new(self.fields()).encode(&mut out);
        out
    }

    /// Appends the encoded ErrorResponse to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        // Encoding into a BytesMut cannot fail for an ErrorResponse.
        let _ = ErrorResponse::new(self.fields()).encode(out);
    }

    /// The message's fields; NUL bytes are removed so the message stays well-formed whatever text it
    /// carries.
    fn fields(&self) -> Vec<(u8, String)> {
        let mut fields = vec![
            (b'S', self.severity.to_string()),
            (b'V', self.severity.to_string()),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        fields
            .into_iter()
            .map(|(k, v)| (k, v.replace('\0', "")))
            .collect()
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode_into(&mut out);
        out
    }
}

/// Reads the SQLSTATE and message of a server ErrorResponse/NoticeResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let text = |kind| {
        error_field(body, kind)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    (text(b'C'), text(b'M'))
}

/// The first field of type `kind` (`b'C'` code, `b'M'` message, `b'V'`/`b'S'` severity, …) of an
/// ErrorResponse or NoticeResponse body; the one walker of error fields.
pub fn error_field(body: &[u8], kind: u8) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&k, after)) = rest.split_first() {
        if k == 0 {
            return None;
        }
        let (value, after) = super::frame::cstr(after)?;
        if k == kind {
            return Some(value);
        }
        rest = after;
    }
    None
}

/// Whether an ErrorResponse body is FATAL or PANIC (the session ends): its non-localized severity (`V`), or
/// the localized one (`S`) from servers older than 9.6.
pub fn is_fatal(body: &[u8]) -> bool {
    error_field(body, b'V')
        .or_else(|| error_field(body, b'S'))
        .is_some_and(|v| v == b"FATAL" || v == b"PANIC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_well_formed_error() {
        let b = ErrorReply::fatal("08006", "stepgate: boom")
            .with_hint("try again")
            .to_bytes();
        assert_eq!(b[0], b'E');
        let len = crate::wire::frame::be_u32(&b, 1).unwrap() as usize;
        assert_eq!(len + 1, b.len());
        assert_eq!(
            error_fields(&b[5..]),
            ("08006".to_string(), "stepgate: boom".to_string())
        );
        assert_eq!(*b.last().unwrap(), 0);
    }
}
