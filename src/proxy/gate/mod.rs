//! The gate's view of one session, as a pure state machine: frontend messages in, backend messages in,
//! an [`Action`] out for each (forward the original bytes, or replace them).
//!
//! How a refusal keeps client and server in step (DESIGN.md "Holding and refusing"): a refused message is
//! replaced by one that makes the *server* fail at exactly that position with a harmless error of its own
//! ([`REFUSAL_SQL`], text that fails in PostgreSQL's parser, as a Query or as a Parse in place of a refused
//! Parse or Execute; a FunctionCall of OID 0), and that one ErrorResponse is rewritten into stepgate's.
//! Nothing a refusal sends names anything a client could create or see in advance (an earlier design sent
//! `EXECUTE stepgate_refused_<suffix>`: another session read the name in pg_stat_activity and PREPAREd a
//! DELETE under it), and a syntax error changes no session state. PostgreSQL then
//! does its own bookkeeping: a transaction block is aborted, an extended-protocol batch skips to Sync, and
//! responses arrive in order. A queue of expected responses tells which ErrorResponse is ours.
//!
//! Prepared statements and portals are tracked by name, and the maps change only when the server confirms
//! (ParseComplete, BindComplete, CloseComplete, CommandComplete of PREPARE/DEALLOCATE/DISCARD). A lookup made
//! before confirmation trusts what was sent earlier in the same batch (if that failed, the server skips the
//! rest of the batch); what is still pending from an earlier batch counts at its most dangerous.
//!
//! Layout: [`context`] is what sessions share; [`expect`] the expected-response queue and what it carries;
//! `names` resolves statement and portal names; `analyze` judges a query string (pure); `simple` handles
//! Query, `extended` Parse/Bind/Execute/Close/FunctionCall; `hold` records held entries and builds refusals;
//! `backend` reads the server's answers and `settle` confirms or gives back reserved token uses; `wait`
//! holds a query for an approval instead of refusing it (`on_hold = "wait"`), `waiting` is what such a wait
//! carries.

mod analyze;
mod backend;
pub mod context;
pub mod expect;
mod extended;
mod hold;
mod names;
mod refusal;
mod settle;
mod simple;
#[cfg(test)]
mod tests;
mod wait;
pub mod waiting;

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::classify::{Class, LexSettings};
use crate::config::Rule;
use crate::gate::SessionFields;
use crate::proxy::authz::{rejection, Reservation};
use crate::token::grant::TokenRef;
use crate::wire::frame::cstr;
use crate::wire::reply::ErrorReply;
pub use context::GateContext;
use expect::{Effect, Expect, StmtInfo};

/// The most replies a session may be waiting for before nothing more is read from its client (about 8 MB of
/// bookkeeping): a client that pipelines without reading is held back instead of growing stepgate.
pub const MAX_QUEUED: usize = 65_536;

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Forward,
    Replace(Vec<u8>),
    /// A Query held under `on_hold = "wait"`: nothing is sent; the client gets the NOTICE, and the message
    /// is decided again off the relay thread once an approval comes or the wait times out
    /// ([`SessionState::on_frontend_durably`] with [`SessionState::wait_round`]).
    Wait(Box<waiting::WaitStart>),
    /// A round of such a wait found no approval that covers the message yet: nothing changed.
    StillWaiting,
}

/// One session's gate state.
pub struct SessionState {
    pub session: SessionFields,
    rule: Rule,
    lex: LexSettings,
    /// Active stepgate settings (from startup, then SET/RESET as the server confirms them).
    pub stepgate: BTreeMap<String, String>,
    prepared: HashMap<Vec<u8>, StmtInfo>,
    portals: HashMap<Vec<u8>, StmtInfo>,
    queue: VecDeque<Expect>,
    batch: u64,
    skip_until_sync: bool,
    /// The server said CopyInResponse and the client has not ended the COPY yet: the server ignores the
    /// Syncs the client sends meanwhile, so they expect no answer.
    copy_in: bool,
    /// Transaction status from the last ReadyForQuery (`I`, `T` or `E`).
    pub txn_status: u8,
    /// `session_authorization` as the server reported it during the login.
    server_user: Option<String>,
    /// The login completed (the first ReadyForQuery).
    login_done: bool,
    /// Policy generation `rule` was chosen under; a reload makes the session choose again.
    generation: u64,
    /// The session's verified token.
    token: Option<TokenRef>,
    /// A token from the startup packet, verified once the upstream accepted the login.
    startup_token: Option<String>,
    /// Reservations of portals suspended by a row limit: their later Executes are the same use.
    suspended: HashMap<Vec<u8>, Vec<Reservation>>,
    /// Authorized statements that ran in the current transaction: committed or rolled back at its end.
    outcome_pending: Vec<Reservation>,
    /// The current transaction failed or was rolled back (its authorized statements are undone).
    txn_failed: bool,
    /// The current transaction set a savepoint (a ROLLBACK may have been to it).
    txn_savepoint: bool,
    /// The session is inside an explicit transaction block (BEGIN seen, or the server said `T`/`E`).
    txn_in_block: bool,
    /// The session's tracing span (current when the state was made). The relay does not enter it on every
    /// wake-up (that would cost more than the gate's fast path): the paths that log or write audit records
    /// enter it themselves (`let _log = self.span.enter()`), so every log line still names its session.
    span: tracing::Span,
    /// While a message is decided on a judge thread ([`SessionState::on_frontend_durably`]): the
    /// `authorized` records its decision needs, written there before the message is forwarded.
    deferred: Option<Vec<crate::audit::AuditEvent>>,
    /// Set for one decision of a Query that waits for an approval ([`SessionState::wait_round`]).
    waiting: Option<waiting::Waiting>,
    /// For the next refusal under `on_hold = "wait"`: the held entry it reuses (after a wait) and what to
    /// add to its message (why it waited no longer, or did not wait).
    reuse_held: Option<(Option<String>, String)>,
}

