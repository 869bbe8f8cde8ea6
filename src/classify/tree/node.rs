//! PostgreSQL's parser, and reading its tree: statements come out as JSON (`{"node": {"<Kind>": {…}}}`), and
//! these helpers read fields, lists, names and constants out of it.

use pg_query::protobuf as pb;
use serde_json::Value;

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

/// The node kind of a statement tree (`SelectStmt`, …).
pub fn top_kind(tree: &Value) -> Option<&str> {
    tree.get("node")?
        .as_object()?
        .keys()
        .next()
        .map(|k| k.as_str())
}

pub fn statement_name(kind: &str) -> String {
    kind.strip_suffix("Stmt").unwrap_or(kind).to_string()
}

/// A field whose value is a node of a fixed kind stored without the `{"<Kind>": …}` wrapper (protobuf
/// message fields that are not `Node`): the arms of a set operation, CALL's function call, the SET of
/// ALTER ROLE/DATABASE/SYSTEM.
pub fn direct_node(field: &str, val: &Value) -> Option<&'static str> {
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
pub fn unwrap_node(v: &Value) -> Option<(&str, &Value)> {
    let (k, body) = v.get("node")?.as_object()?.iter().next()?;
    Some((k.as_str(), body))
}

/// The nodes of a list field, as (kind, body), borrowed.
pub fn list<'a>(v: &'a Value, field: &str) -> Vec<(&'a str, &'a Value)> {
    v.get(field)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(unwrap_node).collect())
        .unwrap_or_default()
}

/// The `sval`s of a list of String nodes (a qualified name).
pub fn names(v: &Value, field: &str) -> Vec<String> {
    list(v, field)
        .into_iter()
        .filter(|(k, _)| *k == "String")
        .filter_map(|(_, b)| b.get("sval").and_then(Value::as_str).map(str::to_string))
        .collect()
}

pub fn int(v: &Value, field: &str) -> i32 {
    v.get(field)
        .and_then(Value::as_i64)
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(0)
}

pub fn is_null(v: &Value, field: &str) -> bool {
    v.get(field).is_none_or(Value::is_null)
}

pub fn nonempty(v: &Value, field: &str) -> bool {
    v.get(field)
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

pub fn enum_name<E: TryFrom<i32>>(n: i32, name: impl Fn(E) -> &'static str) -> &'static str {
    E::try_from(n).map(name).unwrap_or("?")
}

/// `'false'`, `off`, `0`, `no` … as PostgreSQL's parse_bool reads them (prefixes of true/false/yes/no,
/// `on`/`off`, `1`/`0`); only an exact false spelling counts as false.
pub fn is_false_spelling(t: &str) -> bool {
    let t = t.trim().to_ascii_lowercase();
    if t.is_empty() {
        return false;
    }
    t == "0"
        || "false".starts_with(&t)
        || "no".starts_with(&t)
        || (t.len() >= 2 && "off".starts_with(&t))
}

pub fn aconst_string(b: &Value) -> Option<String> {
    b.get("val")?
        .get("Sval")?
        .get("sval")?
        .as_str()
        .map(str::to_string)
}

pub fn aconst_text(b: &Value) -> Option<String> {
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

/// An A_Expr's kind (`AEXPR_OP`, …) and operator name.
pub fn aexpr_kind_op(b: &Value) -> (&'static str, String) {
    let kind = enum_name(int(b, "kind"), |e: pb::AExprKind| e.as_str_name());
    (kind, names(b, "name").last().cloned().unwrap_or_default())
}

pub fn is_literal_false(c: &Value) -> bool {
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
