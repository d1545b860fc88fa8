//! Mutual challenge-response authentication with HMAC-SHA256:
//! HELLO -> CHALLENGE -> AUTH -> READY | ERROR. The key never crosses the
//! wire; each side proves it knows it over both sides' fresh nonces.

use std::io::{Read, Write};
use std::net::TcpStream;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{
    Key, MAX_VOLUME_ID_LEN, Msg, PROTO_VERSION, ProtoError, ReadyInfo, Role, frame_type as t,
    malformed, read_frame, write_frame,
};

/// Largest handshake frame payload (HELLO, CHALLENGE, AUTH, and READY or
/// ERROR while the handshake runs).
pub const HANDSHAKE_MAX: usize = 4096;
/// First bytes of a HELLO payload.
pub const MAGIC: [u8; 4] = *b"RPLF";
pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;
/// Role labels of the two proofs (16 bytes each), so a proof made by one
/// side can never be replayed as the other's.
pub(super) const SERVER_LABEL: &[u8; 16] = b"replfs mirror v1";
pub(super) const CLIENT_LABEL: &[u8; 16] = b"replfs client v1";
/// The only reason the mirror gives on the wire for a refused handshake.
const GENERIC_REFUSAL: &str = "authentication failed";

type Nonce = [u8; NONCE_LEN];
type Proof = [u8; PROOF_LEN];

/// Volume ids: 1 to 64 bytes of `[A-Za-z0-9._-]`, not starting with `.`
/// (they name files in the mirror's state dir).
pub fn check_volume_id(id: &str) -> Result<(), String> {
    let ok_char = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
    if id.is_empty() || id.len() > MAX_VOLUME_ID_LEN {
        return Err(format!(
            "volume id {id:?} must be 1 to {MAX_VOLUME_ID_LEN} bytes"
        ));
    }
    if id.starts_with('.') || !id.bytes().all(ok_char) {
        return Err(format!(
            "volume id {id:?} may hold only letters, digits, '.', '_', '-' and not start with '.'"
        ));
    }
    Ok(())
}

fn nonce() -> Result<Nonce, ProtoError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| {
        ProtoError::Io(std::io::Error::other(format!(
            "no randomness for a nonce: {e}"
        )))
    })?;
    Ok(n)
}

/// HMAC-SHA256(key, label ‖ version ‖ client nonce ‖ server nonce ‖ u8 len ‖ volume id).
pub(super) fn proof(key: &Key, label: &[u8; 16], nc: &Nonce, ns: &Nonce, vol: &str) -> Proof {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(label);
    mac.update(&PROTO_VERSION.to_le_bytes());
    mac.update(nc);
    mac.update(ns);
    mac.update(&[vol.len() as u8]);
    mac.update(vol.as_bytes());
    mac.finalize().into_bytes().into()
}

