//! Conditions of `condition` and `drop` policies: tests on a trace's spans, resources,
//! scopes and totals, combined with `all` / `any` / `not`.
//!
//! Span-level tests (span attributes, resource attributes, scope, name, kind, status, model)
//! are evaluated once per span at ingest, from what the scanner read in its one pass: each
//! is a bit, and a trace carries the OR of its spans' bits. Trace-level tests (duration,
//! span count, LLM totals) and the combinators are evaluated at the decision.

use std::sync::Arc;

use serde::Deserialize;

use crate::otlp::scan::{
    Classifier, EXTRA_SLOTS, Scalar, SpanFacts, resource_attribute, scan_span, scope_name,
};
use crate::sampling::TraceSummary;

/// Span-level tests across all policies (one bit each in a trace's summary).
pub const MAX_SPAN_TESTS: usize = 64;
/// Distinct span attribute keys all conditions may name (the scanner's extra slots).
pub const MAX_ATTRIBUTE_KEYS: usize = EXTRA_SLOTS.end - EXTRA_SLOTS.start;

/// A literal a condition compares with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// One node of a condition, as written. Exactly one of `all`, `any`, `not`, `attribute`,
/// `resource_attribute` and `field`; a test (the last three) takes exactly one operator.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    pub all: Option<Vec<ConditionConfig>>,
    pub any: Option<Vec<ConditionConfig>>,
    pub not: Option<Box<ConditionConfig>>,
    /// A span attribute's key.
    pub attribute: Option<String>,
    /// A resource attribute's key.
    pub resource_attribute: Option<String>,
    /// `span_name`, `kind`, `status`, `scope`, `model`, `duration_ms`, `span_count`,
    /// `llm_cost_usd`, `llm_tokens` or `llm_calls`.
    pub field: Option<String>,
    /// Span-level tests: only the root span counts.
    #[serde(default)]
    pub root: bool,
    pub equals: Option<Literal>,
    pub one_of: Option<Vec<Literal>>,
    pub regex: Option<String>,
    pub exists: Option<bool>,
    pub gt: Option<f64>,
    pub gte: Option<f64>,
    pub lt: Option<f64>,
    pub lte: Option<f64>,
}

/// Span fields a test reads.
#[derive(Debug, Clone, PartialEq)]
enum SpanField {
    /// Scanner slot of the key.
    Attribute(usize),
    Resource(Vec<u8>),
    Name,
    Kind,
    Status,
    Scope,
    Model,
}

/// Trace fields a test reads at the decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TraceField {
    DurationMs,
    SpanCount,
    CostUsd,
    Tokens,
    Calls,
}

#[derive(Debug, Clone)]
enum Op {
    Equals(Literal),
    OneOf(Vec<Literal>),
    Regex(regex::bytes::Regex),
    Exists(bool),
    Cmp(std::cmp::Ordering, bool, f64),
}

#[derive(Debug, Clone)]
struct SpanTest {
    field: SpanField,
    root: bool,
    op: Op,
}

/// A compiled condition.
#[derive(Debug, Clone)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    /// Bit of a span-level test.
    Span(u32),
    Trace(TraceField, OpNum),
}

/// A numeric operator on a trace field.
#[derive(Debug, Clone, Copy)]
pub struct OpNum {
    ord: std::cmp::Ordering,
    or_equal: bool,
    value: f64,
    equals: bool,
}

const KINDS: [&str; 6] = [
    "unspecified",
    "internal",
    "server",
    "client",
    "producer",
    "consumer",
];
const STATUSES: [&str; 3] = ["unset", "ok", "error"];

impl Condition {
    /// Whether a trace matches: its spans' test bits and its summary.
    pub fn matches(&self, s: &TraceSummary) -> bool {
        match self {
            Condition::All(c) => c.iter().all(|c| c.matches(s)),
            Condition::Any(c) => c.iter().any(|c| c.matches(s)),
            Condition::Not(c) => !c.matches(s),
            Condition::Span(bit) => s.matched & (1 << bit) != 0,
            Condition::Trace(field, op) => {
                let v = match field {
                    TraceField::DurationMs => s.duration_ms(),
                    TraceField::SpanCount => s.spans as f64,
                    TraceField::CostUsd => s.cost_usd,
                    TraceField::Tokens => s.input_tokens.saturating_add(s.output_tokens) as f64,
                    TraceField::Calls => s.calls as f64,
                };
                if op.equals {
                    return v == op.value;
                }
                match v.partial_cmp(&op.value) {
                    Some(o) => o == op.ord || (op.or_equal && o == std::cmp::Ordering::Equal),
                    None => false,
                }
            }
        }
    }
}

