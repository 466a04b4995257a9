//! A session's certificates: a fresh CA per session signs the agent's server certificate and
//! ktctl's client certificate. The CA's key is dropped once both are signed, so no one can
//! mint another certificate for the session; only the agent's credentials leave the laptop.

use std::string::String;
use std::{format, vec};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::tunnel::{Identity, SERVER_NAME};

/// The agent's and the client's credentials for one session.
#[derive(Clone, Debug)]
pub struct SessionPki {
    /// Travels to the agent (in a Secret).
    pub server: Identity,
    /// Stays in ktctl's memory.
    pub client: Identity,
}

/// Errors making certificates.
#[derive(Debug, thiserror::Error)]
#[error("making the session certificates: {0}")]
pub struct PkiError(#[from] rcgen::Error);

impl SessionPki {
    /// Makes the CA, signs both certificates (valid for `days`), and forgets the CA key.
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
        let ca_pem = ca_cert.pem();
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |cn: String,
                    usage: ExtendedKeyUsagePurpose,
                    san: Option<&str>|
         -> Result<Identity, PkiError> {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            if let Some(name) = san {
                p.subject_alt_names = vec![SanType::DnsName(name.try_into()?)];
            }
            p.not_before = now - Duration::minutes(5);
            p.not_after = now + Duration::days(days);
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &issuer)?;
            Ok(Identity {
                ca_pem: ca_pem.clone(),
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
        };
        let server = leaf(
            format!("kt-router shadow {session}"),
            ExtendedKeyUsagePurpose::ServerAuth,
            Some(SERVER_NAME),
        )?;
        let client = leaf(
            format!("ktctl {session}"),
            ExtendedKeyUsagePurpose::ClientAuth,
            None,
        )?;
        Ok(SessionPki { server, client })
    }
}