impl SessionState {
    pub fn new(
        session: SessionFields,
        rule: Rule,
        startup_settings: Vec<(String, String)>,
    ) -> SessionState {
        let mut stepgate: BTreeMap<String, String> = startup_settings.into_iter().collect();
        let startup_token = stepgate.remove("stepgate.token");
        SessionState {
            session,
            rule,
            lex: LexSettings::default(),
            stepgate,
            token: None,
            startup_token,
            suspended: HashMap::new(),
            outcome_pending: Vec::new(),
            txn_failed: false,
            txn_savepoint: false,
            txn_in_block: false,
            generation: 0,
            prepared: HashMap::new(),
            portals: HashMap::new(),
            queue: VecDeque::new(),
            batch: 0,
            skip_until_sync: false,
            copy_in: false,
            txn_status: b'I',
            server_user: None,
            login_done: false,
            span: tracing::Span::current(),
            deferred: None,
            waiting: None,
            reuse_held: None,
        }
    }

    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// Called when the upstream has accepted the login: verifies a token from the startup packet. An error
    /// is the FATAL to send before closing the session.
    pub fn on_login(&mut self, ctx: &GateContext) -> Result<(), ErrorReply> {
        // The console, the rule, a token's user line and the audit all use the user stepgate read from the
        // startup packet; the server's own report must agree, or the session does not go on.
        self.login_done = true;
        if let Some(server_user) = self.server_user.take() {
            if server_user != self.session.user {
                let _log = self.span.enter();
                tracing::warn!(server_user = %server_user, user = %self.session.user, "the server logged in another user than the startup packet names");
                return Err(ErrorReply::fatal(
                    "28000",
                    format!(
                        "stepgate: the server logged in \"{server_user}\", not the user the startup packet names (\"{}\")",
                        self.session.user
                    ),
                ));
            }
        }
        let Some(raw) = self.startup_token.take() else {
            return Ok(());
        };
        let _log = self.span.enter();
        match ctx.verify_token(raw.as_bytes(), &self.session, &self.rule) {
            Ok(tok) => {
                if !ctx.record_token_set(&self.session, &tok) {
                    return Err(ErrorReply::fatal(
                        "58030",
                        "stepgate: audit log unavailable; the token in the startup packet was refused",
                    ));
                }
                self.stepgate
                    .insert("stepgate.token".into(), tok.id().to_string());
                self.token = Some(tok);
                Ok(())
            }
            Err(reason) => Err(rejection(&reason, true)),
        }
    }

    /// The session's active token, if any.
    pub fn token(&self) -> Option<&TokenRef> {
        self.token.as_ref()
    }

    /// Frontend message tags the gate must see whole.
    pub fn inspects_frontend(tag: u8) -> bool {
        matches!(
            tag,
            b'Q' | b'P' | b'B' | b'E' | b'C' | b'S' | b'F' | b'c' | b'f' | b'D'
        )
    }

    /// How many server replies the session still expects (ParseComplete, ReadyForQuery, …): zero once the
    /// server has answered everything sent. For tests that hold the model against a real server.
    pub fn expected_replies(&self) -> usize {
        self.queue
            .iter()
            .filter(|e| !matches!(e, Expect::CopyEnd))
            .count()
    }

    /// Entries of the expected-reply queue: what a client that pipelines without reading makes grow. The
    /// relays stop reading from the client at [`MAX_QUEUED`] until the server's replies bring it down.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Backend message tags the gate must see whole.
    pub fn inspects_backend(tag: u8) -> bool {
        matches!(
            tag,
            b'1' | b'2' | b'3' | b'C' | b'I' | b's' | b'E' | b'Z' | b'S' | b'G' | b'T' | b'n'
        )
    }

