//! Classification of what sqlparser (PostgreSqlDialect) could parse.
//!
//! [`top_class`] judges one statement node by its own kind; [`classify`] walks the whole tree so the most
//! dangerous thing anywhere inside counts: data-modifying statements nested in CTEs at any depth,
//! `SELECT … INTO`, row locks, the statement of `EXPLAIN ANALYZE`, `PREPARE` and `DECLARE CURSOR`. Any node
//! kind not named here is `unparsed`.

use std::ops::ControlFlow;

use sqlparser::ast::{
    AlterColumnOperation, AlterTableOperation, BinaryOperator, CopyTarget, Expr, MergeAction,
    MergeClauseKind, ObjectType, Query, Select, SetExpr, Statement, UnaryOperator, Value, Visit,
    Visitor,
};

use crate::config::Class;

/// Facts gathered while classifying.
#[derive(Debug, Default, Clone, Copy)]
pub struct Findings {
    /// A literal value took part in the decision (`WHERE 1 = 1`, `EXPLAIN (ANALYZE 0)`): the verdict must not
    /// be reused for the same shape with other literals.
    pub literal_sensitive: bool,
}

/// The class of a parsed statement, including everything nested inside it.
pub fn classify(stmt: &Statement, found: &mut Findings) -> Class {
    if let Statement::Explain {
        analyze, options, ..
    } = stmt
    {
        if !*analyze && !explain_option_analyze(options.as_deref(), found) {
            // Plain EXPLAIN plans without executing: nothing inside runs.
            return Class::Read;
        }
    }
    let mut walker = Walker {
        class: Class::Read,
        found: Findings::default(),
    };
    let _ = stmt.visit(&mut walker);
    found.literal_sensitive |= walker.found.literal_sensitive;
    walker.class
}

struct Walker {
    class: Class,
    found: Findings,
}

impl Visitor for Walker {
    type Break = ();

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        self.class = self.class.max(top_class(s, &mut self.found));
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if !q.locks.is_empty() {
            self.class = self.class.max(Class::Write);
        }
        if q.for_clause.is_some()
            || q.format_clause.is_some()
            || !q.pipe_operators.is_empty()
            || q.settings.is_some()
        {
            self.class = Class::Unparsed;
        }
        if let SetExpr::Table(_) = q.body.as_ref() {
            // `TABLE t` reads.
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &Select) -> ControlFlow<()> {
        if s.into.is_some() {
            self.class = self.class.max(Class::Ddl);
        }
        ControlFlow::Continue(())
    }
}

fn explain_option_analyze(
    options: Option<&[sqlparser::ast::UtilityOption]>,
    found: &mut Findings,
) -> bool {
    let Some(options) = options else {
        return false;
    };
    // As PostgreSQL reads them: ANALYZE or ANALYSE, and the last one wins.
    let mut analyze = false;
    for o in options {
        let name = o.name.value.to_ascii_lowercase();
        if name == "analyze" || name == "analyse" {
            analyze = match &o.arg {
                None => true,
                Some(arg) => {
                    found.literal_sensitive = true;
                    !is_false_literal(arg)
                }
            };
        }
    }
    analyze
}

/// `false`, `off`, `0`, `'false'`, `'off'`, `'no'`, `'0'`: what PostgreSQL accepts as a false boolean option.
fn is_false_literal(e: &Expr) -> bool {
    let text = match e {
        Expr::Value(v) => match &v.value {
            Value::Boolean(b) => return !*b,
            Value::Number(n, _) => n.clone(),
            Value::SingleQuotedString(s) => s.clone(),
            _ => return false,
        },
        Expr::Identifier(i) => i.value.clone(),
        _ => return false,
    };
    matches!(
        text.to_ascii_lowercase().as_str(),
        "false" | "off" | "0" | "no" | "f" | "n"
    )
}

