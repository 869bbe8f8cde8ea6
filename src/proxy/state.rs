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

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::authz::{rejection, Denied, Grant, Reservation};
use crate::audit::AuditLog;
use crate::classify::cache::CachedClassifier;
use crate::classify::lex::{Kind, Token};
use crate::classify::{decode, split, Class, LexSettings};
use crate::config::{Config, Rule};
use crate::gate::{decide, Decision, HeldStatus, Mode, Registry, SessionFields};
use crate::metrics::Outcome;
use crate::token::grant::TokenRef;
use crate::token::{Ledger, Policy};
use crate::wire::build::{self, message};
use crate::wire::frame::cstr;
use crate::wire::reply::{error_fields, ErrorReply};

/// What the server receives in place of a refused statement: it fails in PostgreSQL's parser (a syntax
/// error at "stepgate") whatever the session's state, so it runs nothing and can be planted by nobody.
pub const REFUSAL_SQL: &[u8] = b"stepgate refused this statement";
/// The statement name of the Parse sent in place of a refused Execute; never stored (the parse fails first).
const REFUSAL_STATEMENT: &[u8] = b"stepgate_refusal";
use std::sync::Arc;

/// Shared by every session of a server.
pub struct GateContext {
    pub config: Config,
    pub cache: CachedClassifier,
    pub registry: Arc<Registry>,
    pub mode: Mode,
    /// `serve --unsafe-no-gate`: nothing is classified or held (for measuring the gate's cost).
    pub disabled: bool,
    /// Policy generation, part of every cache key.
    pub generation: u64,
    /// Keyring and signers tokens are verified against.
    pub policy: Policy,
    /// Spent token uses, shared by every session (and kept across reloads).
    pub ledger: Arc<Ledger>,
    /// Where token events are recorded (None only in unit tests).
    pub audit: Option<Arc<AuditLog>>,
    /// Counters for `/metrics`, kept across reloads.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl GateContext {
    pub fn new(config: Config, registry: Registry, disabled: bool) -> GateContext {
        Self::with_registry(config, Arc::new(registry), disabled)
    }

    /// A context sharing an existing registry (a reload keeps what was held).
    pub fn with_registry(config: Config, registry: Arc<Registry>, disabled: bool) -> GateContext {
        let classifier = config.classifier();
        GateContext {
            mode: config.mode,
            config,
            cache: CachedClassifier::new(classifier, 50_000),
            registry,
            disabled,
            generation: 1,
            policy: Policy::default(),
            ledger: Arc::new(Ledger::default()),
            audit: None,
            metrics: Arc::default(),
        }
    }

    /// Adds the token policy, the ledger of spent uses and the audit log.
    pub fn with_tokens(
        mut self,
        policy: Policy,
        ledger: Arc<Ledger>,
        audit: Arc<AuditLog>,
    ) -> Self {
        self.policy = policy;
        self.ledger = ledger;
        self.audit = Some(audit);
        self
    }
}

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
    fn unknown(what: &str) -> StmtInfo {
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
enum Expect {
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

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Forward,
    Replace(Vec<u8>),
}

/// libpq's large-object fast-path functions (built-in OIDs), allowed over FunctionCall. lo_unlink (964) is
/// not among them.
const LARGE_OBJECT_OIDS: &[u32] = &[
    952,  // lo_open
    953,  // lo_close
    954,  // loread
    955,  // lowrite
    956,  // lo_lseek
    3170, // lo_lseek64
    958,  // lo_tell
    3171, // lo_tell64
    957,  // lo_creat
    715,  // lo_create
    1004, // lo_truncate
    3172, // lo_truncate64
];

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
    /// The session's tracing span (current when the state was made). The relay does not enter it on every
    /// wake-up (that would cost more than the gate's fast path): the paths that log or write audit records
    /// enter it themselves (`let _log = self.span.enter()`), so every log line still names its session.
    span: tracing::Span,
}

/// The metrics outcome of a decision.
fn outcome(decision: Decision, reservations: &[Reservation]) -> Outcome {
    match decision {
        Decision::Refuse => Outcome::Held,
        Decision::Observe => Outcome::Observed,
        Decision::Pass if reservations.is_empty() => Outcome::Pass,
        Decision::Pass => Outcome::Authorized,
    }
}

/// Why a message is refused outright, before any decision.
pub(crate) enum Refused {
    /// It names a stepgate setting in a way that is not accepted.
    Mention,
    /// It cannot be judged: held as this.
    Hold(Box<StmtInfo>),
    /// `SET stepgate.token` with a token that does not verify.
    Token(ErrorReply),
}

/// What [`SessionState::analyze`] finds in a query string.
pub(crate) struct Analysis {
    info: StmtInfo,
    /// Why the most dangerous statement got its class (`DELETE without WHERE`, PostgreSQL's syntax error).
    reason: Option<String>,
    effects: Vec<Effect>,
    rewritten: Option<String>,
    grants: Vec<Grant>,
}

/// Text safe to put inside a single-quoted literal we build ourselves.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " =;:,*+._-/".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What a statement is to the gate, beyond its class.
enum Kind2 {
    Plain,
    /// Names a stepgate setting in a form that is not accepted: refused, never forwarded.
    Mention,
    Set {
        name: String,
        value: String,
    },
    Reset(Option<String>),
    ShowStatus,
    Prepare {
        name: Vec<u8>,
        inner_start: usize,
    },
    Execute {
        name: Vec<u8>,
    },
    Deallocate(Option<Vec<u8>>),
    DiscardAll,
}

fn ident_bytes(t: &Token<'_>) -> Option<Vec<u8>> {
    t.ident().map(sql_name)
}

/// PostgreSQL's NAMEDATALEN - 1: the longest name it stores.
const MAX_NAME: usize = 63;

/// A statement or portal name from the protocol as PostgreSQL stores it: its hash tables keep the first
/// NAMEDATALEN - 1 bytes, so `<63 x's>zzz` and `<63 x's>` are one name.
fn protocol_name(name: &[u8]) -> Vec<u8> {
    name[..name.len().min(MAX_NAME)].to_vec()
}

/// A name written in SQL as PostgreSQL stores it: its scanner cuts an identifier to at most NAMEDATALEN - 1
/// bytes at a character boundary.
fn sql_name(name: String) -> Vec<u8> {
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.as_bytes()[..end].to_vec()
}

