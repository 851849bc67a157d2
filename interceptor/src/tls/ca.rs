//! Chaperone's own certificate authority.
//!
//! In local mode the CA lives in a directory (`ca.crt`, `ca.key`), created on
//! first use and reused across restarts: agent pods trust it, so replacing it
//! silently would break every agent. Hence the rules: the key file is 0600 and
//! a key readable by anyone else is refused; a half-present, corrupt,
//! mismatched or expired CA is an error that names the file, never a reason
//! to generate a new one over it. In cluster mode the CA comes from a
//! `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) so every node presents
//! the same one.

use std::{
    fmt,
    fs::{self, DirBuilder, OpenOptions},
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{TlsError, parse_certificates};

/// The CA certificate's file name inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA key's file name inside the CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// Where the node agent keeps its CA unless told otherwise.
pub const DEFAULT_CA_DIR: &str = "/var/lib/chaperone/ca";

/// How long a newly created CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Back-dating of `notBefore`, for clocks that are slightly behind.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Chaperone's certificate authority: its certificate and signing key.
pub struct LocalCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    info: CaInfo,
}

/// What `chaperone ca show` prints about a CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaInfo {
    pub subject: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER certificate, colon-separated upper-case hex (as
    /// `openssl x509 -fingerprint -sha256` prints it).
    pub sha256_fingerprint: String,
}

/// Whether [`LocalCa::open`] found a CA or made one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaOpened {
    Created,
    Loaded,
}

/// A leaf certificate and its private key, as issued by [`LocalCa::issue`].
pub struct IssuedCert {
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivatePkcs8KeyDer<'static>,
}

/// What a leaf certificate is for: the names and addresses it must carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeafRequest {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
}

// === impl LocalCa ===

