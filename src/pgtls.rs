//! TLS for every Postgres connection: libpq's `sslmode` and `sslrootcert`, which the driver does
//! not read, and the rustls configuration each mode asks for.
//!
//! Modes, as libpq has them:
//! - `disable`: no TLS.
//! - `allow`, `prefer` (the default): TLS when the server offers it, else plaintext; the server's
//!   certificate is not checked (with `sslrootcert`, its chain is, as libpq does).
//! - `require`: TLS or nothing; the certificate is not checked (with `sslrootcert`: its chain).
//! - `verify-ca`: TLS, and the certificate chains to a trusted root (the system's and
//!   `sslrootcert`'s); any host name.
//! - `verify-full`: as `verify-ca`, and the certificate names the host connected to.
//!
//! Invariant: a connection string's TLS options are taken out before the driver parses the rest,
//! and never echoed; a file named by `sslrootcert` is read bounded and must hold certificates.
//!
//! Boundary: the only module importing rustls. Knows nothing of SQL or of the log.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// A root certificate file is at most this long.
const ROOT_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// `sslmode`, as libpq spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(value: &str) -> Result<Mode, String> {
        match value {
            "disable" => Ok(Mode::Disable),
            // The driver has no "plaintext first, then TLS": `allow` tries TLS first.
            "allow" | "prefer" => Ok(Mode::Prefer),
            "require" => Ok(Mode::Require),
            "verify-ca" => Ok(Mode::VerifyCa),
            "verify-full" => Ok(Mode::VerifyFull),
            _ => Err(
                "sslmode: must be disable, allow, prefer, require, verify-ca or verify-full".into(),
            ),
        }
    }

    /// The driver's mode: whether TLS is tried, and whether it is required.
    pub fn driver(self) -> postgres::config::SslMode {
        match self {
            Mode::Disable => postgres::config::SslMode::Disable,
            Mode::Prefer => postgres::config::SslMode::Prefer,
            _ => postgres::config::SslMode::Require,
        }
    }
}

/// The TLS options taken out of a connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    pub root_cert: Option<std::path::PathBuf>,
}

/// Splits `url` (a `postgresql://` URL or `key=value` pairs) into what the driver parses and the
/// TLS options. `Err` names the option, never its value.
pub fn split(url: &str) -> Result<(String, Options), String> {
    let mut options = Options {
        mode: Mode::Prefer,
        root_cert: None,
    };
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => options.mode = Mode::parse(value)?,
            "sslrootcert" => options.root_cert = Some(value.into()),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(key, &percent_decoded(value)?)? {
                kept.push(pair);
            }
        }
        match kept.is_empty() {
            true => base.to_owned(),
            false => format!("{base}?{}", kept.join("&")),
        }
    } else {
        let mut kept = Vec::new();
        for (key, value, text) in pairs(url)? {
            if !take(&key, &value)? {
                kept.push(text);
            }
        }
        kept.join(" ")
    };
    Ok((rest, options))
}

/// `%XX` escapes decoded (a URL's query value).
fn percent_decoded(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("the connection string: a % escape is not two hex digits")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the connection string: an escape is not UTF-8".into())
}

/// The `key=value` pairs of a libpq keyword string: each key, its value (quotes and `\`
/// escapes undone) and the pair's text as given.
fn pairs(text: &str) -> Result<Vec<(String, String, &str)>, String> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let start = rest;
        let eq = rest
            .find('=')
            .ok_or("the connection string: a keyword without `=`")?;
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start();
        let mut value = String::new();
        if let Some(quoted) = rest.strip_prefix('\'') {
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '\'' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let end = end.ok_or("the connection string: a quoted value is not closed")?;
            rest = &quoted[end..];
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let mut chars = rest[..end].chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
            rest = &rest[end..];
        }
        let used = start.len() - rest.len();
        out.push((key, value, start[..used].trim_end()));
        rest = rest.trim_start();
    }
    Ok(out)
}

/// The rustls configuration `options` ask for.
pub fn client_config(options: &Options) -> Result<ClientConfig, String> {
    // ring, not aws-lc-rs: no C toolchain beyond cc, and a shorter build; its key exchanges
    // (X25519, P-256, P-384) are what Postgres servers, Supabase included, offer today.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    // libpq checks the chain in `require` and `prefer` too once a root file is named.
    let check_chain =
        matches!(options.mode, Mode::VerifyCa | Mode::VerifyFull) || options.root_cert.is_some();
    let chain = match check_chain {
        true => Some(
            WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(options)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("TLS: {e}"))?,
        ),
        false => None,
    };
    let verifier = Verifier {
        chain,
        name: options.mode == Mode::VerifyFull,
        provider,
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The system's roots and `sslrootcert`'s certificates.
fn roots(options: &Options) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = &options.root_cert {
        let shown = path.display();
        let file = std::fs::File::open(path).map_err(|e| format!("sslrootcert {shown}: {e}"))?;
        let mut pem = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, ROOT_FILE_BYTES_MAX + 1),
            &mut pem,
        )
        .map_err(|e| format!("sslrootcert {shown}: {e}"))?;
        if pem.len() as u64 > ROOT_FILE_BYTES_MAX {
            return Err(format!(
                "sslrootcert {shown}: larger than {ROOT_FILE_BYTES_MAX} bytes"
            ));
        }
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|_| format!("sslrootcert {shown}: not PEM certificates"))?;
        if certs.is_empty() {
            return Err(format!("sslrootcert {shown}: holds no certificate"));
        }
        let (_, refused) = roots.add_parsable_certificates(certs);
        if refused > 0 {
            return Err(format!(
                "sslrootcert {shown}: {refused} certificate(s) could not be read"
            ));
        }
    }
    if roots.is_empty() {
        return Err(
            "TLS: no root certificates to check the server's against (none in the system's \
             store): name a file with sslrootcert="
                .into(),
        );
    }
    Ok(roots)
}

/// What a mode checks of the server's certificate: nothing (`require`, `prefer` without a root
/// file: encryption, not who answers, as libpq means them), its chain (`verify-ca`), or its chain
/// and the host name (`verify-full`). The handshake's signatures are always checked.
#[derive(Debug)]
struct Verifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_are_taken_out_of_both_forms() {
        let (rest, o) = split(
            "postgresql://u:pw@db.example.com:6543/postgres?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgresql://u:pw@db.example.com:6543/postgres?application_name=x"
        );
        assert_eq!(o.mode, Mode::VerifyFull);
        assert_eq!(
            o.root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        let (rest, o) = split(
            "host=h port=5 sslmode = 'verify-ca' sslrootcert='/my ca.pem' password='a b\\'c'",
        )
        .unwrap();
        assert_eq!(rest, "host=h port=5 password='a b\\'c'");
        assert_eq!(o.mode, Mode::VerifyCa);
        assert_eq!(
            o.root_cert.as_deref(),
            Some(std::path::Path::new("/my ca.pem"))
        );
        let (rest, o) = split("host=/run/postgresql dbname=d").unwrap();
        assert_eq!(
            (rest.as_str(), o.mode),
            ("host=/run/postgresql dbname=d", Mode::Prefer)
        );
        let e = split("host=h sslmode=secret-value").unwrap_err();
        assert!(
            e.starts_with("sslmode:") && !e.contains("secret-value"),
            "{e}"
        );
        assert!(split("host=h password='open").is_err());
    }
}
