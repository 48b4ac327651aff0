//! "Trust nothing" (issue 7) over real sockets: every way a token is
//! refused, namespace permissions and capabilities, inboxes, token expiry
//! and refresh, rate limits and connection caps, oversized and malformed
//! input, slow consumers, and presence across 100 connections.
//!
//! Tokens are minted here with `jsonwebtoken` (HS256 with a test secret,
//! ES256 with the key pair in `tests/data/`), never by the server.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::http;
use common::*;
use courier::auth::{Audience, ChannelClaims, Claims, claims_for};
use courier::config::{Config, NamespacePolicy, PublishRule};
use courier::protocol::*;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const SECRET: &str = "security-tests-secret-0123456789abcdef";
const AUDIENCE: &str = "courier-tests";
const ISSUER: &str = "https://issuer.courier.test";

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_millis()).expect("ms fit u64")
}

/// HS256 with `secret`, as an identity provider would sign it.
fn sign_hs(claims: &Claims, algorithm: Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret).expect("an HMAC key"),
    )
    .expect("sign")
}

/// Claims of `user` for `ttl_secs`, with the test audience and issuer.
fn claims(user: &str, ttl_secs: u64, channels: Option<ChannelClaims>) -> Claims {
    let mut claims = claims_for(user, ttl_secs, channels);
    claims.aud = Some(Audience::One(AUDIENCE.into()));
    claims.iss = Some(ISSUER.into());
    claims
}

/// A good HS256 token of `user`, valid for a minute.
fn token(user: &str) -> String {
    sign_hs(&claims(user, 60, None), Algorithm::HS256, SECRET.as_bytes())
}

/// A good HS256 token of `user` with `channels` capabilities.
fn token_with(user: &str, publish: &[&str], subscribe: &[&str]) -> String {
    let channels = ChannelClaims {
        publish: publish.iter().map(|p| (*p).to_owned()).collect(),
        subscribe: subscribe.iter().map(|p| (*p).to_owned()).collect(),
    };
    sign_hs(
        &claims(user, 60, Some(channels)),
        Algorithm::HS256,
        SECRET.as_bytes(),
    )
}

/// HS256 tokens with the test audience and issuer required.
fn with_jwt(config: &mut Config) {
    config.auth.jwt_secret = Some(SECRET.into());
    config.auth.audience = Some(AUDIENCE.into());
    config.auth.issuer = Some(ISSUER.into());
}

fn namespace(configure: impl FnOnce(&mut NamespacePolicy)) -> NamespacePolicy {
    let mut policy = NamespacePolicy::default();
    configure(&mut policy);
    policy
}

fn connect_frame(token: Option<String>) -> Connect {
    Connect {
        token,
        ..Connect::default()
    }
}

/// Connects with `token` in `connect`; panics unless `connected` comes.
async fn connect_as(url: &str, token: String) -> (Client, Connected) {
    Client::connect_with(url, Codec::Json, connect_frame(Some(token))).await
}

