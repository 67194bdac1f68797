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

    fn only(keys: &[&NodeKey]) -> Admit {
        let keys: Vec<PublicKey> = keys.iter().map(|k| k.public()).collect();
        Arc::new(move |k: &PublicKey| keys.contains(k))
    }

    /// A handshake between a server and a client config over an in-memory pipe: the key each
    /// side proved, or the failure (client's, server's).
    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<(PublicKey, PublicKey), (String, String)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(server);
            let connector = tokio_rustls::TlsConnector::from(client);
            let serving = async move {
                let mut tls = acceptor.accept(a).await.map_err(|e| e.to_string())?;
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
                let certs = tls.get_ref().1.peer_certificates().unwrap();
                Ok::<_, String>(key_of(&certs[0]).unwrap())
            };
            let connecting = async move {
                let mut tls = connector
                    .connect(server_name(), b)
                    .await
                    .map_err(|e| e.to_string())?;
                tls.write_all(b"x").await.map_err(|e| e.to_string())?;
                tls.flush().await.map_err(|e| e.to_string())?;
                let certs = tls.get_ref().1.peer_certificates().unwrap();
                let key = key_of(&certs[0]).unwrap();
                // Wait for the server's verdict on this client's certificate.
                let mut byte = [0u8; 1];
                let _ = tls.read(&mut byte).await;
                Ok::<_, String>(key)
            };
            let (served, connected) = tokio::join!(serving, connecting);
            match (served, connected) {
                (Ok(s), Ok(c)) => Ok((s, c)),
                (s, c) => Err((c.err().unwrap_or_default(), s.err().unwrap_or_default())),
            }
        })
    }

    #[test]
    fn members_prove_their_keys_to_each_other() {
        let (desk, pi) = (NodeKey::generate(), NodeKey::generate());
        let server = server_config(&desk, only(&[&pi])).unwrap();
        let client = client_config(&pi, only(&[&desk])).unwrap();
        let (client_key, server_key) = handshake(server, client).unwrap();
        assert_eq!((client_key, server_key), (pi.public(), desk.public()));
    }

    #[test]
    fn a_key_not_admitted_is_refused_on_either_side() {
        let (desk, pi, stranger) = (
            NodeKey::generate(),
            NodeKey::generate(),
            NodeKey::generate(),
        );
        // The server does not admit the client.
        let server = server_config(&desk, only(&[&pi])).unwrap();
        let client = client_config(&stranger, only(&[&desk])).unwrap();
        let (_, served) = handshake(server, client).unwrap_err();
        assert!(served.contains("certificate"), "{served}");
        // The client does not admit the server.
        let server = server_config(&stranger, only(&[&pi])).unwrap();
        let client = client_config(&pi, only(&[&desk])).unwrap();
        let (connected, _) = handshake(server, client).unwrap_err();
        assert!(connected.contains("certificate"), "{connected}");
    }

    /// A member's certificate (its bytes are no secret) presented with another key: the
    /// handshake signature does not verify under the certificate's key.
    #[test]
    fn a_members_certificate_without_its_key_is_refused() {
        #[derive(Debug)]
        struct Stolen(Arc<rustls::sign::CertifiedKey>);
        impl rustls::client::ResolvesClientCert for Stolen {
            fn resolve(
                &self,
                _: &[&[u8]],
                _: &[SignatureScheme],
            ) -> Option<Arc<rustls::sign::CertifiedKey>> {
                Some(self.0.clone())
            }
            fn has_certs(&self) -> bool {
                true
            }
        }
        let (desk, pi, thief) = (
            NodeKey::generate(),
            NodeKey::generate(),
            NodeKey::generate(),
        );
        let (pi_cert, _) = identity(&pi).unwrap();
        let (_, thief_key) = identity(&thief).unwrap();
        let signer = provider().key_provider.load_private_key(thief_key).unwrap();
        let stolen = Arc::new(rustls::sign::CertifiedKey::new(vec![pi_cert], signer));
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinning {
                admit: only(&[&desk]),
                provider: provider(),
            }))
            .with_client_cert_resolver(Arc::new(Stolen(stolen)));
        let server = server_config(&desk, only(&[&pi])).unwrap();
        let (_, served) = handshake(server, Arc::new(client)).unwrap_err();
        assert!(!served.is_empty(), "the server took a stolen certificate");
    }

    #[test]
    fn plaintext_is_refused_before_a_request_is_read() {
        let desk = NodeKey::generate();
        let server = server_config(&desk, only(&[])).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let refused = runtime.block_on(async {
            use tokio::io::AsyncWriteExt;
            let (a, mut b) = tokio::io::duplex(64 * 1024);
            b.write_all(b"GET /v1/heads HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            tokio_rustls::TlsAcceptor::from(server)
                .accept(a)
                .await
                .err()
        });
        assert!(refused.is_some());
    }
}