    // ---- frontend -------------------------------------------------------------------------------

    /// For a Query or Parse whose SQL is large and whose verdict is not cached: the work that judges it
    /// (filling the cache), to run on a judge thread with the same message before it is fed again (see
    /// [`super::judge`]). None when the message can be judged here at once.
    pub fn offload(
        &self,
        ctx: &std::sync::Arc<GateContext>,
        tag: u8,
        msg: &[u8],
    ) -> Option<super::judge::MessageWork> {
        if ctx.disabled {
            return None;
        }
        let sql = message_sql(tag, msg)?;
        if sql.len() < super::judge::OFFLOAD_BYTES
            || ctx.cache.is_cached(sql, &self.lex, ctx.generation)
        {
            return None;
        }
        let (ctx, lex) = (ctx.clone(), self.lex.clone());
        Some(Box::new(move |msg: &[u8]| {
            if let Some(sql) = message_sql(tag, msg) {
                ctx.cache.lookup(sql, &lex, ctx.generation);
            }
        }))
    }

    /// Whether deciding this message may need an fsync'd `authorized` record: a Query or Execute of a guarded
    /// statement in a session that has a token, or a Query that sets one. Such a message is decided on a
    /// judge thread ([`SessionState::on_frontend_durably`]) so the fsync never stalls the relay thread and
    /// the other sessions on it. A cheap over-approximation: what it misses is decided here as before.
    pub fn needs_durable_write(&self, ctx: &GateContext, tag: u8, msg: &[u8]) -> bool {
        if ctx.disabled || ctx.audit.is_none() || self.skip_until_sync {
            return false;
        }
        let body = msg.get(5..).unwrap_or(&[]);
        match tag {
            b'Q' => {
                let bytes = body.strip_suffix(&[0]).unwrap_or(body);
                // A string that names stepgate may set a token (`SET stepgate.token`, spelled exactly so),
                // whose fsync'd `token_set` record is written when it is judged: decided there, whether or
                // not it runs anything guarded. Without a token nothing else can be authorized.
                if bytes
                    .windows(8)
                    .any(|w| w.eq_ignore_ascii_case(b"stepgate"))
                {
                    return true;
                }
                if self.token.is_none() && ctx.approvals.is_empty() {
                    return false;
                }
                let entry = ctx.cache.lookup(bytes, &self.lex, ctx.generation);
                self.guarded(ctx, entry.max)
            }
            b'E' => {
                (self.token.is_some() || !ctx.approvals.is_empty())
                    && cstr(body).is_some_and(|(portal, _)| {
                        let portal = crate::classify::session_cmd::protocol_name(portal);
                        self.guarded(ctx, self.lookup_portal(&portal).class)
                    })
            }
            _ => false,
        }
    }

