//! A held entry as the statements of a token: what `token new --held` lists and the console's SHOW HELD <id>
//! offers to sign. Only a statement whose recorded text still has its recorded fingerprint can be listed (a
//! redacted or unreadable text cannot).

use std::time::{Duration, SystemTime};

use thiserror::Error;

use super::payload::{fingerprint_of, Payload, StatementGrant};
use crate::classify::Classifier;
use crate::config::Config;
use crate::gate::HeldEntry;

#[derive(Debug, Error)]
pub enum HeldError {
    #[error("held statement {id} was sent to database {held:?}, not {asked:?}")]
    WrongDatabase {
        id: String,
        held: String,
        asked: String,
    },
    #[error("statement {index} of held {id} cannot be listed from the held entry (its text was redacted or it could not be read: {sql:?}); make the token with --sql or --file")]
    NotListable {
        id: String,
        index: usize,
        sql: String,
    },
    #[error("statement {index} of held {id}: {reason}")]
    Class {
        id: String,
        index: usize,
        reason: crate::classify::lex::LexError,
    },
}

/// The statements of a held entry, each with its fingerprint and class.
pub fn statements_of(
    entry: &HeldEntry,
    database: Option<&str>,
    classifier: &Classifier,
) -> Result<Vec<StatementGrant>, HeldError> {
    let id = &entry.id;
    if let Some(db) = database {
        if db != entry.session.database {
            return Err(HeldError::WrongDatabase {
                id: id.clone(),
                held: entry.session.database.clone(),
                asked: db.to_string(),
            });
        }
    }
    let mut out = Vec::new();
    for (i, (fp, sql)) in entry.fingerprints.iter().zip(&entry.statements).enumerate() {
        if fingerprint_of(sql).as_deref() != Some(fp.as_str()) {
            return Err(HeldError::NotListable {
                id: id.clone(),
                index: i + 1,
                sql: sql.clone(),
            });
        }
        out.push(StatementGrant {
            fingerprint: fp.clone(),
            class: super::verify::class_of(classifier, sql).map_err(|reason| HeldError::Class {
                id: id.clone(),
                index: i + 1,
                reason,
            })?,
            sql: sql.clone(),
        });
    }
    Ok(out)
}

/// The payload to sign for a held entry, valid for `ttl` from `now`, for the entry's database and user.
pub fn payload_for(
    entry: &HeldEntry,
    config: &Config,
    ttl: Duration,
    now: SystemTime,
) -> Result<String, HeldError> {
    let classifier = Classifier::for_config(config);
    let statements = statements_of(entry, None, &classifier)?;
    Ok(Payload {
        id: super::new_uuid(),
        instance: config.instance.clone(),
        database: entry.session.database.clone(),
        user: Some(entry.session.user.clone()),
        not_before: None,
        not_after: now + ttl,
        statements,
        reason: None,
    }
    .render())
}
