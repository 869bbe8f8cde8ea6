//! The DBA console: the virtual database `stepgate`, as pgbouncer's console is `pgbouncer`.
//!
//! `psql -h <stepgate> -p 6432 -U <admin> stepgate`. Only `[admin] users` get in, and only with a password
//! the upstream checked ([`login`]). After the login the upstream connection is closed; stepgate answers every
//! command itself, with proper rows, over the simple and the extended protocol ([`protocol`]). Each command
//! is one file of [`commands`] ([`command::Command`]); errors carry their SQLSTATE ([`result::ConsoleError`]).
//! Every command is audited (`admin_action`). Tokens are never shown (their id and a hash only) and password
//! literals stay redacted. The admin list is policy: a RELOAD that removes a user closes that user's
//! console sessions at once.

pub mod command;
pub mod commands;
mod login;
mod protocol;
pub mod result;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::reload::ServerHandle;
use super::shared::Shared;
use super::stream::{send_and_close, ClientStream};
use crate::wire::reply::ErrorReply;
use crate::wire::startup::StartupMessage;
use session::Console;

/// The console's database name.
pub const CONSOLE_DB: &str = "stepgate";

/// Runs a console connection from login to Terminate.
pub(crate) async fn run(
    shared: &Arc<Shared>,
    mut client: ClientStream,
    startup: StartupMessage,
    leftover: BytesMut,
    peer: SocketAddr,
) {
    let user = startup.user();
    let console = Console {
        shared,
        handle: ServerHandle::new(shared.clone()),
        user: user.clone(),
        client_addr: peer.ip().to_string(),
    };
    // The admin list is policy: read from the configuration in force (a reload changes it at once).
    let Some(admin) = shared.gate.load().config.admin.clone() else {
        let e = ErrorReply::fatal(
            "3D000",
            "stepgate: the console is not enabled (no [admin] users)",
        );
        send_and_close(&mut client, &e).await;
        return;
    };
    if !admin.users.contains(&user) {
        console.audit("login", "refused: not an admin user", None);
        warn!(%user, "console login refused: not in [admin] users");
        let e = ErrorReply::fatal(
            "28000",
            format!("stepgate: user \"{user}\" may not open the stepgate console"),
        )
        .with_hint("[admin] users in stepgate.toml lists who may");
        send_and_close(&mut client, &e).await;
        return;
    }
    match login::login(
        shared,
        &mut client,
        &startup,
        &leftover,
        &admin.auth_database,
    )
    .await
    {
        Ok(()) => {}
        Err(login::LoginError::Refused(e)) => {
            console.audit("login", &format!("refused: {}", e.message), None);
            warn!(%user, reason = e.message, "console login refused");
            send_and_close(&mut client, &e).await;
            return;
        }
        Err(login::LoginError::Forwarded) => {
            console.audit("login", "refused by the upstream", None);
            let _ = client.shutdown().await;
            return;
        }
        Err(login::LoginError::Io) => return,
    }
    console.audit("login", "ok", None);
    info!(%user, "console session opened");
    let greeting = result::greeting(&[
        ("server_version", "15.0 (stepgate console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ]);
    if client.write_all(&greeting).await.is_err() {
        return;
    }
    let _ = client.flush().await;
    let _ = protocol::serve(&console, &mut client).await;
    info!(%user, "console session closed");
}
