//! A session's certificates.
//!
//! ktctl makes a fresh CA per session, signs its own client certificate with it and drops the
//! CA's key at once, so exactly one client certificate chains to that CA and nobody can mint
//! another. Only the CA's certificate (public) travels to the shadow, which accepts clients
//! that chain to it.
//!
//! The shadow makes its own key pair when it starts ([`agent_identity`]); the key never leaves
//! the pod's memory: no Secret holds it, so no other pod of the namespace can mount it and pass
//! as the session's shadow. ktctl pins the shadow's certificate on its first connection (see
//! [`crate::tunnel::ServerPin`]).

use std::string::String;
use std::{format, vec};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::tunnel::{Identity, SERVER_NAME};

/// ktctl's side of a session's credentials.
#[derive(Clone, Debug)]
pub struct SessionPki {
    /// The client certificate and key: stay in ktctl's memory.
    pub client: Identity,
    /// PEM of the session CA's certificate: public, handed to the shadow as its only trust
    /// anchor for clients.
    pub client_ca_pem: String,
}

/// Errors making certificates.
#[derive(Debug, thiserror::Error)]
#[error("making the session certificates: {0}")]
pub struct PkiError(#[from] rcgen::Error);

fn leaf(
    cn: String,
    usage: ExtendedKeyUsagePurpose,
    san: Option<&str>,
    days: i64,
) -> Result<(CertificateParams, KeyPair), PkiError> {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if let Some(name) = san {
        p.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
    }
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::days(days);
    Ok((p, KeyPair::generate()?))
}

impl SessionPki {
    /// Makes the CA, signs the client certificate (valid for `days`), and forgets the CA key.
    pub fn generate(session: &str, days: i64) -> Result<SessionPki, PkiError> {
        let now = OffsetDateTime::now_utc();
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, format!("ktctl session {session} CA"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.not_before = now - Duration::minutes(5);
        ca.not_after = now + Duration::days(days);
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let (p, key) = leaf(
            format!("ktctl {session}"),
            ExtendedKeyUsagePurpose::ClientAuth,
            None,
            days,
        )?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok(SessionPki {
            client: Identity {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
            client_ca_pem: ca_cert.pem(),
        })
    }
}

/// The agent's own credentials: a fresh key pair and a self-signed certificate, made in the
/// agent's memory at start. Its trust comes from ktctl's pin, not from a CA.
pub fn agent_identity(session: &str, days: i64) -> Result<Identity, PkiError> {
    let (p, key) = leaf(
        format!("kt-router shadow {session}"),
        ExtendedKeyUsagePurpose::ServerAuth,
        Some(SERVER_NAME),
        days,
    )?;
    let cert = p.self_signed(&key)?;
    Ok(Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
