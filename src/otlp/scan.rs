//! The span scanner: reads, straight from a span's wire bytes, only what sampling and LLM
//! metrics need, without allocating and without decoding the rest.

use std::ops::Range;

use thiserror::Error;

use super::TraceId;
use super::validate::Invalid;
use super::wire::{Malformed, Reader, WireType};

// Field numbers of opentelemetry.proto.trace.v1.Span and the messages inside it.
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_TRACE_STATE: u32 = 3;
const SPAN_PARENT_SPAN_ID: u32 = 4;
const SPAN_NAME: u32 = 5;
const SPAN_KIND: u32 = 6;
const SPAN_START: u32 = 7;
const SPAN_END: u32 = 8;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_EVENTS: u32 = 11;
const SPAN_STATUS: u32 = 15;
const EVENT_NAME: u32 = 2;
const STATUS_CODE: u32 = 3;
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
const ANY_STRING: u32 = 1;
const ANY_BOOL: u32 = 2;
const ANY_INT: u32 = 3;
const ANY_DOUBLE: u32 = 4;
const RESOURCE_ATTRIBUTES: u32 = 1;
const SCOPE_NAME: u32 = 1;

/// `Status.code` value for STATUS_CODE_ERROR.
pub const STATUS_CODE_ERROR: u64 = 2;
/// The event name the OpenTelemetry semantic conventions use for recorded exceptions.
const EXCEPTION_EVENT: &[u8] = b"exception";

/// Why a span was refused; the label of `llmtail_spans_rejected_total{reason}`.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    #[error("trace id must be 16 bytes and not all zero")]
    InvalidTraceId,
    #[error("span id must be 8 bytes and not all zero")]
    InvalidSpanId,
    #[error("span is not valid protobuf")]
    Malformed,
    #[error("span is larger than limits.max_span_bytes")]
    SpanTooLarge,
    #[error("an attribute is larger than limits.max_attribute_bytes")]
    AttributeTooLarge,
    #[error("span is not valid OTLP ({0})")]
    InvalidSpan(Invalid),
    #[error("its resource is not valid OTLP ({0})")]
    InvalidResource(Invalid),
    #[error("its instrumentation scope is not valid OTLP ({0})")]
    InvalidScope(Invalid),
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::InvalidTraceId => "invalid_trace_id",
            Reject::InvalidSpanId => "invalid_span_id",
            Reject::Malformed => "malformed_span",
            Reject::SpanTooLarge => "span_too_large",
            Reject::AttributeTooLarge => "attribute_too_large",
            Reject::InvalidSpan(_) => "invalid_span",
            Reject::InvalidResource(_) => "invalid_resource",
            Reject::InvalidScope(_) => "invalid_scope",
        }
    }
}

impl From<Malformed> for Reject {
    fn from(_: Malformed) -> Self {
        Reject::Malformed
    }
}

/// The bytes of a string attribute's range within its span.
pub fn str_at<'a>(span: &'a [u8], range: &Range<u32>) -> &'a [u8] {
    &span[range.start as usize..range.end as usize]
}

/// An attribute value, as far as the scanner reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// Byte range of a string value inside the span (u32: spans are far smaller than
    /// 4 GiB, and the 16 slots of [`LlmAttrs`] are written for every span scanned).
    Str(Range<u32>),
    Int(i64),
    Double(f64),
    Bool(bool),
}

/// Which attributes the scanner keeps: the caller's classifier (llmtail's is the LLM
/// conventions table, in `llm`) maps a key to a slot and a precedence (lower wins). The wire
/// layer knows no attribute names of its own.
pub trait Classifier {
    fn classify(&self, key: &[u8]) -> Option<(usize, u8)>;

    /// A second slot for the same key, taken as is: keys that sampling conditions name,
    /// which may also be keys of the first classification.
    fn extra(&self, _key: &[u8]) -> Option<usize> {
        None
    }
}

/// Slots a classifier may use: `classify` those below [`EXTRA_SLOTS`], `extra` the rest.
pub const ATTR_SLOTS: usize = 32;
/// Slots of [`Classifier::extra`].
pub const EXTRA_SLOTS: std::ops::Range<usize> = 24..ATTR_SLOTS;

/// The classified attributes found on a span: for each slot, the value of the
/// highest-precedence key that carried it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attrs {
    slots: [Option<(u8, AttrValue)>; ATTR_SLOTS],
}

