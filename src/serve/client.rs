//! The client side of the daemon's socket, for the CLI and tests: one HTTP/1.1 request over
//! the node's Unix socket.

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Http(#[from] hyper::Error),
    #[error("a request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("writing the daemon's answer: {0}")]
    Write(std::io::Error),
}

/// A connection to the daemon, reused for any number of requests.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    /// Connects to the daemon's socket.
    pub async fn connect(socket: &Path) -> Result<Client, ClientError> {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Client { sender })
    }

    /// Sends one request; returns the status and the body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let mut answer = Vec::new();
        let status = self
            .request_streaming(method, path, body, |_, chunk| {
                answer.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        Ok((status, answer))
    }

    /// Sends one request and hands the answer's body to `chunk` piece by piece as it arrives
    /// (a long job's progress, an export), with the answer's status; returns the status. An
    /// error from `chunk` stops the reading and is returned; so does a body the daemon cut
    /// short (a job that failed midway).
    pub async fn request_streaming(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        mut chunk: impl FnMut(u16, &[u8]) -> std::io::Result<()>,
    ) -> Result<u16, ClientError> {
        self.sender.ready().await?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "spool")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                chunk(status, &data).map_err(ClientError::Write)?;
            }
        }
        Ok(status)
    }
}