/// The close code and reason of a socket whose next frame must be a close.
async fn close_of(ws: &mut Socket) -> (u16, String) {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a close in time");
        match message {
            Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                return (code.into(), reason.to_string());
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `connect` with `token` and returns how the server closed.
async fn refused(url: &str, token: Option<String>) -> (u16, String) {
    let mut ws = open(url, Some(Codec::Json)).await;
    let frame = encode_client(Codec::Json, &ClientFrame::Connect(connect_frame(token))).unwrap();
    ws.send(Message::Text(String::from_utf8(frame).unwrap().into()))
        .await
        .unwrap();
    close_of(&mut ws).await
}

/// Opens `/ws` with an `Authorization: Bearer` header and/or a URL suffix.
async fn open_with(url: &str, bearer: Option<&str>) -> Client {
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        Codec::Json.subprotocol().parse().unwrap(),
    );
    if let Some(bearer) = bearer {
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {bearer}").parse().unwrap());
    }
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect in time")
        .expect("websocket handshake");
    Client::raw(ws, Codec::Json)
}

/// Sends `connect` and returns `connected`.
async fn handshake(client: &mut Client, token: Option<String>) -> Connected {
    client
        .send(&ClientFrame::Connect(connect_frame(token)))
        .await;
    match client.recv().await {
        ServerFrame::Connected(connected) => connected,
        other => panic!("expected connected, got {other:?}"),
    }
}

/// The id a reply frame echoes.
fn reply_id(frame: &ServerFrame) -> Option<u64> {
    match frame {
        ServerFrame::Puback(p) => Some(p.id),
        ServerFrame::Subscribed(s) => Some(s.id),
        ServerFrame::Unsubscribed(u) => Some(u.id),
        ServerFrame::Presence(p) => Some(p.id),
        ServerFrame::Pong(p) => Some(p.id),
        ServerFrame::Error(e) => e.id,
        _ => None,
    }
}

/// Sends the request `make` builds with a fresh id; returns its reply.
async fn request(client: &mut Client, make: impl FnOnce(u64) -> ClientFrame) -> ServerFrame {
    let id = client.id();
    client.send(&make(id)).await;
    client
        .wait_for(|f| (reply_id(f) == Some(id)).then(|| f.clone()))
        .await
}

async fn try_publish(client: &mut Client, channel: &str, data: &[u8]) -> ServerFrame {
    request(client, |id| {
        ClientFrame::Publish(Publish {
            id,
            channel: channel.into(),
            data: Some(Payload(data.to_vec().into())),
            ..Publish::default()
        })
    })
    .await
}

async fn try_subscribe(client: &mut Client, subscribe: Subscribe) -> ServerFrame {
    request(client, |id| {
        ClientFrame::Subscribe(Subscribe { id, ..subscribe })
    })
    .await
}

async fn try_presence(client: &mut Client, channel: &str) -> ServerFrame {
    request(client, |id| {
        ClientFrame::Presence(ChannelRequest {
            id,
            channel: channel.into(),
        })
    })
    .await
}

async fn try_refresh(client: &mut Client, token: String) -> (u64, ServerFrame) {
    let id = client.id();
    client
        .send(&ClientFrame::Refresh(Refresh { id, token }))
        .await;
    let reply = client
        .wait_for(|f| (reply_id(f) == Some(id)).then(|| f.clone()))
        .await;
    (id, reply)
}

/// The error `frame` must be, with `code`.
#[track_caller]
fn expect_error(frame: &ServerFrame, code: ErrorCode) -> ErrorFrame {
    match frame {
        ServerFrame::Error(e) if e.code == code => e.clone(),
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

#[track_caller]
fn expect_puback(frame: &ServerFrame) -> u64 {
    match frame {
        ServerFrame::Puback(p) => p.seq,
        other => panic!("expected puback, got {other:?}"),
    }
}

#[track_caller]
fn expect_subscribed(frame: &ServerFrame) {
    assert!(
        matches!(frame, ServerFrame::Subscribed(_)),
        "expected subscribed, got {frame:?}"
    );
}

/// The channel names the admin API lists.
async fn listed_channels(broker: &TestBroker) -> BTreeSet<String> {
    broker.admin().get("/admin/channels").await["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_owned())
        .collect()
}

// ---------------------------------------------------------------- tokens

#[tokio::test]
async fn bad_tokens_close_with_4001_and_a_reason() {
    let broker = TestBroker::start_with(with_jwt).await;
    let url = broker.url();
    let good = claims("alice", 60, None);

    let other_secret = sign_hs(
        &good,
        Algorithm::HS256,
        b"another-secret-another-secret-0000000",
    );
    let hs512 = sign_hs(&good, Algorithm::HS512, SECRET.as_bytes());
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let alg_none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(serde_json::to_vec(&good).unwrap())
    );
    // A good signature over other claims: alice's signature on mallory's body.
    let genuine = sign_hs(&good, Algorithm::HS256, SECRET.as_bytes());
    let mut parts: Vec<&str> = genuine.split('.').collect();
    let forged_body = b64.encode(serde_json::to_vec(&claims("mallory", 60, None)).unwrap());
    parts[1] = &forged_body;
    let tampered = parts.join(".");
    let mut expired = good.clone();
    expired.exp = now_ms() / 1000 - 60;
    let mut wrong_audience = good.clone();
    wrong_audience.aud = Some(Audience::One("someone-else".into()));
    let mut no_audience = good.clone();
    no_audience.aud = None;
    let mut others_only = good.clone();
    others_only.aud = Some(Audience::Many(vec!["a".into(), "b".into()]));
    let mut wrong_issuer = good.clone();
    wrong_issuer.iss = Some("https://evil.test".into());
    let mut no_issuer = good.clone();
    no_issuer.iss = None;
    let mut bad_sub = good.clone();
    bad_sub.sub = "alice bob".into();
    let sign = |c: &Claims| sign_hs(c, Algorithm::HS256, SECRET.as_bytes());

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("bad signature", Some(other_secret), "signature"),
        ("tampered claims", Some(tampered), "signature"),
        ("HS512", Some(hs512), "algorithm"),
        ("alg none", Some(alg_none), "invalid token"),
        ("expired", Some(sign(&expired)), "expired"),
        ("wrong audience", Some(sign(&wrong_audience)), "audience"),
        ("no audience", Some(sign(&no_audience)), "aud"),
        (
            "audience array without ours",
            Some(sign(&others_only)),
            "audience",
        ),
        ("wrong issuer", Some(sign(&wrong_issuer)), "issuer"),
        ("no issuer", Some(sign(&no_issuer)), "iss"),
        ("bad sub", Some(sign(&bad_sub)), "sub"),
        ("garbage", Some("not.a.token".into()), "invalid token"),
        ("empty", Some(String::new()), "invalid token"),
        ("missing", None, "token is required"),
    ];
    for (what, token, needle) in cases {
        let (code, reason) = refused(&url, token).await;
        assert_eq!(code, close::UNAUTHORIZED, "{what}: {reason}");
        assert!(
            reason.contains(needle),
            "{what}: reason {reason:?} should mention {needle:?}"
        );
    }
    // No refused connection stays registered (a session ends just after
    // its close frame is written).
    let deadline = tokio::time::Instant::now() + WAIT;
    while !broker.broker().connections().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refused connections stay registered: {}",
            broker.broker().connections().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The same claims, correctly signed, pass; so does an `aud` array
    // that names this server among others.
    let (_alice, connected) = connect_as(&url, sign(&good)).await;
    assert_eq!(connected.user.as_deref(), Some("alice"));
    let mut several = good.clone();
    several.aud = Some(Audience::Many(vec!["other".into(), AUDIENCE.into()]));
    let (_bob, connected) = connect_as(&url, sign(&several)).await;
    assert_eq!(connected.user.as_deref(), Some("alice"));
}

#[tokio::test]
async fn a_good_token_connects_from_the_frame_the_header_or_the_query() {
    let broker = TestBroker::start_with(with_jwt).await;
    let url = broker.url();

    let (_, connected) = connect_as(&url, token("alice")).await;
    assert_eq!(connected.user.as_deref(), Some("alice"));

    let mut by_header = open_with(&url, Some(&token("bob"))).await;
    assert_eq!(
        handshake(&mut by_header, None).await.user.as_deref(),
        Some("bob")
    );

    let mut by_query = open_with(&format!("{url}?token={}", token("carol")), None).await;
    assert_eq!(
        handshake(&mut by_query, None).await.user.as_deref(),
        Some("carol")
    );

    // `connect.token` beats the header, whichever of them is bad.
    let mut both = open_with(&url, Some("garbage")).await;
    assert_eq!(
        handshake(&mut both, Some(token("dave")))
            .await
            .user
            .as_deref(),
        Some("dave")
    );
    let mut both = open_with(&url, Some(&token("erin"))).await;
    both.send(&ClientFrame::Connect(connect_frame(Some("garbage".into()))))
        .await;
    assert_eq!(close_of(&mut both.ws).await.0, close::UNAUTHORIZED);

    // A bad header token is refused like a bad `connect.token`.
    let mut bad_header = open_with(&url, Some(&token("x")[1..])).await;
    bad_header
        .send(&ClientFrame::Connect(Connect::default()))
        .await;
    assert_eq!(close_of(&mut bad_header.ws).await.0, close::UNAUTHORIZED);

    // Each of them is a working connection.
    by_header.sync().await;
    by_query.sync().await;
}

fn test_key(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

#[tokio::test]
async fn es256_tokens_are_checked_with_the_public_key() {
    let public = test_key("es256-public.pem");
    let broker = TestBroker::start_with(|c| c.auth.jwt_public_key = Some(public.clone())).await;
    let url = broker.url();
    let private = std::fs::read(test_key("es256-private.pem")).unwrap();
    let key = EncodingKey::from_ec_pem(&private).expect("the test private key");
    let alice = claims_for("alice", 60, None);
    let es256 = |c: &Claims| jsonwebtoken::encode(&Header::new(Algorithm::ES256), c, &key).unwrap();

    let (_client, connected) = connect_as(&url, es256(&alice)).await;
    assert_eq!(connected.user.as_deref(), Some("alice"));

    // Algorithm confusion: HS256 keyed with the public key's PEM text.
    let public_pem = std::fs::read(&public).unwrap();
    let confused = sign_hs(&alice, Algorithm::HS256, &public_pem);
    let (code, reason) = refused(&url, Some(confused)).await;
    assert_eq!(code, close::UNAUTHORIZED, "{reason}");
    assert!(reason.contains("algorithm"), "{reason}");

    // A valid-looking ES256 token whose signature is over other claims.
    let genuine = es256(&alice);
    let mut parts: Vec<&str> = genuine.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let forged = b64.encode(serde_json::to_vec(&claims_for("mallory", 60, None)).unwrap());
    parts[1] = &forged;
    let (code, reason) = refused(&url, Some(parts.join("."))).await;
    assert_eq!(code, close::UNAUTHORIZED, "{reason}");
    assert!(reason.contains("signature"), "{reason}");

    let mut expired = alice.clone();
    expired.exp = now_ms() / 1000 - 60;
    let (code, reason) = refused(&url, Some(es256(&expired))).await;
    assert_eq!(
        (code, reason.contains("expired")),
        (close::UNAUTHORIZED, true)
    );
}

#[tokio::test]
async fn rs256_tokens_are_checked_with_the_public_key() {
    let public = test_key("rs256-public.pem");
    let broker = TestBroker::start_with(|c| c.auth.jwt_public_key = Some(public.clone())).await;
    let url = broker.url();
    let private = std::fs::read(test_key("rs256-private.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(&private).expect("the test private key");
    let alice = claims_for("alice", 60, None);
    let sign =
        |alg: Algorithm, c: &Claims| jsonwebtoken::encode(&Header::new(alg), c, &key).unwrap();

    let (_client, connected) = connect_as(&url, sign(Algorithm::RS256, &alice)).await;
    assert_eq!(connected.user.as_deref(), Some("alice"));
    // The same key with another RSA algorithm is not the configured one.
    let (code, reason) = refused(&url, Some(sign(Algorithm::RS512, &alice))).await;
    assert_eq!(code, close::UNAUTHORIZED, "{reason}");
    // HS256 keyed with the public key's PEM text (algorithm confusion).
    let public_pem = std::fs::read(&public).unwrap();
    let (code, reason) = refused(&url, Some(sign_hs(&alice, Algorithm::HS256, &public_pem))).await;
    assert_eq!(code, close::UNAUTHORIZED, "{reason}");
    assert!(reason.contains("algorithm"), "{reason}");
}

// ----------------------------------------------------------- permissions

/// Namespaces: `public` (anonymous), `news` (server-side publishing),
/// `chat` (the default rules), `inbox` with presence.
fn permissions(config: &mut Config) {
    with_jwt(config);
    config
        .namespaces
        .insert("public".into(), namespace(|p| p.anonymous = true));
    config.namespaces.insert(
        "news".into(),
        namespace(|p| {
            p.publish = PublishRule::Server;
            p.anonymous = true;
        }),
    );
    config
        .namespaces
        .insert("inbox".into(), namespace(|p| p.presence = true));
}

#[tokio::test]
async fn anonymous_connections_reach_only_anonymous_namespaces() {
    let broker = TestBroker::start_with(permissions).await;
    let (mut anon, connected) =
        Client::connect_with(&broker.url(), Codec::Json, Connect::default()).await;
    assert_eq!(connected.user, None);

    for channel in ["chat:lobby", "inbox:alice", "orders:1"] {
        let e = expect_error(
            &try_publish(&mut anon, channel, b"1").await,
            ErrorCode::Forbidden,
        );
        assert!(e.message.contains("token"), "{channel}: {e:?}");
        expect_error(
            &try_subscribe(&mut anon, sub(channel)).await,
            ErrorCode::Forbidden,
        );
    }
    // `refresh` cannot turn an anonymous connection into a user.
    let (_, reply) = try_refresh(&mut anon, token("alice")).await;
    expect_error(&reply, ErrorCode::Forbidden);
    expect_error(
        &try_publish(&mut anon, "chat:lobby", b"1").await,
        ErrorCode::Forbidden,
    );
    // Refused requests leave the connection up and create no channel.
    assert_eq!(
        expect_puback(&try_publish(&mut anon, "public:lobby", b"1").await),
        1
    );
    expect_subscribed(&try_subscribe(&mut anon, sub("public:lobby")).await);
    let channels = listed_channels(&broker).await;
    assert_eq!(
        channels,
        BTreeSet::from(["public:lobby".to_owned()]),
        "refused requests create no channel"
    );
}

#[tokio::test]
async fn server_side_namespaces_refuse_client_publishes() {
    let broker = TestBroker::start_with(|c| {
        permissions(c);
        c.auth.api_keys = vec![courier::config::ApiKey {
            name: "backend".into(),
            key: "backend-key-0123456789".into(),
            publish: vec!["news:*".into()],
        }];
    })
    .await;
    let (mut alice, _) = connect_as(&broker.url(), token("alice")).await;
    let (mut anon, _) = Client::connect_with(&broker.url(), Codec::Json, Connect::default()).await;
    for client in [&mut alice, &mut anon] {
        let e = expect_error(
            &try_publish(client, "news:today", b"1").await,
            ErrorCode::Forbidden,
        );
        assert!(e.message.contains("server-side"), "{e:?}");
        // Subscribing is still allowed (news is for reading).
        expect_subscribed(&try_subscribe(client, sub("news:today")).await);
    }
    // The backend publishes through the HTTP API with its key.
    let response = reqwest::Client::new()
        .post(format!("http://{}/api/publish", broker.addr))
        .bearer_auth("backend-key-0123456789")
        .json(&serde_json::json!({"channel": "news:today", "data": "extra"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let got = alice.deliveries(1).await;
    assert_eq!((got[0].0, got[0].1.as_slice()), (1, &b"\"extra\""[..]));
    let got = anon.deliveries(1).await;
    assert_eq!(got[0].0, 1);
}

#[tokio::test]
async fn capabilities_allow_and_deny() {
    let broker = TestBroker::start_with(permissions).await;
    let token = token_with(
        "alice",
        &["chat:room-*", "inbox:*"],
        &["chat:*", "inbox:$sub", "public:*"],
    );
    let (mut alice, _) = connect_as(&broker.url(), token).await;

    assert_eq!(
        expect_puback(&try_publish(&mut alice, "chat:room-1", b"1").await),
        1
    );
    let e = expect_error(
        &try_publish(&mut alice, "chat:general", b"1").await,
        ErrorCode::Forbidden,
    );
    assert!(e.message.contains("channels.pub"), "{e:?}");
    expect_error(
        &try_publish(&mut alice, "public:lobby", b"1").await,
        ErrorCode::Forbidden,
    );
    assert_eq!(
        expect_puback(&try_publish(&mut alice, "inbox:bob", b"1").await),
        1
    );

    expect_subscribed(&try_subscribe(&mut alice, sub("chat:general")).await);
    expect_subscribed(&try_subscribe(&mut alice, sub("inbox:alice")).await);
    expect_subscribed(&try_subscribe(&mut alice, sub("public:lobby")).await);
    let e = expect_error(
        &try_subscribe(&mut alice, sub("orders:1")).await,
        ErrorCode::Forbidden,
    );
    assert!(e.message.contains("channels.sub"), "{e:?}");

    // An empty capability list allows nothing.
    let (mut nobody, _) = connect_as(&broker.url(), token_with("nobody", &[], &[])).await;
    expect_error(
        &try_publish(&mut nobody, "chat:room-1", b"1").await,
        ErrorCode::Forbidden,
    );
    expect_error(
        &try_subscribe(&mut nobody, sub("chat:room-1")).await,
        ErrorCode::Forbidden,
    );
    nobody.sync().await;

    let channels = listed_channels(&broker).await;
    assert!(!channels.contains("orders:1"), "{channels:?}");
    assert!(channels.contains("chat:general"), "{channels:?}");
}

#[tokio::test]
async fn an_inbox_belongs_to_its_user() {
    let broker = TestBroker::start_with(permissions).await;
    let (mut alice, _) = connect_as(&broker.url(), token("alice")).await;
    let (mut bob, _) = connect_as(&broker.url(), token("bob")).await;

    let e = expect_error(
        &try_subscribe(&mut alice, sub("inbox:bob")).await,
        ErrorCode::Forbidden,
    );
    assert!(e.message.contains("inbox:alice"), "{e:?}");
    // A named consumer or a group does not get around it.
    for subscribe in [
        Subscribe {
            consumer: Some("bob".into()),
            ..sub("inbox:bob")
        },
        Subscribe {
            group: Some("bob".into()),
            ..sub("inbox:bob")
        },
        sub("inbox:bob-2"),
        sub("inbox:bo"),
    ] {
        expect_error(
            &try_subscribe(&mut alice, subscribe).await,
            ErrorCode::Forbidden,
        );
    }
    expect_error(
        &try_presence(&mut alice, "inbox:bob").await,
        ErrorCode::Forbidden,
    );
    assert!(
        !listed_channels(&broker).await.contains("inbox:bob"),
        "a refused subscribe creates no channel"
    );

    // Anyone authenticated may write to bob's inbox; only bob reads it.
    expect_subscribed(&try_subscribe(&mut bob, sub("inbox:bob")).await);
    assert_eq!(
        expect_puback(&try_publish(&mut alice, "inbox:bob", b"\"hi\"").await),
        1
    );
    let got = bob.deliveries(1).await;
    assert_eq!(got[0].1, b"\"hi\"");
    match try_presence(&mut bob, "inbox:bob").await {
        ServerFrame::Presence(p) => {
            let users: Vec<_> = p.members.iter().map(|m| m.user.as_str()).collect();
            assert_eq!(users, ["bob"]);
        }
        other => panic!("expected presence, got {other:?}"),
    }
    expect_subscribed(&try_subscribe(&mut alice, sub("inbox:alice")).await);
    alice.sync().await;
}

// --------------------------------------------------------------- expiry

#[tokio::test]
async fn an_expiring_token_is_warned_then_closed_unless_refreshed() {
    let broker = TestBroker::start_with(|c| {
        with_jwt(c);
        c.auth.refresh_window = Duration::from_secs(1);
    })
    .await;
    let url = broker.url();
    // Tokens that expire in 1–2 s (`exp` is in whole seconds).
    let alice = claims("alice", 2, None);
    let expires_ms = alice.exp * 1000;
    let close_at = expires_ms + courier::auth::LEEWAY_SECS * 1000;
    let alice = sign_hs(&alice, Algorithm::HS256, SECRET.as_bytes());
    let carol = sign_hs(
        &claims("carol", 2, None),
        Algorithm::HS256,
        SECRET.as_bytes(),
    );

    let (mut refreshing, _) = connect_as(&url, carol).await;
    let (id, reply) = try_refresh(&mut refreshing, token("carol")).await;
    assert!(
        matches!(reply, ServerFrame::Pong(IdOnly { id: echoed }) if echoed == id),
        "a refresh is answered by pong with its id: {reply:?}"
    );

    // A refresh must carry the same user, and a valid token.
    let (mut lapsing, _) = connect_as(&url, alice).await;
    let (_, reply) = try_refresh(&mut lapsing, token("mallory")).await;
    let e = expect_error(&reply, ErrorCode::Forbidden);
    assert!(e.message.contains("own user"), "{e:?}");
    let (_, reply) = try_refresh(&mut lapsing, "garbage".into()).await;
    expect_error(&reply, ErrorCode::Unauthorized);
    let mut expired = claims("alice", 60, None);
    expired.exp = now_ms() / 1000 - 60;
    let (_, reply) = try_refresh(
        &mut lapsing,
        sign_hs(&expired, Algorithm::HS256, SECRET.as_bytes()),
    )
    .await;
    expect_error(&reply, ErrorCode::Unauthorized);

    // The warning comes `refresh_window` before `exp`, the close at
    // `exp` + leeway (none of the refused refreshes moved them).
    let warning = lapsing.error().await;
    let warned_ms = now_ms();
    assert_eq!(warning.code, ErrorCode::Unauthorized, "{warning:?}");
    assert_eq!(warning.id, None);
    assert!(warning.message.contains("refresh"), "{warning:?}");
    assert!(
        warned_ms + 200 >= expires_ms - 1000,
        "warned {} ms before exp: refresh_window is 1 s",
        expires_ms - warned_ms
    );
    assert!(
        warned_ms <= expires_ms + 500,
        "warned {} ms after exp, not before it",
        warned_ms.saturating_sub(expires_ms)
    );
    let (code, reason) = close_of(&mut lapsing.ws).await;
    let closed_ms = now_ms();
    assert_eq!(code, close::UNAUTHORIZED, "{reason}");
    assert!(reason.contains("expired"), "{reason}");
    assert!(
        closed_ms + 200 >= close_at,
        "closed {} ms before exp + leeway",
        close_at - closed_ms
    );

    // The refreshed connection lives past the old expiry and got no warning.
    refreshing.sync().await;
    assert_eq!(
        expect_puback(&try_publish(&mut refreshing, "chat:x", b"1").await),
        1
    );
    assert!(
        !refreshing
            .backlog
            .iter()
            .any(|f| matches!(f, ServerFrame::Error(_))),
        "no warning after a refresh: {:?}",
        refreshing.backlog
    );
}

// ----------------------------------------------------------------- limits

#[tokio::test]
async fn publishes_over_the_rate_are_refused_then_pass_after_retry_after() {
    let broker = TestBroker::start_with(|c| {
        c.limits.publish_per_sec = 5;
        c.limits.publish_burst = 5;
    })
    .await;
    let mut client = Client::connect(&broker.url(), Codec::MsgPack).await;
    // Six at once: five pass, the sixth is refused with a retry hint.
    let ids: Vec<u64> = (0..6).map(|_| client.id()).collect();
    for id in &ids {
        client
            .send(&ClientFrame::Publish(Publish {
                id: *id,
                channel: "rate:x".into(),
                data: Some(Payload(b"1".to_vec().into())),
                ..Publish::default()
            }))
            .await;
    }
    let mut seqs = Vec::new();
    for id in &ids[..5] {
        let reply = client
            .wait_for(|f| (reply_id(f) == Some(*id)).then(|| f.clone()))
            .await;
        seqs.push(expect_puback(&reply));
    }
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let refused = client
        .wait_for(|f| (reply_id(f) == Some(ids[5])).then(|| f.clone()))
        .await;
    let e = expect_error(&refused, ErrorCode::RateLimited);
    let wait = e.retry_after_ms.expect("retry_after_ms");
    assert!(wait > 0 && wait <= 200, "one cell at 5/s: {e:?}");
    assert!(e.message.contains("publish_per_sec"), "{e:?}");

    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(
        expect_puback(&try_publish(&mut client, "rate:x", b"1").await),
        6
    );
    let peek = broker.admin().get("/admin/channels/rate:x").await;
    assert_eq!(peek["last_seq"], 6, "the refused publish stored nothing");
}

#[tokio::test]
async fn repeated_refusals_close_the_connection_with_4008() {
    let broker = TestBroker::start_with(|c| {
        c.limits.publish_per_sec = 1;
        c.limits.publish_burst = 1;
        c.limits.abuse_violations = 3;
    })
    .await;
    let mut abuser = Client::connect(&broker.url(), Codec::Json).await;
    let mut replies = Vec::new();
    for _ in 0..4 {
        let id = abuser.id();
        abuser
            .send(&ClientFrame::Publish(Publish {
                id,
                channel: "abuse:x".into(),
                data: Some(Payload(b"1".to_vec().into())),
                ..Publish::default()
            }))
            .await;
    }
    let code = loop {
        match tokio::time::timeout(WAIT, abuser.ws.next())
            .await
            .expect("frames in time")
        {
            Some(Ok(Message::Text(text))) => {
                replies.push(decode_server(Codec::Json, text.as_bytes()).unwrap());
            }
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => {}
            other => panic!("expected a close, got {other:?}"),
        }
    };
    assert_eq!(code, close::POLICY);
    let limited = replies
        .iter()
        .filter(|f| matches!(f, ServerFrame::Error(e) if e.code == ErrorCode::RateLimited))
        .count();
    assert_eq!(limited, 3, "closed at the third refusal: {replies:?}");
    assert!(
        replies.iter().any(|f| matches!(f, ServerFrame::Puback(_))),
        "the first publish passed and its puback was sent before the close: {replies:?}"
    );
    // Others are not affected.
    let mut polite = Client::connect(&broker.url(), Codec::Json).await;
    polite.publish("abuse:x", b"2").await;
}

#[tokio::test]
async fn subscriptions_and_connections_per_user_are_capped() {
    let broker = TestBroker::start_with(|c| {
        with_jwt(c);
        c.limits.max_subscriptions = 2;
        c.limits.max_connections_per_user = 2;
    })
    .await;
    let url = broker.url();
    let (mut first, _) = connect_as(&url, token("alice")).await;
    expect_subscribed(&try_subscribe(&mut first, sub("caps:1")).await);
    expect_subscribed(&try_subscribe(&mut first, sub("caps:2")).await);
    let e = expect_error(
        &try_subscribe(&mut first, sub("caps:3")).await,
        ErrorCode::TooLarge,
    );
    assert!(e.message.contains("max_subscriptions"), "{e:?}");
    assert_eq!(e.retry_after_ms, None, "waiting does not help");
    // Unsubscribing makes room.
    let reply = request(&mut first, |id| {
        ClientFrame::Unsubscribe(ChannelRequest {
            id,
            channel: "caps:1".into(),
        })
    })
    .await;
    assert!(matches!(reply, ServerFrame::Unsubscribed(_)), "{reply:?}");
    expect_subscribed(&try_subscribe(&mut first, sub("caps:3")).await);
    assert!(!listed_channels(&broker).await.contains("caps:4"));

    let (second, _) = connect_as(&url, token("alice")).await;
    let (code, reason) = refused(&url, Some(token("alice"))).await;
    assert_eq!(code, close::POLICY, "{reason}");
    assert!(reason.contains("max_connections_per_user"), "{reason}");
    let (_bob, connected) = connect_as(&url, token("bob")).await;
    assert_eq!(
        connected.user.as_deref(),
        Some("bob"),
        "other users are not capped"
    );

    // A closed connection gives its place back.
    drop(second);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut ws = open(&url, Some(Codec::Json)).await;
        let frame = encode_client(
            Codec::Json,
            &ClientFrame::Connect(connect_frame(Some(token("alice")))),
        )
        .unwrap();
        ws.send(Message::Text(String::from_utf8(frame).unwrap().into()))
            .await
            .unwrap();
        let next = tokio::time::timeout(WAIT, ws.next()).await.expect("reply");
        if matches!(next, Some(Ok(Message::Text(_)))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cap never let alice in again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.sync().await;
}

// ------------------------------------------------------ malformed inputs

#[tokio::test]
async fn oversized_and_malformed_requests_get_errors_and_the_connection_works() {
    let broker = TestBroker::start_with(|c| {
        permissions(c);
        c.server.max_frame = 64 * 1024;
    })
    .await;
    let (mut c, _) = connect_as(&broker.url(), token("alice")).await;
    let publish = |id, headers, msg_id: Option<String>| {
        ClientFrame::Publish(Publish {
            id,
            channel: "chat:x".into(),
            data: Some(Payload(b"1".to_vec().into())),
            headers,
            msg_id,
            ..Publish::default()
        })
    };

    let many: Headers = (0..65).map(|i| (format!("h{i}"), "v".into())).collect();
    let e = expect_error(
        &request(&mut c, |id| publish(id, Some(many), None)).await,
        ErrorCode::TooLarge,
    );
    assert!(e.message.contains("64 headers"), "{e:?}");
    let long_value = Headers::from([("h".into(), "v".repeat(4097))]);
    expect_error(
        &request(&mut c, |id| publish(id, Some(long_value), None)).await,
        ErrorCode::TooLarge,
    );
    let long_name = Headers::from([("h".repeat(4097), "v".into())]);
    expect_error(
        &request(&mut c, |id| publish(id, Some(long_name), None)).await,
        ErrorCode::TooLarge,
    );
    let at_limit: Headers = (0..64)
        .map(|i| (format!("h{i}"), "v".repeat(100)))
        .collect();
    expect_puback(&request(&mut c, |id| publish(id, Some(at_limit), None)).await);

    let e = expect_error(
        &request(&mut c, |id| publish(id, None, Some("m".repeat(257)))).await,
        ErrorCode::BadRequest,
    );
    assert!(e.message.contains("msg_id"), "{e:?}");
    expect_error(
        &request(&mut c, |id| publish(id, None, Some(String::new()))).await,
        ErrorCode::BadRequest,
    );
    expect_puback(&request(&mut c, |id| publish(id, None, Some("m".repeat(256)))).await);

    // Bad channel names, wherever a channel is named.
    let too_long = format!("chat:{}", "x".repeat(200));
    for name in [
        "",
        "chat:a b",
        "chat:ü",
        "chat:a\u{0}",
        "chat:*",
        "chat:a,b",
        too_long.as_str(),
    ] {
        expect_error(
            &try_publish(&mut c, name, b"1").await,
            ErrorCode::BadRequest,
        );
        expect_error(
            &try_subscribe(&mut c, sub(name)).await,
            ErrorCode::BadRequest,
        );
        expect_error(&try_presence(&mut c, name).await, ErrorCode::BadRequest);
    }

    // A term reason over 1024 bytes.
    expect_subscribed(&try_subscribe(&mut c, sub("chat:t")).await);
    expect_puback(&try_publish(&mut c, "chat:t", b"1").await);
    let seq = c.deliveries(1).await[0].0;
    c.send(&ClientFrame::Term(Term {
        id: Some(77),
        channel: "chat:t".into(),
        seq,
        reason: Some("r".repeat(1025)),
    }))
    .await;
    let e = c.error().await;
    assert_eq!((e.code, e.id), (ErrorCode::TooLarge, Some(77)), "{e:?}");

    // Frames the codec cannot read, and one over max_frame.
    for text in [
        r#"{"type":"connect","token":7}"#,
        r#"{"type":"refresh","id":5}"#,
        r#"{"type":"refresh","id":6,"token":["a"]}"#,
        r#"{"type":"presence","id":7}"#,
        r#"{"type":"publish","id":1e400,"channel":"chat:x","data":1}"#,
        "\u{feff}{}",
    ] {
        c.ws.send(Message::Text(text.into())).await.unwrap();
        let e = c.error().await;
        assert!(matches!(e.code, ErrorCode::BadRequest), "{text}: {e:?}");
        c.sync().await;
    }
    // A lone surrogate escape: stored as the JSON text it is, or refused;
    // never a crash.
    c.ws.send(Message::Text(
        r#"{"type":"publish","id":1,"channel":"chat:x","data":"\ud800"}"#.into(),
    ))
    .await
    .unwrap();
    let reply = c
        .wait_for(|f| (reply_id(f) == Some(1)).then(|| f.clone()))
        .await;
    assert!(
        matches!(&reply, ServerFrame::Puback(_))
            || matches!(&reply, ServerFrame::Error(e) if e.code == ErrorCode::BadRequest),
        "{reply:?}"
    );
    let big = format!(
        r#"{{"type":"publish","id":9,"channel":"chat:x","data":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    c.ws.send(Message::Text(big.into())).await.unwrap();
    let e = c.error().await;
    assert_eq!(e.code, ErrorCode::TooLarge, "{e:?}");

    // Still a working connection after all of that.
    c.sync().await;
    expect_puback(&try_publish(&mut c, "chat:x", b"\"after\"").await);

    // MsgPack: over max_frame is an error, far over it closes with 1009.
    let (mut m, _) = Client::connect_with(
        &broker.url(),
        Codec::MsgPack,
        connect_frame(Some(token("bob"))),
    )
    .await;
    m.ws.send(Message::Binary(vec![0xc0; 100 * 1024].into()))
        .await
        .unwrap();
    assert_eq!(m.error().await.code, ErrorCode::TooLarge);
    m.sync().await;
    m.ws.send(Message::Binary(vec![0xc0; 200 * 1024].into()))
        .await
        .unwrap();
    assert_eq!(m.expect_close().await, close::MESSAGE_TOO_BIG);
}

#[tokio::test]
async fn a_malformed_or_oversized_connect_is_refused_and_closed() {
    let broker = TestBroker::start_with(|c| {
        with_jwt(c);
        c.server.max_frame = 16 * 1024;
    })
    .await;
    // A token that is not a string: a bad frame, not a crash.
    let mut ws = open(&broker.url(), Some(Codec::Json)).await;
    ws.send(Message::Text(
        r#"{"type":"connect","token":{"a":1}}"#.into(),
    ))
    .await
    .unwrap();
    let mut client = Client::raw(ws, Codec::Json);
    assert_eq!(client.error().await.code, ErrorCode::BadRequest);
    assert_eq!(client.expect_close().await, close::PROTOCOL_ERROR);

    // A token as big as a frame may be.
    let (code, _) = refused(&broker.url(), Some("a".repeat(15 * 1024))).await;
    assert_eq!(code, close::UNAUTHORIZED);
    let mut ws = open(&broker.url(), Some(Codec::Json)).await;
    let frame = format!(
        r#"{{"type":"connect","token":"{}"}}"#,
        "a".repeat(20 * 1024)
    );
    ws.send(Message::Text(frame.into())).await.unwrap();
    let mut client = Client::raw(ws, Codec::Json);
    assert_eq!(client.error().await.code, ErrorCode::BadRequest);
    assert_eq!(client.expect_close().await, close::PROTOCOL_ERROR);

    let (_alice, connected) = connect_as(&broker.url(), token("alice")).await;
    assert_eq!(connected.user.as_deref(), Some("alice"));
}

// --------------------------------------------------------- slow consumers

/// A client whose socket has a tiny receive buffer, so that once it stops
/// reading the server's writes stall soon.
async fn stalling_client(broker: &TestBroker) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(broker.addr).await.unwrap();
    let mut request = broker.url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        Codec::Json.subprotocol().parse().unwrap(),
    );
    let (ws, _) =
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let mut client = Client::raw(ws, Codec::Json);
    handshake(&mut client, None).await;
    client
}

fn counter(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const SLOW_CLOSED: &str = "courier_connections_closed_total{code=\"4009\"}";

#[tokio::test]
async fn a_stalled_reader_is_cut_while_a_fast_one_keeps_receiving() {
    let broker = TestBroker::start_with(|c| {
        c.server.slow_consumer_timeout = Duration::from_secs(1);
        c.limits = courier::limits::LimitsConfig::unlimited();
    })
    .await;
    let admin = broker.admin();
    let metrics = admin.get("/metrics").await;
    let cut_before = counter(metrics.as_str().unwrap(), SLOW_CLOSED);

    let mut stalled = stalling_client(&broker).await;
    let auto = |channel| Subscribe {
        ack: Some(AckMode::Auto),
        ..sub(channel)
    };
    stalled.subscribe(auto("feed:big")).await;
    let stalled_id = admin.get("/admin/connections").await["connections"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut fast = Client::connect(&broker.url(), Codec::MsgPack).await;
    fast.subscribe(auto("feed:big")).await;

    // 200 × 64 KiB: far more than the stalled socket and the queue hold.
    let payload = format!("\"{}\"", "x".repeat(64 * 1024));
    let mut publisher = Client::connect(&broker.url(), Codec::MsgPack).await;
    let count = 200;
    let reader = tokio::spawn(async move {
        let got = fast.deliveries(count).await;
        (fast, got)
    });
    for seq in 1..=count {
        assert_eq!(
            publisher.publish("feed:big", payload.as_bytes()).await,
            u64::try_from(seq).unwrap()
        );
    }
    let (mut fast, got) = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the fast reader gets everything in time")
        .unwrap();
    let seqs: Vec<u64> = got.iter().map(|d| d.0).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>(), "in order, no loss");
    assert!(got.iter().all(|d| d.1 == payload.as_bytes()));

    // The stalled one is gone within about slow_consumer_timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = admin.get("/admin/connections").await;
        let ids: Vec<&str> = list["connections"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["id"].as_str())
            .collect();
        if !ids.contains(&stalled_id.as_str()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled reader {stalled_id} was never cut: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = admin.get("/metrics").await;
    let cut_after = counter(metrics.as_str().unwrap(), SLOW_CLOSED);
    assert!(
        cut_after > cut_before,
        "{SLOW_CLOSED} went from {cut_before} to {cut_after}"
    );
    // The fast reader is still connected and served.
    fast.sync().await;
    publisher.publish("feed:big", b"\"tail\"").await;
    assert_eq!(fast.deliveries(1).await[0].0, 201);
    drop(stalled);
}

#[tokio::test]
async fn a_slow_durable_reader_catches_up_without_loss() {
    let broker = TestBroker::start_with(|c| {
        c.server.slow_consumer_timeout = Duration::from_secs(1);
    })
    .await;
    let mut slow = Client::connect(&broker.url(), Codec::Json).await;
    slow.subscribe(Subscribe {
        consumer: Some("slowpoke".into()),
        max_in_flight: Some(4),
        ..sub("ledger:1")
    })
    .await;
    let mut publisher = Client::connect(&broker.url(), Codec::MsgPack).await;
    let count: u64 = 300;
    for seq in 1..=count {
        publisher
            .publish("ledger:1", format!("{seq}").as_bytes())
            .await;
    }
    let mut seen = Vec::new();
    while seen.len() < usize::try_from(count).unwrap() {
        let got = slow.deliveries(1).await;
        let (seq, data, attempt) = &got[0];
        assert_eq!(data, seq.to_string().as_bytes());
        assert_eq!(*attempt, 1, "seq {seq}: never redelivered");
        seen.push(*seq);
        // Reads slowly; once, stops reading for longer than
        // slow_consumer_timeout: a durable reader is never cut for that.
        let pause = if *seq == 100 { 2000 } else { 2 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        slow.ack("ledger:1", vec![*seq]).await;
    }
    assert_eq!(seen, (1..=count).collect::<Vec<_>>(), "in order, no gap");
    assert!(
        !slow
            .backlog
            .iter()
            .any(|f| matches!(f, ServerFrame::Gap(_) | ServerFrame::Error(_))),
        "{:?}",
        slow.backlog
    );
    slow.sync().await;
    let channel = broker.admin().get("/admin/channels/ledger:1").await;
    let consumer = channel["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().is_some_and(|n| n.contains("slowpoke")))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(consumer["floor"], count, "{channel}");
    assert_eq!(consumer["lag"], 0, "{channel}");
}

// --------------------------------------------------------------- presence

fn presence_namespaces(config: &mut Config) {
    with_jwt(config);
    config.namespaces.insert(
        "room".into(),
        namespace(|p| {
            p.presence = true;
            p.join_leave = true;
        }),
    );
}

fn presence_users(frame: &ServerFrame) -> BTreeSet<String> {
    match frame {
        ServerFrame::Presence(p) => p.members.iter().map(|m| m.user.clone()).collect(),
        other => panic!("expected presence, got {other:?}"),
    }
}

#[tokio::test]
async fn presence_follows_100_connections_and_a_killed_one() {
    let broker = TestBroker::start_with(presence_namespaces).await;
    let url = broker.url();
    let (mut observer, _) = connect_as(&url, token("observer")).await;
    observer.subscribe(sub("room:1")).await;

    let users: Vec<String> = (0..100).map(|i| format!("user-{i:03}")).collect();
    let mut members = Vec::new();
    for user in &users {
        let (mut client, _) = connect_as(&url, token(user)).await;
        client.subscribe(sub("room:1")).await;
        members.push(client);
    }
    let mut joined = BTreeSet::new();
    while joined.len() < users.len() {
        let user = observer
            .wait_for(|f| match f {
                ServerFrame::Join(j) if j.channel == "room:1" => Some(j.user.clone()),
                _ => None,
            })
            .await;
        assert!(joined.insert(user.clone()), "{user} joined twice");
    }
    let mut expected: BTreeSet<String> = users.iter().cloned().collect();
    assert_eq!(joined, expected);
    expected.insert("observer".into());
    assert_eq!(
        presence_users(&try_presence(&mut observer, "room:1").await),
        expected
    );
    // Any member may ask; each member counts one connection.
    match try_presence(&mut members[7], "room:1").await {
        ServerFrame::Presence(p) => {
            assert_eq!(p.members.len(), 101);
            assert!(p.members.iter().all(|m| m.connections == 1), "{p:?}");
        }
        other => panic!("expected presence, got {other:?}"),
    }

    // Kill one: reset its socket, no close handshake.
    let killed = members.remove(42);
    if let tokio_tungstenite::MaybeTlsStream::Plain(stream) = killed.ws.get_ref() {
        stream.set_zero_linger().unwrap();
    }
    drop(killed);
    let left = observer
        .wait_for(|f| match f {
            ServerFrame::Leave(l) if l.channel == "room:1" => Some(l.user.clone()),
            _ => None,
        })
        .await;
    assert_eq!(left, "user-042");
    expected.remove("user-042");
    assert_eq!(
        presence_users(&try_presence(&mut observer, "room:1").await),
        expected
    );
    assert!(
        !observer
            .backlog
            .iter()
            .any(|f| matches!(f, ServerFrame::Leave(_))),
        "only the killed user left: {:?}",
        observer.backlog
    );
}

#[tokio::test]
async fn presence_needs_subscribe_rights_and_a_presence_namespace() {
    let broker = TestBroker::start_with(presence_namespaces).await;
    let url = broker.url();
    let (mut member, _) = connect_as(&url, token("member")).await;
    member.subscribe(sub("room:2")).await;

    let (mut outsider, _) =
        connect_as(&url, token_with("outsider", &["room:*"], &["chat:*"])).await;
    let e = expect_error(
        &try_presence(&mut outsider, "room:2").await,
        ErrorCode::Forbidden,
    );
    assert!(e.message.contains("channels.sub"), "{e:?}");

    expect_error(
        &try_presence(&mut member, "chat:2").await,
        ErrorCode::NotFound,
    );
    expect_error(
        &try_presence(&mut outsider, "chat:2").await,
        ErrorCode::NotFound,
    );
    assert_eq!(
        presence_users(&try_presence(&mut member, "room:2").await),
        BTreeSet::from(["member".to_owned()])
    );
}

// ----------------------------------------------------------------- inbox

/// Bob's two devices subscribe to `inbox:bob` without naming a consumer:
/// both attach to his default consumer, `bob`, in fanout.
async fn both_devices_receive(url: &str, seq: u64, payload: &[u8]) -> (Client, Client) {
    let (mut phone, _) = connect_as(url, token("bob")).await;
    let (mut laptop, _) = connect_as(url, token("bob")).await;
    for device in [&mut phone, &mut laptop] {
        device.subscribe(sub("inbox:bob")).await;
    }
    for device in [&mut phone, &mut laptop] {
        let got = device.deliveries(1).await;
        assert_eq!(
            (got[0].0, got[0].1.as_slice()),
            (seq, payload),
            "every device of bob gets it"
        );
    }
    (phone, laptop)
}

/// After an ack from one device, bob's next visit starts after it.
async fn acked_is_not_redelivered(url: &str, alice: &mut Client, acked: u64) {
    let (mut back, _) = connect_as(url, token("bob")).await;
    back.subscribe(sub("inbox:bob")).await;
    let next = expect_puback(&try_publish(alice, "inbox:bob", b"\"running late\"").await);
    assert_eq!(next, acked + 1);
    let got = back.deliveries(1).await;
    assert_eq!(got[0].0, next, "seq {acked} was acked: {got:?}");
}

#[tokio::test]
async fn an_inbox_message_waits_for_its_offline_user_until_acked() {
    let broker = TestBroker::start_with(with_jwt).await;
    let url = broker.url();
    // Bob has used his inbox before, then went offline.
    let (mut bob, _) = connect_as(&url, token("bob")).await;
    bob.subscribe(sub("inbox:bob")).await;
    drop(bob);
    let (mut alice, _) = connect_as(&url, token("alice")).await;
    let note = b"\"see you at 5\"";
    assert_eq!(
        expect_puback(&try_publish(&mut alice, "inbox:bob", note).await),
        1
    );

    let (mut phone, laptop) = both_devices_receive(&url, 1, note).await;
    // One ack (from either device) acks it for bob.
    phone.ack("inbox:bob", vec![1]).await;
    phone.sync().await;
    drop(phone);
    drop(laptop);
    acked_is_not_redelivered(&url, &mut alice, 1).await;
}

/// A user who never opened the inbox has no consumer yet, and a new
/// consumer starts at `from: "new"` (PROTOCOL §8): a first-time reader
/// asks for `from: "first"` to get what waited for it. From then on the
/// user's consumer keeps the place.
#[tokio::test]
async fn a_first_time_inbox_reader_gets_what_waited_before_its_first_subscribe() {
    let broker = TestBroker::start_with(with_jwt).await;
    let url = broker.url();
    let (mut alice, _) = connect_as(&url, token("alice")).await;
    let note = b"\"welcome\"";
    assert_eq!(
        expect_puback(&try_publish(&mut alice, "inbox:bob", note).await),
        1
    );

    let (mut phone, _) = connect_as(&url, token("bob")).await;
    let (mut laptop, _) = connect_as(&url, token("bob")).await;
    for device in [&mut phone, &mut laptop] {
        // No `from`: an inbox starts at its oldest message for a new reader.
        device.subscribe(sub("inbox:bob")).await;
        let got = device.deliveries(1).await;
        assert_eq!((got[0].0, got[0].1.as_slice()), (1, &note[..]));
    }
    phone.ack("inbox:bob", vec![1]).await;
    phone.sync().await;
    drop(phone);
    drop(laptop);
    acked_is_not_redelivered(&url, &mut alice, 1).await;
}

#[tokio::test]
async fn sse_sessions_take_a_token_and_can_refresh_it() {
    let broker = TestBroker::start_with(with_jwt).await;
    let addr = broker.addr;
    let refused = http::SseStream::open(addr, "/sse?channels=chat:s", None).await;
    assert_eq!(
        refused.err().map(|r| (r.status, r.code())),
        Some((401, "unauthorized".into()))
    );
    let path = format!("/sse?channels=chat:s&token={}", token("alice"));
    let mut stream = http::SseStream::open(addr, &path, None)
        .await
        .expect("opens");
    let connected = stream.next_of("connected").await;
    let connected: serde_json::Value = serde_json::from_str(&connected.data).unwrap();
    assert_eq!(connected["user"], "alice");
    let session = connected["session"].as_str().unwrap().to_owned();
    let refresh = |token: String| serde_json::json!({"session": session, "type": "refresh", "id": 1, "token": token});
    let ok = http::post_json(addr, "/sse/ack", &refresh(token("alice"))).await;
    assert_eq!(ok.status, 204, "{}", String::from_utf8_lossy(&ok.body));
    let foreign = http::post_json(addr, "/sse/ack", &refresh(token("bob"))).await;
    assert_eq!(
        (foreign.status, foreign.code().as_str()),
        (403, "forbidden")
    );
    let garbage = http::post_json(addr, "/sse/ack", &refresh("x.y.z".into())).await;
    assert_eq!(
        (garbage.status, garbage.code().as_str()),
        (401, "unauthorized")
    );
}
