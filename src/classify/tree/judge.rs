//! The walk that judges one statement tree: every statement node raises the class, every function call is
//! checked against the dangerous list and the built-ins that run SQL text, UPDATE/DELETE/MERGE conditions
//! are read by [`super::target`].

use pg_query::protobuf as pb;
use serde_json::Value;

use super::node::*;
use super::target::{Filter, Target};
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

/// PostgreSQL's `AccessShareLock` (lockdefs.h), as LockStmt's `mode` carries it.
const ACCESS_SHARE_LOCK: i32 = 1;

/// What the tree says about one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeVerdict {
    pub class: Class,
    /// The rule that gave the class (`DELETE without WHERE`, `calls pg_read_file`, …).
    pub reason: String,
    /// A literal's value took part in the decision: cache by exact text only.
    pub literal_sensitive: bool,
}

pub fn judge_at(tree: &Value, dangerous: &dyn Fn(&str) -> bool, nesting: u8) -> TreeVerdict {
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

struct Judge<'a> {
    dangerous: &'a dyn Fn(&str) -> bool,
    nesting: u8,
    class: Class,
    reason: String,
    literal_sensitive: bool,
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
            // ACCESS SHARE is the lock a SELECT takes (pg_dump takes it on every table it dumps): it
            // conflicts only with ACCESS EXCLUSIVE. Every stronger mode blocks writers or readers.
            "LockStmt" if int(body, "mode") == ACCESS_SHARE_LOCK => {
                self.raise(Class::Read, || "LOCK … IN ACCESS SHARE MODE".into())
            }
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