impl Attrs {
    pub fn get(&self, slot: usize) -> Option<&AttrValue> {
        self.slots.get(slot)?.as_ref().map(|(_, v)| v)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Keeps `value` unless a key of better (lower) precedence already set this slot.
    pub fn offer(&mut self, slot: usize, precedence: u8, value: AttrValue) {
        let Some(slot) = self.slots.get_mut(slot) else {
            return;
        };
        if slot.as_ref().is_none_or(|(p, _)| precedence < *p) {
            *slot = Some((precedence, value));
        }
    }
}

/// What the sampler and the metrics need to know about one span.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanFacts {
    pub trace_id: TraceId,
    pub span_id: [u8; 8],
    /// The parent's span id, zero for the root (or a parent id of another size).
    pub parent_id: [u8; 8],
    /// True when the parent span id is empty (or all zero): the trace's root.
    pub is_root: bool,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Status code ERROR, or an `exception` event.
    pub status_error: bool,
    /// `Status.code` (0 unset, 1 ok, 2 error).
    pub status_code: u8,
    /// The span's name, as a byte range of the span.
    pub name: Range<u32>,
    /// `Span.kind` (0 unspecified, 1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: u8,
    pub has_exception_event: bool,
    /// The whole `trace_state` field (key, length, value) and its value, as byte ranges.
    pub trace_state: Option<TraceStateField>,
    /// Encoded size of the largest attribute (key and value), for `max_attribute_bytes`.
    pub largest_attribute: u32,
    /// The attributes the classifier picked.
    pub attrs: Attrs,
}

/// Where a span's `trace_state` field sits, so it can be replaced without re-encoding:
/// the field (key and length included) spans `field_start..end`, its value
/// `value_start..end`. 32-bit offsets keep every held span small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceStateField {
    field_start: u32,
    value_start: u32,
    /// Never zero (the field's key comes before it): `Option<TraceStateField>` takes no
    /// more room than the field, and so every held span stays at 32 bytes.
    end: std::num::NonZeroU32,
}

impl TraceStateField {
    fn new(field_start: usize, value_start: usize, end: usize) -> Self {
        TraceStateField {
            field_start: field_start as u32,
            value_start: value_start as u32,
            end: std::num::NonZeroU32::new(end as u32).unwrap_or(std::num::NonZeroU32::MIN),
        }
    }

    /// The whole field: key, length and value.
    pub fn field(&self) -> Range<usize> {
        self.field_start as usize..self.end.get() as usize
    }

    pub fn value(&self) -> Range<usize> {
        self.value_start as usize..self.end.get() as usize
    }
}

impl SpanFacts {
    pub fn is_error(&self) -> bool {
        self.status_error || self.has_exception_event
    }

    pub fn trace_state<'a>(&self, span: &'a [u8]) -> &'a [u8] {
        self.trace_state
            .as_ref()
            .map_or(&[][..], |ts| &span[ts.value()])
    }
}