/// One part of a dynamic policy's key: a span value, or the trace's status.
#[derive(Debug, Clone, PartialEq)]
enum KeyPart {
    Span { field: SpanField, root: bool },
    Status,
}

/// A trace's dynamic-sampling key parts, as its spans supply them.
pub type KeyValues = Box<[Option<Arc<str>>]>;

/// Every condition's span-level tests, which ingest evaluates per span (and the dynamic
/// policy's key parts, read from the same scan).
#[derive(Debug, Default)]
pub struct SpanTests {
    tests: Vec<SpanTest>,
    key: Vec<KeyPart>,
    /// Span attribute keys, by scanner slot (`EXTRA_SLOTS.start + i`).
    keys: Vec<Vec<u8>>,
    /// Whether any test reads a resource or the scope (evaluated once per origin).
    has_origin_tests: bool,
    /// Tells test sets apart: a trace whose spans were tested under another set (a reload
    /// meanwhile) is tested again at its decision.
    generation: u64,
}

/// A classifier with the keys conditions name added.
pub struct Keys<'a, C>(&'a SpanTests, C);

impl<C: Classifier> Classifier for Keys<'_, C> {
    fn classify(&self, key: &[u8]) -> Option<(usize, u8)> {
        self.1.classify(key)
    }

    fn extra(&self, key: &[u8]) -> Option<usize> {
        self.0
            .keys
            .iter()
            .position(|k| k == key)
            .map(|i| EXTRA_SLOTS.start + i)
    }
}

impl SpanTests {
    pub fn is_empty(&self) -> bool {
        self.tests.is_empty()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a dynamic policy needs key values from spans.
    pub fn has_key(&self) -> bool {
        self.key.iter().any(|k| matches!(k, KeyPart::Span { .. }))
    }

    /// The key parts one span supplies (`None` when it supplies none). Resource and scope
    /// values are read from `resource` and `scope`; `intern` makes the shared strings.
    pub fn key_values(
        &self,
        span: &[u8],
        facts: &SpanFacts,
        (resource, scope): (&[u8], &[u8]),
        model: Option<&str>,
        mut intern: impl FnMut(&str) -> Arc<str>,
    ) -> Option<KeyValues> {
        let mut out: Option<Vec<Option<Arc<str>>>> = None;
        for (i, part) in self.key.iter().enumerate() {
            let KeyPart::Span { field, root } = part else {
                continue;
            };
            if *root && !facts.is_root {
                continue;
            }
            let v = match field {
                SpanField::Attribute(slot) => facts.attrs.get(*slot).map(|v| v.scalar(span)),
                SpanField::Resource(key) => resource_attribute(resource, key).ok().flatten(),
                SpanField::Scope => scope_name(scope).ok().flatten().map(Scalar::Str),
                SpanField::Name => Some(Scalar::Str(
                    &span[facts.name.start as usize..facts.name.end as usize],
                )),
                SpanField::Kind => KINDS
                    .get(facts.kind as usize)
                    .map(|k| Scalar::Str(k.as_bytes())),
                SpanField::Status => None,
                SpanField::Model => model.map(|m| Scalar::Str(m.as_bytes())),
            };
            if let Some(v) = v {
                let text = render(v);
                if !text.is_empty() {
                    out.get_or_insert_with(|| vec![None; self.key.len()])[i] = Some(intern(&text));
                }
            }
        }
        out.map(Vec::into_boxed_slice)
    }

    /// A trace's key: its parts' values joined with `|` (`-` for a part no span supplied).
    pub fn key(&self, values: Option<&KeyValues>, has_error: bool) -> String {
        let mut key = String::new();
        for (i, part) in self.key.iter().enumerate() {
            if i > 0 {
                key.push('|');
            }
            match part {
                KeyPart::Status => key.push_str(if has_error { "error" } else { "ok" }),
                KeyPart::Span { .. } => {
                    match values.and_then(|v| v.get(i)).and_then(|v| v.as_deref()) {
                        Some(v) => key.push_str(v),
                        None => key.push('-'),
                    }
                }
            }
        }
        key
    }

    /// `base` (ingest's: the LLM conventions) with the keys the conditions name.
    pub fn keys<C: Classifier>(&self, base: C) -> Keys<'_, C> {
        Keys(self, base)
    }

