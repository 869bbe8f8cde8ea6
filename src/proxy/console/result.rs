//! What a console command answers, and its encoding as PostgreSQL messages (pgwire's message types).

use bytes::BytesMut;
use pgwire::messages::data::{
    DataRow, FieldDescription, NoData, ParameterDescription, RowDescription,
};
use pgwire::messages::extendedquery::{BindComplete, CloseComplete, ParseComplete};
use pgwire::messages::response::{
    CommandComplete, EmptyQueryResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{Authentication, BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::Message;

use crate::wire::reply::ErrorReply;

/// PostgreSQL's OID of `text`: every console column is text.
const TEXT_OID: u32 = 25;

/// One result: columns (all text), rows, and the command tag.
#[derive(Debug, Default)]
pub struct Table {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    pub tag: String,
}

impl Table {
    pub fn new(columns: &[&'static str]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
            tag: String::new(),
        }
    }

    /// A two-column `field | value` table.
    pub fn fields(pairs: Vec<(&str, String)>) -> Table {
        let mut t = Table::new(&["field", "value"]);
        t.rows = pairs
            .into_iter()
            .map(|(k, v)| vec![k.to_string(), v])
            .collect();
        t
    }
}

/// A console command that failed, with the SQLSTATE a client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConsoleError {
    pub code: &'static str,
    pub message: String,
}

impl ConsoleError {
    /// 42601: the command is not one the console knows, or its words are wrong.
    pub fn syntax(message: impl Into<String>) -> Self {
        ConsoleError {
            code: "42601",
            message: message.into(),
        }
    }
    /// 22023: an argument is not a valid value.
    pub fn argument(message: impl Into<String>) -> Self {
        ConsoleError {
            code: "22023",
            message: message.into(),
        }
    }
    /// 42704: the object named does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        ConsoleError {
            code: "42704",
            message: message.into(),
        }
    }
    /// F0000: the config file or keyring could not be loaded.
    pub fn config(message: impl Into<String>) -> Self {
        ConsoleError {
            code: "F0000",
            message: message.into(),
        }
    }
    /// 58030: an I/O error (the audit log could not be read).
    pub fn io(message: impl Into<String>) -> Self {
        ConsoleError {
            code: "58030",
            message: message.into(),
        }
    }
    /// 08P01: a protocol message the console does not accept.
    pub fn protocol(message: impl Into<String>) -> Self {
        ConsoleError {
            code: "08P01",
            message: message.into(),
        }
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.extend_from_slice(
            &ErrorReply::error(self.code, format!("stepgate console: {}", self.message)).to_bytes(),
        );
    }
}

fn put(out: &mut BytesMut, m: impl Message) {
    // Encoding into memory fails only for a message over pgwire's size limit; the console's are small.
    let _ = m.encode(out);
}

pub fn row_description(out: &mut BytesMut, columns: &[&str]) {
    if columns.is_empty() {
        put(out, NoData::new());
        return;
    }
    let fields = columns
        .iter()
        .map(|c| FieldDescription::new(c.to_string(), 0, 0, TEXT_OID, -1, -1, 0))
        .collect();
    put(out, RowDescription::new(fields));
}

/// The rows and the CommandComplete of a table (its RowDescription is written apart, when asked).
pub fn rows_and_tag(out: &mut BytesMut, t: &Table) {
    for r in &t.rows {
        let mut data = BytesMut::new();
        for v in r {
            data.extend_from_slice(&(v.len() as i32).to_be_bytes());
            data.extend_from_slice(v.as_bytes());
        }
        put(out, DataRow::new(data, r.len() as i16));
    }
    put(out, CommandComplete::new(t.tag.clone()));
}

pub fn empty_query(out: &mut BytesMut) {
    put(out, EmptyQueryResponse::new());
}

pub fn ready(out: &mut BytesMut) {
    put(out, ReadyForQuery::new(TransactionStatus::Idle));
}

pub fn parse_complete(out: &mut BytesMut) {
    put(out, ParseComplete::new());
}

pub fn bind_complete(out: &mut BytesMut) {
    put(out, BindComplete::new());
}

pub fn close_complete(out: &mut BytesMut) {
    put(out, CloseComplete::new());
}

/// A console statement takes no parameters.
pub fn no_parameters(out: &mut BytesMut) {
    put(out, ParameterDescription::new(Vec::new()));
}

/// AuthenticationOk.
pub fn authentication_ok() -> BytesMut {
    let mut out = BytesMut::new();
    put(&mut out, Authentication::Ok);
    out
}

/// What a console session starts with after the login: the parameters, a (never used) cancel key, ready.
pub fn greeting(parameters: &[(&str, &str)]) -> BytesMut {
    let mut out = BytesMut::new();
    for (k, v) in parameters {
        put(&mut out, ParameterStatus::new(k.to_string(), v.to_string()));
    }
    let pid = (rand::random::<u32>() >> 1) as i32;
    put(
        &mut out,
        BackendKeyData::new(pid, SecretKey::I32(rand::random())),
    );
    ready(&mut out);
    out
}
