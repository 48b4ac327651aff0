//! The real `courier` binary with its admin listener up and the address
//! and token known ([`AdminBroker`]), for tests of the tools that use the
//! admin API from outside: `courier admin` and the dashboard.

use std::time::{Duration, Instant};

use super::{Admin, ChildBroker, WAIT};

/// The admin token the tests configure (at least 16 characters).
pub const TOKEN: &str = "test-admin-token-0123456789";

/// A `courier serve` child (admin listener on a free port).
pub struct AdminBroker {
    pub broker: ChildBroker,
    /// `http://127.0.0.1:<port>`, no trailing slash.
    pub admin_url: String,
    pub token: String,
    /// The admin API with the right token, for checks.
    pub api: Admin,
    /// The broker's data dir (`admin.token` lives here).
    pub data_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A port that was free a moment ago.
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
        let config = token.map_or_else(String::new, |t| format!("[admin]\ntoken = \"{t}\"\n"));
        let broker = ChildBroker::start(dir.path(), &config);
        let data_dir = dir.path().join("data");
        let admin_addr = admin_addr(&broker);
        let token = match token {
            Some(token) => token.to_owned(),
            None => std::fs::read_to_string(data_dir.join("admin.token"))
                .expect("the broker wrote admin.token")
                .trim()
                .to_owned(),
        };
        let admin_url = format!("http://{admin_addr}");
        Self {
            api: Admin::new(admin_url.clone(), &token),
            broker,
            admin_url,
            token,
            data_dir,
            _dir: dir,
        }
    }
}

/// The admin listener's address, from the `admin=` field the broker logs
/// right after its public address.
fn admin_addr(broker: &ChildBroker) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = broker.log_text();
        let found = log
            .split("admin=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next());
        if let Some(addr) = found {
            return addr.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not log its admin address; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
