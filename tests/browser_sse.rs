//! A real browser on the SSE transport: headless Chromium opens an
//! `EventSource` on a page served by this test, receives messages, is cut
//! off by the server mid-stream (`http.sse_max_age`), reconnects by itself
//! with `Last-Event-ID`, and must see every message once, in order.
//!
//! The page reports each event by POSTing it to this test's tiny server.
//! Needs Debian's `chromium` (scripts/test.sh installs it when missing).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use common::http;
use common::*;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Chromium as a child process, killed on drop.
struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn open(url: &str) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new("chromium")
            .args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium is installed (scripts/test.sh installs it)");
        Self {
            child,
            _profile: profile,
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PAGE: &str = r#"<!doctype html>
<html><body><script>
let n = 0;
function report(event) {
  event.n = n++;
  fetch("/report", {method: "POST", body: JSON.stringify(event)});
}
const source = new EventSource("BROKER/sse?channels=news:live&consumer=tab&ack=auto&from=first");
source.addEventListener("connected", e => report({kind: "open", session: JSON.parse(e.data).session}));
source.addEventListener("msg", e => {
  const frame = JSON.parse(e.data);
  report({kind: "msg", seq: frame.seq, text: frame.data.text, id: e.lastEventId});
});
source.addEventListener("error", () => report({kind: "error", state: source.readyState}));
</script></body></html>"#;

/// Serves the page and collects its reports.
async fn report_server(broker: &str) -> (String, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let page = Arc::new(PAGE.replace("BROKER", broker));
    let app = Router::new()
        .route(
            "/",
            get(move || async move { axum::response::Html((*page).clone()) }),
        )
        .route(
            "/report",
            post(move |body: String| async move {
                if let Ok(value) = serde_json::from_str::<Value>(&body) {
                    let _ = tx.send(value);
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/"), rx)
}

/// The page's next report, within `limit`.
async fn next_report(reports: &mut mpsc::UnboundedReceiver<Value>, limit: Duration) -> Value {
    tokio::time::timeout(limit, reports.recv())
        .await
        .expect("the page reports in time")
        .expect("report server up")
}

#[tokio::test]
async fn eventsource_resumes_after_a_server_cut_without_gap_or_duplicate() {
    let broker = TestBroker::start_with(|config| {
        config.http.sse_max_age = Duration::from_millis(600);
        config.http.sse_retry = Duration::from_millis(50);
        config.http.cors_allow_origins = vec!["*".into()];
    })
    .await;
    let (page_url, mut reports) = report_server(&format!("http://{}", broker.addr)).await;
    let _chromium = Chromium::open(&page_url);

    let mut seen: Vec<Value> = Vec::new();
    let opens = |seen: &[Value]| seen.iter().filter(|r| r["kind"] == "open").count();
    // Chromium takes a while to start.
    while opens(&seen) == 0 {
        seen.push(next_report(&mut reports, Duration::from_secs(60)).await);
    }
    // Publish while the server cuts the stream every 600 ms, until the
    // page has reconnected at least twice with messages flowing.
    let mut published = 0u64;
    while opens(&seen) < 3 || published < 50 {
        assert!(published < 5000, "no reconnect seen: {seen:?}");
        published += 1;
        let body = json!({"channel": "news:live", "data": {"text": format!("m{published}")}});
        let reply = http::post_json(broker.addr, "/api/publish", &body).await;
        assert_eq!(reply.status, 200);
        while let Ok(report) = reports.try_recv() {
            seen.push(report);
        }
    }
    let delivered = |seen: &[Value]| seen.iter().filter(|r| r["kind"] == "msg").count();
    while u64::try_from(delivered(&seen)).unwrap() < published {
        seen.push(next_report(&mut reports, WAIT).await);
    }
    seen.sort_by_key(|r| r["n"].as_u64());
    let msgs: Vec<&Value> = seen.iter().filter(|r| r["kind"] == "msg").collect();
    let seqs: Vec<u64> = msgs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=published).collect::<Vec<_>>(),
        "every message once, in order, across {} connections",
        opens(&seen)
    );
    for report in &msgs {
        let seq = report["seq"].as_u64().unwrap();
        assert_eq!(report["text"], json!(format!("m{seq}")));
        assert_eq!(report["id"], json!(format!("news:live:{seq}")));
    }
    // Each reconnect was a new session: the page really reconnected.
    let sessions: std::collections::HashSet<&str> =
        seen.iter().filter_map(|r| r["session"].as_str()).collect();
    assert!(sessions.len() >= 3, "{sessions:?}");
    // No report can be pending that adds a duplicate: one more message is
    // the next thing the page sees.
    let body = json!({"channel": "news:live", "data": {"text": "last"}});
    http::post_json(broker.addr, "/api/publish", &body).await;
    loop {
        let report = next_report(&mut reports, WAIT).await;
        if report["kind"] == "msg" {
            assert_eq!(report["seq"], json!(published + 1), "{report}");
            break;
        }
    }
}
