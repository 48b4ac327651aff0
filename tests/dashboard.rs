//! The dashboard (`GET /admin/ui`) in a real headless Chromium, driven over
//! WebDriver (chromedriver on a free loopback port) against the real
//! binary: a dead letter shows up, one click requeues it, and the message
//! is delivered again. `scripts/test.sh` installs Chromium when missing;
//! without it this test fails and says how to install it.

mod common;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::{AdminBroker, free_port};
use common::*;
use courier::protocol::{ClientFrame, Codec, Connect, Term};
use fantoccini::{Locator, elements::Element};
use futures_util::FutureExt;
use serde_json::{Value, json};

/// Flags the dashboard test adds to the shared headless ones.
const DASHBOARD_FLAGS: [&str; 2] = ["--disable-dev-shm-usage", "--window-size=1280,1100"];

/// The first of `names` found on `PATH`.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// chromedriver and a Chromium session in a fresh profile.
struct Browser {
    driver: Child,
    client: fantoccini::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        let missing = "the dashboard test needs Chromium and its WebDriver: run scripts/test.sh \
                       (it installs them) or `apt-get install -y chromium chromium-driver`";
        let chromium = on_path(&["chromium", "chromium-browser"])
            .unwrap_or_else(|| panic!("no chromium on PATH; {missing}"));
        let chromedriver = on_path(&["chromedriver"])
            .unwrap_or_else(|| panic!("no chromedriver on PATH; {missing}"));
        let port = free_port();
        let mut command = Command::new(chromedriver);
        command
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so Drop can stop Chromium with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut driver = command.spawn().expect("start chromedriver");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let _ = driver.kill();
                let _ = driver.wait();
                panic!("chromedriver did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let mut args: Vec<String> = CHROMIUM_FLAGS
            .iter()
            .chain(&DASHBOARD_FLAGS)
            .map(|f| (*f).to_owned())
            .collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("an object literal")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = fantoccini::ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await;
        let client = match client {
            Ok(client) => client,
            Err(e) => {
                let _ = driver.kill();
                let _ = driver.wait();
                panic!("chromedriver could not start Chromium: {e}");
            }
        };
        Self {
            driver,
            client,
            _profile: profile,
        }
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
    }

    /// The first element matching `css`, waiting up to [`WAIT`] for it.
    async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    async fn script(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .expect("script runs")
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        // CARGO_TARGET_TMPDIR is <target>/tmp.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .join("test-artifacts");
        std::fs::create_dir_all(&dir).expect("artifact dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group holds chromedriver and the Chromium it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
    }
}

const CHANNEL: &str = "dash:orders/eu";
const XSS: &str = r#"<img src=x onerror="window.__xss = 1">"#;

#[tokio::test]
async fn requeue_from_the_dashboard_delivers_the_dead_letter_again() {
    let broker = AdminBroker::start();
    let browser = Browser::start().await;
    // Close the session even when an assertion fails, then fail.
    let outcome = AssertUnwindSafe(scenario(&broker, &browser))
        .catch_unwind()
        .await;
    browser.close().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn scenario(broker: &AdminBroker, browser: &Browser) {
    let (mut client, connected) =
        Client::connect_with(&broker.broker.url(), Codec::Json, Connect::default()).await;
    client.publish(CHANNEL, b"first").await;
    client.publish(CHANNEL, XSS.as_bytes()).await;
    let mut subscription = sub(CHANNEL);
    subscription.consumer = Some("w".into());
    subscription.since = Some(0);
    client.subscribe(subscription).await;
    let seqs: Vec<u64> = client.deliveries(2).await.iter().map(|d| d.0).collect();
    assert_eq!(seqs, [1, 2]);
    client
        .send(&ClientFrame::Term(Term {
            id: None,
            channel: CHANNEL.into(),
            seq: 1,
            reason: Some("cannot parse".into()),
        }))
        .await;
    client.ack(CHANNEL, vec![2]).await;
    client.sync().await;

    let page = &browser.client;
    page.goto(&format!(
        "{}/admin/ui?token={}",
        broker.admin_url, broker.token
    ))
    .await
    .expect("open the dashboard");
    let row = format!(r#"[data-testid="channel-row"][data-channel="{CHANNEL}"]"#);
    browser.find(&row).await;
    let url = page.current_url().await.expect("url");
    assert!(
        url.query().is_none_or(|q| !q.contains("token")),
        "the token left the address bar: {url}"
    );
    let stored = browser
        .script(r#"return sessionStorage.getItem("courier-admin-token");"#)
        .await;
    assert_eq!(stored, json!(broker.token));

    browser
        .find(&format!(r#"{row} [data-testid="channel-link"]"#))
        .await
        .click()
        .await
        .expect("open the channel");
    let dead = r#"[data-testid="dlq-row"][data-seq="1"]"#;
    let text = browser.find(dead).await.text().await.expect("row text");
    assert!(
        text.contains("c/w") && text.contains("term") && text.contains("cannot parse"),
        "{text}"
    );
    let messages = browser
        .find(r#"[data-testid="message-row"][data-seq="2"]"#)
        .await;
    let shown = messages.text().await.expect("message text");
    assert!(shown.contains(XSS), "the payload shows as text: {shown}");
    assert_eq!(
        browser.script("return typeof window.__xss;").await,
        json!("undefined"),
        "a payload ran as markup"
    );
    let shot = browser.screenshot("dashboard.png").await;
    eprintln!("screenshot: {}", shot.display());

    browser
        .find(&format!(r#"{dead} [data-testid="dlq-requeue"]"#))
        .await
        .click()
        .await
        .expect("click Requeue");
    browser.find(r#"[data-testid="dlq-empty"]"#).await;
    let notice = browser.find(r#"[data-testid="notice"]"#).await;
    assert!(
        notice
            .text()
            .await
            .expect("notice")
            .contains("Requeued seq 1"),
        "the outcome is reported"
    );

    let (status, list) = broker
        .api
        .call("GET", "/admin/channels/dash:orders%2Feu/dlq", None)
        .await;
    assert_eq!((status, &list["entries"]), (200, &json!([])), "{list}");
    let again = client.deliveries(1).await;
    assert_eq!((again[0].0, again[0].1.as_slice()), (1, &b"first"[..]));
    client.ack(CHANNEL, vec![1]).await;

    // A refused token brings up the prompt; the right one brings the data back.
    browser
        .script(
            r##"sessionStorage.setItem("courier-admin-token", "wrong-token-wrong-token");
                location.hash = "#/connections"; return null;"##,
        )
        .await;
    browser
        .find(r#"[data-testid="token-form"]:not([hidden])"#)
        .await;
    browser
        .find(r#"[data-testid="token-input"]"#)
        .await
        .send_keys(&broker.token)
        .await
        .expect("type the token");
    browser
        .find(r#"[data-testid="token-submit"]"#)
        .await
        .click()
        .await
        .expect("submit the token");
    let connection = format!(
        r#"[data-testid="connection-row"][data-id="{}"]"#,
        connected.conn_id
    );
    browser
        .find(&format!(r#"{connection} [data-testid="kick"]"#))
        .await
        .click()
        .await
        .expect("click Kick");
    assert_eq!(
        client.expect_close().await,
        4008,
        "kicked with the default code"
    );
}
