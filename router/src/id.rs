use std::fmt;

use serde::{Deserialize, Deserializer};

/// The id of an endpoint: the first DNS label of `ep-foo.db.example.com`, or the value of
/// `options=endpoint=ep-foo`. Because it becomes a DNS label, a log field and a metric label,
/// it is restricted to what is safe in all three: 1..=63 chars of `[a-z0-9-]`, not starting or
/// ending with '-'.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEndpointId {
    #[error("endpoint id is empty")]
    Empty,
    #[error("endpoint id is longer than 63 characters")]
    TooLong,
    #[error("endpoint id may only contain lowercase letters, digits and '-'")]
    BadChar,
    #[error("endpoint id must not start or end with '-'")]
    BadHyphen,
}

impl EndpointId {
    pub const MAX_LEN: usize = 63;

    pub fn parse(s: &str) -> Result<Self, InvalidEndpointId> {
        if s.is_empty() {
            return Err(InvalidEndpointId::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(InvalidEndpointId::TooLong);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(InvalidEndpointId::BadChar);
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(InvalidEndpointId::BadHyphen);
        }
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EndpointId({})", self.0)
    }
}

impl std::str::FromStr for EndpointId {
    type Err = InvalidEndpointId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for EndpointId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["demo", "ep-foo-123", "a", &"x".repeat(63)] {
            assert_eq!(EndpointId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(EndpointId::parse(""), Err(InvalidEndpointId::Empty));
        assert_eq!(
            EndpointId::parse(&"x".repeat(64)),
            Err(InvalidEndpointId::TooLong)
        );
        for bad in ["Demo", "ep_foo", "ep.foo", "ep foo", "é", "ep;drop"] {
            assert_eq!(
                EndpointId::parse(bad),
                Err(InvalidEndpointId::BadChar),
                "{bad}"
            );
        }
        assert_eq!(EndpointId::parse("-ep"), Err(InvalidEndpointId::BadHyphen));
        assert_eq!(EndpointId::parse("ep-"), Err(InvalidEndpointId::BadHyphen));
    }
}