/// Scans one encoded `Span`.
pub fn scan_span(span: &[u8], classifier: &impl Classifier) -> Result<SpanFacts, Reject> {
    let mut r = Reader::new(span);
    let mut trace_id: &[u8] = &[];
    let mut span_id: &[u8] = &[];
    let mut parent: &[u8] = &[];
    let mut facts = SpanFacts {
        trace_id: TraceId([0; 16]),
        span_id: [0; 8],
        parent_id: [0; 8],
        is_root: true,
        start_ns: 0,
        end_ns: 0,
        status_error: false,
        status_code: 0,
        name: 0..0,
        kind: 0,
        has_exception_event: false,
        trace_state: None,
        largest_attribute: 0,
        attrs: Attrs::default(),
    };
    while !r.is_empty() {
        let field_start = r.pos();
        let (field, wire) = r.tag()?;
        match (field, wire) {
            (SPAN_TRACE_ID, WireType::Len) => trace_id = r.len_delimited()?.1,
            (SPAN_SPAN_ID, WireType::Len) => span_id = r.len_delimited()?.1,
            (SPAN_PARENT_SPAN_ID, WireType::Len) => parent = r.len_delimited()?.1,
            (SPAN_TRACE_STATE, WireType::Len) => {
                let (start, value) = r.len_delimited()?;
                facts.trace_state = Some(TraceStateField::new(
                    field_start,
                    start,
                    start + value.len(),
                ));
            }
            (SPAN_NAME, WireType::Len) => {
                let (start, name) = r.len_delimited()?;
                facts.name = start as u32..(start + name.len()) as u32;
            }
            (SPAN_KIND, WireType::Varint) => facts.kind = r.varint()?.min(u8::MAX as u64) as u8,
            (SPAN_START, WireType::Fixed64) => facts.start_ns = r.fixed64()?,
            (SPAN_END, WireType::Fixed64) => facts.end_ns = r.fixed64()?,
            (SPAN_ATTRIBUTES, WireType::Len) => {
                let (offset, kv) = r.len_delimited()?;
                facts.largest_attribute = facts.largest_attribute.max(kv.len() as u32);
                scan_attribute(kv, offset, classifier, &mut facts.attrs)?;
            }
            (SPAN_EVENTS, WireType::Len) => {
                if event_is_exception(r.len_delimited()?.1)? {
                    facts.has_exception_event = true;
                }
            }
            (SPAN_STATUS, WireType::Len) => {
                if let Some(code) = status_code(r.len_delimited()?.1)? {
                    facts.status_error = code == STATUS_CODE_ERROR;
                    facts.status_code = code.min(u8::MAX as u64) as u8;
                }
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    facts.trace_id = TraceId(
        trace_id
            .try_into()
            .ok()
            .filter(|id: &[u8; 16]| id != &[0; 16])
            .ok_or(Reject::InvalidTraceId)?,
    );
    facts.span_id = span_id
        .try_into()
        .ok()
        .filter(|id: &[u8; 8]| id != &[0; 8])
        .ok_or(Reject::InvalidSpanId)?;
    facts.is_root = parent.iter().all(|b| *b == 0);
    facts.parent_id = parent.try_into().unwrap_or([0; 8]);
    Ok(facts)
}

/// The name of an encoded `InstrumentationScope`, if it has one.
pub fn scope_name(scope: &[u8]) -> Result<Option<&[u8]>, Malformed> {
    let mut r = Reader::new(scope);
    let mut name = None;
    while !r.is_empty() {
        match r.tag()? {
            (SCOPE_NAME, WireType::Len) => name = Some(r.len_delimited()?.1),
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(name)
}

fn event_is_exception(event: &[u8]) -> Result<bool, Malformed> {
    let mut r = Reader::new(event);
    let mut is_exception = false;
    while !r.is_empty() {
        match r.tag()? {
            (EVENT_NAME, WireType::Len) => is_exception = r.len_delimited()?.1 == EXCEPTION_EVENT,
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(is_exception)
}

fn status_code(status: &[u8]) -> Result<Option<u64>, Malformed> {
    let mut r = Reader::new(status);
    let mut code = None;
    while !r.is_empty() {
        match r.tag()? {
            (STATUS_CODE, WireType::Varint) => code = Some(r.varint()?),
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(code)
}

/// Reads one `KeyValue`; records it when the classifier wants its key. `offset` is where the
/// KeyValue starts inside the span, so string values are kept as span byte ranges.
fn scan_attribute(
    kv: &[u8],
    offset: usize,
    classifier: &impl Classifier,
    out: &mut Attrs,
) -> Result<(), Malformed> {
    let mut r = Reader::new(kv);
    let mut key: &[u8] = &[];
    let mut value: Option<(usize, &[u8])> = None;
    while !r.is_empty() {
        match r.tag()? {
            (KEY_VALUE_KEY, WireType::Len) => key = r.len_delimited()?.1,
            (KEY_VALUE_VALUE, WireType::Len) => value = Some(r.len_delimited()?),
            (_, wire) => r.skip(wire)?,
        }
    }
    let first = classifier.classify(key);
    let extra = classifier.extra(key);
    if first.is_none() && extra.is_none() {
        return Ok(());
    }
    if let Some((start, any)) = value
        && let Some(v) = any_value(any, offset + start)?
    {
        if let Some(slot) = extra {
            out.offer(slot, 0, v.clone());
        }
        if let Some((slot, precedence)) = first {
            out.offer(slot, precedence, v);
        }
    }
    Ok(())
}

/// Reads an `AnyValue`'s scalar (the last one set, as protobuf's oneof rule says).
fn any_value(any: &[u8], offset: usize) -> Result<Option<AttrValue>, Malformed> {
    let mut r = Reader::new(any);
    let mut value = None;
    while !r.is_empty() {
        value = match r.tag()? {
            (ANY_STRING, WireType::Len) => {
                let (start, s) = r.len_delimited()?;
                let start = offset + start;
                Some(AttrValue::Str(start as u32..(start + s.len()) as u32))
            }
            (ANY_BOOL, WireType::Varint) => Some(AttrValue::Bool(r.varint()? != 0)),
            (ANY_INT, WireType::Varint) => Some(AttrValue::Int(r.varint()? as i64)),
            (ANY_DOUBLE, WireType::Fixed64) => {
                Some(AttrValue::Double(f64::from_bits(r.fixed64()?)))
            }
            (_, wire) => {
                r.skip(wire)?;
                None
            }
        };
    }
    Ok(value)
}

/// A scalar attribute value, borrowed from the bytes it was read from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    Str(&'a [u8]),
    Int(i64),
    Double(f64),
    Bool(bool),
}

impl AttrValue {
    /// The value, its string read from the span it was scanned from.
    pub fn scalar<'a>(&self, span: &'a [u8]) -> Scalar<'a> {
        match self {
            AttrValue::Str(range) => Scalar::Str(str_at(span, range)),
            AttrValue::Int(v) => Scalar::Int(*v),
            AttrValue::Double(v) => Scalar::Double(*v),
            AttrValue::Bool(v) => Scalar::Bool(*v),
        }
    }
}

/// The value of one attribute of an encoded `Resource` (the last one with that key).
pub fn resource_attribute<'a>(
    resource: &'a [u8],
    wanted: &[u8],
) -> Result<Option<Scalar<'a>>, Malformed> {
    let mut r = Reader::new(resource);
    let mut found = None;
    while !r.is_empty() {
        match r.tag()? {
            (RESOURCE_ATTRIBUTES, WireType::Len) => {
                let kv = r.len_delimited()?.1;
                let mut kr = Reader::new(kv);
                let mut key: &[u8] = &[];
                let mut value: &[u8] = &[];
                while !kr.is_empty() {
                    match kr.tag()? {
                        (KEY_VALUE_KEY, WireType::Len) => key = kr.len_delimited()?.1,
                        (KEY_VALUE_VALUE, WireType::Len) => value = kr.len_delimited()?.1,
                        (_, wire) => kr.skip(wire)?,
                    }
                }
                if key == wanted
                    && let Some(v) = any_value(value, 0)?
                {
                    found = Some(v.scalar(value));
                }
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(found)
}

/// Reads `service.name` from an encoded `Resource`.
pub fn service_name(resource: &[u8]) -> Result<Option<&[u8]>, Malformed> {
    Ok(match resource_attribute(resource, b"service.name")? {
        Some(Scalar::Str(name)) => Some(name),
        _ => None,
    })
}

/// A span's trace id, read without scanning anything else.
pub fn trace_id(span: &[u8]) -> Option<TraceId> {
    let mut r = Reader::new(span);
    let mut id = None;
    while !r.is_empty() {
        match r.tag().ok()? {
            (SPAN_TRACE_ID, WireType::Len) => id = r.len_delimited().ok()?.1.try_into().ok(),
            (_, wire) => r.skip(wire).ok()?,
        }
    }
    id.map(TraceId)
}

/// A span's id and its parent's (zeros for none), read without scanning anything else:
/// the trace's shape, read again from held spans when their LLM calls are resolved.
pub fn span_link(span: &[u8]) -> Option<([u8; 8], [u8; 8])> {
    let mut r = Reader::new(span);
    let (mut id, mut parent) = ([0; 8], [0; 8]);
    while !r.is_empty() {
        match r.tag().ok()? {
            (SPAN_SPAN_ID, WireType::Len) => id = r.len_delimited().ok()?.1.try_into().ok()?,
            (SPAN_PARENT_SPAN_ID, WireType::Len) => {
                parent = r.len_delimited().ok()?.1.try_into().unwrap_or([0; 8]);
            }
            (_, wire) => r.skip(wire).ok()?,
        }
    }
    Some((id, parent))
}

/// Where a span's `trace_state` field is, read without scanning anything else (for spans
/// whose bytes were rewritten after the scan).
pub fn trace_state_field(span: &[u8]) -> Result<Option<TraceStateField>, Malformed> {
    let mut r = Reader::new(span);
    let mut found = None;
    while !r.is_empty() {
        let field_start = r.pos();
        match r.tag()? {
            (SPAN_TRACE_STATE, WireType::Len) => {
                let (start, value) = r.len_delimited()?;
                found = Some(TraceStateField::new(
                    field_start,
                    start,
                    start + value.len(),
                ));
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(found)
}