/// The class of one statement node by its own kind (nested statements are visited separately).
pub fn top_class(stmt: &Statement, found: &mut Findings) -> Class {
    use Statement as S;
    match stmt {
        S::Query(_) => Class::Read,
        S::Insert(_) => Class::Write,
        S::Update(u) => filtered_change(u.selection.as_ref(), found),
        S::Delete(d) => filtered_change(d.selection.as_ref(), found),
        S::Merge(m) => {
            let unconditional_delete = m.clauses.iter().any(|c| {
                matches!(c.action, MergeAction::Delete { .. })
                    && c.predicate.is_none()
                    && matches!(
                        c.clause_kind,
                        MergeClauseKind::Matched | MergeClauseKind::NotMatchedBySource
                    )
            });
            if unconditional_delete {
                Class::Destructive
            } else {
                Class::Write
            }
        }
        S::Copy { target, .. } => match target {
            CopyTarget::Stdin | CopyTarget::Stdout => Class::Write,
            _ => Class::Privileged,
        },
        S::Call(_) => Class::Write,
        S::Explain { .. } | S::ExplainTable { .. } => Class::Read,
        S::StartTransaction { .. }
        | S::Commit { .. }
        | S::Rollback { .. }
        | S::Savepoint { .. }
        | S::ReleaseSavepoint { .. }
        | S::Set(_)
        | S::ShowVariable { .. }
        | S::ShowVariables { .. }
        | S::Discard { .. }
        | S::LISTEN { .. }
        | S::UNLISTEN { .. }
        | S::NOTIFY { .. }
        | S::Deallocate { .. }
        | S::Execute { .. }
        | S::Fetch { .. }
        | S::Close { .. }
        | S::Declare { .. }
        | S::Prepare { .. }
        | S::Reset(_)
        | S::Analyze(_) => Class::Session,
        S::Vacuum(v) => {
            if v.full {
                Class::Privileged
            } else {
                Class::Session
            }
        }
        S::CreateRole(_) | S::CreateUser(_) | S::AlterRole { .. } | S::AlterUser(_) => {
            Class::Privileged
        }
        // The lock a SELECT takes; PostgreSQL's tree is the referee for the mode too.
        S::Lock(sqlparser::ast::Lock {
            lock_mode: Some(sqlparser::ast::LockTableMode::AccessShare),
            ..
        }) => Class::Read,
        S::Lock(_) => Class::Privileged,
        S::Grant(_)
        | S::Revoke(_)
        | S::GrantRole(_)
        | S::RevokeRole(_)
        | S::AlterDefaultPrivileges(_)
        | S::Load { .. }
        | S::Kill { .. } => Class::Privileged,
        S::CreateTable(_)
        | S::CreateView(_)
        | S::CreateIndex(_)
        | S::CreateSchema { .. }
        | S::CreateSequence { .. }
        | S::CreateType { .. }
        | S::CreateDomain(_)
        | S::CreateFunction(_)
        | S::CreateProcedure { .. }
        | S::CreateTrigger(_)
        | S::CreateExtension(_)
        | S::CreatePolicy(_)
        | S::CreateRule(_)
        | S::CreateOperator(_)
        | S::CreateOperatorFamily(_)
        | S::CreateOperatorClass(_)
        | S::CreateTextSearch(_)
        | S::CreateAggregate(_)
        | S::CreateCollation(_)
        | S::CreateDatabase { .. }
        | S::CreateForeignTable(_)
        | S::CreateServer(_)
        | S::CreateForeignDataWrapper(_)
        | S::CreateUserMapping(_)
        | S::AlterIndex { .. }
        | S::AlterView(_)
        | S::AlterSchema(_)
        | S::AlterType(_)
        | S::AlterFunction(_)
        | S::AlterPolicy(_)
        | S::AlterTrigger(_)
        | S::AlterCollation(_)
        | S::AlterOperator(_)
        | S::AlterOperatorFamily(_)
        | S::AlterOperatorClass(_)
        | S::AlterTextSearch(_)
        | S::Comment { .. }
        | S::RefreshMaterializedView(_) => Class::Ddl,
        S::AlterTable(at) => at
            .operations
            .iter()
            .map(alter_table_op)
            .max()
            .unwrap_or(Class::Ddl),
        S::Drop { object_type, .. } => match object_type {
            ObjectType::Database | ObjectType::Role | ObjectType::User | ObjectType::Group => {
                Class::Privileged
            }
            _ => Class::Destructive,
        },
        S::DropFunction(_)
        | S::DropDomain(_)
        | S::DropProcedure { .. }
        | S::DropPolicy(_)
        | S::DropRule(_)
        | S::DropTrigger(_)
        | S::DropExtension(_)
        | S::DropOperator(_)
        | S::DropOperatorFamily(_)
        | S::DropOperatorClass(_)
        | S::Truncate(_) => Class::Destructive,
        _ => Class::Unparsed,
    }
}

