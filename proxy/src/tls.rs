//! TLS material: the crypto provider, CA bundles, and the listener's server
//! config (certificate and key from files, picked up again when they change).

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{self, ListenerTls};

/// The crypto provider used everywhere (ring).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// A hash of a file's content (0 if it cannot be read): tells a reload
/// whether a file changed under the same path.
pub(crate) fn fingerprint(path: &Path) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    std::fs::read(path).map_or(0, |bytes| {
        // DefaultHasher::new() has fixed keys: the same content, the same
        // number, for the life of the process.
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    })
}

/// A root store holding every certificate of a PEM bundle.
pub(crate) fn root_store(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The listener's TLS config; ALPN offers h2 (and http/1.1, so HTTP/1.1
/// clients get a clear error instead of a failed handshake).
pub(crate) fn server_config(
    tls: &ListenerTls,
    base: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let cert_path = config::resolve(&tls.cert, base);
    let key_path = config::resolve(&tls.key, base);
    let chain = certs(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key_path.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = root_store(&config::resolve(ca, base))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{} and {} do not make a usable certificate: {e}",
            cert_path.display(),
            key_path.display()
        )
    })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The identity a verified client certificate names, for limit keys: its
/// first URI SAN (a SPIFFE ID in a mesh), else its first DNS SAN, else its
/// subject's common name.
pub(crate) fn client_identity(cert: &[u8]) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names = &san.value.general_names;
        let uri = names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
        let dns = names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        });
        if let Some(name) = uri.or(dns) {
            return Some(name.to_owned());
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    cn
}
