//! TLS between peers, with certificates made from the node keys: each side pins the other's key,
//! as Syncthing's device ids do.
//!
//! A node's certificate is self-signed with its ed25519 node key and made in memory when it is
//! needed. Nothing in a presented certificate is believed but its key, and that key only because
//! the TLS 1.3 handshake signature proves the peer holds it: names, dates and issuers are not
//! read. A connection is accepted only if the caller's [`Admit`] takes the key (a current member
//! of the fleet, or the key a pairing code was shown beside). TLS 1.3 only, ed25519 only; both
//! sides present a certificate.
//!
//! Boundary: the peer side of rustls (`pgtls` is Postgres's); no sockets, no HTTP.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};

use crate::identity::{NodeKey, PublicKey};

/// Whether a peer presenting this key may connect.
pub type Admit = Arc<dyn Fn(&PublicKey) -> bool + Send + Sync>;

/// The name a client asks for: certificates carry it, and nobody checks it.
pub const PEER_NAME: &str = "spool-peer";

/// This node's certificate and its key, in the forms rustls takes.
fn identity(key: &NodeKey) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
    let pkcs8 = key.to_pkcs8_der();
    let signer = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.clone()),
        &rcgen::PKCS_ED25519,
    )
    .map_err(|e| format!("the node key as a certificate key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![PEER_NAME.to_owned()])
        .map_err(|e| format!("a certificate for the node key: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, key.origin().to_hex());
    let cert = params
        .self_signed(&signer)
        .map_err(|e| format!("a certificate for the node key: {e}"))?;
    Ok((
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)),
    ))
}

/// The ed25519 key a certificate carries, if it carries one.
pub fn key_of(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let spki = parsed.public_key();
    // id-Ed25519 (RFC 8410), with no parameters.
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        return None;
    }
    let bytes: [u8; 32] = spki.subject_public_key.data.as_ref().try_into().ok()?;
    Some(PublicKey(bytes))
}

fn provider() -> Arc<CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a listening node serves with: its certificate, and a client certificate demanded of
/// every peer, whose key `admit` must take.
pub fn server_config(key: &NodeKey, admit: Admit) -> Result<Arc<ServerConfig>, String> {
    let provider = provider();
    let (cert, private) = identity(key)?;
    let verifier = Arc::new(Pinning {
        admit,
        provider: provider.clone(),
    });
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], private)
        .map_err(|e| format!("serving with the node key: {e}"))?;
    Ok(Arc::new(config))
}

/// What a connecting node presents: its certificate; the server's key must be one `admit`
/// takes.
pub fn client_config(key: &NodeKey, admit: Admit) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let (cert, private) = identity(key)?;
    let verifier = Arc::new(Pinning {
        admit,
        provider: provider.clone(),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], private)
        .map_err(|e| format!("connecting with the node key: {e}"))?;
    Ok(Arc::new(config))
}

/// The name a client connects with (see [`PEER_NAME`]).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(PEER_NAME).expect("a valid DNS name")
}

/// Both directions' verifier: the presented key, proven by the handshake, must be admitted.
struct Pinning {
    admit: Admit,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Pinning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pinning")
    }
}

impl Pinning {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), Error> {
        let key = key_of(cert).ok_or(Error::InvalidCertificate(CertificateError::BadEncoding))?;
        match (self.admit)(&key) {
            true => Ok(()),
            false => Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for Pinning {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("peers speak TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for Pinning {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("peers speak TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_carries_the_node_key() {
        let key = NodeKey::generate();
        let (cert, _) = identity(&key).unwrap();
        assert_eq!(key_of(&cert), Some(key.public()));
    }
}