    /// Bits of the tests on a resource and scope, for all spans of one `ScopeSpans`
    /// (root-only ones are kept apart: `(any span, root only)`).
    pub fn origin_bits(&self, resource: &[u8], scope: &[u8]) -> (u64, u64) {
        let (mut any, mut root) = (0u64, 0u64);
        if !self.has_origin_tests {
            return (0, 0);
        }
        for (i, t) in self.tests.iter().enumerate() {
            let hit = match &t.field {
                SpanField::Resource(key) => {
                    let v = resource_attribute(resource, key).ok().flatten();
                    test(&t.op, v)
                }
                SpanField::Scope => {
                    let v = scope_name(scope).ok().flatten().map(Scalar::Str);
                    test(&t.op, v)
                }
                _ => false,
            };
            if hit {
                if t.root {
                    root |= 1 << i;
                } else {
                    any |= 1 << i;
                }
            }
        }
        (any, root)
    }

    /// Bits of the tests one span passes; `origin` is [`SpanTests::origin_bits`] of its
    /// resource and scope, `model` its LLM call's model if it is one.
    pub fn span_bits(
        &self,
        span: &[u8],
        facts: &SpanFacts,
        origin: (u64, u64),
        model: Option<&str>,
    ) -> u64 {
        let mut bits = origin.0 | if facts.is_root { origin.1 } else { 0 };
        for (i, t) in self.tests.iter().enumerate() {
            if t.root && !facts.is_root {
                continue;
            }
            let v = match &t.field {
                SpanField::Attribute(slot) => facts.attrs.get(*slot).map(|v| v.scalar(span)),
                SpanField::Name => Some(Scalar::Str(
                    &span[facts.name.start as usize..facts.name.end as usize],
                )),
                SpanField::Kind => Some(Scalar::Str(
                    KINDS.get(facts.kind as usize).unwrap_or(&"").as_bytes(),
                )),
                SpanField::Status => Some(Scalar::Str(
                    STATUSES
                        .get(facts.status_code as usize)
                        .unwrap_or(&"")
                        .as_bytes(),
                )),
                SpanField::Model => model.map(|m| Scalar::Str(m.as_bytes())),
                SpanField::Resource(_) | SpanField::Scope => continue,
            };
            if test(&t.op, v) {
                bits |= 1 << i;
            }
        }
        bits
    }
}

impl SpanTests {
    /// The bits of a trace's held spans, tested again (its spans arrived under another
    /// set of tests: a reload); `base` and `model` as ingest's classifier and model.
    pub fn retest<C: Classifier + Copy>(
        &self,
        spans: &[crate::otlp::reframe::HeldSpan],
        base: C,
        mut model: impl FnMut(&[u8], &SpanFacts) -> Option<Arc<str>>,
    ) -> u64 {
        let mut bits = 0;
        for held in spans {
            let Ok(facts) = scan_span(held.bytes(), &self.keys(base)) else {
                continue;
            };
            let origin = self.origin_bits(&held.origin.resource, &held.origin.scope);
            let model = model(held.bytes(), &facts);
            bits |= self.span_bits(held.bytes(), &facts, origin, model.as_deref());
        }
        bits
    }
}

fn number(v: Scalar<'_>) -> Option<f64> {
    match v {
        Scalar::Int(i) => Some(i as f64),
        Scalar::Double(d) => Some(d),
        Scalar::Str(s) => std::str::from_utf8(s).ok()?.trim().parse().ok(),
        Scalar::Bool(_) => None,
    }
}

fn equals(v: Scalar<'_>, lit: &Literal) -> bool {
    match (v, lit) {
        (Scalar::Str(s), Literal::Str(l)) => s == l.as_bytes(),
        (Scalar::Bool(b), Literal::Bool(l)) => b == *l,
        (Scalar::Str(s), Literal::Bool(l)) => s == if *l { &b"true"[..] } else { b"false" },
        (v, Literal::Int(l)) => number(v) == Some(*l as f64),
        (v, Literal::Float(l)) => number(v) == Some(*l),
        // A number compared with a string literal: by the literal's number.
        (v, Literal::Str(l)) => l
            .trim()
            .parse::<f64>()
            .ok()
            .is_some_and(|l| number(v) == Some(l)),
        (Scalar::Int(_) | Scalar::Double(_), Literal::Bool(_)) => false,
    }
}

