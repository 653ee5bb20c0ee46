//! The authentication exchange between client and compute, relayed message by message until
//! ReadyForQuery. This is the only part of a session the proxy has to understand: the
//! compute's BackendKeyData is swapped for a proxy-issued cancel key here, and, for clients
//! that pass the endpoint in the password, the proxy answers the compute's password challenge
//! itself (cleartext, md5 or SCRAM-SHA-256) with the real password.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cancel::{CancelGuard, CancelMap, CancelTarget};
use crate::error::ProxyError;

/// Largest message relayed one by one during authentication (SASL, GSS tokens, parameter
/// status, errors); real ones are a few hundred bytes.
const MAX_AUTH_MESSAGE: usize = 64 * 1024;

/// What one read from the compute takes during authentication: its greeting in one go.
const AUTH_READ_BUFFER: usize = 8 * 1024;

const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

pub(crate) enum AuthOutcome {
    /// ReadyForQuery: the session is established. The guard (if the compute sent a key)
    /// keeps the cancel key valid for as long as it lives.
    Ready(Option<CancelGuard>),
    Refused,
}

/// Credentials the proxy uses itself, when the client gave them to the proxy (the
/// `endpoint=ID;PASSWORD` convention) rather than to the compute.
pub(crate) struct ProxyAuth {
    /// As the client sent it (any encoding): the md5 hash is computed over these bytes.
    pub user: Vec<u8>,
    pub password: String,
}

/// How the proxy answers the compute's authentication request itself.
pub(crate) enum ComputeCreds {
    /// The client's cleartext password (`endpoint=ID;PASSWORD` on a passthrough endpoint).
    Password(ProxyAuth),
    /// The ClientKey of a client verified at the proxy ([`crate::login`]): SCRAM only.
    Scram(Box<crate::scram::ComputeLogin>),
}

impl ComputeCreds {
    /// The credentials for the compute login after [`crate::login::login`].
    pub(crate) fn after_login(
        verified: crate::login::Verified,
        password: Option<ProxyAuth>,
    ) -> Option<Self> {
        match verified {
            crate::login::Verified::NotChecked => password.map(Self::Password),
            crate::login::Verified::Scram {
                client_key,
                verifier,
            } => Some(Self::Scram(Box::new(crate::scram::ComputeLogin::new(
                client_key, verifier,
            )))),
        }
    }
}

impl std::fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyAuth")
            .field("user", &String::from_utf8_lossy(&self.user))
            .finish_non_exhaustive()
    }
}

/// Asks the client for a cleartext password (only ever called over TLS) and returns it.
pub(crate) async fn request_password<C: AsyncRead + AsyncWrite + Unpin>(
    client: &mut C,
) -> Result<String, ProxyError> {
    let mut m = BytesMut::with_capacity(9);
    m.put_u8(b'R');
    m.put_u32(8);
    m.put_i32(AUTH_CLEARTEXT);
    client.write_all(&m).await.map_err(ProxyError::ClientIo)?;
    let (tag, body) = read_message(client, MAX_AUTH_MESSAGE)
        .await
        .map_err(ProxyError::ClientIo)?;
    if tag != b'p' {
        return Err(ProxyError::NoEndpoint);
    }
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    String::from_utf8(body[..end].to_vec()).map_err(|_| ProxyError::NoEndpoint)
}

