//! The cluster's certificates and kubeconfigs: one CA signs the API server's serving
//! certificate, the kubelets' serving certificates and client certificates (the admin's in
//! `system:masters`, and users made by tests for RBAC checks).

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::layout::{Layout, Machine, api_server_ip};

/// Paths of the files [`ensure`] writes under `target/testbed/pki`.
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn apiserver_cert(&self) -> PathBuf {
        self.dir.join("apiserver.crt")
    }
    pub fn apiserver_key(&self) -> PathBuf {
        self.dir.join("apiserver.key")
    }
    pub fn admin_cert(&self) -> PathBuf {
        self.dir.join("admin.crt")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin.key")
    }
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }
    pub fn kubelet_cert(&self, m: Machine) -> PathBuf {
        self.dir.join(format!("{}.crt", m.name()))
    }
    pub fn kubelet_key(&self, m: Machine) -> PathBuf {
        self.dir.join(format!("{}.key", m.name()))
    }
}

fn write_private(path: &Path, data: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data.as_bytes())?;
    Ok(())
}

fn load_issuer(pki: &Pki) -> Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::from_pem(&fs::read_to_string(pki.ca_key())?)?;
    let cert = fs::read_to_string(pki.ca_cert())?;
    Ok(Issuer::from_ca_cert_pem(&cert, key)?)
}

fn leaf(
    cn: &str,
    org: Option<&str>,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![usage];
    p
}

fn issue(
    issuer: &Issuer<'_, KeyPair>,
    params: CertificateParams,
    cert: &Path,
    key: &Path,
) -> Result<()> {
    let kp = KeyPair::generate()?;
    let c = params.signed_by(&kp, issuer)?;
    fs::write(cert, c.pem())?;
    write_private(key, &kp.serialize_pem())
}

/// Makes the CA and every certificate the cluster needs, unless they exist already.
pub fn ensure(layout: &Layout, nodes: u8) -> Result<Pki> {
    let pki = Pki { dir: layout.pki() };
    fs::create_dir_all(&pki.dir)?;
    if !pki.ca_cert().exists() {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kt-testbed-ca");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let kp = KeyPair::generate()?;
        let c = p.self_signed(&kp)?;
        fs::write(pki.ca_cert(), c.pem())?;
        write_private(&pki.ca_key(), &kp.serialize_pem())?;
        // Everything signed by an older CA is void now.
        for f in fs::read_dir(&pki.dir)? {
            let f = f?.path();
            if f != pki.ca_cert() && f != pki.ca_key() {
                fs::remove_file(f)?;
            }
        }
    }
    let issuer = load_issuer(&pki)?;
    if !pki.apiserver_cert().exists() {
        let mut sans = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))),
            SanType::IpAddress(IpAddr::V4(api_server_ip())),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        for n in [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "localhost",
        ] {
            sans.push(SanType::DnsName(n.try_into()?));
        }
        issue(
            &issuer,
            leaf(
                "kube-apiserver",
                None,
                sans,
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            &pki.apiserver_cert(),
            &pki.apiserver_key(),
        )?;
    }
    if !pki.admin_cert().exists() {
        issue(
            &issuer,
            leaf(
                "kubernetes-admin",
                Some("system:masters"),
                vec![],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
            &pki.admin_cert(),
            &pki.admin_key(),
        )?;
    }
    if !pki.sa_key().exists() {
        let kp = KeyPair::generate()?;
        write_private(&pki.sa_key(), &kp.serialize_pem())?;
        fs::write(pki.sa_pub(), kp.public_key_pem())?;
    }
    for n in 1..=nodes {
        let m = Machine::Node(n);
        if !pki.kubelet_cert(m).exists() {
            let sans = vec![
                SanType::IpAddress(IpAddr::V4(m.ip())),
                SanType::DnsName(m.name().try_into()?),
            ];
            issue(
                &issuer,
                leaf(
                    &format!("system:node:{}", m.name()),
                    Some("system:nodes"),
                    sans,
                    ExtendedKeyUsagePurpose::ServerAuth,
                ),
                &pki.kubelet_cert(m),
                &pki.kubelet_key(m),
            )?;
        }
    }
    Ok(pki)
}

/// A kubeconfig for a client certificate, talking to the API server at its LAN address.
pub fn kubeconfig(
    pki: &Pki,
    user: &str,
    cert: &Path,
    key: &Path,
    namespace: &str,
) -> Result<String> {
    use std::fmt::Write;
    let b64 = |p: &Path| -> Result<String> {
        Ok(STANDARD.encode(fs::read(p).with_context(|| format!("reading {}", p.display()))?))
    };
    let mut s = String::new();
    writeln!(
        s,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kt-testbed\n  cluster:"
    )?;
    writeln!(
        s,
        "    server: https://{}:6443\n    certificate-authority-data: {}",
        api_server_ip(),
        b64(&pki.ca_cert())?
    )?;
    writeln!(
        s,
        "users:\n- name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}",
        b64(cert)?,
        b64(key)?
    )?;
    writeln!(
        s,
        "contexts:\n- name: kt-testbed\n  context:\n    cluster: kt-testbed\n    user: {user}\n    namespace: {namespace}"
    )?;
    writeln!(s, "current-context: kt-testbed")?;
    Ok(s)
}

/// Makes a kubeconfig for a user that is not an admin (RBAC applies to it), for tests of
/// missing permissions. Returns its path.
pub fn user_kubeconfig(
    layout: &Layout,
    user: &str,
    groups: &[&str],
    namespace: &str,
) -> Result<PathBuf> {
    let pki = Pki { dir: layout.pki() };
    let issuer = load_issuer(&pki)?;
    let mut p = leaf(user, None, vec![], ExtendedKeyUsagePurpose::ClientAuth);
    for g in groups {
        p.distinguished_name.push(DnType::OrganizationName, *g);
    }
    let cert = pki.dir.join(format!("user-{user}.crt"));
    let key = pki.dir.join(format!("user-{user}.key"));
    issue(&issuer, p, &cert, &key)?;
    let path = layout.dir.join(format!("kubeconfig-{user}"));
    write_private(&path, &kubeconfig(&pki, user, &cert, &key, namespace)?)?;
    Ok(path)
}
