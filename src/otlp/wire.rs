//! Minimal protobuf wire-format reading and writing: varints, tags and field skipping.
//!
//! Every read is bounds-checked against the slice it reads from, so a hostile length prefix
//! can never make the scanner read or allocate past the bytes that actually arrived.

use thiserror::Error;

/// Protobuf wire types that OTLP uses (groups are rejected as malformed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireType {
    Varint,
    Fixed64,
    Len,
    Fixed32,
}

/// A span or message whose bytes are not valid protobuf.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("malformed protobuf: {0}")]
pub struct Malformed(pub &'static str);

/// A forward-only reader over one message's bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Offset of the next unread byte.
    #[inline]
    pub fn pos(&self) -> usize {
        self.pos
    }

    #[inline]
    pub fn varint(&mut self) -> Result<u64, Malformed> {
        // Tags and most lengths are a single byte.
        if let Some(&byte) = self.buf.get(self.pos)
            && byte < 0x80
        {
            self.pos += 1;
            return Ok(u64::from(byte));
        }
        self.varint_slow()
    }

    #[cold]
    fn varint_slow(&mut self) -> Result<u64, Malformed> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let byte = *self
                .buf
                .get(self.pos)
                .ok_or(Malformed("truncated varint"))?;
            self.pos += 1;
            if i == 9 && byte > 1 {
                // The tenth byte holds bit 63 only; decoders refuse anything more.
                return Err(Malformed("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(Malformed("varint longer than 10 bytes"))
    }

    /// Reads a field key; returns the field number and wire type.
    #[inline]
    pub fn tag(&mut self) -> Result<(u32, WireType), Malformed> {
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(Malformed("invalid field number"));
        }
        let wire = match key & 7 {
            0 => WireType::Varint,
            1 => WireType::Fixed64,
            2 => WireType::Len,
            5 => WireType::Fixed32,
            _ => return Err(Malformed("unsupported wire type")),
        };
        Ok((field as u32, wire))
    }

    #[inline]
    fn fixed<const N: usize>(&mut self, truncated: &'static str) -> Result<[u8; N], Malformed> {
        let end = self.pos + N;
        let bytes = self.buf.get(self.pos..end).ok_or(Malformed(truncated))?;
        self.pos = end;
        let mut le = [0u8; N];
        le.copy_from_slice(bytes);
        Ok(le)
    }

    #[inline]
    pub fn fixed64(&mut self) -> Result<u64, Malformed> {
        self.fixed("truncated fixed64").map(u64::from_le_bytes)
    }

    #[inline]
    pub fn fixed32(&mut self) -> Result<u32, Malformed> {
        self.fixed("truncated fixed32").map(u32::from_le_bytes)
    }

    /// Reads a length-delimited payload and returns it with its start offset.
    #[inline]
    pub fn len_delimited(&mut self) -> Result<(usize, &'a [u8]), Malformed> {
        let len = self.varint()?;
        let start = self.pos;
        let len = usize::try_from(len).map_err(|_| Malformed("length overflows"))?;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= self.buf.len())
            .ok_or(Malformed("length prefix past the end of the message"))?;
        self.pos = end;
        Ok((start, &self.buf[start..end]))
    }

    /// Skips one field's value of the given wire type.
    #[inline]
    pub fn skip(&mut self, wire: WireType) -> Result<(), Malformed> {
        match wire {
            WireType::Varint => self.varint().map(drop),
            WireType::Fixed64 => self.fixed64().map(drop),
            WireType::Fixed32 => self.fixed32().map(drop),
            WireType::Len => self.len_delimited().map(drop),
        }
    }
}

/// Appends `value` as a varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a length-delimited field: key, length, payload.
pub fn put_len_field(out: &mut Vec<u8>, field: u32, payload: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// A value of an OTLP `AnyValue`, for attributes llmtail writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Double(f64),
    Bool(bool),
}

/// Appends one span attribute: field 9, a `KeyValue` with the given `AnyValue`.
pub fn put_attribute(out: &mut Vec<u8>, key: &str, value: Value<'_>) {
    const SPAN_ATTRIBUTES: u32 = 9;
    let mut any = Vec::with_capacity(16);
    match value {
        Value::Str(s) => put_len_field(&mut any, 1, s.as_bytes()),
        Value::Int(i) => {
            put_varint(&mut any, 3 << 3);
            put_varint(&mut any, i as u64);
        }
        Value::Double(d) => {
            put_varint(&mut any, (4 << 3) | 1);
            any.extend_from_slice(&d.to_le_bytes());
        }
        Value::Bool(b) => {
            put_varint(&mut any, 2 << 3);
            put_varint(&mut any, u64::from(b));
        }
    }
    let mut kv = Vec::with_capacity(key.len() + any.len() + 4);
    put_len_field(&mut kv, 1, key.as_bytes());
    put_len_field(&mut kv, 2, &any);
    put_len_field(out, SPAN_ATTRIBUTES, &kv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(Reader::new(&out).varint(), Ok(v));
        }
    }

    #[test]
    fn hostile_length_prefix_is_rejected_without_reading_past_the_end() {
        // field 1, wire type 2, length 2^40, then 3 bytes
        let mut buf = vec![0x0a];
        put_varint(&mut buf, 1 << 40);
        buf.extend_from_slice(b"abc");
        let mut r = Reader::new(&buf);
        assert_eq!(r.tag(), Ok((1, WireType::Len)));
        assert!(r.len_delimited().is_err());
    }

    #[test]
    fn groups_and_field_zero_are_malformed() {
        assert!(Reader::new(&[0x0b]).tag().is_err()); // wire type 3 (group start)
        assert!(Reader::new(&[0x00]).tag().is_err()); // field number 0
    }
}
