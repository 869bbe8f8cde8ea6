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

mod judge;
mod node;
mod target;
#[cfg(test)]
mod tests;

use serde_json::Value;

pub use judge::{TreeVerdict, SQL_EXECUTING_BUILTINS};
use node::*;
pub use node::{parse, top_kind, without_values};

/// Judges one statement tree (`{"node": {"<Kind>": {…}}}`).
pub fn judge(tree: &Value, dangerous: &dyn Fn(&str) -> bool) -> TreeVerdict {
    judge::judge_at(tree, dangerous, 0)
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

/// The value of one string constant as PostgreSQL's scanner decodes it (`'…'`, `E'…'`, `U&'…'` with or
/// without UESCAPE, `$tag$…$tag$`), or None when `literal` is not exactly one string constant (a bit
/// string, a cast, more than one token…).
pub fn string_constant(literal: &str) -> Option<String> {
    let stmts = parse(&format!("SELECT {literal}"), true).ok()?;
    let [(_, _, tree)] = stmts.as_slice() else {
        return None;
    };
    let select = tree.get("node")?.get("SelectStmt")?;
    let targets = list(select, "target_list");
    let [("ResTarget", target)] = targets.as_slice() else {
        return None;
    };
    match unwrap_node(target.get("val")?)? {
        ("AConst", c) => aconst_string(c),
        _ => None,
    }
}