/// Classifies a statement's role from its significant tokens.
fn kind_of(tokens: &[Token<'_>]) -> Kind2 {
    let w = |i: usize, kw: &str| tokens.get(i).is_some_and(|t| t.is_word(kw));
    let exact_stepgate = |i: usize| {
        tokens
            .get(i)
            .is_some_and(|t| t.kind == Kind::Word && t.text == "stepgate")
            && tokens.get(i + 1).is_some_and(|t| t.text == ".")
            && tokens.get(i + 2).is_some_and(|t| t.kind == Kind::Word)
    };
    let setting_name = |i: usize| format!("stepgate.{}", tokens[i + 2].text.to_ascii_lowercase());
    // SET stepgate.<name> = <value> | TO <value>
    if w(0, "set")
        && exact_stepgate(1)
        && tokens.len() == 6
        && (tokens[4].text == "=" || tokens[4].is_word("to"))
    {
        let v = &tokens[5];
        let value = match v.kind {
            Kind::String if v.text.starts_with('\'') => {
                Some(v.text[1..v.text.len() - 1].replace("''", "'"))
            }
            Kind::Word | Kind::Number => Some(v.text.to_string()),
            _ => None,
        };
        if let Some(value) = value {
            return Kind2::Set {
                name: setting_name(1),
                value,
            };
        }
        return Kind2::Mention;
    }
    if w(0, "reset") && tokens.len() == 2 && w(1, "all") {
        return Kind2::Reset(None);
    }
    if w(0, "reset") && exact_stepgate(1) && tokens.len() == 4 {
        return Kind2::Reset(Some(setting_name(1)));
    }
    if w(0, "show") && exact_stepgate(1) && tokens.len() == 4 {
        if tokens[3].is_word("status") {
            return Kind2::ShowStatus;
        }
        return Kind2::Plain;
    }
    if crate::classify::needs_attention(tokens) && mentions(tokens) {
        return Kind2::Mention;
    }
    if w(0, "prepare") && tokens.len() > 3 && !w(1, "transaction") {
        if let (Some(name), Some(as_at)) = (
            ident_bytes(&tokens[1]),
            tokens.iter().position(|t| t.is_word("as")),
        ) {
            if as_at + 1 < tokens.len() {
                return Kind2::Prepare {
                    name,
                    inner_start: as_at + 1,
                };
            }
        }
        return Kind2::Plain;
    }
    if w(0, "execute") && tokens.len() >= 2 {
        if let Some(name) = ident_bytes(&tokens[1]) {
            return Kind2::Execute { name };
        }
    }
    if w(0, "deallocate") {
        let i = if w(1, "prepare") { 2 } else { 1 };
        if w(i, "all") && tokens.len() == i + 1 {
            return Kind2::Deallocate(None);
        }
        if let Some(name) = tokens.get(i).and_then(ident_bytes) {
            if tokens.len() == i + 1 {
                return Kind2::Deallocate(Some(name));
            }
        }
        return Kind2::Plain;
    }
    if w(0, "discard") && w(1, "all") && tokens.len() == 2 {
        return Kind2::DiscardAll;
    }
    Kind2::Plain
}

/// A mention of a stepgate setting anywhere in the statement.
fn mentions(tokens: &[Token<'_>]) -> bool {
    tokens.iter().enumerate().any(|(i, t)| {
        (matches!(t.kind, Kind::Word | Kind::QuotedIdent)
            && t.ident()
                .is_some_and(|n| n.eq_ignore_ascii_case("stepgate"))
            && tokens.get(i + 1).is_some_and(|n| n.text == "."))
            || (matches!(t.kind, Kind::String | Kind::QuotedIdent)
                && crate::classify::mentions_stepgate_text(t.text))
    })
}

/// `SHOW stepgate.<name>` exactly as written.
fn plain_show_stepgate(tokens: &[Token<'_>]) -> bool {
    tokens.len() == 4
        && tokens[0].is_word("show")
        && tokens[1].kind == Kind::Word
        && tokens[1].text.eq_ignore_ascii_case("stepgate")
        && tokens[2].text == "."
        && tokens[3].kind == Kind::Word
}

/// `… EXECUTE name …` inside another statement (EXPLAIN ANALYZE EXECUTE p, CREATE TABLE … AS EXECUTE p).
fn embedded_execute(tokens: &[Token<'_>]) -> Option<Vec<u8>> {
    tokens.windows(2).find_map(|p| {
        (p[0].is_word("execute") && !p[1].is_word("function") && !p[1].is_word("procedure"))
            .then(|| ident_bytes(&p[1]))
            .flatten()
    })
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
                ctx.token_activated(&self.session, &tok);
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

    /// Backend message tags the gate must see whole.
    pub fn inspects_backend(tag: u8) -> bool {
        matches!(
            tag,
            b'1' | b'2' | b'3' | b'C' | b'I' | b's' | b'E' | b'Z' | b'S' | b'G' | b'T' | b'n'
        )
    }

    // ---- frontend -------------------------------------------------------------------------------

    /// For a Query or Parse whose SQL is large and whose verdict is not cached: the work that judges it
    /// (filling the cache), to run on a judge thread before the message is fed again (see
    /// [`super::judge`]). None when the message can be judged here at once.
    pub fn offload(
        &self,
        ctx: &std::sync::Arc<GateContext>,
        tag: u8,
        msg: &[u8],
    ) -> Option<super::judge::Job> {
        if ctx.disabled {
            return None;
        }
        let body = msg.get(5..)?;
        let sql = match tag {
            b'Q' => body.strip_suffix(&[0]).unwrap_or(body),
            b'P' => cstr(cstr(body)?.1)?.0,
            _ => return None,
        };
        if sql.len() < super::judge::OFFLOAD_BYTES
            || ctx.cache.is_cached(sql, &self.lex, ctx.generation)
        {
            return None;
        }
        let (ctx, sql, lex) = (ctx.clone(), sql.to_vec(), self.lex.clone());
        Some(Box::new(move || {
            ctx.cache.lookup(&sql, &lex, ctx.generation);
        }))
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
            b'C' => {
                if let Some(name) = body.get(1..).and_then(cstr).map(|(n, _)| protocol_name(n)) {
                    self.queue.push_back(Expect::Close {
                        batch: self.batch,
                        kind: body[0],
                        name,
                    });
                }
                Action::Forward
            }
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

    /// Records a held/observed entry; returns the error to send for a refusal.
    fn hold(
        &self,
        ctx: &GateContext,
        sql: &str,
        info: &StmtInfo,
        status: HeldStatus,
        denied: Option<&Denied>,
        because: Option<&str>,
    ) -> ErrorReply {
        if let Some(Denied::AuditUnavailable) = denied {
            return Self::audit_unavailable();
        }
        let _log = self.span.enter();
        let why = denied.and_then(Denied::describe);
        let statements = if info.statements.is_empty() {
            vec![(String::new(), sql.to_string())]
        } else {
            info.statements.clone()
        };
        let mut reason = format!(
            "{} is guarded for database {:?}, user {:?}",
            info.class, self.session.database, self.session.user
        );
        if let Some(why) = &why {
            reason = format!("{reason}; {why}");
        }
        match ctx
            .registry
            .record(&self.session, sql, statements, info.class, &reason, status)
        {
            Ok(entry) => {
                let fps: Vec<&str> = entry
                    .fingerprints
                    .iter()
                    .map(String::as_str)
                    .filter(|f| !f.is_empty())
                    .collect();
                if status == HeldStatus::Observed {
                    tracing::warn!(held_id = %entry.id, class = %info.class, user = %self.session.user, database = %self.session.database, sql = %entry.sql, "would hold (observe mode)");
                } else {
                    tracing::warn!(held_id = %entry.id, class = %info.class, user = %self.session.user, database = %self.session.database, sql = %entry.sql, "statement held");
                }
                // A statement PostgreSQL cannot parse reads like the typo it usually is.
                let message = match because.and_then(|b| b.strip_prefix("PostgreSQL: ")) {
                    Some(parser) if info.class == Class::Unparsed => {
                        format!("stepgate: statement held ({}): {parser}", info.class)
                    }
                    _ => format!("stepgate: statement held ({})", info.class),
                };
                ErrorReply::error("42501", message)
                    .with_detail(format!(
                        "held id {}; fingerprint {}{}{}",
                        entry.id,
                        if fps.is_empty() { "(none)".to_string() } else { fps.join(", ") },
                        because.map(|b| format!("; {b}")).unwrap_or_default(),
                        why.as_deref().map(|w| format!("; {w}")).unwrap_or_default()
                    ))
                    .with_hint(format!(
                        "stepgate token new --held {id} | gpg --clearsign, then SET stepgate.token (or SHOW HELD {id} in the stepgate console)",
                        id = entry.id
                    ))
            }
            Err(e) => {
                ctx.metrics
                    .audit_write_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %e, "audit log unavailable: guarded statement refused");
                Self::audit_unavailable()
            }
        }
    }

    fn audit_unavailable() -> ErrorReply {
        ErrorReply::error(
            "58030",
            "stepgate: audit log unavailable; guarded statement refused",
        )
    }

    fn mention_refusal(&self) -> ErrorReply {
        let _log = self.span.enter();
        tracing::warn!("refused a statement that names a stepgate setting");
        ErrorReply::error("42501", "stepgate: statement refused: it names a stepgate setting")
            .with_detail("stepgate settings are changed only with SET stepgate.<name> = '…', RESET stepgate.<name> and SHOW stepgate.<name>; other spellings never reach the server")
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

    fn refuse_query(&mut self, refusal: ErrorReply) -> Action {
        self.expect_query(Vec::new(), Some(refusal), Vec::new());
        Action::Replace(build::query(REFUSAL_SQL))
    }

    fn status_text(&self, ctx: &GateContext, settings: &[String]) -> String {
        let guard: Vec<&str> = self.rule.guard.iter().map(|c| c.as_str()).collect();
        let mut settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        settings.sort();
        sanitize(&format!(
            "mode={}; rule=database:{},user:{},guard:{},signatures:{}; unparsed_guarded={}; settings={}; {}",
            ctx.mode.as_str(),
            self.rule.database,
            self.rule.user,
            if guard.is_empty() { "-".to_string() } else { guard.join("+") },
            self.rule.signatures,
            !ctx.config.allow_unparsed,
            if settings.is_empty() { "-".to_string() } else { settings.join("+") },
            match &self.token {
                None => "token=none".to_string(),
                Some(t) => format!(
                    "token={}; signers={}; not_after={}; statements={}",
                    t.id(),
                    t.auth.signers.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join("+"),
                    humantime::format_rfc3339_seconds(t.auth.payload.not_after),
                    t.auth.payload.statements.len()
                ),
            }
        ))
    }

    /// What a statement name means right now (see the module docs for pending names).
    fn lookup_statement(
        &self,
        name: &[u8],
        local: &HashMap<Vec<u8>, Option<StmtInfo>>,
    ) -> StmtInfo {
        if let Some(v) = local.get(name) {
            return v
                .clone()
                .unwrap_or_else(|| StmtInfo::unknown("a deallocated prepared statement"));
        }
        let mut pending: Vec<(Option<u64>, Option<&StmtInfo>)> = Vec::new();
        for e in &self.queue {
            match e {
                Expect::Parse {
                    batch,
                    name: n,
                    info,
                    refused: None,
                } if n == name => pending.push((Some(*batch), Some(info))),
                Expect::Close {
                    batch,
                    kind: b'S',
                    name: n,
                } if n == name => pending.push((Some(*batch), None)),
                // SQL PREPARE/DEALLOCATE in a query string still running: never of the current batch.
                Expect::Query { effects, .. } => {
                    for eff in effects {
                        match eff {
                            Effect::Prepare { name: n, info } if n == name => {
                                pending.push((None, Some(info)))
                            }
                            Effect::Deallocate(Some(n)) if n == name => pending.push((None, None)),
                            Effect::Deallocate(None) | Effect::DiscardAll => {
                                pending.push((None, None))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        self.resolve(pending, self.prepared.get(name), "prepared statement", name)
    }

    fn lookup_portal(&self, name: &[u8]) -> StmtInfo {
        let pending = self
            .queue
            .iter()
            .filter_map(|e| match e {
                Expect::Bind {
                    batch,
                    portal,
                    info,
                } if portal == name => Some((Some(*batch), Some(info))),
                Expect::Close {
                    batch,
                    kind: b'P',
                    name: n,
                } if n == name => Some((Some(*batch), None)),
                _ => None,
            })
            .collect();
        self.resolve(pending, self.portals.get(name), "portal", name)
    }

    /// Combines what is pending for a name with what the server confirmed. The latest record of the current
    /// batch decides (if it failed, the server skips the rest of the batch); records of earlier batches are
    /// not settled yet, so the most dangerous of them and the confirmed value counts. `None` records are
    /// removals (Close, DEALLOCATE): the name would be unknown.
    fn resolve(
        &self,
        pending: Vec<(Option<u64>, Option<&StmtInfo>)>,
        confirmed: Option<&StmtInfo>,
        what: &str,
        name: &[u8],
    ) -> StmtInfo {
        let unknown = || {
            StmtInfo::unknown(&format!(
                "unknown {what} {:?}",
                String::from_utf8_lossy(name)
            ))
        };
        if let Some((_, rec)) = pending.iter().rev().find(|(b, _)| *b == Some(self.batch)) {
            return rec.cloned().unwrap_or_else(unknown);
        }
        if pending.is_empty() {
            return confirmed.cloned().unwrap_or_else(unknown);
        }
        pending
            .iter()
            .map(|(_, r)| *r)
            .chain([confirmed])
            .map(|r| r.cloned().unwrap_or_else(unknown))
            .max_by_key(|i| i.class)
            .unwrap_or_else(unknown)
    }

    /// Judges the statements of a query string. Returns (info of the whole message, effects per statement,
    /// rewritten SQL if a stepgate statement had to be rewritten), or the refusal to send.
    fn analyze(
        &self,
        ctx: &GateContext,
        bytes: &[u8],
        local: &mut HashMap<Vec<u8>, Option<StmtInfo>>,
    ) -> Result<Analysis, Refused> {
        let unparsed = |what: &str| {
            Refused::Hold(Box::new(StmtInfo {
                class: Class::Unparsed,
                statements: vec![(String::new(), what.to_string())],
                effect: Effect::None,
                fetches: None,
            }))
        };
        let text =
            decode(bytes, &self.lex).map_err(|e| unparsed(&format!("unreadable query: {e}")))?;
        let stmts = ctx
            .cache
            .classifier()
            .analyze(&text, &self.lex)
            .map_err(|e| unparsed(&format!("{}: {e}", String::from_utf8_lossy(bytes))))?;
        let mut class = Class::Read;
        let mut guarded_statements = Vec::new();
        let mut effects = Vec::with_capacity(stmts.len());
        let mut rewrites: Vec<(usize, usize, String)> = Vec::new();
        let mut mention = false;
        // Settings as the statements of this string will see them (SET takes effect for what follows).
        let mut view: Vec<String> = self.stepgate.keys().cloned().collect();
        let mut view_token = self.token.clone();
        let mut grants: Vec<Grant> = Vec::new();
        let mut reason: Option<(Class, String)> = None;
        let mut fetches = None;
        for s in &stmts {
            let index = effects.len();
            let mut c = s.verdict.class;
            let mut effect = Effect::None;
            // What PostgreSQL's parser rejected runs nothing and is judged `unparsed` whatever its first
            // words say; only a mention of a stepgate setting is still refused outright.
            let kind = match kind_of(&s.tokens) {
                Kind2::Mention => Kind2::Mention,
                // Any other spelling of a stepgate setting, as PostgreSQL decodes it (U&"…", E'\x73…' in
                // set_config, ALTER ROLE … SET …): refused, never forwarded. `SHOW stepgate.<name>` as
                // written is the one plain form that passes (the server holds only the token's id).
                Kind2::Plain if s.mentions_stepgate && !plain_show_stepgate(&s.tokens) => {
                    Kind2::Mention
                }
                _ if s.verdict.class == Class::Unparsed => Kind2::Plain,
                k => k,
            };
            match kind {
                Kind2::Mention => mention = true,
                Kind2::Set { name, value } => {
                    c = Class::Session;
                    if !view.contains(&name) {
                        view.push(name.clone());
                    }
                    let (shown, token) = if name == "stepgate.token" {
                        // Verified now, so a bad token fails the SET itself; the server sees only its id.
                        let _log = self.span.enter();
                        let tok = ctx
                            .verify_token(value.as_bytes(), &self.session, &self.rule)
                            .map_err(|reason| Refused::Token(rejection(&reason, false)))?;
                        view_token = Some(tok.clone());
                        (sanitize(tok.id()), Some(tok))
                    } else {
                        ("set".to_string(), None)
                    };
                    rewrites.push((
                        s.start,
                        s.start + s.text.len(),
                        format!("SET {name} = '{shown}'"),
                    ));
                    let value = if token.is_some() { shown } else { value };
                    effect = Effect::SetStepgate { name, value, token };
                }
                Kind2::Reset(name) => {
                    c = Class::Session;
                    match &name {
                        Some(n) => view.retain(|v| v != n),
                        None => view.clear(),
                    }
                    if name.as_deref().is_none_or(|n| n == "stepgate.token") {
                        view_token = None;
                    }
                    effect = Effect::ResetStepgate(name);
                }
                Kind2::ShowStatus => {
                    c = Class::Read;
                    rewrites.push((
                        s.start,
                        s.start + s.text.len(),
                        format!(
                            "SELECT '{}'::text AS \"stepgate.status\"",
                            self.status_text(ctx, &view)
                        ),
                    ));
                }
                Kind2::Prepare { name, inner_start } => {
                    let inner = &s.tokens[inner_start..];
                    let v = ctx.cache.classifier().judge(inner);
                    let inner_sql = &text[inner[0].start..s.start + s.text.len()];
                    let mut inner_class = v.class;
                    if let Some(n) = embedded_execute(inner) {
                        inner_class = inner_class.max(self.lookup_statement(&n, local).class);
                    }
                    let info = StmtInfo {
                        class: inner_class,
                        statements: vec![(split::fingerprint(inner), inner_sql.to_string())],
                        effect: Effect::None,
                        fetches: None,
                    };
                    c = Class::Session;
                    local.insert(name.clone(), Some(info.clone()));
                    effect = Effect::Prepare {
                        name,
                        info: Box::new(info),
                    };
                }
                Kind2::Execute { name } => {
                    // EXECUTE runs the prepared statement: a token has to list that statement.
                    let info = self.lookup_statement(&name, local);
                    if self.guarded(ctx, info.class) {
                        let listed = if self.prepared.contains_key(&name)
                            || local.get(&name).is_some_and(|v| v.is_some())
                        {
                            info.statements.clone()
                        } else {
                            // An unknown name: nothing to authorize but the EXECUTE itself.
                            vec![(s.fingerprint(), s.text.to_string())]
                        };
                        for (fingerprint, sql) in &listed {
                            grants.push(Grant {
                                index,
                                fingerprint: fingerprint.clone(),
                                sql: sql.clone(),
                                token: view_token.clone(),
                            });
                        }
                        guarded_statements.extend(listed);
                    }
                    class = class.max(info.class);
                    effects.push(Effect::None);
                    continue;
                }
                Kind2::Deallocate(name) => {
                    c = Class::Session;
                    match &name {
                        Some(n) => {
                            local.insert(n.clone(), None);
                        }
                        None => local.clear(),
                    }
                    effect = Effect::Deallocate(name);
                }
                Kind2::DiscardAll => {
                    c = Class::Session;
                    local.clear();
                    view.clear();
                    view_token = None;
                    effect = Effect::DiscardAll;
                }
                Kind2::Plain => {
                    if let Some(n) = embedded_execute(&s.tokens) {
                        c = c.max(self.lookup_statement(&n, local).class);
                    }
                    // SQL FETCH/MOVE on a portal bound by the protocol runs that portal's statement, as an
                    // Execute would: judged by it, and a token has to list it. (A cursor DECLAREd in SQL was
                    // judged by its query when it was declared.)
                    if let Some(portal) = s.fetch_portal.as_deref().map(str::as_bytes) {
                        let bound = self.portals.contains_key(portal)
                            || self.queue.iter().any(
                                |e| matches!(e, Expect::Bind { portal: p, .. } if p == portal),
                            );
                        if bound {
                            let info = self.lookup_portal(portal);
                            if self.guarded(ctx, info.class) {
                                for (fingerprint, sql) in &info.statements {
                                    grants.push(Grant {
                                        index,
                                        fingerprint: fingerprint.clone(),
                                        sql: sql.clone(),
                                        token: view_token.clone(),
                                    });
                                }
                                guarded_statements.extend(info.statements.clone());
                            }
                            class = class.max(info.class);
                            effects.push(Effect::None);
                            continue;
                        }
                        // Not bound yet: if this runs later as a prepared statement, its Execute looks again.
                        fetches = Some(sql_name(String::from_utf8_lossy(portal).into_owned()));
                    }
                }
            }
            if self.guarded(ctx, c) {
                if reason.as_ref().is_none_or(|(rc, _)| c > *rc) && c == s.verdict.class {
                    reason = Some((c, s.reason.clone()));
                }
                let fingerprint = s.fingerprint();
                grants.push(Grant {
                    index,
                    fingerprint: fingerprint.clone(),
                    sql: s.text.to_string(),
                    token: view_token.clone(),
                });
                guarded_statements.push((fingerprint, s.text.to_string()));
            }
            class = class.max(c);
            effects.push(effect);
        }
        if mention {
            return Err(Refused::Mention);
        }
        let rewritten = if rewrites.is_empty() {
            None
        } else if let (std::borrow::Cow::Borrowed(orig), true) = (&text, text.len() == bytes.len())
        {
            // The offsets are offsets into the bytes as they came: safe to splice.
            let mut out = String::with_capacity(orig.len());
            let mut pos = 0;
            for (a, b, with) in rewrites {
                out.push_str(&orig[pos..a]);
                out.push_str(&with);
                pos = b;
            }
            out.push_str(&orig[pos..]);
            Some(out)
        } else {
            return Err(unparsed("a stepgate setting in a query that is not UTF-8"));
        };
        Ok(Analysis {
            reason: reason.map(|(_, r)| r),
            info: StmtInfo {
                class,
                statements: guarded_statements,
                effect: Effect::None,
                fetches,
            },
            effects,
            rewritten,
            grants,
        })
    }

    /// For a guarded message: reserve uses for its grants (see [`GateContext::authorize`]). Returns the
    /// reservations, or why it is not authorized.
    fn authorize(
        &self,
        ctx: &GateContext,
        guarded: bool,
        grants: &[Grant],
        class: Class,
    ) -> (Vec<Reservation>, Option<Denied>) {
        if !guarded {
            return (Vec::new(), None);
        }
        if grants.iter().all(|g| g.token.is_none()) {
            return (Vec::new(), Some(Denied::NoToken));
        }
        let _log = self.span.enter();
        match ctx.authorize(&self.session, &self.rule, grants, class) {
            Ok(r) => (r, None),
            Err(d) => {
                if let Some(code) = d.code() {
                    ctx.metrics.token_rejected(code);
                }
                (Vec::new(), Some(d))
            }
        }
    }

    fn on_query(&mut self, ctx: &GateContext, body: &[u8]) -> Action {
        let bytes = body.strip_suffix(&[0]).unwrap_or(body);
        if ctx.disabled {
            self.expect_query(Vec::new(), None, Vec::new());
            return Action::Forward;
        }
        let entry = ctx.cache.lookup(bytes, &self.lex, ctx.generation);
        if !entry.attention && !self.guarded(ctx, entry.max) {
            ctx.metrics.statement(entry.max, Outcome::Pass);
            self.expect_query(Vec::new(), None, Vec::new());
            return Action::Forward;
        }
        let mut local = HashMap::new();
        // The message's SQL, redacted, is only needed for a held entry.
        let sql = || crate::gate::redact(&String::from_utf8_lossy(bytes));
        let started = std::time::Instant::now();
        let analysis = self.analyze(ctx, bytes, &mut local);
        ctx.metrics.classified(started.elapsed());
        match analysis {
            Err(Refused::Mention) => {
                ctx.metrics.statement(Class::Privileged, Outcome::Held);
                self.refuse_query(self.mention_refusal())
            }
            Err(Refused::Token(err)) => {
                ctx.metrics.statement(Class::Session, Outcome::Held);
                self.refuse_query(err)
            }
            Err(Refused::Hold(info)) => {
                ctx.metrics.statement(info.class, Outcome::Held);
                let err = self.hold(ctx, &sql(), &info, HeldStatus::Held, None, None);
                self.refuse_query(err)
            }
            Ok(Analysis {
                info,
                reason,
                effects,
                rewritten,
                grants,
            }) => {
                let guarded = !info.statements.is_empty() || self.guarded(ctx, info.class);
                let (reservations, denied) = self.authorize(ctx, guarded, &grants, info.class);
                let decision = decide(guarded, ctx.mode, denied.is_none());
                ctx.metrics
                    .statement(info.class, outcome(decision, &reservations));
                match decision {
                    Decision::Refuse => {
                        let err = self.hold(
                            ctx,
                            &sql(),
                            &info,
                            HeldStatus::Held,
                            denied.as_ref(),
                            reason.as_deref(),
                        );
                        return self.refuse_query(err);
                    }
                    Decision::Observe => {
                        self.hold(
                            ctx,
                            &sql(),
                            &info,
                            HeldStatus::Observed,
                            denied.as_ref(),
                            reason.as_deref(),
                        );
                    }
                    Decision::Pass => {}
                }
                self.expect_query(effects, None, reservations);
                match rewritten {
                    Some(text) => Action::Replace(build::query(text.as_bytes())),
                    None => Action::Forward,
                }
            }
        }
    }

    fn on_parse(&mut self, ctx: &GateContext, body: &[u8]) -> Action {
        let Some((name, rest)) = cstr(body) else {
            return Action::Forward; // malformed: the server will say so
        };
        let Some((query, rest)) = cstr(rest) else {
            return Action::Forward;
        };
        let name = protocol_name(name);
        let push = |me: &mut Self, info: StmtInfo, refused: Option<ErrorReply>| {
            me.queue.push_back(Expect::Parse {
                batch: me.batch,
                name: name.clone(),
                info,
                refused,
            });
        };
        if ctx.disabled {
            push(self, StmtInfo::unknown(""), None);
            return Action::Forward;
        }
        let entry = ctx.cache.lookup(query, &self.lex, ctx.generation);
        if !entry.attention && !self.guarded(ctx, entry.max) {
            let info = StmtInfo {
                class: entry.max,
                statements: Vec::new(),
                effect: Effect::None,
                fetches: None,
            };
            push(self, info, None);
            return Action::Forward;
        }
        let mut local = HashMap::new();
        match self.analyze(ctx, query, &mut local) {
            Err(Refused::Mention) => {
                // Never forwarded: a Parse of invalid SQL makes the server fail here instead.
                let refusal = self.mention_refusal();
                push(self, StmtInfo::unknown(""), Some(refusal));
                Action::Replace(build::parse(&name, REFUSAL_SQL))
            }
            Err(Refused::Token(err)) => {
                push(self, StmtInfo::unknown(""), Some(err));
                Action::Replace(build::parse(&name, REFUSAL_SQL))
            }
            Err(Refused::Hold(info)) => {
                push(self, *info, None);
                Action::Forward
            }
            Ok(Analysis {
                mut info,
                effects,
                rewritten,
                ..
            }) => {
                // The statement's own fingerprints are what a token will have to list.
                if info.statements.is_empty() {
                    if let Ok(text) = decode(query, &self.lex) {
                        if let Ok(stmts) = ctx.cache.classifier().analyze(&text, &self.lex) {
                            info.statements = stmts
                                .iter()
                                .map(|s| (s.fingerprint(), s.text.to_string()))
                                .collect();
                        }
                    }
                }
                info.effect = effects.into_iter().next().unwrap_or(Effect::None);
                if let Effect::Prepare { .. } | Effect::Deallocate(_) | Effect::DiscardAll =
                    info.effect
                {
                    // SQL PREPARE/DEALLOCATE/DISCARD through the extended protocol: name tracking would need the
                    // server's confirmation of an inner statement; judge conservatively instead.
                    info.class = info.class.max(Class::Unparsed);
                    info.effect = Effect::None;
                }
                push(self, info, None);
                match rewritten {
                    Some(text) => {
                        let mut b = name.clone();
                        b.push(0);
                        b.extend_from_slice(text.as_bytes());
                        b.push(0);
                        b.extend_from_slice(rest);
                        Action::Replace(message(b'P', &b))
                    }
                    None => Action::Forward,
                }
            }
        }
    }

    fn on_bind(&mut self, body: &[u8]) -> Action {
        let Some((portal, rest)) = cstr(body) else {
            return Action::Forward;
        };
        let Some((stmt, _)) = cstr(rest) else {
            return Action::Forward;
        };
        let info = self.lookup_statement(&protocol_name(stmt), &HashMap::new());
        self.queue.push_back(Expect::Bind {
            batch: self.batch,
            portal: protocol_name(portal),
            info,
        });
        Action::Forward
    }

    fn on_execute(&mut self, ctx: &GateContext, body: &[u8]) -> Action {
        let Some((portal, _)) = cstr(body) else {
            return Action::Forward;
        };
        let portal = protocol_name(portal);
        if ctx.disabled {
            self.queue.push_back(Expect::Execute {
                effect: Effect::None,
                refused: None,
                portal,
                reservations: Vec::new(),
            });
            return Action::Forward;
        }
        let mut info = self.lookup_portal(&portal);
        // A prepared SQL FETCH/MOVE runs the portal it names, which may have been bound after the Parse.
        if let Some(target) = info.fetches.take() {
            let bound = self.portals.contains_key(&target)
                || self
                    .queue
                    .iter()
                    .any(|e| matches!(e, Expect::Bind { portal: p, .. } if *p == target));
            if bound {
                let runs = self.lookup_portal(&target);
                if runs.class > info.class {
                    info.class = runs.class;
                    info.statements = runs.statements;
                }
            }
        }
        // Only a hold needs the SQL text; the pass path does no string work.
        let sql = |info: &StmtInfo| {
            info.statements
                .iter()
                .map(|(_, s)| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let guarded = self.guarded(ctx, info.class);
        // A portal suspended by a row limit continues the use its first Execute reserved.
        let rebound = self.queue.iter().any(
            |e| matches!(e, Expect::Bind { portal: p, .. } | Expect::Close { kind: b'P', name: p, .. } if *p == portal),
        );
        let continued = if guarded && !rebound {
            self.suspended.remove(&portal)
        } else {
            None
        };
        let (reservations, denied) = match continued {
            Some(r) => (r, None),
            None => {
                let grants: Vec<Grant> = info
                    .statements
                    .iter()
                    .map(|(fingerprint, sql)| Grant {
                        index: 0,
                        fingerprint: fingerprint.clone(),
                        sql: sql.clone(),
                        token: self.token.clone(),
                    })
                    .collect();
                self.authorize(ctx, guarded, &grants, info.class)
            }
        };
        let decision = decide(guarded, ctx.mode, denied.is_none());
        ctx.metrics
            .statement(info.class, outcome(decision, &reservations));
        match decision {
            Decision::Refuse => {
                let err = self.hold(
                    ctx,
                    &sql(&info),
                    &info,
                    HeldStatus::Held,
                    denied.as_ref(),
                    None,
                );
                self.queue.push_back(Expect::Execute {
                    effect: Effect::None,
                    refused: Some(err),
                    portal,
                    reservations: Vec::new(),
                });
                Action::Replace(build::parse(REFUSAL_STATEMENT, REFUSAL_SQL))
            }
            d => {
                if d == Decision::Observe {
                    self.hold(
                        ctx,
                        &sql(&info),
                        &info,
                        HeldStatus::Observed,
                        denied.as_ref(),
                        None,
                    );
                }
                self.queue.push_back(Expect::Execute {
                    effect: info.effect,
                    refused: None,
                    portal,
                    reservations,
                });
                Action::Forward
            }
        }
    }

    fn on_function_call(&mut self, ctx: &GateContext, body: &[u8]) -> Action {
        self.batch += 1;
        let Some(oid) = body
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            // Too short to name a function: the server rejects it as a protocol violation.
            self.queue.push_back(Expect::FunctionCall { refused: None });
            return Action::Forward;
        };
        if ctx.disabled || LARGE_OBJECT_OIDS.contains(&oid) {
            self.queue.push_back(Expect::FunctionCall { refused: None });
            return Action::Forward;
        }
        let text = format!("FunctionCall of function OID {oid}");
        let fp = crate::audit::hash_line(format!("functioncall {oid}").as_bytes());
        let info = StmtInfo {
            class: Class::Privileged,
            statements: vec![(fp, text.clone())],
            effect: Effect::None,
            fetches: None,
        };
        let decision = decide(self.guarded(ctx, Class::Privileged), ctx.mode, false);
        ctx.metrics
            .statement(Class::Privileged, outcome(decision, &[]));
        match decision {
            Decision::Refuse => {
                let err = self.hold(ctx, &text, &info, HeldStatus::Held, None, None);
                self.queue
                    .push_back(Expect::FunctionCall { refused: Some(err) });
                let mut b = body.to_vec();
                b[..4].copy_from_slice(&0u32.to_be_bytes());
                Action::Replace(message(b'F', &b))
            }
            d => {
                if d == Decision::Observe {
                    self.hold(ctx, &text, &info, HeldStatus::Observed, None, None);
                }
                self.queue.push_back(Expect::FunctionCall { refused: None });
                Action::Forward
            }
        }
    }

    // ---- backend --------------------------------------------------------------------------------

    fn apply(&mut self, ctx: &GateContext, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::SetStepgate { name, value, token } => {
                if let Some(tok) = token {
                    let _log = self.span.enter();
                    ctx.token_activated(&self.session, &tok);
                    self.token = Some(tok);
                }
                self.stepgate.insert(name, value);
            }
            Effect::ResetStepgate(Some(name)) => {
                if name == "stepgate.token" {
                    self.token = None;
                }
                self.stepgate.remove(&name);
            }
            Effect::ResetStepgate(None) => {
                self.token = None;
                self.stepgate.clear()
            }
            Effect::DiscardAll => {
                self.token = None;
                self.stepgate.clear();
                self.prepared.clear();
                self.portals.clear();
            }
            Effect::Deallocate(Some(name)) => {
                self.prepared.remove(&name);
            }
            Effect::Deallocate(None) => self.prepared.clear(),
            Effect::Prepare { name, info } => {
                self.prepared.insert(name, *info);
            }
        }
    }

    /// Confirms the reservations of a statement the server completed; their transaction's outcome follows.
    fn confirm(&mut self, ctx: &GateContext, reservations: Vec<Reservation>, body: &[u8]) {
        if reservations.is_empty() {
            return;
        }
        let _log = self.span.enter();
        let tag = cstr(body)
            .map(|(t, _)| String::from_utf8_lossy(t).into_owned())
            .unwrap_or_default();
        for r in reservations {
            ctx.executed(&self.session, &r, &tag);
            self.outcome_pending.push(r);
        }
    }

    /// Records how the transaction of the authorized statements that ran in it ended.
    fn settle(&mut self, ctx: &GateContext, committed: bool) {
        if self.outcome_pending.is_empty() {
            return;
        }
        let _log = self.span.enter();
        for r in std::mem::take(&mut self.outcome_pending) {
            ctx.outcome(&self.session, &r, committed);
        }
    }

    /// The session is over: a transaction still open is rolled back by the server.
    pub fn on_session_end(&mut self, ctx: &GateContext) {
        let committed = self.txn_status == b'I' && !self.txn_failed;
        self.settle(ctx, committed);
    }

    /// Gives back the reservations of statements the server did not run.
    fn release(&self, ctx: &GateContext, reservations: Vec<Reservation>, why: &str) {
        if reservations.is_empty() {
            return;
        }
        let _log = self.span.enter();
        for r in reservations {
            ctx.released(&self.session, &r, why);
        }
    }

    /// The server reported an error for the statements these reservations were for, so it may have begun
    /// running them. A use is given back only where PostgreSQL provably undid the statement: `ddl` and
    /// `destructive` statements that run transactionally (no CONCURRENTLY, no sequence functions, no
    /// database, tablespace or system commands), which an error rolls back. Every other use stays spent.
    fn release_failed(&self, ctx: &GateContext, reservations: Vec<Reservation>, why: &str) {
        let (undone, spent): (Vec<_>, Vec<_>) = reservations.into_iter().partition(|r| {
            matches!(r.class, Class::Ddl | Class::Destructive)
                && crate::classify::undone_by_rollback(&r.sql)
        });
        self.release(ctx, undone, why);
        if !spent.is_empty() {
            let _log = self.span.enter();
            for r in spent {
                tracing::warn!(token_id = %r.token.id(), fingerprint = %r.fingerprint, class = %r.class, reason = why, "the server failed a statement that may have had effects before it failed: its use stays spent");
            }
        }
    }

    /// Releases what an expectation that will never be answered had reserved.
    fn abandon(&self, ctx: &GateContext, e: Expect, why: &str) {
        match e {
            Expect::Query { reservations, .. } | Expect::Execute { reservations, .. } => {
                self.release(ctx, reservations, why)
            }
            _ => {}
        }
    }

    /// CommandComplete or EmptyQueryResponse: the statement at the front of the queue finished.
    fn on_backend_complete(&mut self, ctx: &GateContext, tag: u8, body: &[u8]) -> Action {
        let (mine, effect) = match self.queue.front_mut() {
            Some(Expect::Execute { .. }) => match self.queue.pop_front() {
                Some(Expect::Execute {
                    effect,
                    reservations,
                    ..
                }) => (reservations, effect),
                _ => return Action::Forward,
            },
            Some(Expect::Query {
                effects,
                done,
                reservations,
                ..
            }) => {
                let index = *done;
                let effect = effects.get(index).cloned().unwrap_or(Effect::None);
                *done += 1;
                // The pass path has nothing reserved: no partition to build.
                let mine = if reservations.is_empty() {
                    Vec::new()
                } else {
                    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(reservations)
                        .into_iter()
                        .partition(|r| r.index == index);
                    *reservations = rest;
                    mine
                };
                (mine, effect)
            }
            _ => return Action::Forward,
        };
        if tag == b'C' {
            self.confirm(ctx, mine, body);
            self.apply(ctx, effect);
        } else {
            self.release(ctx, mine, "empty query");
        }
        Action::Forward
    }

    pub fn on_backend(&mut self, ctx: &GateContext, tag: u8, msg: &[u8]) -> Action {
        let body = msg.get(5..).unwrap_or(&[]);
        // A CopyEnd marker at the front was not preceded by a copy-in: the server ignored that CopyDone.
        while matches!(self.queue.front(), Some(Expect::CopyEnd)) {
            self.queue.pop_front();
        }
        if matches!(tag, b'C' | b'E' | b'Z') {
            // The copy ended (or failed): the server answers Syncs again.
            self.copy_in = false;
        }
        match tag {
            b'T' | b'n' => {
                // RowDescription/NoData answer a Describe; a simple Query's RowDescription belongs to it.
                self.pop_if(|e| matches!(e, Expect::Describe));
                return Action::Forward;
            }
            b'G' => {
                // CopyInResponse for the statement at the front: the server is in copy-in mode. Syncs the
                // client sent after that statement, up to its CopyDone/CopyFail, get no answer.
                let end = self.queue.iter().position(|e| matches!(e, Expect::CopyEnd));
                let upto = end.unwrap_or(self.queue.len());
                let mut i = 1;
                let mut limit = upto;
                while i < limit {
                    if matches!(self.queue.get(i), Some(Expect::Sync)) {
                        self.queue.remove(i);
                        limit -= 1;
                    } else {
                        i += 1;
                    }
                }
                match end {
                    Some(_) => {
                        self.queue.remove(limit);
                    }
                    None => self.copy_in = true,
                }
                return Action::Forward;
            }
            b'1' => {
                if let Some(Expect::Parse { name, info, .. }) =
                    self.pop_if(|e| matches!(e, Expect::Parse { .. }))
                {
                    self.prepared.insert(name, info);
                }
            }
            b'2' => {
                if let Some(Expect::Bind { portal, info, .. }) =
                    self.pop_if(|e| matches!(e, Expect::Bind { .. }))
                {
                    self.suspended.remove(&portal);
                    self.portals.insert(portal, info);
                }
            }
            b'3' => {
                if let Some(Expect::Close { kind, name, .. }) =
                    self.pop_if(|e| matches!(e, Expect::Close { .. }))
                {
                    if kind == b'S' {
                        self.prepared.remove(&name);
                    } else {
                        self.suspended.remove(&name);
                        self.portals.remove(&name);
                    }
                }
            }
            b'C' if body.starts_with(b"ROLLBACK\0") => {
                self.txn_failed = true;
                return self.on_backend_complete(ctx, tag, body);
            }
            b'C' | b'I' => return self.on_backend_complete(ctx, tag, body),
            b's' => {
                if let Some(Expect::Execute {
                    portal,
                    reservations,
                    ..
                }) = self.pop_if(|e| matches!(e, Expect::Execute { .. }))
                {
                    if !reservations.is_empty() {
                        self.suspended.insert(portal, reservations);
                    }
                }
            }
            b'E' => {
                self.txn_failed = true;
                return self.on_error(ctx, msg, body);
            }
            b'Z' => {
                self.txn_status = body.first().copied().unwrap_or(b'I');
                while let Some(e) = self.queue.pop_front() {
                    let last = matches!(
                        e,
                        Expect::Sync | Expect::Query { .. } | Expect::FunctionCall { .. }
                    );
                    self.abandon(ctx, e, "no response from the server");
                    if last {
                        break;
                    }
                }
                if self.txn_status == b'I' {
                    // Portals do not outlive their transaction.
                    self.suspended.clear();
                    let committed = !self.txn_failed;
                    self.settle(ctx, committed);
                    self.txn_failed = false;
                }
            }
            b'S' => {
                if let Some((name, rest)) = cstr(body) {
                    let value = cstr(rest)
                        .map(|(v, _)| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default();
                    match name {
                        b"client_encoding" => self.lex.client_encoding = value,
                        b"standard_conforming_strings" => {
                            self.lex.standard_conforming_strings = value == "on"
                        }
                        b"session_authorization" if !self.login_done => {
                            // Reported during the login: the user the server actually logged in.
                            self.server_user = Some(value)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        Action::Forward
    }

    fn pop_if(&mut self, pred: impl Fn(&Expect) -> bool) -> Option<Expect> {
        if self.queue.front().is_some_and(pred) {
            self.queue.pop_front()
        } else {
            None
        }
    }

    fn on_error(&mut self, ctx: &GateContext, _msg: &[u8], body: &[u8]) -> Action {
        let (code, message) = error_fields(body);
        let why = format!("server error {code}: {message}");
        // An aborted transaction answers everything with 25P02: that is the server's truth, not ours to rewrite.
        let ours = |r: &Option<ErrorReply>| r.clone().filter(|_| code != "25P02");
        if let Some(Expect::Query {
            reservations, done, ..
        }) = self.queue.front_mut()
        {
            // The statements after the failing one in the string do not run; the failing one may have.
            let failing = *done;
            let (ran, left): (Vec<_>, Vec<_>) = std::mem::take(reservations)
                .into_iter()
                .partition(|r| r.index == failing);
            self.release(ctx, left, &why);
            self.release_failed(ctx, ran, &why);
        }
        match self.queue.front_mut() {
            Some(Expect::Query { refused, .. }) | Some(Expect::FunctionCall { refused }) => {
                if let Some(err) = ours(refused) {
                    return Action::Replace(err.to_bytes().to_vec());
                }
                Action::Forward
            }
            Some(Expect::Sync) | None => Action::Forward,
            Some(_) => {
                // An extended-protocol message failed: the server skips everything up to Sync.
                let replacement = match self.queue.front() {
                    Some(Expect::Execute { refused, .. }) | Some(Expect::Parse { refused, .. }) => {
                        ours(refused)
                    }
                    _ => None,
                };
                // Query and FunctionCall messages sent before the Sync are skipped too.
                let mut first = true;
                while self
                    .queue
                    .front()
                    .is_some_and(|e| !matches!(e, Expect::Sync))
                {
                    match self.queue.pop_front() {
                        // The message that failed may have begun running; the rest were skipped.
                        Some(Expect::Execute { reservations, .. }) if first => {
                            self.release_failed(ctx, reservations, &why)
                        }
                        Some(e) => self.abandon(ctx, e, &why),
                        None => {}
                    }
                    first = false;
                }
                if self.queue.is_empty() {
                    self.skip_until_sync = true;
                }
                match replacement {
                    Some(err) => Action::Replace(err.to_bytes().to_vec()),
                    None => Action::Forward,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> GateContext {
        GateContext::new(Config::default(), Registry::new(None), false)
    }

    fn st() -> SessionState {
        SessionState::new(SessionFields::default(), Rule::default(), Vec::new())
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        build::parse(name.as_bytes(), sql.as_bytes())
    }

    fn bind(portal: &str, stmt: &str) -> Vec<u8> {
        build::bind(portal.as_bytes(), stmt.as_bytes())
    }

    fn execute(portal: &str) -> Vec<u8> {
        build::execute(portal.as_bytes())
    }

    fn fe(s: &mut SessionState, c: &GateContext, m: &[u8]) -> Action {
        s.on_frontend(c, m[0], m)
    }

    fn be(s: &mut SessionState, tag: u8, body: &[u8]) -> Action {
        s.on_backend(&ctx(), tag, &message(tag, body))
    }

    #[test]
    fn the_server_must_confirm_the_user() {
        // What a real server cannot be made to do through the startup packet (it reports the user it
        // logged in): a session_authorization that differs from the user stepgate read ends the login.
        let c = ctx();
        let fields = SessionFields {
            user: "app".into(),
            ..Default::default()
        };
        let mut s = SessionState::new(fields.clone(), Rule::default(), Vec::new());
        be(&mut s, b'S', b"session_authorization\0dba\0");
        let err = s.on_login(&c).unwrap_err();
        assert!(err.message.contains("logged in \"dba\""), "{}", err.message);
        let mut s = SessionState::new(fields, Rule::default(), Vec::new());
        be(&mut s, b'S', b"session_authorization\0app\0");
        assert!(s.on_login(&c).is_ok());
        // Later changes (SET SESSION AUTHORIZATION) are the session's own business.
        be(&mut s, b'S', b"session_authorization\0dba\0");
    }

    fn syncs(s: &SessionState) -> usize {
        s.queue.iter().filter(|e| matches!(e, Expect::Sync)).count()
    }

    #[test]
    fn copy_end_outside_copy_keeps_every_sync() {
        // The server ignores CopyDone/CopyFail outside COPY and answers all three Syncs.
        let c = ctx();
        let mut s = st();
        for m in [
            build::sync(),
            build::sync(),
            message(b'c', b""),
            build::sync(),
            message(b'f', b"x\0"),
        ] {
            fe(&mut s, &c, &m);
        }
        assert_eq!(syncs(&s), 3);
        for _ in 0..3 {
            be(&mut s, b'Z', b"I");
        }
        // Only the last CopyFail's marker is left; it expects no answer and goes with the next message.
        assert!(s.queue.iter().all(|e| matches!(e, Expect::CopyEnd)));
        be(&mut s, b'Z', b"I");
        assert!(s.queue.is_empty());
    }

    #[test]
    fn syncs_inside_copy_in_expect_no_answer() {
        // Parse/Bind/Execute(COPY FROM STDIN), Sync, CopyData, Sync, CopyDone, Sync: the server answers
        // 1, 2, G (copy-in: both Syncs ignored), C, Z.
        let c = ctx();
        for g_first in [false, true] {
            let mut s = st();
            for m in [parse("", "COPY t FROM STDIN"), bind("", ""), execute("")] {
                fe(&mut s, &c, &m);
            }
            be(&mut s, b'1', b"");
            be(&mut s, b'2', b"");
            if g_first {
                be(&mut s, b'G', b"\0\0\0");
            }
            for m in [
                build::sync(),
                message(b'd', b"1\n"),
                build::sync(),
                message(b'c', b""),
                build::sync(),
            ] {
                fe(&mut s, &c, &m);
            }
            if !g_first {
                be(&mut s, b'G', b"\0\0\0");
            }
            assert_eq!(syncs(&s), 1, "g_first {g_first}");
            be(&mut s, b'C', b"COPY 1\0");
            be(&mut s, b'Z', b"I");
            assert!(s.queue.is_empty(), "g_first {g_first}");
        }
    }

    #[test]
    fn prepared_read_passes() {
        let c = ctx();
        let mut s = st();
        assert_eq!(
            fe(&mut s, &c, &parse("s0", "select $1::int + $2::int")),
            Action::Forward
        );
        assert_eq!(fe(&mut s, &c, &message(b'S', &[])), Action::Forward);
        be(&mut s, b'1', &[]);
        be(&mut s, b'Z', b"I");
        assert_eq!(fe(&mut s, &c, &bind("", "s0")), Action::Forward);
        assert_eq!(fe(&mut s, &c, &execute("")), Action::Forward);
    }

    #[test]
    fn reparse_rejected_by_the_server_cannot_launder_a_drop() {
        let c = ctx();
        let mut s = st();
        fe(&mut s, &c, &parse("p", "DROP TABLE t"));
        fe(&mut s, &c, &message(b'S', &[]));
        be(&mut s, b'1', &[]);
        be(&mut s, b'Z', b"I");
        // Re-Parse under the same name: the server refuses with 42P05, after we have seen the Parse.
        fe(&mut s, &c, &parse("p", "SELECT 1"));
        fe(&mut s, &c, &message(b'S', &[]));
        fe(&mut s, &c, &bind("", "p"));
        assert!(
            matches!(fe(&mut s, &c, &execute("")), Action::Replace(_)),
            "pending re-Parse from an earlier batch counts at its most dangerous"
        );
        be(
            &mut s,
            b'E',
            b"SERROR\0C42P05\0Mprepared statement \"p\" already exists\0\0",
        );
        be(&mut s, b'Z', b"I");
        fe(&mut s, &c, &message(b'S', &[]));
        fe(&mut s, &c, &bind("", "p"));
        assert!(
            matches!(fe(&mut s, &c, &execute("")), Action::Replace(_)),
            "p is still the DROP"
        );
    }

    /// Untrusted bytes never panic the state machine: random messages of every inspected type, in both
    /// directions, in any order.
    #[test]
    fn random_messages_never_panic() {
        use rand::{Rng, SeedableRng};
        let c = ctx();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let pieces: [&[u8]; 12] = [
            b"\0",
            b"p\0",
            b"SELECT 1\0",
            b"DROP TABLE t\0",
            b"SET stepgate.token = 'x'\0",
            b"\x00\x00\x03\xc4",
            b"S",
            b"P",
            b"\xff\xfe",
            b"EXECUTE p\0",
            b"PREPARE p AS DELETE FROM t\0",
            b"SERROR\0C26000\0\0",
        ];
        for _ in 0..2_000 {
            let mut s = st();
            for _ in 0..rng.random_range(1..12) {
                let mut body = Vec::new();
                for _ in 0..rng.random_range(0..4) {
                    body.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
                }
                if rng.random_bool(0.5) {
                    let tag = b"QPBECSFcf"[rng.random_range(0..9)];
                    let _ = fe(&mut s, &c, &message(tag, &body));
                } else {
                    let tag = b"123CIsEZS"[rng.random_range(0..9)];
                    let _ = be(&mut s, tag, &body);
                }
            }
        }
    }

    #[test]
    fn short_function_call_is_forwarded_for_the_server_to_reject() {
        let c = ctx();
        let mut s = st();
        assert_eq!(fe(&mut s, &c, &message(b'F', &[0, 1])), Action::Forward);
    }
}