    /// Decides a message whose decision may need fsync'd evidence, on a judge thread: the decision is made
    /// under the session's lock with its `authorized` records held back, then the records are written and
    /// fsync'd without the lock (the relay thread keeps serving this session's server replies and the other
    /// sessions), and only then is the action returned for the relay to forward. If the records cannot be
    /// written, the uses are given back and the message is refused (58030), as on the relay thread.
    ///
    /// While the records are written, the message's expected reply is kept out of the queue — the server has
    /// not seen the message — so a server reply that arrives meanwhile (an error that makes the server skip
    /// to Sync) is matched against what was really sent; it is queued after the write, or, if the server
    /// will now skip the message, its uses are given back then (`released` after `authorized`).
    pub fn on_frontend_durably(
        state: &std::sync::Mutex<SessionState>,
        ctx: &GateContext,
        tag: u8,
        msg: &[u8],
    ) -> Action {
        let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
        let (action, records, entry) = {
            let mut s = lock();
            s.deferred = Some(Vec::new());
            let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                s.on_frontend(ctx, tag, msg)
            }));
            // Never left set: a later decision on the relay thread must write its own records.
            let records = s.deferred.take().unwrap_or_default();
            let action = match decided {
                Ok(action) => action,
                Err(panic) => {
                    // A bug: nothing is forwarded; what this message reserved stays spent (no replay).
                    drop(s);
                    std::panic::resume_unwind(panic)
                }
            };
            if records.is_empty() {
                return action;
            }
            // Records were deferred only by this message's reservation, made with its entry queued last.
            let entry = s.queue.pop_back();
            (action, records, entry)
        };
        let written = ctx.write_durably(&records);
        let mut s = lock();
        let Some(mut entry) = entry else {
            // Not queued as expected (cannot happen): forward nothing.
            return Action::Replace(crate::wire::build::query(refusal::REFUSAL_SQL));
        };
        if s.skip_until_sync {
            // The server now skips this message (an earlier one failed meanwhile): nothing will answer it,
            // so it is not queued. Recorded: its uses are given back (`released` after `authorized`); not
            // recorded: given back and the message refused all the same.
            if written {
                s.abandon(ctx, entry, "skipped by the server until Sync");
                return action;
            }
            return s.refuse_unrecorded(ctx, &mut entry);
        }
        if !written {
            let action = s.refuse_unrecorded(ctx, &mut entry);
            s.queue.push_back(entry);
            return action;
        }
        s.queue.push_back(entry);
        action
    }

    /// The `authorized` records of a message could not be written: its uses are given back and it is
    /// refused instead of forwarded.
    fn refuse_unrecorded(&mut self, ctx: &GateContext, entry: &mut Expect) -> Action {
        let _log = self.span.enter();
        tracing::error!("audit log unavailable: guarded statement refused");
        let refusal = refusal::audit_unavailable();
        match entry {
            Expect::Execute {
                refused,
                reservations,
                effect,
                ..
            } => {
                ctx.unreserve(reservations);
                reservations.clear();
                *effect = Effect::None;
                *refused = Some(refusal);
                Action::Replace(crate::wire::build::parse(
                    refusal::REFUSAL_STATEMENT,
                    refusal::REFUSAL_SQL,
                ))
            }
            Expect::Query {
                refused,
                reservations,
                effects,
                ..
            } => {
                ctx.unreserve(reservations);
                reservations.clear();
                effects.clear();
                *refused = Some(refusal);
                Action::Replace(crate::wire::build::query(refusal::REFUSAL_SQL))
            }
            // Only a Query or an Execute reserves uses.
            _ => Action::Replace(crate::wire::build::query(refusal::REFUSAL_SQL)),
        }
    }

    pub fn on_frontend(&mut self, ctx: &GateContext, tag: u8, msg: &[u8]) -> Action {
        if ctx.generation != self.generation {
            if self.generation != 0 {
                self.rule = ctx
                    .config
                    .rule_for(&self.session.database, &self.session.user);
            }
            self.generation = ctx.generation;
        }
        let body = msg.get(5..).unwrap_or(&[]);
        match tag {
            // After an error in an extended-protocol message the server skips everything up to Sync, Query
            // and FunctionCall included. They are still judged (a refusal replaces them as usual), but no
            // reply will come, so nothing is left expected and what was reserved is given back.
            b'Q' | b'F' if self.skip_until_sync => {
                let before = self.queue.len();
                let action = if tag == b'Q' {
                    self.on_query(ctx, body)
                } else {
                    self.on_function_call(ctx, body)
                };
                while self.queue.len() > before {
                    if let Some(e) = self.queue.pop_back() {
                        self.abandon(ctx, e, "skipped by the server until Sync");
                    }
                }
                action
            }
            b'Q' => self.on_query(ctx, body),
            // In copy-in mode the server ignores Sync (and Flush): no answer will come.
            b'S' if self.copy_in => Action::Forward,
            b'S' => {
                self.queue.push_back(Expect::Sync);
                self.batch += 1;
                self.skip_until_sync = false;
                Action::Forward
            }
            _ if self.skip_until_sync => Action::Forward,
            b'D' => {
                self.queue.push_back(Expect::Describe);
                Action::Forward
            }
            b'P' => self.on_parse(ctx, body),
            b'B' => self.on_bind(body),
            b'E' => self.on_execute(ctx, body),
            b'C' => self.on_close(body),
            b'F' => self.on_function_call(ctx, body),
            b'c' | b'f' => {
                // CopyDone/CopyFail: whether the server was copying in (and so ignored the Syncs sent since
                // the COPY began) is known only from its answer; outside COPY it ignores these messages.
                if std::mem::take(&mut self.copy_in) {
                    return Action::Forward;
                }
                self.queue.push_back(Expect::CopyEnd);
                Action::Forward
            }
            _ => Action::Forward,
        }
    }

    fn guarded(&self, ctx: &GateContext, class: Class) -> bool {
        ctx.config.is_guarded(&self.rule, class)
    }

    /// A Query message is its own batch: its responses end with ReadyForQuery.
    fn expect_query(
        &mut self,
        effects: Vec<Effect>,
        refused: Option<ErrorReply>,
        reservations: Vec<Reservation>,
    ) {
        self.queue.push_back(Expect::Query {
            effects,
            done: 0,
            refused,
            reservations,
        });
        self.batch += 1;
    }
}

/// The SQL of a whole Query or Parse message.
fn message_sql(tag: u8, msg: &[u8]) -> Option<&[u8]> {
    let body = msg.get(5..)?;
    match tag {
        b'Q' => Some(body.strip_suffix(&[0]).unwrap_or(body)),
        b'P' => Some(cstr(cstr(body)?.1)?.0),
        _ => None,
    }
}
