//! Statement classes (DESIGN.md "Statement classes"), ordered from harmless to most dangerous.

use std::fmt;
use std::str::FromStr;

/// What a statement can do. The order is the order of danger: a statement takes the most dangerous class
/// found anywhere inside it, and `unparsed` (the classifier cannot judge it) ranks above everything.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Read,
    Session,
    Write,
    Ddl,
    Destructive,
    Privileged,
    Unparsed,
}

impl Class {
    pub const ALL: [Class; 7] = [
        Class::Read,
        Class::Session,
        Class::Write,
        Class::Ddl,
        Class::Destructive,
        Class::Privileged,
        Class::Unparsed,
    ];

    /// The classes guarded when no rule says otherwise.
    pub const DEFAULT_GUARDED: [Class; 4] = [
        Class::Ddl,
        Class::Destructive,
        Class::Privileged,
        Class::Unparsed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Session => "session",
            Class::Write => "write",
            Class::Ddl => "ddl",
            Class::Destructive => "destructive",
            Class::Privileged => "privileged",
            Class::Unparsed => "unparsed",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Class::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown class {s:?} (expected one of read, session, write, ddl, destructive, privileged, unparsed)"))
    }
}