impl LocalCa {
    /// The CA in `dir`, created (directory 0700, key 0600) when neither file
    /// exists yet.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        Self::open(dir).map(|(ca, _)| ca)
    }

    /// Like [`LocalCa::load_or_create`], and says which of the two happened.
    pub fn open(dir: &Path) -> Result<(Self, CaOpened), TlsError> {
        ensure_private_dir(dir)?;
        if let Some(ca) = Self::load(dir)? {
            return Ok((ca, CaOpened::Loaded));
        }
        match Self::create(dir) {
            Ok(ca) => Ok((ca, CaOpened::Created)),
            // Another process created it between our look and our write.
            Err(TlsError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                let ca = Self::load(dir)?.ok_or_else(|| TlsError::HalfCa {
                    present: dir.join(CA_KEY_FILE),
                    missing: dir.join(CA_CERT_FILE),
                })?;
                Ok((ca, CaOpened::Loaded))
            }
            Err(e) => Err(e),
        }
    }

    /// The CA in `dir`, or `None` when there is none (neither file exists).
    pub fn load(dir: &Path) -> Result<Option<Self>, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (false, false) => return Ok(None),
            (true, false) => {
                return Err(TlsError::HalfCa {
                    present: cert_path,
                    missing: key_path,
                });
            }
            (false, true) => {
                return Err(TlsError::HalfCa {
                    present: key_path,
                    missing: cert_path,
                });
            }
            (true, true) => {}
        }
        check_key_file_mode(&key_path)?;
        let cert_pem =
            fs::read(&cert_path).map_err(|e| TlsError::io("read", cert_path.clone(), e))?;
        let key_pem = fs::read(&key_path).map_err(|e| TlsError::io("read", key_path.clone(), e))?;
        Self::from_pem_parts(
            &cert_path.display().to_string(),
            &cert_pem,
            &key_path.display().to_string(),
            &key_pem,
        )
        .map(Some)
    }

    /// The CA from a `kubernetes.io/tls` Secret's data (`tls.crt`, `tls.key`),
    /// for cluster mode. `secret` names it in errors (`namespace/name`).
    pub fn from_secret_data(
        secret: &str,
        tls_crt: &[u8],
        tls_key: &[u8],
    ) -> Result<Self, TlsError> {
        Self::from_pem_parts(
            &format!("Secret {secret} key tls.crt"),
            tls_crt,
            &format!("Secret {secret} key tls.key"),
            tls_key,
        )
    }

    /// The CA from a `kubernetes.io/tls` Secret object.
    pub fn from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Result<Self, TlsError> {
        let name = format!(
            "{}/{}",
            secret.metadata.namespace.as_deref().unwrap_or(""),
            secret.metadata.name.as_deref().unwrap_or("")
        );
        let data = secret.data.as_ref();
        let field = |key: &str| {
            data.and_then(|d| d.get(key))
                .map(|b| b.0.as_slice())
                .ok_or_else(|| TlsError::BadCertificate {
                    what: format!("Secret {name}"),
                    reason: format!(
                        "it has no `{key}` in its data (expected a kubernetes.io/tls Secret)"
                    ),
                })
        };
        Self::from_secret_data(&name, field("tls.crt")?, field("tls.key")?)
    }

    /// The PEM bundle agent pods must trust for chaperone's side: the CA
    /// certificate.
    pub fn bundle_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn info(&self) -> &CaInfo {
        &self.info
    }

    /// Issue a server certificate signed by this CA, with a fresh P-256 key.
    pub fn issue(&self, request: &LeafRequest) -> Result<IssuedCert, TlsError> {
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, request.common_name.as_str());
        params.not_before = request.not_before.unwrap_or(now - BACKDATE).into();
        params.not_after = request
            .not_after
            .unwrap_or(now + Duration::from_secs(24 * 3600))
            .into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        for name in &request.dns_names {
            let name = name
                .clone()
                .try_into()
                .map_err(|_| TlsError::BadCertificate {
                    what: format!("the name {name:?}"),
                    reason: "not a valid DNS name for a certificate".into(),
                })?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(request.ips.iter().copied().map(SanType::IpAddress));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_der: cert.der().clone(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    fn create(dir: &Path) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        // A distinct name per CA: bundles may hold several (rotation, more
        // than one installation), and verifiers pick issuers by name.
        let id: [u8; 4] = rand::random();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("chaperone local CA {}", hex::encode(id)),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "chaperone");
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();

        // Key first: a certificate without its key is useless, and both
        // files are linked into place only if absent, never overwritten.
        write_new(dir, CA_KEY_FILE, key_pem.as_bytes(), 0o600)?;
        if let Err(e) = write_new(dir, CA_CERT_FILE, cert_pem.as_bytes(), 0o644) {
            // We created the key a moment ago; do not leave half a CA behind.
            let _ = fs::remove_file(dir.join(CA_KEY_FILE));
            return Err(e);
        }
        tracing::info!(dir = %dir.display(), "created chaperone CA");
        let cert_der = cert.der().clone();
        let info = info_of(&cert_der, "the new CA certificate")?;
        Ok(LocalCa {
            cert_pem,
            cert_der,
            issuer: Issuer::new(params, key),
            info,
        })
    }

    fn from_pem_parts(
        cert_what: &str,
        cert_pem: &[u8],
        key_what: &str,
        key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        let cert_der = parse_certificates(cert_what, cert_pem)?.swap_remove(0);
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| {
            TlsError::BadCertificate {
                what: cert_what.into(),
                reason: e.to_string(),
            }
        })?;
        if !x509.is_ca() {
            return Err(TlsError::BadCertificate {
                what: cert_what.into(),
                reason: "it is not a CA certificate (basicConstraints CA:TRUE is missing)".into(),
            });
        }
        let key = parse_key(key_what, key_pem)?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(TlsError::KeyMismatch {
                cert: cert_what.into(),
                key: key_what.into(),
            });
        }
        let info = info_of(&cert_der, cert_what)?;
        if info.not_after < OffsetDateTime::now_utc() {
            return Err(TlsError::Expired {
                what: cert_what.into(),
                not_after: info.not_after.to_string(),
            });
        }
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| TlsError::BadCertificate {
                what: cert_what.into(),
                reason: e.to_string(),
            })?;
        // Re-encode so `bundle_pem` is exactly one clean certificate.
        let cert_pem = pem_of(&cert_der);
        Ok(LocalCa {
            cert_pem,
            cert_der,
            issuer,
            info,
        })
    }
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

