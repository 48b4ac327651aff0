//! The real `courier` binary with its admin listener on a free loopback
//! port and a known admin token ([`AdminBroker`]), and a minimal HTTP
//! client for checking the admin API from a test ([`AdminBroker::get`],
//! [`AdminBroker::post`]).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::Value;

use super::{ChildBroker, WAIT};

/// The admin token the tests configure (at least 16 characters).
pub const TOKEN: &str = "test-admin-token-0123456789";

/// A `courier serve` child with its admin listener up.
pub struct AdminBroker {
    pub broker: ChildBroker,
    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub admin_url: String,
    pub token: String,
    /// The broker's data dir (`admin.token` lives here).
    pub data_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A port that was free a moment ago (the broker binds it right after).
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    probe.local_addr().expect("addr").port()
}

impl AdminBroker {
    /// Starts with [`TOKEN`] as the configured admin token.
    pub fn start() -> Self {
        Self::start_with_token(Some(TOKEN))
    }

    /// Starts with `token` in `[admin]`, or none (the broker generates one
    /// and keeps it in `<data dir>/admin.token`).
    pub fn start_with_token(token: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut config = format!("[server]\nadmin_listen = \"127.0.0.1:{port}\"\n");
        if let Some(token) = token {
            config.push_str(&format!("\n[admin]\ntoken = \"{token}\"\n"));
        }
        let broker = ChildBroker::start(dir.path(), &config);
        let data_dir = dir.path().join("data");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the admin listener did not open on {port}; broker log:\n{}",
                broker.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let token = match token {
            Some(token) => token.to_owned(),
            None => std::fs::read_to_string(data_dir.join("admin.token"))
                .expect("the broker wrote admin.token")
                .trim()
                .to_owned(),
        };
        Self {
            broker,
            admin_url: format!("http://127.0.0.1:{port}"),
            token,
            data_dir,
            _dir: dir,
        }
    }

    /// `GET <admin_url><path>` with the token: the status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None).await
    }

    /// `POST <admin_url><path>` with a JSON body and the token.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request("POST", path, Some(body)).await
    }

    async fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let authority = self.admin_url.trim_start_matches("http://").to_owned();
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&authority)
                .await
                .expect("connect to the admin listener");
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .expect("http handshake");
            let connection = tokio::spawn(connection);
            let mut request = Request::builder()
                .method(method)
                .uri(path)
                .header("host", &authority)
                .header("authorization", format!("Bearer {}", self.token));
            let body = match body {
                Some(body) => {
                    request = request.header("content-type", "application/json");
                    Bytes::from(serde_json::to_vec(&body).expect("json"))
                }
                None => Bytes::new(),
            };
            let response = sender
                .send_request(request.body(Full::new(body)).expect("request"))
                .await
                .expect("response");
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            connection.abort();
            let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "{method} {path} answered {status} without JSON: {}",
                    String::from_utf8_lossy(&bytes)
                )
            });
            (status, value)
        };
        tokio::time::timeout(WAIT, exchange)
            .await
            .expect("the admin API answers in time")
    }
}
