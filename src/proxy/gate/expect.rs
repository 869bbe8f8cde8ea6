//! What the gate remembers between a message and the server's answer to it: what a prepared statement or
//! portal would run ([`StmtInfo`]), what a statement changes in the session once confirmed ([`Effect`]), and the
//! queue of expected responses ([`Expect`]), in the order the server will answer.

use crate::classify::Class;
use crate::proxy::authz::Reservation;
use crate::token::grant::TokenRef;
use crate::wire::reply::ErrorReply;

/// What a prepared statement or portal would run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StmtInfo {
    pub class: Class,
    /// (fingerprint, SQL) of each statement, for held entries and authorization.
    pub statements: Vec<(String, String)>,
    /// What its successful execution changes in the session.
    pub effect: Effect,
    /// A SQL FETCH/MOVE: the portal it runs, judged when it executes (the portal may be bound later).
    pub fetches: Option<Vec<u8>>,
}

impl StmtInfo {
    pub fn unknown(what: &str) -> StmtInfo {
        StmtInfo {
            class: Class::Unparsed,
            statements: vec![(crate::audit::hash_line(what.as_bytes()), what.to_string())],
            effect: Effect::None,
            fetches: None,
        }
    }
}

/// A change to the session that takes effect when the server confirms the statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    None,
    SetStepgate {
        name: String,
        value: String,
        /// For `stepgate.token`: the verified token that becomes active.
        token: Option<TokenRef>,
    },
    /// `RESET stepgate.<name>`, or every stepgate setting for `RESET ALL`.
    ResetStepgate(Option<String>),
    /// DISCARD ALL: prepared statements, portals and stepgate settings are gone.
    DiscardAll,
    Deallocate(Option<Vec<u8>>),
    Prepare {
        name: Vec<u8>,
        info: Box<StmtInfo>,
    },
}

#[derive(Debug)]
pub(super) enum Expect {
    Query {
        effects: Vec<Effect>,
        done: usize,
        refused: Option<ErrorReply>,
        reservations: Vec<Reservation>,
    },
    Parse {
        batch: u64,
        name: Vec<u8>,
        info: StmtInfo,
        refused: Option<ErrorReply>,
    },
    Bind {
        batch: u64,
        portal: Vec<u8>,
        info: StmtInfo,
    },
    Execute {
        effect: Effect,
        refused: Option<ErrorReply>,
        portal: Vec<u8>,
        reservations: Vec<Reservation>,
    },
    Close {
        batch: u64,
        kind: u8,
        name: Vec<u8>,
    },
    Sync,
    /// Describe: answered by RowDescription or NoData (a statement's ParameterDescription comes first).
    Describe,
    FunctionCall {
        refused: Option<ErrorReply>,
    },
    /// Where the client ended a COPY (CopyDone/CopyFail). No response: if the server turns out to have
    /// been in copy-in mode (a CopyInResponse arrives for the statement before it), the Syncs between that
    /// statement and this marker were ignored by the server and are dropped; otherwise the marker is.
    CopyEnd,
}
