//! Neon's identifiers as the pageserver's API writes them: tenant and timeline ids are 16
//! bytes in 32 lowercase hex digits, LSNs are `X/Y` (the high and low 32 bits in hex, as
//! PostgreSQL's `pg_lsn` prints them).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a Neon id or LSN. The text names the rule, never the input (which may
/// come from a client and go back to one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidNeonId {
    #[error("must be 32 hexadecimal digits")]
    NotHex32,
    #[error("must be two hexadecimal numbers of up to 8 digits, as in 16/B374D848")]
    NotLsn,
    #[error("0/0 is not a valid LSN")]
    ZeroLsn,
}

fn parse_hex16(s: &str) -> Result<[u8; 16], InvalidNeonId> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InvalidNeonId::NotHex32);
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte =
            u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| InvalidNeonId::NotHex32)?;
    }
    Ok(out)
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 16]);

        impl $name {
            /// A new random id (128 bits: collisions are not a concern).
            pub fn generate() -> Self {
                Self(rand::random())
            }

            /// 32 hex digits, either case (Neon writes lowercase).
            pub fn parse(s: &str) -> Result<Self, InvalidNeonId> {
                parse_hex16(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl FromStr for $name {
            type Err = InvalidNeonId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(
    /// A Neon tenant: one database cluster's storage, shared by all its timelines.
    TenantId
);
hex_id!(
    /// A Neon timeline: one branch of a tenant's history.
    TimelineId
);

/// A WAL position. Parsed only from the `X/Y` form; 0/0 (Neon's "invalid LSN") is refused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lsn(u64);

impl Lsn {
    pub fn new(value: u64) -> Result<Self, InvalidNeonId> {
        if value == 0 {
            return Err(InvalidNeonId::ZeroLsn);
        }
        Ok(Self(value))
    }

    pub fn parse(s: &str) -> Result<Self, InvalidNeonId> {
        let (hi, lo) = s.split_once('/').ok_or(InvalidNeonId::NotLsn)?;
        let half = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(InvalidNeonId::NotLsn);
            }
            u32::from_str_radix(p, 16).map_err(|_| InvalidNeonId::NotLsn)
        };
        Self::new((u64::from(half(hi)?) << 32) | u64::from(half(lo)?))
    }

    pub fn value(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Lsn {
    /// As Neon and PostgreSQL print it: `16/B374D848`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

impl FromStr for Lsn {
    type Err = InvalidNeonId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // The pageserver writes 0/0 for LSNs it does not have yet (a new timeline's
        // `remote_consistent_lsn`); reading them must not fail, so only parsing is strict.
        match Self::parse(&s) {
            Ok(l) => Ok(l),
            Err(InvalidNeonId::ZeroLsn) => Ok(Self(0)),
            Err(e) => Err(serde::de::Error::custom(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex_digits_and_print_lowercase() {
        let t = TimelineId::parse("DE200BD42B49CC1814412C7E592DD6E9").unwrap();
        assert_eq!(t.to_string(), "de200bd42b49cc1814412c7e592dd6e9");
        assert_eq!(t, t.to_string().parse().unwrap());
        for bad in [
            "",
            "de200bd42b49cc1814412c7e592dd6e",
            "de200bd42b49cc1814412c7e592dd6e90",
            "de200bd42b49cc1814412c7e592dd6eg",
            "+e200bd42b49cc1814412c7e592dd6e9",
            "é200bd42b49cc1814412c7e592dd6e9",
        ] {
            assert_eq!(
                TenantId::parse(bad),
                Err(InvalidNeonId::NotHex32),
                "{bad:?}"
            );
        }
        let (a, b) = (TimelineId::generate(), TimelineId::generate());
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(serde_json::to_value(a).unwrap(), a.to_string());
        let back: TimelineId = serde_json::from_value(serde_json::json!(a.to_string())).unwrap();
        assert_eq!(back, a);
        assert!(serde_json::from_value::<TimelineId>(serde_json::json!("xyz")).is_err());
    }

    #[test]
    fn lsns_are_x_slash_y() {
        let l = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(l.value(), 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/1696A50").unwrap().to_string(), "0/1696A50");
        assert_eq!(Lsn::parse("ffffffff/ffffffff").unwrap().value(), u64::MAX);
        for bad in [
            "",
            "16",
            "/1",
            "1/",
            "16/B374D84G",
            "123456789/0",
            "0/123456789",
            "1/2/3",
            " 1/2",
            "-1/2",
            "+1/2",
            "0x1/2",
        ] {
            assert_eq!(Lsn::parse(bad), Err(InvalidNeonId::NotLsn), "{bad:?}");
        }
        assert_eq!(Lsn::parse("0/0"), Err(InvalidNeonId::ZeroLsn));
        assert_eq!(serde_json::to_value(l).unwrap(), "16/B374D848");
        // The pageserver's "none yet" reads as a value, not an error.
        let zero: Lsn = serde_json::from_value(serde_json::json!("0/0")).unwrap();
        assert_eq!(zero.value(), 0);
        assert!(serde_json::from_value::<Lsn>(serde_json::json!("0")).is_err());
    }
}
