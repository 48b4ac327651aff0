//! Who a connection is and what it may do.
//!
//! Tokens are JWTs checked with `jsonwebtoken`: HS256 with a shared secret,
//! or RS256 / ES256 with a public key (PEM). The algorithm is fixed by the
//! key the operator configured, never by the token's header, so `alg: none`
//! and algorithm-confusion tokens are refused. Claims:
//!
//! - `sub`: the user id (required, 1–194 bytes of channel-name characters,
//!   so `inbox:<sub>` is a valid channel name);
//! - `exp`: expiry, seconds since the Unix epoch (required);
//! - `channels` (optional): capabilities, `{"pub": [...], "sub": [...]}`,
//!   each a list of channel patterns: an exact name or a prefix ending in
//!   `*`; `$sub` stands for the token's own user id. Without `channels` the
//!   namespace rules alone decide.
//!
//! Nothing here does I/O after start-up: keys are read once by
//! [`Auth::from_config`].

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::protocol::ChannelName;

/// Seconds of clock skew allowed on `exp`.
pub const LEEWAY_SECS: u64 = 5;

/// Why a token or a key was refused. The message is for humans (close
/// reasons, start-up errors); it never echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("auth configuration: {0}")]
    Config(String),
}

/// A channel pattern: an exact name, or a prefix when it ends in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// `$sub` in `text` becomes `user`.
    pub fn new(text: &str, user: Option<&str>) -> Self {
        match user {
            Some(user) => Self(text.replace("$sub", user)),
            None => Self(text.to_owned()),
        }
    }

    /// Whether `channel` matches.
    pub fn matches(&self, channel: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => self.0 == channel,
        }
    }
}

/// True when some pattern matches `channel`.
pub fn any_matches(patterns: &[Pattern], channel: &str) -> bool {
    patterns.iter().any(|p| p.matches(channel))
}

/// The `channels` claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelClaims {
    #[serde(default, rename = "pub")]
    pub publish: Vec<String>,
    #[serde(default, rename = "sub")]
    pub subscribe: Vec<String>,
}

/// The `aud` claim: one audience or several (RFC 7519 allows both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims Courier reads; others are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<ChannelClaims>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// What a token granted, with `$sub` already substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub publish: Vec<Pattern>,
    pub subscribe: Vec<Pattern>,
}

/// An authenticated connection's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// When the token expires, ms since the Unix epoch.
    pub expires_ms: u64,
    /// `None`: the token carries no `channels` claim.
    pub capabilities: Option<Capabilities>,
}

/// The configured verifier, or none (every connection is anonymous).
pub struct Auth {
    verifier: Option<(DecodingKey, Validation)>,
    /// The HS256 secret, kept to mint development tokens.
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("enabled", &self.enabled())
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Auth {
    /// No verification: every connection is anonymous.
    pub fn disabled() -> Self {
        Self {
            verifier: None,
            secret: None,
        }
    }

    /// Reads the configured keys (files included). Errors name the key.
    pub fn from_config(config: &AuthConfig) -> Result<Self, AuthError> {
        let secret = match (&config.jwt_secret, &config.jwt_secret_file) {
            (Some(_), Some(_)) => {
                return Err(AuthError::Config(
                    "set auth.jwt_secret or auth.jwt_secret_file, not both".into(),
                ));
            }
            (Some(secret), None) => Some(secret.clone().into_bytes()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    AuthError::Config(format!("auth.jwt_secret_file {}: {e}", path.display()))
                })?;
                Some(text.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
            }
            (None, None) => None,
        };
        let public = match &config.jwt_public_key {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                AuthError::Config(format!("auth.jwt_public_key {}: {e}", path.display()))
            })?),
            None => None,
        };
        let (key, algorithm) = match (&secret, &public) {
            (None, None) => return Ok(Self::disabled()),
            (Some(_), Some(_)) => {
                return Err(AuthError::Config(
                    "set a secret (HS256) or auth.jwt_public_key (RS256/ES256), not both".into(),
                ));
            }
            (Some(secret), None) => {
                if secret.len() < 32 {
                    return Err(AuthError::Config(
                        "the JWT secret must be at least 32 bytes (HS256 with a short secret can be brute-forced)".into(),
                    ));
                }
                (
                    DecodingKey::from_secret(secret)
                        .map_err(|e| AuthError::Config(format!("auth.jwt_secret: {e}")))?,
                    Algorithm::HS256,
                )
            }
            (None, Some(pem)) => match DecodingKey::from_rsa_pem(pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => (
                    DecodingKey::from_ec_pem(pem).map_err(|_| {
                        AuthError::Config(
                            "auth.jwt_public_key is neither an RSA nor an EC (P-256) public key in PEM"
                                .into(),
                        )
                    })?,
                    Algorithm::ES256,
                ),
            },
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = config.audience.is_some();
        if let Some(audience) = &config.audience {
            validation.set_audience(&[audience]);
            // Without this a token with no `aud` at all would pass.
            validation.required_spec_claims.insert("aud".into());
        }
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Self {
            verifier: Some((key, validation)),
            secret,
        })
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// Checks a token: signature, algorithm, `exp`, audience and issuer
    /// where configured, and the `sub` and `channels` claims.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let Some((key, validation)) = &self.verifier else {
            return Err(AuthError::Config("no authentication is configured".into()));
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => {
                    AuthError::Invalid("the token's algorithm is not the configured one".into())
                }
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::Invalid(format!("the {claim} claim is missing"))
                }
                _ => AuthError::Invalid(e.to_string()),
            }
        })?;
        let claims = data.claims;
        if claims.sub.is_empty() || ChannelName::new(&format!("inbox:{}", claims.sub)).is_err() {
            return Err(AuthError::Invalid(
                "the sub claim must be 1–194 bytes of channel-name characters (A–Z a–z 0–9 _ . : @ / = -)".into(),
            ));
        }
        let user = claims.sub;
        let capabilities = claims.channels.map(|c| Capabilities {
            publish: c
                .publish
                .iter()
                .map(|p| Pattern::new(p, Some(&user)))
                .collect(),
            subscribe: c
                .subscribe
                .iter()
                .map(|p| Pattern::new(p, Some(&user)))
                .collect(),
        });
        Ok(Identity {
            expires_ms: claims.exp.saturating_mul(1000),
            user,
            capabilities,
        })
    }

    /// Mints an HS256 token from the configured secret (`courier token`).
    pub fn mint(&self, claims: &Claims) -> Result<String, AuthError> {
        let Some(secret) = &self.secret else {
            return Err(AuthError::Config(
                "minting needs auth.jwt_secret or auth.jwt_secret_file (public-key setups sign tokens with the private key, outside Courier)".into(),
            ));
        };
        let key = EncodingKey::from_secret(secret)
            .map_err(|e| AuthError::Config(format!("auth.jwt_secret: {e}")))?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
            .map_err(|e| AuthError::Config(e.to_string()))
    }
}

