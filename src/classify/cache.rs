//! A bounded, concurrent cache of verdicts, so a repeated statement costs a hash lookup.
//!
//! Two maps: by the exact bytes of a query string, and by its *shape* (its tokens with string and number
//! literals set aside), so simple-protocol traffic that repeats one statement with new literals is parsed
//! once. A query string whose verdict depended on a literal (`WHERE 1 = 1`, `EXPLAIN (ANALYZE 0)`) is
//! literal-sensitive and cached by exact bytes only. Every key carries the lexing settings and the policy
//! generation, so a change of either can never reuse an old verdict.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use dashmap::DashMap;

use super::lex::{self, Kind};
use super::{decode, Class, Classifier, LexSettings, ReadError, Verdict};

/// The cached judgement of one query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// One verdict per statement, in order.
    pub verdicts: Box<[Verdict]>,
    /// The most dangerous class among them (`read` for an empty string).
    pub max: Class,
    /// Some statement needs the session's attention beyond its class (PREPARE, EXECUTE, DEALLOCATE,
    /// DISCARD, SET/RESET/SHOW, or a mention of a stepgate setting): see [`super::needs_attention`].
    pub attention: bool,
}

impl Entry {
    fn from_verdicts(verdicts: Vec<Verdict>, attention: bool) -> Entry {
        let max = verdicts
            .iter()
            .map(|v| v.class)
            .max()
            .unwrap_or(Class::Read);
        Entry {
            verdicts: verdicts.into_boxed_slice(),
            max,
            attention,
        }
    }

    fn unreadable() -> Entry {
        Entry::from_verdicts(
            vec![Verdict {
                class: Class::Unparsed,
                literal_sensitive: true,
                fallback: true,
            }],
            true,
        )
    }
}

/// The maps' keys are already outputs of a randomly keyed SipHash: hashing them again would only cost time.
#[derive(Clone, Default)]
struct KeyIsHash;

impl BuildHasher for KeyIsHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for u64 keys; kept correct for any other use.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = DashMap<u64, Arc<Entry>, KeyIsHash>;

/// Classifier plus cache. Share one per server (it is `Sync`).
pub struct CachedClassifier {
    classifier: Classifier,
    exact: Map,
    shapes: Map,
    capacity: usize,
    hasher: RandomState,
}

impl CachedClassifier {
    /// `capacity` bounds each of the two maps.
    pub fn new(classifier: Classifier, capacity: usize) -> Self {
        CachedClassifier {
            classifier,
            exact: Map::with_hasher(KeyIsHash),
            shapes: Map::with_hasher(KeyIsHash),
            capacity: capacity.max(16),
            hasher: RandomState::new(),
        }
    }

    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// The keys' common prefix (policy generation and lexing settings), hashed once per lookup and cloned.
    fn key(&self, settings: &LexSettings, generation: u64) -> impl Hasher + Clone {
        let mut h = self.hasher.build_hasher();
        generation.hash(&mut h);
        settings.hash(&mut h);
        h
    }

    /// The verdicts for a query string as it came off the wire (bytes in the session's encoding).
    /// A string that cannot be read is one `unparsed` verdict.
    pub fn lookup(&self, bytes: &[u8], settings: &LexSettings, generation: u64) -> Arc<Entry> {
        let prefix = self.key(settings, generation);
        let mut h = prefix.clone();
        h.write(bytes);
        let exact_key = h.finish();
        if let Some(e) = self.exact.get(&exact_key) {
            return e.clone();
        }
        let text = match decode(bytes, settings) {
            Ok(t) => t,
            Err(_) => return self.remember(&self.exact, exact_key, Entry::unreadable()),
        };
        // The shape as one byte string, hashed in one go (many small writes cost more than the copy): per
        // significant token its kind, then its text and 0xFF (never in UTF-8) — or, for a string literal,
        // whether it names a stepgate setting (that changes the verdict); numbers are their kind alone.
        let mut shape = Vec::with_capacity(text.len() + 16);
        // A backslash may end a literal where the scanner (which reads with standard_conforming_strings on)
        // does not, if the setting is or becomes off: such a string is keyed by its exact bytes only.
        let shape_safe = !text.contains('\\') && text.len() <= super::MAX_PARSE_BYTES;
        let shape_key = if !shape_safe {
            None
        } else {
            // The literal after UESCAPE is no value: it says how the `U&` identifier before it decodes
            // (`U&"pg_!0074erminate_backend" UESCAPE '!'` names pg_terminate_backend), so it stays in the key.
            let mut after_uescape = false;
            lex::lex_each(&text, settings.standard_conforming_strings, |t, pg| {
                if t.is_trivia() {
                    return;
                }
                shape.extend_from_slice(&pg.to_le_bytes());
                let uescape = std::mem::replace(&mut after_uescape, t.is_word("uescape"));
                match t.kind {
                    Kind::Number => {}
                    // A U& literal's escapes are its own (UESCAPE), so its text may spell a stepgate
                    // setting no plain search finds: keyed by its text.
                    Kind::String
                        if uescape || t.text.starts_with("U&") || t.text.starts_with("u&") =>
                    {
                        shape.extend_from_slice(t.text.as_bytes());
                        shape.push(0xFF);
                    }
                    Kind::String => shape.push(super::mentions_stepgate_text(t.text) as u8),
                    _ => {
                        shape.extend_from_slice(t.text.as_bytes());
                        shape.push(0xFF);
                    }
                }
            })
            .ok()
            .map(|()| {
                let mut h = prefix;
                h.write(&shape);
                h.finish()
            })
        };
        if let Some(k) = shape_key {
            if let Some(e) = self.shapes.get(&k) {
                return e.clone();
            }
        }
        let entry = match self.classifier.analyze(&text, settings) {
            Ok(stmts) => Entry::from_verdicts(
                stmts.iter().map(|s| s.verdict).collect(),
                stmts
                    .iter()
                    .any(|s| s.mentions_stepgate || super::needs_attention(&s.tokens)),
            ),
            Err(ReadError::Lex(_)) | Err(_) => Entry::unreadable(),
        };
        let literal_sensitive = entry.verdicts.iter().any(|v| v.literal_sensitive);
        let entry = self.remember(&self.exact, exact_key, entry);
        if let (Some(k), false) = (shape_key, literal_sensitive) {
            self.remember(&self.shapes, k, (*entry).clone());
        }
        entry
    }

    /// True when the verdicts for these exact bytes are cached (a lookup costs a hash).
    pub fn is_cached(&self, bytes: &[u8], settings: &LexSettings, generation: u64) -> bool {
        let mut h = self.key(settings, generation);
        h.write(bytes);
        self.exact.contains_key(&h.finish())
    }

    fn remember(&self, map: &Map, key: u64, entry: Entry) -> Arc<Entry> {
        if map.len() >= self.capacity {
            // Evict about half, arbitrarily: cheap, bounded, and rare.
            let mut n = 0u32;
            map.retain(|_, _| {
                n = n.wrapping_add(1);
                n.is_multiple_of(2)
            });
        }
        let entry = Arc::new(entry);
        map.insert(key, entry.clone());
        entry
    }

    /// Number of cached entries (exact, shape).
    pub fn len(&self) -> (usize, usize) {
        (self.exact.len(), self.shapes.len())
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.shapes.is_empty()
    }
}
