//! Channel names: 1–200 bytes of `[A-Za-z0-9_.:@/=-]`; the part before the
//! first `:` is the namespace.

use std::fmt;

/// Longest channel name, bytes.
pub const MAX_CHANNEL_LEN: usize = 200;

/// Why a channel name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {0} bytes; the limit is {MAX_CHANNEL_LEN}")]
    TooLong(usize),
    #[error("channel name has {0:?}; allowed are A-Z a-z 0-9 and _ . : @ / = -")]
    BadChar(char),
}

/// A validated channel name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(String);

impl ChannelName {
    /// Checks `name` against the naming rules.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_CHANNEL_LEN {
            return Err(NameError::TooLong(name.len()));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_.:@/=-".contains(*c)))
        {
            return Err(NameError::BadChar(bad));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace: the part before the first `:`, or `""` when there is none.
    pub fn namespace(&self) -> &str {
        namespace_of(&self.0)
    }
}

/// The namespace of a channel name: the part before the first `:`, or `""`.
pub fn namespace_of(name: &str) -> &str {
    name.split_once(':').map_or("", |(ns, _)| ns)
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for name in [
            "a",
            "chat:room-1",
            "inbox:alice@example.com",
            "a/b=c_d.e",
            &"x".repeat(200),
        ] {
            assert!(ChannelName::new(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn rejects_empty_long_and_odd_names() {
        assert_eq!(ChannelName::new(""), Err(NameError::Empty));
        assert_eq!(
            ChannelName::new(&"x".repeat(201)),
            Err(NameError::TooLong(201))
        );
        assert_eq!(ChannelName::new("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(ChannelName::new("é"), Err(NameError::BadChar('é')));
        assert_eq!(ChannelName::new("a*"), Err(NameError::BadChar('*')));
    }

    #[test]
    fn namespace_is_the_part_before_the_first_colon() {
        assert_eq!(ChannelName::new("chat:a:b").unwrap().namespace(), "chat");
        assert_eq!(ChannelName::new("plain").unwrap().namespace(), "");
    }
}
