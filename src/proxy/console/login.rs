//! The console's login: relayed to the upstream's `[admin] auth_database`, and accepted only if the upstream
//! asked for a password (cleartext, md5 or SCRAM) and accepted it.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::protocol::Reader;
use crate::proxy::shared::Shared;
use crate::proxy::stream::ClientStream;
use crate::proxy::upstream;
use crate::wire::build::message;
use crate::wire::frame;
use crate::wire::reply::ErrorReply;
use crate::wire::startup::StartupMessage;

pub(super) enum LoginError {
    /// stepgate refuses: send this.
    Refused(ErrorReply),
    /// The upstream's own error was forwarded.
    Forwarded,
    Io,
}

/// Relays the login to the upstream's `auth_database`; Ok only for a password login the upstream accepted.
pub(super) async fn login(
    shared: &Shared,
    client: &mut ClientStream,
    startup: &StartupMessage,
    leftover: &BytesMut,
    auth_database: &str,
) -> Result<(), LoginError> {
    let mut up = match upstream::connect(shared, shared.config.startup_timeout).await {
        Ok(u) => u,
        Err(e) => {
            return Err(LoginError::Refused(ErrorReply::fatal(
                "08006",
                format!("stepgate: {e}"),
            )))
        }
    };
    let mut packet = startup.clone();
    packet.params.retain(|(k, _)| {
        k.as_slice() != b"database" && k.as_slice() != b"options" && k.as_slice() != b"replication"
    });
    packet
        .params
        .push((b"database".to_vec(), auth_database.as_bytes().to_vec()));
    packet.params.retain(|(k, _)| !k.starts_with(b"stepgate."));
    up.write_all(&packet.encode())
        .await
        .map_err(|_| LoginError::Io)?;
    let mut from_up = Reader::new(&mut up, BytesMut::new());
    let mut challenged = false;
    let mut client_buf = leftover.clone();
    loop {
        let Some((tag, body)) = from_up.next().await.map_err(|_| LoginError::Io)? else {
            return Err(LoginError::Refused(ErrorReply::fatal(
                "08006",
                "stepgate: the upstream closed the connection during the console login",
            )));
        };
        match tag {
            b'R' if body.len() >= 4 => {
                let code = frame::be_u32(&body, 0).unwrap_or(u32::MAX);
                let needs_answer = match code {
                    0 => {
                        let _ = from_up.stream.write_all(&message(b'X', &[])).await;
                        if !challenged {
                            return Err(LoginError::Refused(
                                ErrorReply::fatal(
                                    "28000",
                                    "stepgate: the console needs a password login, and the upstream let this user in without one",
                                )
                                .with_detail("trust and peer logins are not enough: every login stepgate relays comes from stepgate's own address")
                                .with_hint("give the admin role a password and a md5 or scram-sha-256 line in pg_hba.conf"),
                            ));
                        }
                        client
                            .write_all(&super::result::authentication_ok())
                            .await
                            .map_err(|_| LoginError::Io)?;
                        return Ok(());
                    }
                    3 | 5 | 10 => {
                        challenged = true;
                        true
                    }
                    11 => true,
                    12 => false,
                    _ => {
                        return Err(LoginError::Refused(ErrorReply::fatal(
                            "28000",
                            format!(
                                "stepgate: the console cannot relay authentication method {code}"
                            ),
                        )))
                    }
                };
                let forwarded = if code == 10 {
                    // The client's TLS ends at stepgate: SCRAM channel binding cannot work, so do not offer it.
                    frame::sasl_without_channel_binding(&body)
                        .unwrap_or_else(|| message(b'R', &body))
                } else {
                    message(b'R', &body)
                };
                client
                    .write_all(&forwarded)
                    .await
                    .map_err(|_| LoginError::Io)?;
                client.flush().await.map_err(|_| LoginError::Io)?;
                if needs_answer {
                    let mut from_client =
                        Reader::new(&mut *client, std::mem::take(&mut client_buf));
                    let answer = from_client.next().await.map_err(|_| LoginError::Io)?;
                    client_buf = from_client.buf;
                    match answer {
                        Some((b'p', b)) => from_up
                            .stream
                            .write_all(&message(b'p', &b))
                            .await
                            .map_err(|_| LoginError::Io)?,
                        _ => return Err(LoginError::Io),
                    }
                }
            }
            b'E' => {
                let _ = client.write_all(&message(b'E', &body)).await;
                let _ = client.flush().await;
                return Err(LoginError::Forwarded);
            }
            _ => {}
        }
    }
}