fn test(op: &Op, v: Option<Scalar<'_>>) -> bool {
    match (op, v) {
        (Op::Exists(want), v) => v.is_some() == *want,
        (_, None) => false,
        (Op::Equals(l), Some(v)) => equals(v, l),
        (Op::OneOf(ls), Some(v)) => ls.iter().any(|l| equals(v, l)),
        (Op::Regex(re), Some(Scalar::Str(s))) => re.is_match(s),
        (Op::Regex(re), Some(v)) => re.is_match(render(v).as_bytes()),
        (Op::Cmp(ord, or_equal, x), Some(v)) => number(v)
            .and_then(|n| n.partial_cmp(x))
            .is_some_and(|o| o == *ord || (*or_equal && o == std::cmp::Ordering::Equal)),
    }
}

fn render(v: Scalar<'_>) -> String {
    match v {
        Scalar::Str(s) => String::from_utf8_lossy(s).into_owned(),
        Scalar::Int(i) => i.to_string(),
        Scalar::Double(d) => d.to_string(),
        Scalar::Bool(b) => b.to_string(),
    }
}

/// The keys of `keys` that are set.
fn present<'a>(keys: &[(&'a str, bool)]) -> Vec<&'a str> {
    keys.iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| *k)
        .collect()
}

/// "needs exactly one of …; got …".
fn exactly_one(what: &str, got: &[&str], choices: &str) -> String {
    let got = if got.is_empty() {
        "none".to_owned()
    } else {
        got.join(", ")
    };
    format!("{what}needs exactly one of {choices}; got {got}")
}

/// Builds the span-level tests and compiled conditions of a policy list.
#[derive(Default)]
pub struct Compiler {
    tests: SpanTests,
}

const SPAN_FIELDS: [&str; 5] = ["span_name", "kind", "status", "scope", "model"];
const TRACE_FIELDS: [&str; 5] = [
    "duration_ms",
    "span_count",
    "llm_cost_usd",
    "llm_tokens",
    "llm_calls",
];

