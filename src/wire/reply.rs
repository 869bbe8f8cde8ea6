//! Messages stepgate writes itself (errors it reports to a client), encoded with pgwire's message types.

use bytes::BytesMut;
use pgwire::messages::response::ErrorResponse;
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

    /// Appends the encoded ErrorResponse to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
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
        // Encoding into a BytesMut cannot fail for an ErrorResponse; NUL bytes are removed so the message
        // stays well-formed whatever text it carries.
        let fields = fields
            .into_iter()
            .map(|(k, v)| (k, v.replace('\0', "")))
            .collect();
        let _ = ErrorResponse::new(fields).encode(out);
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode_into(&mut out);
        out
    }
}

/// Reads the SQLSTATE and message of a server ErrorResponse/NoticeResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut rest = body;
    while let Some((&kind, after)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let Some((value, after)) = super::frame::cstr(after) else {
            break;
        };
        match kind {
            b'C' => code = String::from_utf8_lossy(value).into_owned(),
            b'M' => message = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
        rest = after;
    }
    (code, message)
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
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        assert_eq!(
            error_fields(&b[5..]),
            ("08006".to_string(), "stepgate: boom".to_string())
        );
        assert_eq!(*b.last().unwrap(), 0);
    }
}