/// Claims for a token of `user` valid for `ttl_secs` from now.
pub fn claims_for(user: &str, ttl_secs: u64, channels: Option<ChannelClaims>) -> Claims {
    Claims {
        sub: user.to_owned(),
        exp: now_secs().saturating_add(ttl_secs),
        channels,
        aud: None,
        iss: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    fn hmac(audience: Option<&str>) -> Auth {
        Auth::from_config(&AuthConfig {
            jwt_secret: Some(SECRET.into()),
            audience: audience.map(Into::into),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn sign(claims: &Claims, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_good_token_names_the_user_and_its_capabilities() {
        let auth = hmac(None);
        let claims = claims_for(
            "alice",
            60,
            Some(ChannelClaims {
                publish: vec!["chat:*".into()],
                subscribe: vec!["chat:*".into(), "inbox:$sub".into()],
            }),
        );
        let identity = auth.verify(&sign(&claims, SECRET)).unwrap();
        assert_eq!(identity.user, "alice");
        let caps = identity.capabilities.unwrap();
        assert!(any_matches(&caps.subscribe, "inbox:alice"));
        assert!(!any_matches(&caps.subscribe, "inbox:bob"));
        assert!(any_matches(&caps.publish, "chat:room-1"));
        assert!(!any_matches(&caps.publish, "news:x"));
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let auth = hmac(Some("courier"));
        let mut claims = claims_for("alice", 60, None);
        claims.aud = Some(Audience::One("courier".into()));
        assert!(auth.verify(&sign(&claims, SECRET)).is_ok());
        let wrong_secret = sign(&claims, "another-secret-another-secret-000000");
        assert!(
            matches!(auth.verify(&wrong_secret), Err(AuthError::Invalid(m)) if m.contains("signature"))
        );
        let mut expired = claims.clone();
        expired.exp = now_secs() - 3600;
        assert_eq!(
            auth.verify(&sign(&expired, SECRET)),
            Err(AuthError::Expired)
        );
        let mut other_audience = claims.clone();
        other_audience.aud = Some(Audience::One("someone-else".into()));
        let mut several = claims.clone();
        several.aud = Some(Audience::Many(vec!["other".into(), "courier".into()]));
        assert!(
            auth.verify(&sign(&several, SECRET)).is_ok(),
            "an aud array naming us"
        );
        let mut none = claims.clone();
        none.aud = None;
        assert!(
            matches!(auth.verify(&sign(&none, SECRET)), Err(AuthError::Invalid(m)) if m.contains("aud")),
            "aud required"
        );
        assert!(
            matches!(auth.verify(&sign(&other_audience, SECRET)), Err(AuthError::Invalid(m)) if m.contains("audience"))
        );
        assert!(auth.verify("not.a.token").is_err());
        assert!(auth.verify("").is_err());
        // alg: none, with the same claims.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert!(auth.verify(&none).is_err(), "alg none");
        // HS512 with the right secret is still not the configured algorithm.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        )
        .unwrap();
        assert!(
            matches!(auth.verify(&hs512), Err(AuthError::Invalid(m)) if m.contains("algorithm"))
        );
        let mut bad_sub = claims_for("a b", 60, None);
        bad_sub.aud = Some(Audience::One("courier".into()));
        assert!(auth.verify(&sign(&bad_sub, SECRET)).is_err());
    }

    #[test]
    fn config_mistakes_are_named() {
        let short = Auth::from_config(&AuthConfig {
            jwt_secret: Some("short".into()),
            ..AuthConfig::default()
        });
        assert!(matches!(short, Err(AuthError::Config(m)) if m.contains("32 bytes")));
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("key.pem");
        std::fs::write(&pem, "not a key").unwrap();
        let bad = Auth::from_config(&AuthConfig {
            jwt_public_key: Some(pem),
            ..AuthConfig::default()
        });
        assert!(matches!(bad, Err(AuthError::Config(m)) if m.contains("jwt_public_key")));
        assert!(!Auth::from_config(&AuthConfig::default()).unwrap().enabled());
    }

    #[test]
    fn patterns() {
        assert!(Pattern::new("chat:*", None).matches("chat:a"));
        assert!(!Pattern::new("chat:*", None).matches("chatx"));
        assert!(Pattern::new("*", None).matches("anything"));
        assert!(Pattern::new("a:b", None).matches("a:b"));
        assert!(!Pattern::new("a:b", None).matches("a:bc"));
    }
}