pub(crate) async fn authenticate<C, K>(
    cancels: &Arc<CancelMap>,
    client: &mut C,
    compute: &mut K,
    mut target: CancelTarget,
    mut proxy_auth: Option<ComputeCreds>,
) -> Result<AuthOutcome, ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    K: AsyncRead + AsyncWrite + Unpin,
{
    let endpoint = target.endpoint.clone();
    let compute_err = |source| ProxyError::ComputeProtocol {
        endpoint: endpoint.clone(),
        source,
    };
    // The compute sends its whole greeting (AuthenticationOk, a dozen ParameterStatus,
    // BackendKeyData, ReadyForQuery: ~400 bytes) at once; read unbuffered, that was two recv
    // calls per message, ~30 per new session.
    let mut compute = tokio::io::BufReader::with_capacity(AUTH_READ_BUFFER, compute);
    let compute = &mut compute;
    let mut out = BytesMut::with_capacity(1024);
    let mut guard = None;
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (tag, body) = read_message(compute, MAX_AUTH_MESSAGE)
            .await
            .map_err(compute_err)?;
        match tag {
            b'K' => {
                if body.len() < 8 || body.len() > 4 + crate::wire::MAX_CANCEL_SECRET_LEN {
                    return Err(compute_err(invalid("bad BackendKeyData")));
                }
                target.pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                target.secret = body[4..].to_vec();
                let (pid, secret, g) = cancels.register(target.clone());
                guard = Some(g);
                out.put_u8(b'K');
                out.put_u32((8 + secret.len()) as u32);
                out.put_i32(pid);
                out.put_slice(&secret);
                continue;
            }
            b'R' if body.len() >= 4 => {
                let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                if let Some(creds) = &mut proxy_auth {
                    if code != AUTH_OK {
                        let reply = match creds {
                            ComputeCreds::Password(creds) => {
                                answer_challenge(creds, code, &body[4..], &mut scram)
                            }
                            ComputeCreds::Scram(login) => answer_with_key(login, code, &body[4..]),
                        }
                        .map_err(compute_err)?;
                        if let Some(reply) = reply {
                            compute.write_all(&reply).await.map_err(compute_err)?;
                        }
                        continue;
                    }
                    // AuthenticationOk goes to the client, which has been waiting since it
                    // sent its password to us.
                }
                append(&mut out, tag, &body);
                if needs_reply(code) {
                    client.write_all(&out).await.map_err(ProxyError::ClientIo)?;
                    out.clear();
                    let (ctag, cbody) = read_message(client, MAX_AUTH_MESSAGE)
                        .await
                        .map_err(ProxyError::ClientIo)?;
                    let mut m = BytesMut::with_capacity(cbody.len() + 5);
                    append(&mut m, ctag, &cbody);
                    compute.write_all(&m).await.map_err(compute_err)?;
                }
            }
            b'Z' => {
                append(&mut out, tag, &body);
                // Whatever the compute sent after ReadyForQuery (a notice, or the error of a
                // shutdown) is already in the buffer, which goes away here: the client gets it
                // now, in order, and the relay takes over from the socket.
                out.put_slice(compute.buffer());
                client.write_all(&out).await.map_err(ProxyError::ClientIo)?;
                return Ok(AuthOutcome::Ready(guard));
            }
            b'E' => {
                append(&mut out, tag, &body);
                let _ = client.write_all(&out).await;
                return Ok(AuthOutcome::Refused);
            }
            _ => append(&mut out, tag, &body),
        }
    }
}

/// The proxy's own answer to the compute's authentication request.
fn answer_challenge(
    creds: &ProxyAuth,
    code: i32,
    data: &[u8],
    scram: &mut Option<ScramSha256>,
) -> std::io::Result<Option<BytesMut>> {
    let mut m = BytesMut::new();
    match code {
        AUTH_CLEARTEXT => frontend::password_message(creds.password.as_bytes(), &mut m)?,
        AUTH_MD5 => {
            let salt: [u8; 4] = data
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| invalid("short md5 salt"))?;
            let hash = postgres_protocol::authentication::md5_hash(
                &creds.user,
                creds.password.as_bytes(),
                salt,
            );
            frontend::password_message(hash.as_bytes(), &mut m)?;
        }
        AUTH_SASL => {
            let offers_scram = data
                .split(|&b| b == 0)
                .any(|mech| mech == SCRAM_SHA_256.as_bytes());
            if !offers_scram {
                return Err(invalid("compute offers no SCRAM-SHA-256"));
            }
            // Plain TCP to the compute: no channel binding to offer.
            let s = ScramSha256::new(creds.password.as_bytes(), ChannelBinding::unsupported());
            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut m)?;
            *scram = Some(s);
        }
        AUTH_SASL_CONTINUE => {
            let s = scram
                .as_mut()
                .ok_or_else(|| invalid("SASL continue without start"))?;
            s.update(data)?;
            frontend::sasl_response(s.message(), &mut m)?;
        }
        AUTH_SASL_FINAL => {
            // Verifies the server's signature: a compute that does not know the password
            // cannot pretend to.
            scram
                .as_mut()
                .ok_or_else(|| invalid("SASL final without start"))?
                .finish(data)?;
            return Ok(None);
        }
        _ => {
            return Err(invalid(
                "unsupported authentication method for password forwarding",
            ))
        }
    }
    Ok(Some(m))
}

