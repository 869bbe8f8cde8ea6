//! `[[allow]]`: exact statements that pass without a token (a migration tool's own bookkeeping, run on every
//! invocation), recorded as `allowed`; and `include = [...]` files that carry such entries (the presets in
//! `fixtures/allow/`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::rule::pattern_matches;

/// Why the `[[allow]]` entries or an `include` file cannot be used (the config turns it into its own error).
#[derive(Debug)]
pub enum AllowError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    Parse {
        path: String,
        message: String,
    },
    Invalid {
        path: String,
        message: String,
    },
}

/// One `[[allow]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAllow {
    /// Shown in the `allowed` record and `SHOW CONFIG`.
    name: Option<String>,
    /// The statement, exactly (matched by its fingerprint: layout and comments aside, names and literals
    /// count).
    sql: Option<String>,
    /// Or its fingerprint (`sha256:…`, as `stepgate check --format json` and held entries show it).
    fingerprint: Option<String>,
    /// Databases it applies to (`*`, `prefix*` or a name). [every database]
    databases: Option<Vec<String>>,
    /// Users it applies to. [every user]
    users: Option<Vec<String>>,
}

/// A file named by `include`: `[[allow]]` entries only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInclude {
    #[serde(default)]
    allow: Vec<RawAllow>,
}

/// A statement that passes without a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub name: String,
    /// The statement as written (its fingerprint is computed by the gate), or None when given by fingerprint.
    pub sql: Option<String>,
    pub fingerprint: Option<String>,
    pub databases: Vec<String>,
    pub users: Vec<String>,
    /// The file it came from.
    pub source: String,
}

impl Allow {
    /// Whether the entry applies to a session of `database` and `user`.
    pub fn applies_to(&self, database: &str, user: &str) -> bool {
        self.databases.iter().any(|p| pattern_matches(p, database))
            && self.users.iter().any(|p| pattern_matches(p, user))
    }
}

fn convert(raw: Vec<RawAllow>, source: &str) -> Result<Vec<Allow>, AllowError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let invalid = |message: String| AllowError::Invalid {
                path: source.to_string(),
                message,
            };
            match (&a.sql, &a.fingerprint) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(format!(
                        "entry {}: give exactly one of sql or fingerprint",
                        i + 1
                    )))
                }
                (Some(s), None) if s.trim().is_empty() => {
                    return Err(invalid(format!("entry {}: empty sql", i + 1)))
                }
                (None, Some(f))
                    if !f.strip_prefix("sha256:").is_some_and(|h| {
                        h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
                    }) =>
                {
                    return Err(invalid(format!(
                        "entry {}: fingerprint {f:?} is not sha256: and 64 hex digits",
                        i + 1
                    )))
                }
                _ => {}
            }
            Ok(Allow {
                name: a
                    .name
                    .unwrap_or_else(|| format!("{source} entry {}", i + 1)),
                sql: a.sql,
                fingerprint: a.fingerprint.map(|f| f.to_ascii_lowercase()),
                databases: a.databases.unwrap_or_else(|| vec!["*".into()]),
                users: a.users.unwrap_or_else(|| vec!["*".into()]),
                source: source.to_string(),
            })
        })
        .collect()
}

/// The config's own entries, then those of each `include` file in order (paths relative to `base`).
pub(super) fn load(
    own: Vec<RawAllow>,
    include: Vec<PathBuf>,
    base: &Path,
    source: &str,
) -> Result<Vec<Allow>, AllowError> {
    let mut out = convert(own, source)?;
    for path in include {
        let path = if path.is_absolute() {
            path
        } else {
            base.join(path)
        };
        let text = std::fs::read_to_string(&path).map_err(|e| AllowError::Read {
            path: path.clone(),
            source: e,
        })?;
        let shown = path.display().to_string();
        let raw: RawInclude = toml::from_str(&text).map_err(|e| AllowError::Parse {
            path: shown.clone(),
            message: e.to_string().trim_end().to_string(),
        })?;
        out.extend(convert(raw.allow, &shown)?);
    }
    Ok(out)
}
