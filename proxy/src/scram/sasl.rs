//! PostgreSQL's SASL framing around the SCRAM messages: AuthenticationSASL /
//! SASLContinue / SASLFinal from the server, SASLInitialResponse / SASLResponse (both `p`)
//! from the client.

use bytes::{BufMut, BytesMut};

use super::server::{Mechanism, MAX_MESSAGE_LEN};
use super::ScramError;

pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

/// AuthenticationSASL offering `mechanisms`, preferred first.
pub fn authentication_sasl(mechanisms: &[Mechanism], dst: &mut BytesMut) {
    let body_len: usize = 4 + mechanisms.iter().map(|m| m.name().len() + 1).sum::<usize>() + 1;
    dst.put_u8(b'R');
    dst.put_u32((4 + body_len) as u32);
    dst.put_i32(AUTH_SASL);
    for m in mechanisms {
        dst.put_slice(m.name().as_bytes());
        dst.put_u8(0);
    }
    dst.put_u8(0);
}

/// AuthenticationSASLContinue or AuthenticationSASLFinal carrying `data`.
pub fn authentication_sasl_data(code: i32, data: &[u8], dst: &mut BytesMut) {
    dst.put_u8(b'R');
    dst.put_u32((8 + data.len()) as u32);
    dst.put_i32(code);
    dst.put_slice(data);
}

/// The body of a SASLInitialResponse: mechanism name, then the client-first message with its
/// own length (-1 for none, which SCRAM does not allow).
pub fn parse_initial_response(body: &[u8]) -> Result<(&[u8], &[u8]), ScramError> {
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(ScramError::Malformed(
            "no mechanism name in SASLInitialResponse",
        ))?;
    let (mechanism, rest) = (&body[..nul], &body[nul + 1..]);
    let (len, data) = rest
        .split_first_chunk::<4>()
        .ok_or(ScramError::Malformed("truncated SASLInitialResponse"))?;
    let len = i32::from_be_bytes(*len);
    if usize::try_from(len).ok() != Some(data.len()) || data.len() > MAX_MESSAGE_LEN {
        return Err(ScramError::Malformed(
            "SASLInitialResponse length does not match its data",
        ));
    }
    Ok((mechanism, data))
}

/// The mechanisms of an AuthenticationSASL body (after the code): NUL-terminated names, then
/// an empty one.
pub fn parse_mechanisms(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.split(|&b| b == 0).take_while(|m| !m.is_empty())
}

/// SASLInitialResponse from the proxy to a compute.
pub fn initial_response(mechanism: Mechanism, data: &[u8], dst: &mut BytesMut) {
    let name = mechanism.name().as_bytes();
    dst.put_u8(b'p');
    dst.put_u32((4 + name.len() + 1 + 4 + data.len()) as u32);
    dst.put_slice(name);
    dst.put_u8(0);
    dst.put_i32(data.len() as i32);
    dst.put_slice(data);
}

/// SASLResponse from the proxy to a compute.
pub fn response(data: &[u8], dst: &mut BytesMut) {
    dst.put_u8(b'p');
    dst.put_u32((4 + data.len()) as u32);
    dst.put_slice(data);
}