impl Compiler {
    /// Compiles a dynamic policy's key; problems as (key path below `key`, message).
    pub fn compile_key(
        &mut self,
        parts: &[crate::sampling::dynamic::KeyPartConfig],
    ) -> Result<(), Vec<(String, String)>> {
        let mut problems = Vec::new();
        if parts.is_empty() {
            problems.push(("key".to_owned(), "must list at least one part".to_owned()));
        }
        for (i, p) in parts.iter().enumerate() {
            let at = |k: &str| format!("key[{i}].{k}");
            let set = present(&[
                ("attribute", p.attribute.is_some()),
                ("resource_attribute", p.resource_attribute.is_some()),
                ("field", p.field.is_some()),
            ]);
            if set.len() != 1 {
                problems.push((
                    format!("key[{i}]"),
                    exactly_one("", &set, "attribute, resource_attribute, field"),
                ));
                continue;
            }
            let field = if let Some(key) = &p.attribute {
                match self.slot(key) {
                    Ok(slot) => SpanField::Attribute(slot),
                    Err(message) => {
                        problems.push((at("attribute"), message));
                        continue;
                    }
                }
            } else if let Some(key) = &p.resource_attribute {
                SpanField::Resource(key.as_bytes().to_vec())
            } else {
                match p.field.as_deref().unwrap_or_default() {
                    "span_name" => SpanField::Name,
                    "kind" => SpanField::Kind,
                    "scope" => SpanField::Scope,
                    "model" => SpanField::Model,
                    "status" => {
                        if p.root {
                            problems.push((
                                at("root"),
                                "does not apply to status (the trace's)".to_owned(),
                            ));
                        }
                        self.tests.key.push(KeyPart::Status);
                        continue;
                    }
                    other => {
                        problems.push((
                            at("field"),
                            format!("unknown key field {other:?}; one of span_name, kind, scope, model, status"),
                        ));
                        continue;
                    }
                }
            };
            self.tests.key.push(KeyPart::Span {
                field,
                root: p.root,
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The scanner slot of a span attribute key (a new one if there is room).
    fn slot(&mut self, key: &str) -> Result<usize, String> {
        let i = match self.tests.keys.iter().position(|k| k == key.as_bytes()) {
            Some(i) => i,
            None if self.tests.keys.len() < MAX_ATTRIBUTE_KEYS => {
                self.tests.keys.push(key.as_bytes().to_vec());
                self.tests.keys.len() - 1
            }
            None => {
                return Err(format!(
                    "conditions and keys may name at most {MAX_ATTRIBUTE_KEYS} distinct span attribute keys"
                ));
            }
        };
        Ok(EXTRA_SLOTS.start + i)
    }

    /// Compiles one condition; problems as (key path below it, message).
    pub fn compile(&mut self, c: &ConditionConfig) -> Result<Condition, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let out = self.node(c, "", &mut problems);
        match out {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(problems),
        }
    }

    pub fn finish(mut self) -> Arc<SpanTests> {
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.tests.generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(self.tests)
    }

    fn node(
        &mut self,
        c: &ConditionConfig,
        path: &str,
        problems: &mut Vec<(String, String)>,
    ) -> Option<Condition> {
        let at = |key: &str| {
            if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            }
        };
        let here = || {
            if path.is_empty() {
                "condition".to_owned()
            } else {
                path.to_owned()
            }
        };
        let set = present(&[
            ("all", c.all.is_some()),
            ("any", c.any.is_some()),
            ("not", c.not.is_some()),
            ("attribute", c.attribute.is_some()),
            ("resource_attribute", c.resource_attribute.is_some()),
            ("field", c.field.is_some()),
        ]);
        if set.len() != 1 {
            problems.push((
                here(),
                exactly_one(
                    "",
                    &set,
                    "all, any, not, attribute, resource_attribute, field",
                ),
            ));
            return None;
        }
        let op_keys = present(&[
            ("equals", c.equals.is_some()),
            ("one_of", c.one_of.is_some()),
            ("regex", c.regex.is_some()),
            ("exists", c.exists.is_some()),
            ("gt", c.gt.is_some()),
            ("gte", c.gte.is_some()),
            ("lt", c.lt.is_some()),
            ("lte", c.lte.is_some()),
        ]);
        let list = |items: &Vec<ConditionConfig>,
                    key: &str,
                    this: &mut Compiler,
                    problems: &mut Vec<(String, String)>| {
            if items.is_empty() {
                problems.push((at(key), "must list at least one condition".into()));
            }
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if let Some(n) = this.node(item, &format!("{}[{i}]", at(key)), problems) {
                    out.push(n);
                }
            }
            out
        };
        if set[0] == "all" || set[0] == "any" || set[0] == "not" {
            if let Some(op) = op_keys.first() {
                problems.push((at(op), format!("does not apply to `{}`", set[0])));
            }
            if c.root {
                problems.push((at("root"), format!("does not apply to `{}`", set[0])));
            }
        }
        match set[0] {
            "all" => return Some(Condition::All(list(c.all.as_ref()?, "all", self, problems))),
            "any" => return Some(Condition::Any(list(c.any.as_ref()?, "any", self, problems))),
            "not" => {
                let inner = self.node(c.not.as_ref()?, &at("not"), problems)?;
                return Some(Condition::Not(Box::new(inner)));
            }
            _ => {}
        }
        if op_keys.len() != 1 {
            problems.push((
                here(),
                exactly_one(
                    "a test ",
                    &op_keys,
                    "equals, one_of, regex, exists, gt, gte, lt, lte",
                ),
            ));
            return None;
        }
        let op = match op_keys[0] {
            "equals" => Op::Equals(c.equals.clone()?),
            "one_of" => {
                let v = c.one_of.clone()?;
                if v.is_empty() {
                    problems.push((at("one_of"), "must list at least one value".into()));
                }
                Op::OneOf(v)
            }
            "regex" => match regex::bytes::Regex::new(c.regex.as_ref()?) {
                Ok(re) => Op::Regex(re),
                Err(e) => {
                    problems.push((at("regex"), format!("not a valid regular expression: {e}")));
                    return None;
                }
            },
            "exists" => Op::Exists(c.exists?),
            key => {
                let v = [c.gt, c.gte, c.lt, c.lte].into_iter().flatten().next()?;
                if !v.is_finite() {
                    problems.push((at(key), format!("must be a finite number, got {v}")));
                }
                let ord = if key.starts_with('g') {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Less
                };
                Op::Cmp(ord, key.ends_with('e'), v)
            }
        };
        let field = match set[0] {
            "attribute" => {
                let key = c.attribute.as_ref()?;
                if key.is_empty() {
                    problems.push((at("attribute"), "must not be empty".into()));
                }
                match self.slot(key) {
                    Ok(slot) => SpanField::Attribute(slot),
                    Err(message) => {
                        problems.push((at("attribute"), message));
                        return None;
                    }
                }
            }
            "resource_attribute" => {
                self.tests.has_origin_tests = true;
                SpanField::Resource(c.resource_attribute.as_ref()?.as_bytes().to_vec())
            }
            _ => {
                let name = c.field.as_deref()?;
                match name {
                    "span_name" => SpanField::Name,
                    "kind" => SpanField::Kind,
                    "status" => SpanField::Status,
                    "model" => SpanField::Model,
                    "scope" => {
                        self.tests.has_origin_tests = true;
                        SpanField::Scope
                    }
                    _ => {
                        let field = match name {
                            "duration_ms" => TraceField::DurationMs,
                            "span_count" => TraceField::SpanCount,
                            "llm_cost_usd" => TraceField::CostUsd,
                            "llm_tokens" => TraceField::Tokens,
                            "llm_calls" => TraceField::Calls,
                            other => {
                                problems.push((
                                    at("field"),
                                    format!(
                                        "unknown field {other:?}; one of {}, {}",
                                        SPAN_FIELDS.join(", "),
                                        TRACE_FIELDS.join(", ")
                                    ),
                                ));
                                return None;
                            }
                        };
                        if c.root {
                            problems.push((
                                at("root"),
                                format!("does not apply to the trace field {name}"),
                            ));
                        }
                        let op = match op {
                            Op::Cmp(ord, or_equal, value) => OpNum {
                                ord,
                                or_equal,
                                value,
                                equals: false,
                            },
                            Op::Equals(Literal::Int(v)) => OpNum {
                                ord: std::cmp::Ordering::Equal,
                                or_equal: true,
                                value: v as f64,
                                equals: true,
                            },
                            Op::Equals(Literal::Float(v)) => OpNum {
                                ord: std::cmp::Ordering::Equal,
                                or_equal: true,
                                value: v,
                                equals: true,
                            },
                            _ => {
                                problems.push((
                                    at(op_keys[0]),
                                    format!(
                                        "the trace field {name} takes a number with equals, gt, gte, lt or lte"
                                    ),
                                ));
                                return None;
                            }
                        };
                        return Some(Condition::Trace(field, op));
                    }
                }
            }
        };
        if let (SpanField::Kind | SpanField::Status, Op::Equals(l)) = (&field, &op) {
            let allowed: &[&str] = if field == SpanField::Kind {
                &KINDS
            } else {
                &STATUSES
            };
            if !matches!(l, Literal::Str(s) if allowed.contains(&s.as_str())) {
                problems.push((
                    at("equals"),
                    format!("must be one of {}", allowed.join(", ")),
                ));
            }
        }
        if self.tests.tests.len() == MAX_SPAN_TESTS {
            problems.push((
                if path.is_empty() {
                    "condition".into()
                } else {
                    path.to_owned()
                },
                format!("conditions may hold at most {MAX_SPAN_TESTS} span-level tests in all"),
            ));
            return None;
        }
        self.tests.tests.push(SpanTest {
            field,
            root: c.root,
            op,
        });
        Some(Condition::Span((self.tests.tests.len() - 1) as u32))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use opentelemetry_proto::tonic::common::v1::{
        AnyValue, InstrumentationScope, KeyValue, any_value,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{Span, Status, span::SpanKind};
    use prost::Message;

    use super::*;
    use crate::config::Config;
    use crate::otlp::TraceId;
    use crate::sampling::adaptive::BaseRate;
    use crate::sampling::{DecidedBy, Sampler};

    fn kv(key: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    fn text(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.into())
    }

    fn encoded(
        name: &str,
        root: bool,
        attrs: Vec<KeyValue>,
        kind: SpanKind,
        status: i32,
    ) -> Vec<u8> {
        Span {
            trace_id: vec![7; 16],
            span_id: vec![if root { 1 } else { 2 }; 8],
            parent_span_id: if root { vec![] } else { vec![1; 8] },
            name: name.into(),
            kind: kind as i32,
            attributes: attrs,
            status: Some(Status {
                code: status,
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn sampler_of(policies: &str) -> Sampler {
        let cfg = Config::parse(&format!(
            "exporter:\n  file:\n    path: x\nsampling:\n  base_rate: 0\n  policies:\n{policies}"
        ))
        .unwrap();
        Sampler::new(&cfg.sampling, Arc::new(BaseRate::new(0.0)))
    }

    /// A trace summary of these spans (all under one resource and scope), as ingest
    /// builds it.
    fn summary(s: &Sampler, spans: &[Vec<u8>], resource: &[u8], scope: &[u8]) -> TraceSummary {
        let tests = s.span_tests();
        let mut sum = TraceSummary::default();
        let origin = tests.origin_bits(resource, scope);
        for span in spans {
            let facts = scan_span(span, &tests.keys(crate::llm::Conventions)).unwrap();
            sum.add_span((facts.start_ns, facts.end_ns), facts.is_error(), None, None);
            sum.matched |= tests.span_bits(span, &facts, origin, None);
        }
        sum
    }

    fn resource(service: &str, tier: &str) -> Vec<u8> {
        Resource {
            attributes: vec![
                kv("service.name", text(service)),
                kv("deployment.tier", text(tier)),
            ],
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn scope(name: &str) -> Vec<u8> {
        InstrumentationScope {
            name: name.into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    const POLICIES: &str = "    - name: health
      type: drop
      condition:
        any:
          - {field: span_name, root: true, regex: '^GET /(healthz|ready)'}
          - {resource_attribute: deployment.tier, equals: synthetic}
    - {name: errors, type: error}
    - name: gold
      type: condition
      condition:
        all:
          - {attribute: customer.tier, one_of: [gold, platinum]}
          - not: {attribute: internal.test, equals: true}
    - name: big
      type: condition
      rate: 0.5
      condition: {field: span_count, gte: 3}
    - name: http-errors
      type: condition
      condition: {attribute: http.response.status_code, gte: 500}
    - name: client-calls
      type: condition
      condition: {all: [{field: kind, equals: client}, {field: scope, regex: '^opentelemetry\\.instrumentation\\.'}]}
";

    #[test]
    fn conditions_match_on_any_span_and_drop_wins() {
        let s = sampler_of(POLICIES);
        let id = TraceId([0; 16]); // R = 0: kept only at p = 1
        let now = Instant::now();
        let res = resource("shop", "prod");
        let sc = scope("app");
        let root = encoded("POST /checkout", true, vec![], SpanKind::Server, 0);
        // A non-root span names the customer tier.
        let child = encoded(
            "charge",
            false,
            vec![kv("customer.tier", text("gold"))],
            SpanKind::Internal,
            0,
        );
        let d = s.decide(
            &id,
            &summary(&s, &[root.clone(), child.clone()], &res, &sc),
            now,
        );
        assert_eq!((d.keep, d.by), (true, DecidedBy::Policy("gold")));
        // Flagged as a test: `not` excludes it.
        let test_child = encoded(
            "charge",
            false,
            vec![
                kv("customer.tier", text("gold")),
                kv("internal.test", any_value::Value::BoolValue(true)),
            ],
            SpanKind::Internal,
            0,
        );
        let d = s.decide(
            &id,
            &summary(&s, &[root.clone(), test_child], &res, &sc),
            now,
        );
        assert_eq!(d.by, DecidedBy::BaseRate);
        // A health check with an error: dropped, the drop policy wins.
        let health = encoded("GET /healthz", true, vec![], SpanKind::Server, 2);
        let d = s.decide(
            &id,
            &summary(&s, &[health.clone(), child.clone()], &res, &sc),
            now,
        );
        assert_eq!((d.keep, d.by), (false, DecidedBy::Policy("health")));
        // The health check's name on a non-root span does not match a root-only test.
        let inner_health = encoded("GET /healthz", false, vec![], SpanKind::Client, 2);
        let d = s.decide(
            &id,
            &summary(&s, &[root.clone(), inner_health], &res, &sc),
            now,
        );
        assert_eq!(d.by, DecidedBy::Policy("errors"));
        // A synthetic probe's resource.
        let d = s.decide(
            &id,
            &summary(
                &s,
                &[root.clone(), child.clone()],
                &resource("shop", "synthetic"),
                &sc,
            ),
            now,
        );
        assert_eq!((d.keep, d.by), (false, DecidedBy::Policy("health")));
        // Numbers: an int attribute compared with gte; span count at rate 0.5.
        let http = encoded(
            "GET",
            false,
            vec![kv(
                "http.response.status_code",
                any_value::Value::IntValue(503),
            )],
            SpanKind::Client,
            0,
        );
        let d = s.decide(&id, &summary(&s, &[root.clone(), http], &res, &sc), now);
        assert_eq!(d.by, DecidedBy::Policy("http-errors"));
        let three = [root.clone(), root.clone(), root.clone()];
        let d = s.decide(&id, &summary(&s, &three, &res, &sc), now);
        assert_eq!((d.keep, d.by), (false, DecidedBy::Policy("big")));
        let mut high_r = [0xffu8; 16];
        high_r[0] = 0;
        assert!(
            s.decide(&TraceId(high_r), &summary(&s, &three, &res, &sc), now)
                .keep
        );
        // Kind and scope.
        let client = encoded("call", false, vec![], SpanKind::Client, 0);
        let otel = scope("opentelemetry.instrumentation.requests");
        let d = s.decide(
            &id,
            &summary(&s, &[root.clone(), client.clone()], &res, &otel),
            now,
        );
        assert_eq!(d.by, DecidedBy::Policy("client-calls"));
        let d = s.decide(&id, &summary(&s, &[root, client], &res, &sc), now);
        assert_eq!(d.by, DecidedBy::BaseRate);
    }

    #[test]
    fn held_spans_are_tested_again_under_new_conditions() {
        let old = sampler_of(
            "    - {name: a, type: condition, condition: {attribute: x, exists: true}}\n",
        );
        let new =
            sampler_of("    - {name: b, type: condition, condition: {attribute: y, equals: 1}}\n");
        assert_ne!(old.span_tests().generation(), new.span_tests().generation());
        let span = encoded(
            "s",
            true,
            vec![kv("y", any_value::Value::IntValue(1))],
            SpanKind::Internal,
            0,
        );
        let held = crate::otlp::reframe::HeldSpan::lone(bytes::Bytes::from(span), None, true);
        let no_model = |_: &[u8], _: &SpanFacts| None;
        let conventions = crate::llm::Conventions;
        let old_bits = old
            .span_tests()
            .retest(std::slice::from_ref(&held), conventions, no_model);
        assert_eq!(old_bits, 0);
        assert_eq!(new.span_tests().retest(&[held], conventions, no_model), 1);
    }

    #[test]
    fn mistakes_are_reported_at_their_key() {
        let text = "exporter:\n  file: {path: x}\nsampling:\n  policies:
    - name: a
      type: condition
      condition:
        any:
          - {attribute: k, regex: '(unclosed'}
          - {field: colour, equals: red}
          - {attribute: k, equals: 1, gt: 2}
    - name: b
      type: drop
      rate: 0.5
      condition: {field: span_count, root: true, gt: 1}
    - {name: c, type: condition}
    - {name: d, type: error, condition: {attribute: k, exists: true}}
    - {name: e, type: condition, condition: {field: kind, equals: sever}}
";
        let errs = Config::parse(text).unwrap_err().0;
        let found: Vec<(String, Option<usize>)> =
            errs.iter().map(|p| (p.path.clone(), p.line)).collect();
        for (path, line) in [
            ("sampling.policies[0].condition.any[0].regex", 9),
            ("sampling.policies[0].condition.any[1].field", 10),
            ("sampling.policies[0].condition.any[2]", 11),
            ("sampling.policies[1].rate", 14),
            ("sampling.policies[1].condition.root", 15),
            ("sampling.policies[2].condition", 16),
            ("sampling.policies[3].condition", 17),
            ("sampling.policies[4].condition.equals", 18),
        ] {
            assert!(
                found.contains(&(path.to_owned(), Some(line))),
                "{path} at line {line} missing from {found:?}"
            );
        }
        let regex = errs.iter().find(|p| p.path.ends_with("regex")).unwrap();
        assert!(
            regex.message.contains("regular expression"),
            "{}",
            regex.message
        );
    }

    #[test]
    fn a_string_literal_compares_with_numbers_and_booleans_as_written() {
        let lit = |y: &str| serde_yaml_ng::from_str::<Literal>(y).unwrap();
        assert!(equals(Scalar::Int(200), &lit("200")));
        assert!(equals(Scalar::Int(200), &lit("'200'")));
        assert!(equals(Scalar::Double(0.5), &lit("0.5")));
        assert!(equals(Scalar::Str(b"true"), &lit("true")));
        assert!(equals(Scalar::Bool(true), &lit("true")));
        assert!(!equals(Scalar::Str(b"gold"), &lit("Gold")));
        assert!(!equals(Scalar::Int(1), &lit("true")));
        assert!(test(&Op::Exists(false), None));
        assert!(!test(
            &Op::Cmp(std::cmp::Ordering::Greater, false, 1.0),
            Some(Scalar::Str(b"abc"))
        ));
    }
}