/// The proxy's answer to the compute's authentication request with a verified client's
/// ClientKey: SCRAM-SHA-256 only (a compute that asks for md5 or cleartext cannot be answered
/// without the password, which the proxy never has).
fn answer_with_key(
    login: &mut crate::scram::ComputeLogin,
    code: i32,
    data: &[u8],
) -> std::io::Result<Option<BytesMut>> {
    use crate::scram::{sasl, Mechanism};
    let scram_err =
        |e: crate::scram::ScramError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut m = BytesMut::new();
    match code {
        AUTH_SASL => {
            if !sasl::parse_mechanisms(data).any(|mech| mech == SCRAM_SHA_256.as_bytes()) {
                return Err(invalid("compute offers no SCRAM-SHA-256"));
            }
            sasl::initial_response(Mechanism::ScramSha256, &login.client_first(), &mut m);
        }
        AUTH_SASL_CONTINUE => {
            let reply = login.server_first(data).map_err(scram_err)?;
            sasl::response(&reply, &mut m);
        }
        AUTH_SASL_FINAL => {
            login.server_final(data).map_err(scram_err)?;
            return Ok(None);
        }
        _ => {
            return Err(invalid(
                "the compute asks for a password method other than SCRAM-SHA-256 for a role \
                 verified at the proxy (set password_encryption = scram-sha-256 and scram-sha-256 \
                 in pg_hba.conf)",
            ))
        }
    }
    Ok(Some(m))
}

/// Authentication requests the client must answer: everything but Ok and SASLFinal.
fn needs_reply(code: i32) -> bool {
    matches!(code, 2 | 3 | 5 | 7 | 8 | 9 | 10 | 11)
}

fn append(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(body);
}

fn invalid(msg: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// One protocol message (type byte, length, body), refusing lengths over `max` before
/// allocating.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let body_len = len.checked_sub(4).filter(|&n| n <= max).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message length {len}"),
        )
    })?;
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).await?;
    Ok((head[0], body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwake_compute_manager::ComputeAddr;
    use pgwake_router::EndpointId;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = BytesMut::new();
        append(&mut m, tag, body);
        m.to_vec()
    }

    /// The compute's greeting arrives in one piece with a notice right behind ReadyForQuery:
    /// the client gets all of it in order, the notice included, though the buffered read took
    /// it from the socket before the relay started.
    #[tokio::test]
    async fn bytes_after_ready_for_query_reach_the_client_in_order() {
        let (mut client, mut client_far) = tokio::io::duplex(64 * 1024);
        let (mut compute, mut compute_far) = tokio::io::duplex(64 * 1024);
        let mut greeting = message(b'R', &0i32.to_be_bytes());
        for i in 0..14 {
            greeting.extend(message(b'S', format!("param{i}\0value\0").as_bytes()));
        }
        greeting.extend(message(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]));
        greeting.extend(message(b'Z', b"I"));
        let notice = message(b'N', b"SNOTICE\0Mlate\0\0");
        let mut sent = greeting.clone();
        sent.extend(&notice);
        compute_far.write_all(&sent).await.unwrap();
        let target = CancelTarget {
            endpoint: EndpointId::parse("ep").unwrap(),
            addr: ComputeAddr::new("127.0.0.1:5432"),
            pid: 0,
            secret: Vec::new(),
        };
        let cancels = CancelMap::new();
        let outcome = authenticate(&cancels, &mut client, &mut compute, target, None)
            .await
            .unwrap();
        assert!(matches!(outcome, AuthOutcome::Ready(Some(_))));
        drop(client);
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        // The key is the proxy's own (same length), the rest as sent.
        let key_at = greeting.len() - 6 - 13;
        assert_eq!(got.len(), sent.len());
        assert_eq!(got[..key_at], greeting[..key_at]);
        assert_eq!(got[key_at..key_at + 5], greeting[key_at..key_at + 5]);
        assert_eq!(got[greeting.len()..], notice[..]);
    }
}
