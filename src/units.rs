//! Values of the config that every component uses: durations, byte sizes, socket
//! addresses. A leaf module: components import it, and `config` composes the components,
//! so no import goes both ways.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration written as `10s`, `500ms`, `2m` (humantime syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration such as \"10s\", \"500ms\" or \"2m\"")
        })?;
        humantime::parse_duration(text.trim())
            .map(Dur)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); use e.g. \"10s\", \"500ms\", \"2m\""
                ))
            })
    }
}

/// A size in bytes, written as a number or with a unit: `512MiB`, `2GiB`, `64KiB`, `1GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        let bad = |text: &str| {
            serde::de::Error::custom(format!(
                "invalid size {text:?}; write bytes, or e.g. \"512MiB\", \"2GiB\", \"64KiB\""
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n as usize)),
            Raw::Text(text) => {
                let t = text.trim();
                let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                let (num, unit) = t.split_at(split);
                let n: u64 = num.parse().map_err(|_| bad(&text))?;
                let factor: u64 = match unit.trim() {
                    "" | "B" => 1,
                    "KiB" => 1 << 10,
                    "MiB" => 1 << 20,
                    "GiB" => 1 << 30,
                    "KB" | "kB" => 1_000,
                    "MB" => 1_000_000,
                    "GB" => 1_000_000_000,
                    _ => return Err(bad(&text)),
                };
                n.checked_mul(factor)
                    .map(|b| ByteSize(b as usize))
                    .ok_or_else(|| bad(&text))
            }
        }
    }
}

/// A problem with `endpoint` when it is not an IP `host:port` (as a listen address must be).
pub fn socket_problem(key: &str, endpoint: &str, example: &str) -> Option<(String, String)> {
    endpoint.parse::<SocketAddr>().is_err().then(|| {
        (
            key.to_owned(),
            format!("{endpoint:?} is not host:port with an IP host, e.g. {example}"),
        )
    })
}
