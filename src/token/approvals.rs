//! Approved tokens: signed tokens handed to the running stepgate (`stepgate approve`, the console's
//! `APPROVE`) rather than set by a session. An approved token covers the statements it lists for any session
//! of its database (and its user, when it names one), each use once, until its `not-after` — so a migration
//! tool runs unchanged. Every use is re-verified for the session that makes it (its rule, database and user),
//! and spends from the same ledger as a token set with `SET stepgate.token`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::Duration;
use std::time::SystemTime;

use super::grant::TokenRef;

/// The approved tokens of a server (kept across reloads, rebuilt from `approved` records at start).
#[derive(Default)]
pub struct Approvals {
    tokens: RwLock<Vec<TokenRef>>,
    /// How many there are, read without the lock: [`Approvals::is_empty`] is asked on every guarded
    /// message of a session without a token.
    count: AtomicUsize,
    /// Bumped by every [`Approvals::add`], with the statements waiting for an approval woken.
    added: Mutex<u64>,
    wake: Condvar,
}

impl Approvals {
    /// Adds `token`; false when a token with its id is approved already (nothing changes).
    pub fn add(&self, token: TokenRef) -> bool {
        let mut tokens = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        if tokens.iter().any(|t| t.id() == token.id()) {
            return false;
        }
        tokens.push(token);
        self.count.store(tokens.len(), Ordering::Release);
        drop(tokens);
        *self.added.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.wake.notify_all();
        true
    }

    /// Wakes every waiting statement without adding anything (a cancel request: the one it concerns sees
    /// its flag and gives up).
    pub fn nudge(&self) {
        let _lock = self.added.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.notify_all();
    }

    /// How many approvals were added so far (to wait for the next one with [`Approvals::wait_added`]).
    pub fn added(&self) -> u64 {
        *self.added.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until an approval was added after `seen` (see [`Approvals::added`]), `timeout` passed or, woken
    /// by [`Approvals::nudge`], `give_up` says so; returns the count then.
    pub fn wait_added(&self, seen: u64, timeout: Duration, give_up: &dyn Fn() -> bool) -> u64 {
        let added = self.added.lock().unwrap_or_else(|p| p.into_inner());
        let (added, _) = self
            .wake
            .wait_timeout_while(added, timeout, |n| *n == seen && !give_up())
            .unwrap_or_else(|p| p.into_inner());
        *added
    }

    /// Approved tokens that could cover `fingerprint` for a session of `database` and `user` at `now`
    /// (listed, for that database and user, not expired), oldest first. Expired ones are dropped.
    pub fn covering(
        &self,
        database: &str,
        user: &str,
        fingerprint: &str,
        now: SystemTime,
    ) -> Vec<TokenRef> {
        {
            let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
            if tokens.is_empty() {
                return Vec::new();
            }
            if tokens.iter().all(|t| t.auth.payload.not_after >= now) {
                return Self::matching(&tokens, database, user, fingerprint);
            }
        }
        let mut tokens = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        tokens.retain(|t| t.auth.payload.not_after >= now);
        self.count.store(tokens.len(), Ordering::Release);
        Self::matching(&tokens, database, user, fingerprint)
    }

    fn matching(
        tokens: &[TokenRef],
        database: &str,
        user: &str,
        fingerprint: &str,
    ) -> Vec<TokenRef> {
        tokens
            .iter()
            .filter(|t| {
                let p = &t.auth.payload;
                p.database == database
                    && p.user.as_deref().is_none_or(|u| u == user)
                    && t.listed.contains_key(fingerprint)
            })
            .cloned()
            .collect()
    }

    /// Every approved token, oldest first.
    pub fn list(&self) -> Vec<TokenRef> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }
}