// === helpers ===

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists()
        .map_err(|e| TlsError::io("look at", path, e))
}

/// Create `dir` with mode 0700 if missing; refuse one others can write to.
fn ensure_private_dir(dir: &Path) -> Result<(), TlsError> {
    if !exists(dir)? {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| TlsError::io("create directory", dir, e))?;
    }
    let mode = fs::metadata(dir)
        .map_err(|e| TlsError::io("read metadata of", dir, e))?
        .permissions()
        .mode();
    if mode & 0o022 != 0 {
        return Err(TlsError::DirTooOpen {
            path: dir.into(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

fn check_key_file_mode(path: &Path) -> Result<(), TlsError> {
    let mode = fs::metadata(path)
        .map_err(|e| TlsError::io("read metadata of", path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyFileTooOpen {
            path: path.into(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Write `contents` to `dir/name` with `mode`, failing with `AlreadyExists`
/// rather than replacing an existing file. The data goes to a temporary
/// file first and is linked into place, so a crash never leaves a torn file.
fn write_new(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| TlsError::io("create", &tmp, e))?;
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(|e| TlsError::io("write", &tmp, e))?;
        fs::hard_link(&tmp, &path).map_err(|e| TlsError::io("create", &path, e))
    })();
    let _ = fs::remove_file(&tmp);
    result
}

fn parse_key(what: &str, pem: &[u8]) -> Result<KeyPair, TlsError> {
    let bad = |reason: String| TlsError::BadKey {
        what: what.into(),
        reason,
    };
    let key = rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| bad(format!("invalid PEM: {e}")))?
        .ok_or_else(|| bad("no `-----BEGIN PRIVATE KEY-----` block found".into()))?;
    match key {
        PrivateKeyDer::Pkcs8(der) => KeyPair::try_from(der.secret_pkcs8_der())
            .map_err(|e| bad(format!("unsupported or corrupt PKCS#8 key: {e}"))),
        _ => Err(bad(
            "it is PKCS#1 or SEC1; chaperone reads PKCS#8 (`BEGIN PRIVATE KEY`): convert it with \
             `openssl pkcs8 -topk8 -nocrypt`, or set `privateKey.encoding: PKCS8` in cert-manager"
                .into(),
        )),
    }
}

fn info_of(der: &CertificateDer<'_>, what: &str) -> Result<CaInfo, TlsError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCertificate {
            what: what.into(),
            reason: e.to_string(),
        })?;
    Ok(CaInfo {
        subject: x509.subject().to_string(),
        not_before: x509.validity().not_before.to_datetime(),
        not_after: x509.validity().not_after.to_datetime(),
        sha256_fingerprint: fingerprint(der),
    })
}

/// SHA-256 fingerprint as `AB:CD:…`.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One certificate as PEM.
pub fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_ca_is_persisted_privately_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let (first, opened) = LocalCa::open(&dir).unwrap();
        assert_eq!(opened, CaOpened::Created);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        let pem_on_disk = fs::read_to_string(dir.join(CA_CERT_FILE)).unwrap();
        assert_eq!(first.bundle_pem(), pem_on_disk);
        assert!(first.info().subject.contains("chaperone local CA"));

        let (second, opened) = LocalCa::open(&dir).unwrap();
        assert_eq!(opened, CaOpened::Loaded);
        assert_eq!(second.bundle_pem(), first.bundle_pem());
        assert_eq!(second.info(), first.info());
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_reloaded_ca_issues_leaves_that_chain_to_the_saved_certificate() {
        use rustls::client::danger::ServerCertVerifier as _;
        let tmp = tempfile::tempdir().unwrap();
        let created = LocalCa::load_or_create(tmp.path()).unwrap();
        let loaded = LocalCa::load_or_create(tmp.path()).unwrap();
        let leaf = loaded
            .issue(&LeafRequest {
                common_name: "kubernetes".into(),
                dns_names: vec!["kubernetes.default".into()],
                ..LeafRequest::default()
            })
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(created.certificate_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::tls::crypto_provider(),
        )
        .build()
        .unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert_der,
                &[],
                &rustls::pki_types::ServerName::try_from("kubernetes.default").unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(tmp.path()).unwrap();
        let key = tmp.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = LocalCa::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, TlsError::KeyFileTooOpen { .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // The key is untouched: still there, still world-readable.
        assert_eq!(mode(&key), 0o644);
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = LocalCa::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, TlsError::DirTooOpen { .. }), "{err}");
        assert!(!tmp.path().join(CA_KEY_FILE).exists());
    }

    #[test]
    fn half_a_ca_is_an_error_and_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(tmp.path()).unwrap();
        let key_before = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();
        fs::remove_file(tmp.path().join(CA_CERT_FILE)).unwrap();
        let err = LocalCa::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, TlsError::HalfCa { .. }), "{err}");
        assert!(err.to_string().contains("ca.crt"), "{err}");
        assert_eq!(fs::read(tmp.path().join(CA_KEY_FILE)).unwrap(), key_before);
        assert!(!tmp.path().join(CA_CERT_FILE).exists());
    }

    #[test]
    fn corrupt_files_are_errors_that_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(tmp.path()).unwrap();
        let cert = tmp.path().join(CA_CERT_FILE);
        fs::write(&cert, "not a certificate\n").unwrap();
        let err = LocalCa::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, TlsError::BadCertificate { .. }), "{err}");
        assert!(
            err.to_string().contains(&cert.display().to_string()),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&cert).unwrap(), "not a certificate\n");

        let tmp = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(tmp.path()).unwrap();
        let key = tmp.path().join(CA_KEY_FILE);
        fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = LocalCa::load_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn a_key_from_another_ca_is_a_mismatch() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(a.path()).unwrap();
        LocalCa::load_or_create(b.path()).unwrap();
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let err = LocalCa::load_or_create(a.path()).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn a_ca_loads_from_secret_data() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(tmp.path()).unwrap();
        let crt = fs::read(tmp.path().join(CA_CERT_FILE)).unwrap();
        let key = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();
        let from_secret = LocalCa::from_secret_data("chaperone/ca", &crt, &key).unwrap();
        assert_eq!(from_secret.info(), ca.info());

        let mut secret = k8s_openapi::api::core::v1::Secret::default();
        secret.metadata.namespace = Some("chaperone".into());
        secret.metadata.name = Some("ca".into());
        secret.data = Some(
            [("tls.crt".to_string(), k8s_openapi::ByteString(crt))]
                .into_iter()
                .collect(),
        );
        let err = LocalCa::from_secret(&secret).unwrap_err();
        assert!(err.to_string().contains("chaperone/ca"), "{err}");
        assert!(err.to_string().contains("tls.key"), "{err}");
        secret
            .data
            .as_mut()
            .unwrap()
            .insert("tls.key".into(), k8s_openapi::ByteString(key));
        assert_eq!(LocalCa::from_secret(&secret).unwrap().info(), ca.info());
    }

    #[test]
    fn a_leaf_certificate_is_not_accepted_as_a_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(tmp.path()).unwrap();
        let leaf = ca.issue(&LeafRequest::default()).unwrap();
        let key_pem = pem_block("PRIVATE KEY", leaf.key_der.secret_pkcs8_der());
        let err =
            LocalCa::from_secret_data("x/y", pem_of(&leaf.cert_der).as_bytes(), key_pem.as_bytes())
                .unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    fn pem_block(label: &str, der: &[u8]) -> String {
        pem_of(der).replace("CERTIFICATE", label)
    }

    #[test]
    fn fingerprint_matches_openssl_format() {
        let fp = fingerprint(b"abc");
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert!(fp.starts_with("BA:78:16:BF"), "{fp}");
    }
}
