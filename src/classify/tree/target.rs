//! Whether an UPDATE/DELETE/MERGE condition touches every row of its target: a condition that references no
//! column of the target (outside subqueries), or is a tautology, or is absent. Only literal `false`/`NULL`
//! count as never true; no constant is evaluated.

use pg_query::protobuf as pb;
use serde_json::Value;

use super::node::*;

/// What a condition does to the target's rows.
pub enum Filter {
    /// Depends on each row.
    Rows,
    /// Literal `false` or `NULL`: no row.
    Never,
    /// Holds for every row (or cannot be shown not to), with why.
    AllRows(String),
}

/// The table an UPDATE/DELETE/MERGE changes, for telling its columns apart.
pub struct Target {
    names: Vec<String>,
    /// Other tables are joined in (FROM, USING, MERGE's source): only columns qualified with the
    /// target's name count as the target's.
    joined: bool,
}

impl Target {
    pub fn of(body: &Value, joined: bool) -> Target {
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

    pub fn condition(&self, c: &Value, literal_sensitive: &mut bool) -> Filter {
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
