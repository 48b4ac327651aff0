//! What one connection may do: its identity and the namespace rules.
//!
//! Without `[auth]` keys every connection is anonymous and may do anything
//! except publish to a `publish = "server"` namespace (the development
//! default). With keys, a request passes when all of these hold:
//!
//! 1. the namespace lets anonymous connections in (`anonymous = true`), or
//!    the connection has a user;
//! 2. publishing: the namespace is not server-side only;
//! 3. `inbox:<user>`: only `<user>` subscribes to it or asks its presence;
//! 4. the token's `channels` capabilities, when it has them, match.

use crate::auth::{Capabilities, Identity, any_matches};
use crate::config::{Config, PublishRule};
use crate::protocol::ChannelName;

/// The namespace of per-user inboxes.
pub const INBOX: &str = "inbox";

/// What a request wants to do with a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
    Presence,
}

/// A connection's identity and rights.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Tokens are checked on this broker.
    pub auth_enabled: bool,
    pub user: Option<String>,
    pub capabilities: Option<Capabilities>,
    /// When the token expires, ms since the Unix epoch.
    pub expires_ms: Option<u64>,
}

impl Access {
    /// Anonymous access (`auth_enabled` says whether tokens are checked).
    pub fn anonymous(auth_enabled: bool) -> Self {
        Self {
            auth_enabled,
            ..Self::default()
        }
    }

    /// Access of an authenticated identity.
    pub fn authenticated(identity: Identity) -> Self {
        Self {
            auth_enabled: true,
            user: Some(identity.user),
            capabilities: identity.capabilities,
            expires_ms: Some(identity.expires_ms),
        }
    }

    /// Whether `action` on `channel` is allowed; the error says why not.
    pub fn check(
        &self,
        config: &Config,
        action: Action,
        channel: &ChannelName,
    ) -> Result<(), String> {
        let namespace = channel.namespace();
        let policy = config.policy(namespace);
        if action == Action::Publish && policy.publish == PublishRule::Server {
            return Err(format!(
                "channels of namespace {namespace:?} are published server-side only (the HTTP publish API)"
            ));
        }
        if !self.auth_enabled {
            return Ok(());
        }
        let Some(user) = &self.user else {
            if policy.anonymous && namespace != INBOX {
                return Ok(());
            }
            return Err(format!(
                "namespace {namespace:?} needs an authenticated connection (connect with a token)"
            ));
        };
        if namespace == INBOX
            && action != Action::Publish
            && channel.as_str().strip_prefix("inbox:") != Some(user.as_str())
        {
            return Err(format!(
                "{channel} is another user's inbox; yours is inbox:{user}"
            ));
        }
        if let Some(caps) = &self.capabilities {
            let (allowed, claim) = match action {
                Action::Publish => (&caps.publish, "pub"),
                Action::Subscribe | Action::Presence => (&caps.subscribe, "sub"),
            };
            if !any_matches(allowed, channel.as_str()) {
                return Err(format!(
                    "the token's channels.{claim} does not include {channel}"
                ));
            }
        }
        Ok(())
    }
}

/// Whether a connection without a token may connect at all: no keys are
/// configured, or some namespace lets anonymous connections in.
pub fn anonymous_allowed(config: &Config, auth_enabled: bool) -> bool {
    !auth_enabled
        || config.default_namespace.anonymous
        || config.namespaces.values().any(|p| p.anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Pattern;
    use crate::config::NamespacePolicy;

    fn config() -> Config {
        let mut config = Config::default();
        config.namespaces.insert(
            "public".into(),
            NamespacePolicy {
                anonymous: true,
                ..NamespacePolicy::default()
            },
        );
        config.namespaces.insert(
            "news".into(),
            NamespacePolicy {
                publish: PublishRule::Server,
                ..NamespacePolicy::default()
            },
        );
        config
    }

    fn name(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    fn alice(caps: Option<Capabilities>) -> Access {
        Access {
            auth_enabled: true,
            user: Some("alice".into()),
            capabilities: caps,
            expires_ms: Some(u64::MAX),
        }
    }

    /// Each case: (action, channel, allowed).
    fn check_all(access: &Access, config: &Config, cases: &[(Action, &str, bool)]) {
        for (action, channel, allowed) in cases {
            let result = access.check(config, *action, &name(channel));
            assert_eq!(result.is_ok(), *allowed, "{action:?} {channel}: {result:?}");
        }
    }

    #[test]
    fn without_keys_everything_but_server_only_publishing_is_allowed() {
        let config = config();
        let open = Access::anonymous(false);
        check_all(
            &open,
            &config,
            &[
                (Action::Subscribe, "inbox:bob", true),
                (Action::Publish, "chat:x", true),
                (Action::Publish, "news:today", false),
            ],
        );
        assert!(anonymous_allowed(&config, false));
    }

    #[test]
    fn anonymous_connections_reach_only_anonymous_namespaces() {
        let config = config();
        let anon = Access::anonymous(true);
        check_all(
            &anon,
            &config,
            &[
                (Action::Subscribe, "public:lobby", true),
                (Action::Subscribe, "chat:x", false),
                (Action::Subscribe, "inbox:x", false),
            ],
        );
        let denied = anon
            .check(&config, Action::Subscribe, &name("chat:x"))
            .unwrap_err();
        assert!(denied.contains("token"), "{denied}");
        assert!(anonymous_allowed(&config, true));
        assert!(!anonymous_allowed(&Config::default(), true));
    }

    #[test]
    fn inboxes_belong_to_their_user() {
        check_all(
            &alice(None),
            &config(),
            &[
                (Action::Subscribe, "inbox:alice", true),
                (Action::Subscribe, "inbox:bob", false),
                (Action::Presence, "inbox:bob", false),
                // Sending bob a message is fine.
                (Action::Publish, "inbox:bob", true),
            ],
        );
    }

    #[test]
    fn capabilities_narrow_what_a_token_may_do() {
        let caps = Capabilities {
            publish: vec![Pattern::new("chat:*", None)],
            subscribe: vec![
                Pattern::new("chat:*", None),
                Pattern::new("inbox:$sub", Some("alice")),
            ],
        };
        check_all(
            &alice(Some(caps)),
            &config(),
            &[
                (Action::Publish, "chat:x", true),
                (Action::Publish, "public:x", false),
                (Action::Subscribe, "inbox:alice", true),
                (Action::Subscribe, "public:x", false),
            ],
        );
    }
}
