//! PostgreSQL's own parse tree as the referee (libpg_query, through the `pg_query` crate).
//!
//! A statement's class is judged on the tree PostgreSQL's grammar builds, walked generically (the tree is
//! serialised to JSON, so no node kind can be skipped by a walker that forgot it): every statement node
//! anywhere inside raises the class to its own; every function call is checked against the dangerous list
//! and the built-ins that execute SQL text; a statement kind this module does not name is `unparsed`.
//! Names come decoded by PostgreSQL's scanner (`U&"…"`, quoting), so no spelling hides a function.
//!
//! Constant conditions: an UPDATE/DELETE/MERGE whose condition does not reference the target row (no
//! column of it outside a subquery, or any column qualified with its name), or is a tautology (`x = x`,
//! `x IS NOT DISTINCT FROM x`, `NOT (x <> x)`, `x IN (x, …)`, an OR with such a branch) touches every row.
//! Only literal `false` and `NULL` count as never true: no constant is evaluated, because evaluating it
//! exactly as PostgreSQL does (casts, numeric precision, collations) is the server's job.

use pg_query::protobuf as pb;
use serde_json::Value;

use crate::config::Class;

/// The built-ins that execute a string argument as SQL (PostgreSQL 13–18): the name and which argument.
pub const SQL_EXECUTING_BUILTINS: &[(&str, usize)] = &[
    ("query_to_xml", 0),
    ("query_to_xmlschema", 0),
    ("query_to_xml_and_xmlschema", 0),
    ("ts_stat", 0),
];

/// How deep SQL text inside SQL text (query_to_xml('select query_to_xml(…)')) is followed before it is
/// judged `unparsed`.
const MAX_NESTED_SQL: u8 = 4;

/// What the tree says about one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeVerdict {
    pub class: Class,
    /// The rule that gave the class (`DELETE without WHERE`, `calls pg_read_file`, …).
    pub reason: String,
    /// A literal's value took part in the decision: cache by exact text only.
    pub literal_sensitive: bool,
}

/// Parses `sql` with PostgreSQL's grammar. Returns each statement's byte range and tree, or PostgreSQL's
/// own error message.
pub fn parse(
    sql: &str,
    standard_conforming_strings: bool,
) -> Result<Vec<(usize, usize, Value)>, String> {
    let options = if standard_conforming_strings {
        pg_query::ParserOptions::DEFAULT
    } else {
        pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS
    };
    let parsed = pg_query::parse(sql, options);
    if !standard_conforming_strings {
        // libpg_query sets its (thread-local) standard_conforming_strings from the options, and puts it
        // back only when the parse succeeds: after a failed parse with it off, every later scan on this
        // thread would read backslashes as escapes. A parse with the default options puts it back.
        let _ = pg_query::parse(";", pg_query::ParserOptions::DEFAULT);
    }
    let parsed = parsed.map_err(|e| match e {
        pg_query::Error::Parse(m) => m,
        pg_query::Error::Decode(_) => {
            "the statement nests deeper than stepgate's parse budget".to_string()
        }
        other => other.to_string(),
    })?;
    let mut out = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let start = usize::try_from(raw.stmt_location)
            .unwrap_or(0)
            .min(sql.len());
        let end = match usize::try_from(raw.stmt_len) {
            Ok(0) | Err(_) => sql.len(),
            Ok(n) => (start + n).min(sql.len()),
        };
        let tree = serde_json::to_value(&raw.stmt).map_err(|e| e.to_string())?;
        out.push((start, end, tree));
    }
    Ok(out)
}

/// A tree without positions and string values, for comparing two readings of the same text.
pub fn without_values(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| k.as_str() != "location" && k.as_str() != "sval")
                .map(|(k, v)| (k.clone(), without_values(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_values).collect()),
        other => other.clone(),
    }
}

/// Judges one statement tree (`{"node": {"<Kind>": {…}}}`).
pub fn judge(tree: &Value, dangerous: &dyn Fn(&str) -> bool) -> TreeVerdict {
    judge_at(tree, dangerous, 0)
}

fn judge_at(tree: &Value, dangerous: &dyn Fn(&str) -> bool, nesting: u8) -> TreeVerdict {
    let mut j = Judge {
        dangerous,
        nesting,
        class: Class::Read,
        reason: String::new(),
        literal_sensitive: false,
    };
    j.walk(tree, true);
    if j.reason.is_empty() {
        j.reason = match top_kind(tree) {
            Some(k) => statement_name(k),
            None => "empty statement".into(),
        };
    }
    TreeVerdict {
        class: j.class,
        reason: j.reason,
        literal_sensitive: j.literal_sensitive,
    }
}

