//! OTLP traces on the wire: lazy view messages, the span scanner, tracestate edits and
//! re-framing of kept spans into new export requests.

pub mod codec;
pub mod json;
#[cfg(test)]
mod proptests;
pub mod redact;
pub mod reframe;
pub mod request;
pub mod scan;
pub mod tracestate;
pub mod validate;
pub mod wire;

/// Generated from `proto/view.proto`: OTLP messages with raw `bytes` in place of the
/// nested messages the hot path does not decode.
pub mod view {
    include!(concat!(env!("OUT_DIR"), "/llmtail.view.rs"));
}

use std::fmt;

/// A 16-byte W3C trace id; valid when not all zero (the all-zero default is the invalid
/// id, a placeholder).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId(pub [u8; 16]);

impl TraceId {
    /// The consistent-sampling randomness: the id's least-significant 56 bits.
    pub fn randomness(&self) -> u64 {
        let mut be = [0u8; 8];
        be[1..].copy_from_slice(&self.0[9..16]);
        u64::from_be_bytes(be)
    }

    /// A cheap, well-mixed 64-bit key for sharding (trace ids are random by spec, but a
    /// sender may choose badly, so both halves are folded in).
    pub fn shard_key(&self) -> u64 {
        let mut hi = [0u8; 8];
        let mut lo = [0u8; 8];
        hi.copy_from_slice(&self.0[..8]);
        lo.copy_from_slice(&self.0[8..]);
        let x = u64::from_le_bytes(hi) ^ u64::from_le_bytes(lo).rotate_left(29);
        x.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