fn proofs_equal(a: &Proof, b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Copies exactly `N` bytes (callers checked the length).
fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// Best-effort `Error` frame before closing (the peer may be gone already).
fn send_error(s: &mut impl Write, msg: &str) {
    let _ = write_frame(s, t::ERROR, msg.as_bytes());
}

fn error_text(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Client side: HELLO(version, volume id, client nonce) -> CHALLENGE(server
/// nonce, server proof) -> AUTH(client proof) -> READY(applied) | ERROR.
/// Returns the mirror's applied LSN: resume from `applied + 1`.
///
/// The client checks the mirror's proof before giving its own: a mirror
/// with another key (or that does not serve `volume`) is `AuthFailed`. A
/// refusal by the mirror (wrong key, busy volume) is `Refused`. Set a read
/// timeout on `s` first: this function blocks on reads.
pub fn client_handshake(
    s: &mut TcpStream,
    volume: &str,
    key: &Key,
) -> Result<ReadyInfo, ProtoError> {
    client(s, volume, key, Role::Shipper)
}

/// [`client_handshake`] for another role (a verifier does not claim the volume).
pub fn client_handshake_as(
    s: &mut TcpStream,
    volume: &str,
    key: &Key,
    role: Role,
) -> Result<ReadyInfo, ProtoError> {
    client(s, volume, key, role)
}

fn client<S: Read + Write>(
    s: &mut S,
    volume: &str,
    key: &Key,
    role: Role,
) -> Result<ReadyInfo, ProtoError> {
    check_volume_id(volume).map_err(ProtoError::Encode)?;
    let nc = nonce()?;
    let mut hello = Vec::with_capacity(39 + volume.len());
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&PROTO_VERSION.to_le_bytes());
    hello.extend_from_slice(&nc);
    hello.push(volume.len() as u8);
    hello.extend_from_slice(volume.as_bytes());
    write_frame(s, t::HELLO, &hello)?;

    let (ty, p) = read_frame(s, HANDSHAKE_MAX)?;
    let (ns, server_proof) = match ty {
        t::ERROR => return Err(ProtoError::Refused(error_text(&p))),
        t::CHALLENGE if p.len() == 2 + NONCE_LEN + PROOF_LEN => {
            let theirs = u16::from_le_bytes([p[0], p[1]]);
            if theirs != PROTO_VERSION {
                send_error(s, &format!("protocol version {theirs} not supported"));
                return Err(ProtoError::Version {
                    ours: PROTO_VERSION,
                    theirs,
                });
            }
            (arr::<NONCE_LEN>(&p[2..34]), p[34..].to_vec())
        }
        _ => return malformed(format!("expected CHALLENGE, got frame type {ty}")),
    };
    let expected = proof(key, SERVER_LABEL, &nc, &ns, volume);
    if !proofs_equal(&expected, &server_proof) {
        send_error(s, GENERIC_REFUSAL);
        return Err(ProtoError::AuthFailed(format!(
            "the mirror could not prove it knows the key of volume {volume:?} \
             (the keys differ, or the mirror does not serve this volume)"
        )));
    }
    let mut auth = proof(key, CLIENT_LABEL, &nc, &ns, volume).to_vec();
    auth.push(role as u8);
    write_frame(s, t::AUTH, &auth)?;

    let (ty, p) = read_frame(s, HANDSHAKE_MAX)?;
    match ty {
        t::READY => match super::decode_msg(ty, &p)? {
            Msg::Ready(r) => Ok(r),
            _ => malformed("READY that is not a Ready"),
        },
        t::ERROR => Err(ProtoError::Refused(error_text(&p))),
        _ => malformed(format!("expected READY, got frame type {ty}")),
    }
}

/// Server side, up to verifying the client's proof; returns the volume id.
/// The caller then sends `Msg::Ready` or `Msg::Error`.
///
/// `key_for` maps a volume id to its key (`None`: not served here). An
/// unknown volume still gets a CHALLENGE (with a random proof) so that it is
/// indistinguishable from a wrong key on the wire; both are refused with the
/// same generic `Error`, and the returned `AuthFailed` carries the real
/// reason for the log. On any failure an `Error` frame has been sent (best
/// effort). The caller should set a read timeout on `s` (e.g. 10 s) so a
/// silent peer cannot hold the connection.
pub fn server_handshake(
    s: &mut TcpStream,
    key_for: &dyn Fn(&str) -> Option<Key>,
) -> Result<(String, Role), ProtoError> {
    server(s, key_for)
}

struct Hello {
    version: u16,
    nonce: Nonce,
    volume: String,
}

fn parse_hello(ty: u8, p: &[u8]) -> Result<Hello, ProtoError> {
    if ty != t::HELLO {
        return malformed(format!("expected HELLO, got frame type {ty}"));
    }
    if p.len() < 39 || p[..4] != MAGIC {
        return malformed("HELLO without the replfs magic");
    }
    let version = u16::from_le_bytes([p[4], p[5]]);
    let nonce = arr::<NONCE_LEN>(&p[6..38]);
    let n = p[38] as usize;
    if p.len() != 39 + n {
        return malformed(format!(
            "HELLO of {} bytes with a {n}-byte volume id",
            p.len()
        ));
    }
    let volume = std::str::from_utf8(&p[39..])
        .map_err(|_| ProtoError::Malformed("volume id is not UTF-8".into()))?;
    check_volume_id(volume).map_err(ProtoError::Malformed)?;
    Ok(Hello {
        version,
        nonce,
        volume: volume.to_owned(),
    })
}

fn server<S: Read + Write>(
    s: &mut S,
    key_for: &dyn Fn(&str) -> Option<Key>,
) -> Result<(String, Role), ProtoError> {
    let hello = read_frame(s, HANDSHAKE_MAX).and_then(|(ty, p)| parse_hello(ty, &p));
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            if !matches!(e, ProtoError::Closed | ProtoError::Io(_)) {
                send_error(s, "malformed handshake");
            }
            return Err(e);
        }
    };
    if hello.version != PROTO_VERSION {
        send_error(
            s,
            &format!(
                "protocol version {} not supported; this mirror speaks {PROTO_VERSION}",
                hello.version
            ),
        );
        return Err(ProtoError::Version {
            ours: PROTO_VERSION,
            theirs: hello.version,
        });
    }
    let vol = hello.volume;
    let key = key_for(&vol);
    let ns = nonce()?;
    let server_proof = match &key {
        Some(k) => proof(k, SERVER_LABEL, &hello.nonce, &ns, &vol),
        None => nonce()?,
    };
    let mut challenge = Vec::with_capacity(2 + NONCE_LEN + PROOF_LEN);
    challenge.extend_from_slice(&PROTO_VERSION.to_le_bytes());
    challenge.extend_from_slice(&ns);
    challenge.extend_from_slice(&server_proof);
    write_frame(s, t::CHALLENGE, &challenge)?;

    let (ty, p) = read_frame(s, HANDSHAKE_MAX)?;
    let fail = |s: &mut S, why: String| {
        send_error(s, GENERIC_REFUSAL);
        Err(ProtoError::AuthFailed(why))
    };
    match (ty, &key) {
        (t::ERROR, None) => Err(ProtoError::AuthFailed(format!(
            "unknown volume {vol:?} (client gave up: {})",
            error_text(&p)
        ))),
        (t::ERROR, Some(_)) => Err(ProtoError::AuthFailed(format!(
            "the client rejected our proof for volume {vol:?}: the keys differ ({})",
            error_text(&p)
        ))),
        (t::AUTH, None) if p.len() == PROOF_LEN + 1 => fail(s, format!("unknown volume {vol:?}")),
        (t::AUTH, Some(k)) if p.len() == PROOF_LEN + 1 => {
            let expected = proof(k, CLIENT_LABEL, &hello.nonce, &ns, &vol);
            let role = match p[PROOF_LEN] {
                0 => Role::Shipper,
                1 => Role::Verifier,
                r => {
                    send_error(s, "malformed handshake");
                    return malformed(format!("unknown role {r} in AUTH"));
                }
            };
            if proofs_equal(&expected, &p[..PROOF_LEN]) {
                Ok((vol, role))
            } else {
                fail(
                    s,
                    format!("wrong client proof for volume {vol:?} (wrong key)"),
                )
            }
        }
        _ => {
            send_error(s, "malformed handshake");
            malformed(format!(
                "expected AUTH, got frame type {ty} ({} bytes)",
                p.len()
            ))
        }
    }
}