/// True when the statement names a stepgate setting anywhere, as PostgreSQL decodes it: a SET/RESET/SHOW
/// (also inside ALTER ROLE/DATABASE/SYSTEM and function SET clauses) of a `stepgate.*` name, or a string
/// constant containing `stepgate.` (`set_config(E'\x73tepgate.token', …)`, `current_setting(…)`). Names
/// built at run time (`set_config(concat(…), …)`) are out of reach.
pub fn mentions_stepgate(tree: &Value) -> bool {
    fn walk(v: &Value) -> bool {
        match v {
            Value::Object(map) => map.iter().any(|(k, val)| match k.as_str() {
                "VariableSetStmt" | "VariableShowStmt" | "setstmt" => {
                    val.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| n.to_ascii_lowercase().starts_with("stepgate."))
                        || walk(val)
                }
                "sval" => val
                    .as_str()
                    .is_some_and(|s| s.to_ascii_lowercase().contains("stepgate.")),
                _ => walk(val),
            }),
            Value::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    walk(tree)
}

/// True when a statement may leave effects a rollback does not undo: CONCURRENTLY anywhere, sequence
/// functions (nextval, setval), calls of dangerous or SQL-running functions, and statement kinds that are
/// not transactional or not only so (database, tablespace, system, subscription, VACUUM, CLUSTER, REINDEX,
/// CHECKPOINT, LOAD, COPY to or from files or programs, DO).
pub fn non_transactional(tree: &Value) -> bool {
    fn walk(v: &Value) -> bool {
        match v {
            Value::Object(map) => map.iter().any(|(k, val)| match k.as_str() {
                "concurrent" => val.as_bool() == Some(true),
                "FuncCall" => {
                    let name = names(val, "funcname")
                        .last()
                        .map(|n| n.to_lowercase())
                        .unwrap_or_default();
                    matches!(name.as_str(), "nextval" | "setval")
                        || SQL_EXECUTING_BUILTINS.iter().any(|(n, _)| *n == name)
                        || walk(val)
                }
                "CreatedbStmt"
                | "DropdbStmt"
                | "AlterDatabaseStmt"
                | "AlterDatabaseSetStmt"
                | "AlterDatabaseRefreshCollStmt"
                | "CreateTableSpaceStmt"
                | "DropTableSpaceStmt"
                | "AlterTableSpaceOptionsStmt"
                | "AlterSystemStmt"
                | "CreateSubscriptionStmt"
                | "AlterSubscriptionStmt"
                | "DropSubscriptionStmt"
                | "VacuumStmt"
                | "ClusterStmt"
                | "ReindexStmt"
                | "CheckPointStmt"
                | "LoadStmt"
                | "DoStmt"
                | "CallStmt" => true,
                "CopyStmt" => {
                    val.get("is_program").and_then(Value::as_bool) == Some(true)
                        || val
                            .get("filename")
                            .and_then(Value::as_str)
                            .is_some_and(|f| !f.is_empty())
                        || walk(val)
                }
                _ => walk(val),
            }),
            Value::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    walk(tree)
}

/// Relations (RangeVar) without a schema, and DROP/COMMENT objects named by one word, in a statement tree.
pub fn unqualified_names(tree: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                // A RangeVar, wrapped in a Node or stored directly (`relation` fields).
                if let (Some(schema), Some(rel)) = (
                    map.get("schemaname").and_then(Value::as_str),
                    map.get("relname").and_then(Value::as_str),
                ) {
                    if schema.is_empty() {
                        out.push(rel.to_string());
                    }
                }
                for (k, val) in map {
                    match k.as_str() {
                        "DropStmt" => {
                            for obj in val
                                .get("objects")
                                .and_then(Value::as_array)
                                .into_iter()
                                .flatten()
                            {
                                if let Some(("List", l)) = unwrap_node(obj) {
                                    let parts = names(l, "items");
                                    if parts.len() == 1 {
                                        out.push(parts[0].clone());
                                    }
                                }
                            }
                            walk(val, out);
                        }
                        _ => walk(val, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(tree, &mut out);
    out
}

/// The portal a FETCH or MOVE runs.
pub fn fetch_portal(tree: &Value) -> Option<String> {
    let (kind, body) = unwrap_node(tree)?;
    (kind == "FetchStmt")
        .then(|| body.get("portalname")?.as_str().map(str::to_string))
        .flatten()
}

/// The node kind of a statement tree (`SelectStmt`, …).
pub fn top_kind(tree: &Value) -> Option<&str> {
    tree.get("node")?
        .as_object()?
        .keys()
        .next()
        .map(|k| k.as_str())
}

fn statement_name(kind: &str) -> String {
    kind.strip_suffix("Stmt").unwrap_or(kind).to_string()
}

struct Judge<'a> {
    dangerous: &'a dyn Fn(&str) -> bool,
    nesting: u8,
    class: Class,
    reason: String,
    literal_sensitive: bool,
}

/// A field whose value is a node of a fixed kind stored without the `{"<Kind>": …}` wrapper (protobuf
/// message fields that are not `Node`): the arms of a set operation, CALL's function call, the SET of
/// ALTER ROLE/DATABASE/SYSTEM.
fn direct_node(field: &str, val: &Value) -> Option<&'static str> {
    if !val.is_object() {
        return None;
    }
    match field {
        "larg" | "rarg" => Some("SelectStmt"),
        "funccall" => Some("FuncCall"),
        "setstmt" => Some("VariableSetStmt"),
        _ => None,
    }
}

/// The node of a `{"node": {"<Kind>": body}}` wrapper.
fn unwrap_node(v: &Value) -> Option<(&str, &Value)> {
    let (k, body) = v.get("node")?.as_object()?.iter().next()?;
    Some((k.as_str(), body))
}

/// The nodes of a list field, as (kind, body), borrowed.
fn list<'a>(v: &'a Value, field: &str) -> Vec<(&'a str, &'a Value)> {
    v.get(field)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(unwrap_node).collect())
        .unwrap_or_default()
}

/// The `sval`s of a list of String nodes (a qualified name).
fn names(v: &Value, field: &str) -> Vec<String> {
    list(v, field)
        .into_iter()
        .filter(|(k, _)| *k == "String")
        .filter_map(|(_, b)| b.get("sval").and_then(Value::as_str).map(str::to_string))
        .collect()
}

fn int(v: &Value, field: &str) -> i32 {
    v.get(field)
        .and_then(Value::as_i64)
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(0)
}

fn is_null(v: &Value, field: &str) -> bool {
    v.get(field).is_none_or(Value::is_null)
}

fn nonempty(v: &Value, field: &str) -> bool {
    v.get(field)
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

fn enum_name<E: TryFrom<i32>>(n: i32, name: impl Fn(E) -> &'static str) -> &'static str {
    E::try_from(n).map(name).unwrap_or("?")
}

impl Judge<'_> {
    fn raise(&mut self, class: Class, why: impl FnOnce() -> String) {
        if class > self.class
            || self.reason.is_empty() && class == self.class && class > Class::Read
        {
            self.class = class;
            self.reason = why();
        }
    }

    /// Walks any JSON value: every `{"<UpperCaseKind>": body}` member is a node.
    fn walk(&mut self, v: &Value, runs: bool) {
        match v {
            Value::Object(map) => {
                for (k, val) in map {
                    if k.starts_with(|c: char| c.is_ascii_uppercase()) {
                        self.node(k, val, runs);
                    } else if let Some(kind) = direct_node(k, val) {
                        self.node(kind, val, runs);
                    } else {
                        self.walk(val, runs);
                    }
                }
            }
            Value::Array(a) => {
                for x in a {
                    self.walk(x, runs);
                }
            }
            _ => {}
        }
    }

    fn walk_field(&mut self, body: &Value, field: &str, runs: bool) {
        if let Some(v) = body.get(field) {
            self.walk(v, runs);
        }
    }

    /// Walks every field but the ones named.
    fn walk_except(&mut self, body: &Value, skip: &[&str], runs: bool) {
        if let Some(map) = body.as_object() {
            for (k, v) in map {
                if !skip.contains(&k.as_str()) {
                    self.walk(v, runs);
                }
            }
        }
    }

    fn node(&mut self, kind: &str, body: &Value, runs: bool) {
        match kind {
            "FuncCall" => self.func_call(body),
            "ExplainStmt" => {
                let analyze = self.explain_analyze(body);
                if runs {
                    self.raise(Class::Read, || "EXPLAIN".into());
                }
                self.walk_field(body, "query", runs && analyze);
                self.walk_except(body, &["query"], runs);
                return;
            }
            // Bodies that are stored, not run, by this statement: their functions still count.
            "CreateFunctionStmt" | "ViewStmt" | "RuleStmt" => {
                if runs {
                    self.statement(kind, body);
                }
                self.walk(body, false);
                return;
            }
            _ => {
                if runs && (kind.ends_with("Stmt") || kind == "SetOperationStmt") {
                    self.statement(kind, body);
                }
            }
        }
        self.walk(body, runs);
    }

    /// EXPLAIN's options: ANALYZE (or ANALYSE) as PostgreSQL reads them, the last one winning. A value
    /// that is not exactly one of PostgreSQL's boolean spellings counts as true.
    fn explain_analyze(&mut self, body: &Value) -> bool {
        let mut analyze = false;
        for (k, opt) in list(body, "options") {
            if k != "DefElem" {
                continue;
            }
            let name = opt.get("defname").and_then(Value::as_str).unwrap_or("");
            if name != "analyze" && name != "analyse" {
                continue;
            }
            analyze = match opt.get("arg").and_then(unwrap_node) {
                None => true,
                Some((k, arg)) => {
                    self.literal_sensitive = true;
                    let text = match k {
                        "String" => arg.get("sval").and_then(Value::as_str).map(str::to_string),
                        "Integer" => arg
                            .get("ival")
                            .and_then(Value::as_i64)
                            .map(|n| n.to_string()),
                        "Boolean" => arg
                            .get("boolval")
                            .and_then(Value::as_bool)
                            .map(|b| b.to_string()),
                        "AConst" => aconst_text(arg),
                        _ => None,
                    };
                    !text.is_some_and(|t| is_false_spelling(&t))
                }
            };
        }
        analyze
    }

    fn func_call(&mut self, body: &Value) {
        let name = names(body, "funcname")
            .last()
            .map(|n| n.to_lowercase())
            .unwrap_or_default();
        if (self.dangerous)(&name) {
            self.raise(Class::Privileged, || format!("calls {name}"));
        }
        if let Some(&(_, arg)) = SQL_EXECUTING_BUILTINS.iter().find(|(n, _)| *n == name) {
            let args = list(body, "args");
            let text = args.get(arg).and_then(|(k, b)| match *k {
                "AConst" => aconst_string(b),
                _ => None,
            });
            match text {
                Some(sql) if self.nesting < MAX_NESTED_SQL => {
                    self.literal_sensitive = true;
                    match parse(&sql, true) {
                        Ok(stmts) => {
                            for (_, _, tree) in stmts {
                                let v = judge_at(&tree, self.dangerous, self.nesting + 1);
                                self.literal_sensitive |= v.literal_sensitive;
                                self.raise(v.class, || {
                                    format!("{name} runs SQL that {}", v.reason)
                                });
                            }
                        }
                        Err(e) => self.raise(Class::Unparsed, || {
                            format!("{name} runs SQL PostgreSQL cannot parse: {e}")
                        }),
                    }
                }
                _ => self.raise(Class::Privileged, || {
                    format!("{name} runs SQL text that is not a literal")
                }),
            }
        }
    }

    /// Raises the class to this statement's own (its nested parts are walked by the caller).
    fn statement(&mut self, kind: &str, body: &Value) {
        let name = || statement_name(kind);
        match kind {
            "SelectStmt" | "SetOperationStmt" => {
                self.raise(Class::Read, || "SELECT".into());
                if !is_null(body, "into_clause") {
                    self.raise(Class::Ddl, || "SELECT … INTO creates a table".into());
                }
                if nonempty(body, "locking_clause") {
                    self.raise(Class::Write, || {
                        "SELECT … FOR UPDATE/SHARE locks rows".into()
                    });
                }
            }
            "InsertStmt" => self.raise(Class::Write, || "INSERT".into()),
            "UpdateStmt" | "DeleteStmt" => {
                let verb = if kind == "UpdateStmt" {
                    "UPDATE"
                } else {
                    "DELETE"
                };
                let from = if kind == "UpdateStmt" {
                    "from_clause"
                } else {
                    "using_clause"
                };
                let target = Target::of(body, nonempty(body, from));
                match body.get("where_clause").filter(|w| !w.is_null()) {
                    None => self.raise(Class::Destructive, || format!("{verb} without WHERE")),
                    Some(w) => match target.condition(w, &mut self.literal_sensitive) {
                        Filter::Rows => self.raise(Class::Write, || verb.into()),
                        Filter::Never => self.raise(Class::Write, || format!("{verb} WHERE false")),
                        Filter::AllRows(why) => {
                            self.raise(Class::Destructive, || format!("{verb} with {why}"))
                        }
                    },
                }
            }
            "MergeStmt" => self.merge(body),
            "CallStmt" => self.raise(Class::Write, || "CALL".into()),
            "CopyStmt" => {
                let file = body.get("filename").and_then(Value::as_str).unwrap_or("");
                if body.get("is_program").and_then(Value::as_bool) == Some(true) {
                    self.raise(Class::Privileged, || {
                        "COPY … PROGRAM runs a shell command".into()
                    });
                } else if !file.is_empty() {
                    self.raise(Class::Privileged, || "COPY to or from a server file".into());
                } else {
                    self.raise(Class::Write, || "COPY FROM STDIN / TO STDOUT".into());
                }
            }
            "TransactionStmt" => {
                self.raise(Class::Session, || "transaction control".into());
            }
            "VariableSetStmt" | "VariableShowStmt" | "DiscardStmt" | "ListenStmt"
            | "UnlistenStmt" | "NotifyStmt" | "DeallocateStmt" | "ExecuteStmt" | "FetchStmt"
            | "ClosePortalStmt" | "ConstraintsSetStmt" | "PrepareStmt" | "DeclareCursorStmt" => {
                self.raise(Class::Session, name)
            }
            "VacuumStmt" => {
                let full = list(body, "options").iter().any(|(k, o)| {
                    *k == "DefElem" && o.get("defname").and_then(Value::as_str) == Some("full")
                });
                if full {
                    self.raise(Class::Privileged, || "VACUUM FULL".into());
                } else {
                    self.raise(Class::Session, || "VACUUM/ANALYZE".into());
                }
            }
            "ReturnStmt" | "PlassignStmt" => self.raise(Class::Read, name),
            "CreateStmt"
            | "CreateTableAsStmt"
            | "ViewStmt"
            | "IndexStmt"
            | "CreateSchemaStmt"
            | "CreateSeqStmt"
            | "AlterSeqStmt"
            | "CompositeTypeStmt"
            | "CreateEnumStmt"
            | "CreateRangeStmt"
            | "AlterEnumStmt"
            | "CreateDomainStmt"
            | "CreateFunctionStmt"
            | "AlterFunctionStmt"
            | "CreateTrigStmt"
            | "CreateEventTrigStmt"
            | "AlterEventTrigStmt"
            | "CreateExtensionStmt"
            | "AlterExtensionStmt"
            | "AlterExtensionContentsStmt"
            | "CreatePolicyStmt"
            | "AlterPolicyStmt"
            | "RuleStmt"
            | "DefineStmt"
            | "CreateOpClassStmt"
            | "CreateOpFamilyStmt"
            | "AlterOpFamilyStmt"
            | "CreateCastStmt"
            | "CreateConversionStmt"
            | "CreateTransformStmt"
            | "CreatePlangStmt"
            | "CreateAmStmt"
            | "CreateFdwStmt"
            | "AlterFdwStmt"
            | "CreateForeignServerStmt"
            | "AlterForeignServerStmt"
            | "CreateForeignTableStmt"
            | "CreateUserMappingStmt"
            | "AlterUserMappingStmt"
            | "ImportForeignSchemaStmt"
            | "CreatePublicationStmt"
            | "AlterPublicationStmt"
            | "CreateStatsStmt"
            | "AlterStatsStmt"
            | "CommentStmt"
            | "SecLabelStmt"
            | "RefreshMatViewStmt"
            | "RenameStmt"
            | "AlterObjectSchemaStmt"
            | "AlterObjectDependsStmt"
            | "AlterTableMoveAllStmt"
            | "AlterTsdictionaryStmt"
            | "AlterTsconfigurationStmt"
            | "AlterCollationStmt"
            | "AlterOperatorStmt"
            | "AlterTypeStmt"
            | "ReplicaIdentityStmt"
            | "CreatedbStmt" => self.raise(Class::Ddl, name),
            "AlterDomainStmt" => {
                // subtype 'X': DROP CONSTRAINT.
                if body.get("subtype").and_then(Value::as_str) == Some("X") {
                    self.raise(Class::Destructive, || {
                        "ALTER DOMAIN … DROP CONSTRAINT".into()
                    });
                } else {
                    self.raise(Class::Ddl, name);
                }
            }
            "AlterTableStmt" => {
                self.raise(Class::Ddl, || "ALTER TABLE".into());
                for (k, cmd) in list(body, "cmds") {
                    if k != "AlterTableCmd" {
                        continue;
                    }
                    let sub =
                        enum_name(int(cmd, "subtype"), |e: pb::AlterTableType| e.as_str_name());
                    match sub {
                        "AT_DropColumn"
                        | "AT_DropConstraint"
                        | "AT_AlterColumnType"
                        | "AT_DetachPartition"
                        | "AT_DetachPartitionFinalize"
                        | "AT_DropExpression"
                        | "AT_DropIdentity"
                        | "AT_DropInherit"
                        | "AT_DropOf"
                        | "?" => self.raise(Class::Destructive, || {
                            format!("ALTER TABLE {}", &sub[3.min(sub.len())..])
                        }),
                        "AT_ChangeOwner" => {
                            self.raise(Class::Privileged, || "ALTER TABLE … OWNER TO".into())
                        }
                        _ => {}
                    }
                }
            }
            "DropStmt" | "TruncateStmt" | "DropSubscriptionStmt" | "DropUserMappingStmt" => self
                .raise(Class::Destructive, || match kind {
                    "TruncateStmt" => "TRUNCATE".into(),
                    _ => "DROP".into(),
                }),
            "GrantStmt"
            | "GrantRoleStmt"
            | "CreateRoleStmt"
            | "AlterRoleStmt"
            | "AlterRoleSetStmt"
            | "DropRoleStmt"
            | "ReassignOwnedStmt"
            | "DropOwnedStmt"
            | "AlterSystemStmt"
            | "AlterDefaultPrivilegesStmt"
            | "DoStmt"
            | "ClusterStmt"
            | "ReindexStmt"
            | "CheckPointStmt"
            | "LoadStmt"
            | "AlterOwnerStmt"
            | "DropdbStmt"
            | "AlterDatabaseStmt"
            | "AlterDatabaseSetStmt"
            | "AlterDatabaseRefreshCollStmt"
            | "CreateTableSpaceStmt"
            | "AlterTableSpaceOptionsStmt"
            | "DropTableSpaceStmt"
            | "CreateSubscriptionStmt"
            | "AlterSubscriptionStmt" => self.raise(Class::Privileged, name),
            "LockStmt" => self.raise(Class::Privileged, || "LOCK".into()),
            _ => self.raise(Class::Unparsed, || {
                format!("PostgreSQL statement kind {kind} is not judged by stepgate")
            }),
        }
    }

    fn merge(&mut self, body: &Value) {
        self.raise(Class::Write, || "MERGE".into());
        let target = Target::of(body, true);
        let join = match body.get("join_condition").filter(|w| !w.is_null()) {
            None => Filter::AllRows("no join condition".into()),
            Some(c) => target.condition(c, &mut self.literal_sensitive),
        };
        for (k, clause) in list(body, "merge_when_clauses") {
            if k != "MergeWhenClause" {
                continue;
            }
            let cmd = enum_name(int(clause, "command_type"), |e: pb::CmdType| {
                e.as_str_name()
            });
            if cmd != "CMD_DELETE" && cmd != "CMD_UPDATE" {
                continue;
            }
            let kind = enum_name(int(clause, "match_kind"), |e: pb::MergeMatchKind| {
                e.as_str_name()
            });
            let cond = match clause.get("condition").filter(|w| !w.is_null()) {
                None => Filter::AllRows("no condition".into()),
                Some(c) => target.condition(c, &mut self.literal_sensitive),
            };
            let every_row = match kind {
                // Rows without a match: with an empty source, every row of the target.
                "MERGE_WHEN_NOT_MATCHED_BY_SOURCE" => matches!(cond, Filter::AllRows(_)),
                "MERGE_WHEN_MATCHED" => {
                    matches!(join, Filter::AllRows(_)) && matches!(cond, Filter::AllRows(_))
                }
                _ => false,
            };
            if every_row {
                let verb = if cmd == "CMD_DELETE" {
                    "DELETE"
                } else {
                    "UPDATE"
                };
                self.raise(Class::Destructive, || {
                    format!("MERGE … THEN {verb} on every row of the target")
                });
            }
        }
    }
}

/// `'false'`, `off`, `0`, `no` … as PostgreSQL's parse_bool reads them (prefixes of true/false/yes/no,
/// `on`/`off`, `1`/`0`); only an exact false spelling counts as false.
fn is_false_spelling(t: &str) -> bool {
    let t = t.trim().to_ascii_lowercase();
    if t.is_empty() {
        return false;
    }
    t == "0"
        || "false".starts_with(&t)
        || "no".starts_with(&t)
        || (t.len() >= 2 && "off".starts_with(&t))
}

fn aconst_string(b: &Value) -> Option<String> {
    b.get("val")?
        .get("Sval")?
        .get("sval")?
        .as_str()
        .map(str::to_string)
}

fn aconst_text(b: &Value) -> Option<String> {
    let val = b.get("val")?;
    if let Some(s) = val.get("Sval") {
        return s.get("sval")?.as_str().map(str::to_string);
    }
    if let Some(i) = val.get("Ival") {
        return Some(i.get("ival")?.as_i64()?.to_string());
    }
    if let Some(b) = val.get("Boolval") {
        return Some(b.get("boolval")?.as_bool()?.to_string());
    }
    None
}

/// What a condition does to the target's rows.
enum Filter {
    /// Depends on each row.
    Rows,
    /// Literal `false` or `NULL`: no row.
    Never,
    /// Holds for every row (or cannot be shown not to), with why.
    AllRows(String),
}

/// The table an UPDATE/DELETE/MERGE changes, for telling its columns apart.
struct Target {
    names: Vec<String>,
    /// Other tables are joined in (FROM, USING, MERGE's source): only columns qualified with the
    /// target's name count as the target's.
    joined: bool,
}

impl Target {
    fn of(body: &Value, joined: bool) -> Target {
        let mut names = Vec::new();
        if let Some(rel) = body.get("relation") {
            if let Some(n) = rel.get("relname").and_then(Value::as_str) {
                names.push(n.to_string());
            }
            if let Some(a) = rel
                .get("alias")
                .and_then(|a| a.get("aliasname"))
                .and_then(Value::as_str)
            {
                // With an alias, the table's own name no longer names it.
                names = vec![a.to_string()];
            }
        }
        Target { names, joined }
    }

    fn condition(&self, c: &Value, literal_sensitive: &mut bool) -> Filter {
        if let Some((k, b)) = unwrap_node(c) {
            if k == "AConst" {
                *literal_sensitive = true;
                if b.get("isnull").and_then(Value::as_bool) == Some(true)
                    || b.get("val")
                        .and_then(|v| v.get("Boolval"))
                        .and_then(|v| v.get("boolval"))
                        .and_then(Value::as_bool)
                        == Some(false)
                {
                    return Filter::Never;
                }
                return Filter::AllRows("a constant condition".into());
            }
        }
        if !self.references(c, false) {
            return Filter::AllRows("a condition that references no column of the target".into());
        }
        if self.tautology(c) {
            return Filter::AllRows("a condition that is always true".into());
        }
        Filter::Rows
    }

    /// True when `v` references a column of the target row: an unqualified column outside subqueries
    /// (when nothing else is joined in), or a column qualified with the target's name anywhere.
    fn references(&self, v: &Value, in_subquery: bool) -> bool {
        match v {
            Value::Object(map) => map.iter().any(|(k, val)| match k.as_str() {
                "ColumnRef" => {
                    let fields: Vec<String> = list(val, "fields")
                        .into_iter()
                        .map(|(k, b)| {
                            if k == "String" {
                                b.get("sval")
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_string()
                            } else {
                                "*".to_string()
                            }
                        })
                        .collect();
                    match fields.len() {
                        0 => false,
                        1 => !in_subquery && !self.joined,
                        n => self.names.iter().any(|t| *t == fields[n - 2]),
                    }
                }
                // `x IN (SELECT …)`: the tested expression is outside the subquery.
                "SubLink" => {
                    val.get("testexpr")
                        .is_some_and(|t| self.references(t, in_subquery))
                        || val
                            .get("subselect")
                            .is_some_and(|t| self.references(t, true))
                }
                "RangeSubselect" | "SelectStmt" => self.references(val, true),
                _ => self.references(val, in_subquery),
            }),
            Value::Array(a) => a.iter().any(|x| self.references(x, in_subquery)),
            _ => false,
        }
    }

    /// `x = x`, `x >= x`, `x <= x`, `x IS NOT DISTINCT FROM x`, `x IN (…, x, …)`, `NOT (x <> x)`, and an OR
    /// with such a branch or an AND of only such branches.
    fn tautology(&self, c: &Value) -> bool {
        let Some((k, b)) = unwrap_node(c) else {
            return false;
        };
        match k {
            "BoolExpr" => {
                let op = enum_name(int(b, "boolop"), |e: pb::BoolExprType| e.as_str_name());
                let args: &[Value] = b
                    .get("args")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                match op {
                    "OR_EXPR" => args.iter().any(|a| {
                        self.tautology(a) || !self.references(a, false) && !is_literal_false(a)
                    }),
                    "AND_EXPR" => args.iter().all(|a| self.tautology(a)),
                    "NOT_EXPR" => args.first().is_some_and(|a| self.contradiction(a)),
                    _ => false,
                }
            }
            "AExpr" => {
                let (kind, op) = aexpr_kind_op(b);
                let (l, r) = (b.get("lexpr"), b.get("rexpr"));
                let same = || self.same_sides(b);
                match kind {
                    "AEXPR_OP" => matches!(op.as_str(), "=" | ">=" | "<=") && same(),
                    "AEXPR_NOT_DISTINCT" => same(),
                    "AEXPR_IN" if op == "=" => match (l, r.and_then(Value::as_object)) {
                        (Some(l), _) => {
                            let items = r
                                .and_then(|r| r.get("node"))
                                .and_then(|n| n.get("List"))
                                .and_then(|l| l.get("items"))
                                .and_then(Value::as_array)
                                .map(Vec::as_slice)
                                .unwrap_or(&[]);
                            let nl = self.norm(l);
                            items.iter().any(|i| self.norm(i) == nl)
                        }
                        _ => false,
                    },
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// `x <> x`, `x < x`, `x > x`, `x IS DISTINCT FROM x`, `NOT (tautology)`.
    fn contradiction(&self, c: &Value) -> bool {
        let Some((k, b)) = unwrap_node(c) else {
            return false;
        };
        match k {
            "AExpr" => {
                let (kind, op) = aexpr_kind_op(b);
                let same = self.same_sides(b);
                same && (kind == "AEXPR_DISTINCT"
                    || kind == "AEXPR_OP" && matches!(op.as_str(), "<>" | "!=" | "<" | ">"))
            }
            "BoolExpr" => {
                let op = enum_name(int(b, "boolop"), |e: pb::BoolExprType| e.as_str_name());
                op == "NOT_EXPR"
                    && b.get("args")
                        .and_then(Value::as_array)
                        .and_then(|a| a.first())
                        .is_some_and(|a| self.tautology(a))
            }
            _ => false,
        }
    }

    /// Both sides of an A_Expr are the same expression (see [`Target::norm`]).
    fn same_sides(&self, b: &Value) -> bool {
        match (b.get("lexpr"), b.get("rexpr")) {
            (Some(l), Some(r)) => self.norm(l) == self.norm(r),
            _ => false,
        }
    }

    /// An expression with positions removed and the target's qualification dropped from its columns, so
    /// `t.id` and `id` compare equal.
    fn norm(&self, v: &Value) -> Value {
        match v {
            Value::Object(map) => {
                let mut out = serde_json::Map::new();
                for (k, val) in map {
                    if k == "location" {
                        continue;
                    }
                    if k == "ColumnRef" {
                        let mut fields = val
                            .get("fields")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default();
                        if fields.len() >= 2 {
                            let q = fields[fields.len() - 2]
                                .get("node")
                                .and_then(|n| n.get("String"))
                                .and_then(|s| s.get("sval"))
                                .and_then(Value::as_str)
                                .unwrap_or("");
                            if self.names.iter().any(|t| t == q) {
                                fields.drain(..fields.len() - 1);
                            }
                        }
                        out.insert(k.clone(), serde_json::json!({ "fields": fields }));
                        continue;
                    }
                    out.insert(k.clone(), self.norm(val));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(|x| self.norm(x)).collect()),
            other => other.clone(),
        }
    }
}

/// An A_Expr's kind (`AEXPR_OP`, …) and operator name.
fn aexpr_kind_op(b: &Value) -> (&'static str, String) {
    let kind = enum_name(int(b, "kind"), |e: pb::AExprKind| e.as_str_name());
    (kind, names(b, "name").last().cloned().unwrap_or_default())
}

fn is_literal_false(c: &Value) -> bool {
    match unwrap_node(c) {
        Some(("AConst", b)) => {
            b.get("isnull").and_then(Value::as_bool) == Some(true)
                || b.get("val")
                    .and_then(|v| v.get("Boolval"))
                    .and_then(|v| v.get("boolval"))
                    .and_then(Value::as_bool)
                    == Some(false)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(sql: &str) -> (Class, String) {
        let stmts = parse(sql, true).unwrap();
        let dangerous = |n: &str| n == "pg_read_file" || n == "lo_export";
        let mut best = (Class::Read, String::new());
        for (_, _, t) in stmts {
            let v = judge(&t, &dangerous);
            if v.class >= best.0 {
                best = (v.class, v.reason);
            }
        }
        best
    }

    #[test]
    fn table() {
        use Class::*;
        for (sql, want) in [
            ("SELECT 1", Read),
            ("SELECT * FROM t WHERE id = 1 FOR UPDATE", Write),
            ("SELECT * INTO x FROM t", Ddl),
            ("DELETE FROM t", Destructive),
            ("DELETE FROM t WHERE id = 1", Write),
            ("DELETE FROM t WHERE false", Write),
            ("DELETE FROM t WHERE EXISTS (SELECT 1)", Destructive),
            ("DELETE FROM t WHERE (SELECT true)", Destructive),
            ("DELETE FROM t WHERE (id) = id", Destructive),
            ("DELETE FROM t WHERE id = t.id", Destructive),
            ("DELETE FROM t AS x WHERE x.id = id", Destructive),
            (
                "DELETE FROM t WHERE id IS NOT DISTINCT FROM id",
                Destructive,
            ),
            ("DELETE FROM t WHERE NOT (id <> id)", Destructive),
            ("DELETE FROM t WHERE id = 3 OR true", Destructive),
            ("DELETE FROM t WHERE id IN (1, id)", Destructive),
            ("DELETE FROM t WHERE 1::int = 1.4::int", Destructive),
            ("DELETE FROM t WHERE '1'::int = '01'::int", Destructive),
            ("DELETE FROM t WHERE 'a'::char(3) = 'a  '", Destructive),
            ("DELETE FROM t WHERE 1e400 > 1e399", Destructive),
            ("DELETE FROM t WHERE 'a' < 'B'", Destructive),
            (
                "DELETE FROM t WHERE EXISTS (SELECT 1 FROM o WHERE o.tid = t.id)",
                Write,
            ),
            (
                "UPDATE t SET a = 1 FROM (SELECT 1 AS one) s WHERE one = 1",
                Destructive,
            ),
            ("UPDATE t SET a = o.a FROM o WHERE t.id = o.id", Write),
            (
                "MERGE INTO t USING (SELECT 1) s ON true WHEN MATCHED AND true THEN DELETE",
                Destructive,
            ),
            (
                "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
                Write,
            ),
            (
                "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE THEN DELETE",
                Destructive,
            ),
            ("EXPLAIN DELETE FROM t", Read),
            ("EXPLAIN (ANALYZE) DELETE FROM t", Destructive),
            ("EXPLAIN (U&\"analyze\") DELETE FROM t", Destructive),
            ("EXPLAIN (ANALYSE) DELETE FROM t", Destructive),
            (
                "EXPLAIN (ANALYZE off, ANALYZE on) DELETE FROM t",
                Destructive,
            ),
            ("EXPLAIN (ANALYZE on, ANALYZE off) DELETE FROM t", Read),
            ("EXPLAIN (ANALYZE 'maybe') DELETE FROM t", Destructive),
            ("SELECT U&\"pg_read_file\"('/etc/hostname')", Privileged),
            ("SELECT pg_catalog.\"pg_read_file\"('x')", Privileged),
            (
                "SELECT query_to_xml('select lo_export(424242, ''proof.bin'')', true, true, '')",
                Privileged,
            ),
            (
                "SELECT query_to_xml('delete from t', true, true, '')",
                Destructive,
            ),
            ("SELECT query_to_xml('select 1', true, true, '')", Read),
            ("SELECT query_to_xml(q, true, true, '') FROM qs", Privileged),
            ("COPY (SELECT 1) TO PROGRAM 'id'", Privileged),
            ("COPY t FROM STDIN", Write),
            (
                "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
                Destructive,
            ),
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
                Ddl,
            ),
            ("DO $$ BEGIN END $$", Privileged),
            ("VACUUM (FULL) t", Privileged),
            ("VACUUM ANALYZE t", Session),
            ("ALTER TABLE t DROP COLUMN a", Destructive),
            ("ALTER TABLE t ADD COLUMN a int", Ddl),
            ("ALTER TABLE t OWNER TO x", Privileged),
            ("DECLARE c CURSOR FOR SELECT * FROM t FOR UPDATE", Write),
            ("PREPARE p AS DELETE FROM t", Destructive),
            ("TABLE t", Read),
            ("COMMIT PREPARED 'x'", Session),
            ("SELECT 1 AS a INTO newt UNION SELECT 2", Ddl),
            ("SELECT 1 UNION (SELECT * FROM t FOR UPDATE)", Write),
        ] {
            let (got, why) = class(sql);
            assert_eq!(got, want, "{sql}: {why}");
        }
    }

    #[test]
    fn unqualified_names_are_found() {
        let names = |sql: &str| -> Vec<String> {
            parse(sql, true)
                .unwrap()
                .iter()
                .flat_map(|(_, _, t)| unqualified_names(t))
                .collect()
        };
        assert_eq!(names("DROP TABLE orders"), ["orders"]);
        assert!(names("DROP TABLE sales.orders").is_empty());
        assert_eq!(names("TRUNCATE a, s.b"), ["a"]);
        assert_eq!(names("ALTER TABLE t DROP COLUMN c"), ["t"]);
        assert!(names("ALTER TABLE s.t DROP COLUMN c").is_empty());
        assert_eq!(
            names("DELETE FROM s.t WHERE id IN (SELECT id FROM u)"),
            ["u"]
        );
    }

    #[test]
    fn what_a_rollback_undoes() {
        let nt = |sql: &str| {
            parse(sql, true)
                .unwrap()
                .iter()
                .any(|(_, _, t)| non_transactional(t))
        };
        assert!(!nt("DROP TABLE t"));
        assert!(!nt("ALTER TABLE t ADD COLUMN a int"));
        assert!(nt("CREATE INDEX CONCURRENTLY i ON t (a)"));
        assert!(nt("DROP INDEX CONCURRENTLY i"));
        assert!(nt("DELETE FROM t WHERE id = nextval('s')"));
        assert!(nt("DROP DATABASE d"));
        assert!(nt("VACUUM FULL t"));
        assert!(nt("COPY (SELECT 1) TO PROGRAM 'x'"));
    }

    #[test]
    fn deep_inputs_are_refused_not_overflowed() {
        for sql in [
            format!("SELECT {}1", "1+".repeat(50_000)),
            format!("SELECT 1{}", "::int".repeat(50_000)),
            format!("{}SELECT 1", "EXPLAIN ANALYZE ".repeat(5_000)),
            format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000)),
        ] {
            assert!(parse(&sql, true).is_err(), "{}", &sql[..40]);
        }
    }
}