fn alter_table_op(op: &AlterTableOperation) -> Class {
    use AlterTableOperation as A;
    match op {
        A::DropColumn { .. }
        | A::DropConstraint { .. }
        | A::DropPrimaryKey { .. }
        | A::DropForeignKey { .. }
        | A::DropIndex { .. }
        | A::DropPartitions { .. }
        | A::DetachPartition { .. }
        | A::DetachPartitionOf { .. } => Class::Destructive,
        A::AlterColumn {
            op: AlterColumnOperation::SetDataType { .. },
            ..
        } => Class::Destructive,
        A::OwnerTo { .. } => Class::Privileged,
        _ => Class::Ddl,
    }
}

/// UPDATE/DELETE: without a WHERE, or with one that is constant true, it touches every row.
fn filtered_change(selection: Option<&Expr>, found: &mut Findings) -> Class {
    match selection {
        None => Class::Destructive,
        Some(e) => {
            if const_truth(e, found) == Some(true) {
                Class::Destructive
            } else {
                Class::Write
            }
        }
    }
}

/// Some(true) when `e` holds for every row regardless of the data, Some(false) when it never holds, None when
/// it depends on the data. A condition without any column reference that cannot be evaluated counts as true.
pub fn const_truth(e: &Expr, found: &mut Findings) -> Option<bool> {
    match e {
        Expr::Nested(inner) => const_truth(inner, found),
        Expr::Value(v) => {
            found.literal_sensitive = true;
            match &v.value {
                Value::Boolean(b) => Some(*b),
                Value::Null => Some(false),
                _ => Some(!is_false_literal(e)),
            }
        }
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => const_truth(expr, found).map(|b| !b),
        Expr::BinaryOp { left, op, right } => match op {
            BinaryOperator::Or => match (const_truth(left, found), const_truth(right, found)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            BinaryOperator::And => match (const_truth(left, found), const_truth(right, found)) {
                (Some(true), Some(true)) => Some(true),
                (Some(false), _) | (_, Some(false)) => Some(false),
                _ => None,
            },
            _ => {
                if has_column_ref(left) || has_column_ref(right) {
                    // `x = x` holds for every row where x is not null: treat it as no filter.
                    if matches!(
                        op,
                        BinaryOperator::Eq | BinaryOperator::GtEq | BinaryOperator::LtEq
                    ) && left.to_string().eq_ignore_ascii_case(&right.to_string())
                        && !has_subquery(left)
                    {
                        return Some(true);
                    }
                    return None;
                }
                if has_subquery(left) || has_subquery(right) {
                    return None;
                }
                found.literal_sensitive = true;
                Some(compare_constants(left, op, right).unwrap_or(true))
            }
        },
        _ => {
            if has_column_ref(e) || has_subquery(e) {
                None
            } else {
                found.literal_sensitive = true;
                Some(true)
            }
        }
    }
}

fn constant(e: &Expr) -> Option<Value> {
    match e {
        Expr::Nested(i) => constant(i),
        Expr::Value(v) => Some(v.value.clone()),
        Expr::Cast { expr, .. } => constant(expr),
        _ => None,
    }
}

fn compare_constants(l: &Expr, op: &BinaryOperator, r: &Expr) -> Option<bool> {
    let (l, r) = (constant(l)?, constant(r)?);
    let ord = match (&l, &r) {
        (Value::Number(a, _), Value::Number(b, _)) => a
            .parse::<f64>()
            .ok()?
            .partial_cmp(&b.parse::<f64>().ok()?)?,
        (Value::SingleQuotedString(a), Value::SingleQuotedString(b)) => a.cmp(b),
        (Value::Boolean(a), Value::Boolean(b)) => a.cmp(b),
        _ => return None,
    };
    use std::cmp::Ordering::*;
    Some(match op {
        BinaryOperator::Eq => ord == Equal,
        BinaryOperator::NotEq => ord != Equal,
        BinaryOperator::Lt => ord == Less,
        BinaryOperator::LtEq => ord != Greater,
        BinaryOperator::Gt => ord == Greater,
        BinaryOperator::GtEq => ord != Less,
        _ => return None,
    })
}

fn has_column_ref(e: &Expr) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(e, |x| {
        if matches!(x, Expr::Identifier(_) | Expr::CompoundIdentifier(_)) {
            found = true;
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    found
}

fn has_subquery(e: &Expr) -> bool {
    let mut found = false;
    let _ = sqlparser::ast::visit_expressions(e, |x| {
        if matches!(
            x,
            Expr::Subquery(_)
                | Expr::Exists { .. }
                | Expr::In {
                    target: sqlparser::ast::InTarget::Subquery(_),
                    ..
                }
        ) {
            found = true;
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    found
}
