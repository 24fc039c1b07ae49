//! Privacy: before kept spans leave, prompt and completion content is dropped or replaced by
//! a hash, and chosen attributes have e-mail addresses and API keys masked. Only kept spans
//! pay for it, and only when configured; a span with nothing to change is not copied.

use globset::GlobSet;
use regex::Regex;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::wire::{Malformed, Reader, WireType, put_len_field};

const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_EVENTS: u32 = 11;
const EVENT_NAME: u32 = 2;
const EVENT_ATTRIBUTES: u32 = 3;
const KEY_VALUE_KEY: u32 = 1;
const KEY_VALUE_VALUE: u32 = 2;
const ANY_STRING: u32 = 1;

/// Attributes that carry prompt or completion content (globs).
pub const CONTENT_KEYS: &[&str] = &[
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.prompt*",
    "gen_ai.completion*",
    "llm.input_messages*",
    "llm.output_messages*",
    "llm.prompts*",
    "input.value",
    "output.value",
];

/// Events that carry prompt or completion content.
pub const CONTENT_EVENTS: &[&str] = &[
    "gen_ai.content.prompt",
    "gen_ai.content.completion",
    "gen_ai.system.message",
    "gen_ai.user.message",
    "gen_ai.assistant.message",
    "gen_ai.tool.message",
    "gen_ai.choice",
    "gen_ai.client.inference.operation.details",
];

const EMAIL: &str = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}";
const API_KEY: &str = r"\b(?:sk|pk|rk)-(?:ant-|proj-|live-|test-)?[A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|\bAIza[0-9A-Za-z_-]{35}|\bgh[pousr]_[A-Za-z0-9]{36}|\bxox[abpr]-[A-Za-z0-9-]{10,}";
/// What a masked match becomes.
const MASK: &str = "[REDACTED]";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentMode {
    /// Export content as it came.
    #[default]
    Keep,
    /// Remove content attributes and content events.
    Drop,
    /// Replace each content value by `sha256:` and its first 16 bytes in hex, so equal
    /// prompts can still be matched.
    Hash,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskConfig {
    /// Attribute keys whose string values are masked, as globs: `*` any run of characters
    /// (dots included), `?` one character, `[abc]` one of a set, `{a,b}` either.
    pub attributes: Vec<String>,
    /// `email`, `api_key`, or a regular expression.
    pub patterns: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    pub content: ContentMode,
    pub mask: MaskConfig,
}

impl PrivacyConfig {
    /// Every way the mask could silently mask nothing is an error here.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for (i, p) in self.mask.patterns.iter().enumerate() {
            let at = format!("mask.patterns[{i}]");
            match pattern(p) {
                Err(e) => problems.push((at, format!("not a valid regular expression: {e}"))),
                Ok(re) if re.is_match("") => problems.push((
                    at,
                    "matches the empty string, so it would mask between every character; \
                     it must match at least one character"
                        .into(),
                )),
                Ok(_) => {}
            }
        }
        for (i, g) in self.mask.attributes.iter().enumerate() {
            let at = format!("mask.attributes[{i}]");
            if let Err(e) = glob(g) {
                problems.push((at, format!("not a valid glob: {e}")));
            } else if g.trim().is_empty() {
                problems.push((at, "empty: it matches no attribute".into()));
            } else if let Some(c) = g.chars().find(|c| "^$\\()|+".contains(*c)) {
                problems.push((
                    at,
                    format!(
                        "{g:?} looks like a regular expression ({c:?}), which matches no attribute key; \
                         attributes take globs: `*` any run of characters, `?` one character"
                    ),
                ));
            }
        }
        match (self.mask.attributes.is_empty(), self.mask.patterns.is_empty()) {
            (false, true) => problems.push((
                "mask.patterns".into(),
                "empty while mask.attributes is set: nothing would be masked; add `email`, `api_key` or a regular expression".into(),
            )),
            (true, false) => problems.push((
                "mask.attributes".into(),
                "empty while mask.patterns is set: nothing would be masked; list the attribute keys (globs) to mask".into(),
            )),
            _ => {}
        }
        problems
    }

    pub fn is_active(&self) -> bool {
        self.content != ContentMode::Keep
            || (!self.mask.attributes.is_empty() && !self.mask.patterns.is_empty())
    }
}

fn pattern(p: &str) -> Result<Regex, regex::Error> {
    Regex::new(match p {
        "email" => EMAIL,
        "api_key" => API_KEY,
        other => other,
    })
}

fn glob(g: &str) -> Result<globset::Glob, globset::Error> {
    globset::GlobBuilder::new(g)
        .literal_separator(false)
        .build()
}

fn glob_set<'a>(globs: impl IntoIterator<Item = &'a str>) -> Result<GlobSet, globset::Error> {
    let mut set = globset::GlobSetBuilder::new();
    for g in globs {
        set.add(glob(g)?);
    }
    set.build()
}

pub struct Redactor {
    content: ContentMode,
    content_keys: GlobSet,
    mask_keys: GlobSet,
    masks: Vec<Regex>,
}

/// A redactor that cannot be built: a pattern or glob that `--validate` refuses.
#[derive(Debug, thiserror::Error)]
pub enum RedactorError {
    #[error(transparent)]
    Pattern(#[from] regex::Error),
    #[error(transparent)]
    Glob(#[from] globset::Error),
}

enum Change {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

impl Redactor {
    /// `None` when the config asks for nothing.
    pub fn new(cfg: &PrivacyConfig) -> Result<Option<Redactor>, RedactorError> {
        if !cfg.is_active() {
            return Ok(None);
        }
        Ok(Some(Redactor {
            content: cfg.content,
            content_keys: glob_set(CONTENT_KEYS.iter().copied())?,
            mask_keys: glob_set(cfg.mask.attributes.iter().map(String::as_str))?,
            masks: cfg
                .mask
                .patterns
                .iter()
                .map(|p| pattern(p))
                .collect::<Result<_, _>>()?,
        }))
    }

    /// The span with its content redacted, or `None` when nothing had to change.
    pub fn rewrite(&self, span: &[u8]) -> Result<Option<Vec<u8>>, Malformed> {
        self.rewrite_fields(span, SPAN_ATTRIBUTES, Some(SPAN_EVENTS))
    }

    /// Rewrites the KeyValue fields numbered `attrs` (and events numbered `events`) of a
    /// message, copying every other field verbatim.
    fn rewrite_fields(
        &self,
        msg: &[u8],
        attrs: u32,
        events: Option<u32>,
    ) -> Result<Option<Vec<u8>>, Malformed> {
        let mut r = Reader::new(msg);
        let mut out = Vec::with_capacity(msg.len());
        let mut changed = false;
        while !r.is_empty() {
            let start = r.pos();
            let (field, wire) = r.tag()?;
            if wire == WireType::Len && field == attrs {
                let kv = r.len_delimited()?.1;
                match self.key_value(kv)? {
                    Change::Keep => out.extend_from_slice(&msg[start..r.pos()]),
                    Change::Drop => changed = true,
                    Change::Replace(new) => {
                        put_len_field(&mut out, attrs, &new);
                        changed = true;
                    }
                }
            } else if wire == WireType::Len && Some(field) == events {
                let event = r.len_delimited()?.1;
                if self.content == ContentMode::Drop && is_content_event(event)? {
                    changed = true;
                } else if let Some(new) = self.rewrite_fields(event, EVENT_ATTRIBUTES, None)? {
                    put_len_field(&mut out, field, &new);
                    changed = true;
                } else {
                    out.extend_from_slice(&msg[start..r.pos()]);
                }
            } else {
                r.skip(wire)?;
                out.extend_from_slice(&msg[start..r.pos()]);
            }
        }
        Ok(changed.then_some(out))
    }

    fn key_value(&self, kv: &[u8]) -> Result<Change, Malformed> {
        let mut r = Reader::new(kv);
        let (mut key, mut value): (&[u8], &[u8]) = (&[], &[]);
        while !r.is_empty() {
            match r.tag()? {
                (KEY_VALUE_KEY, WireType::Len) => key = r.len_delimited()?.1,
                (KEY_VALUE_VALUE, WireType::Len) => value = r.len_delimited()?.1,
                (_, wire) => r.skip(wire)?,
            }
        }
        let key_str = String::from_utf8_lossy(key);
        if self.content != ContentMode::Keep && self.content_keys.is_match(key_str.as_ref()) {
            return Ok(match self.content {
                ContentMode::Drop => Change::Drop,
                _ => {
                    let digest = Sha256::digest(value);
                    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
                    Change::Replace(key_value(key, &format!("sha256:{hex}")))
                }
            });
        }
        if self.mask_keys.is_match(key_str.as_ref())
            && let Some(text) = string_value(value)?
        {
            let mut masked = text.to_owned();
            for re in &self.masks {
                masked = re.replace_all(&masked, MASK).into_owned();
            }
            if masked != text {
                return Ok(Change::Replace(key_value(key, &masked)));
            }
        }
        Ok(Change::Keep)
    }
}

fn is_content_event(event: &[u8]) -> Result<bool, Malformed> {
    let mut r = Reader::new(event);
    while !r.is_empty() {
        match r.tag()? {
            (EVENT_NAME, WireType::Len) => {
                let name = r.len_delimited()?.1;
                return Ok(CONTENT_EVENTS.iter().any(|e| e.as_bytes() == name));
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(false)
}

fn string_value(any: &[u8]) -> Result<Option<&str>, Malformed> {
    let mut r = Reader::new(any);
    let mut s = None;
    while !r.is_empty() {
        match r.tag()? {
            (ANY_STRING, WireType::Len) => s = std::str::from_utf8(r.len_delimited()?.1).ok(),
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(s)
}

/// An encoded `KeyValue` with a string value.
pub fn key_value(key: &[u8], value: &str) -> Vec<u8> {
    let mut any = Vec::with_capacity(value.len() + 4);
    put_len_field(&mut any, ANY_STRING, value.as_bytes());
    let mut kv = Vec::with_capacity(key.len() + any.len() + 8);
    put_len_field(&mut kv, KEY_VALUE_KEY, key);
    put_len_field(&mut kv, KEY_VALUE_VALUE, &any);
    kv
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    use opentelemetry_proto::tonic::trace::v1::Span;
    use opentelemetry_proto::tonic::trace::v1::span::Event;
    use prost::Message;

    use super::*;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    const PROMPT: &str = "My card is 4111 and my email is jane.doe@example.com, help";

    fn span() -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "chat".into(),
            attributes: vec![
                kv("gen_ai.request.model", "gpt-4o"),
                kv("gen_ai.input.messages", PROMPT),
                kv("gen_ai.prompt.0.content", PROMPT),
                kv("llm.output_messages.0.message.content", "Sure, Jane"),
                kv(
                    "http.request.header.authorization",
                    "Bearer sk-proj-abcdefghijklmnopqrstuvwx",
                ),
                kv("user.email", "jane.doe@example.com"),
            ],
            events: vec![
                Event {
                    name: "gen_ai.content.prompt".into(),
                    attributes: vec![kv("gen_ai.prompt", PROMPT)],
                    ..Default::default()
                },
                Event {
                    name: "exception".into(),
                    attributes: vec![kv("exception.message", "boom")],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn redactor(content: ContentMode) -> Redactor {
        Redactor::new(&PrivacyConfig {
            content,
            mask: MaskConfig {
                attributes: vec!["http.request.header.*".into(), "user.email".into()],
                patterns: vec!["email".into(), "api_key".into()],
            },
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn drop_leaves_no_prompt_text_in_the_bytes() {
        let bytes = span().encode_to_vec();
        let out = redactor(ContentMode::Drop)
            .rewrite(&bytes)
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.contains("4111") && !text.contains("jane.doe") && !text.contains("Sure, Jane"),
            "{text}"
        );
        assert!(!text.contains("sk-proj-abc"));
        let s = Span::decode(&out[..]).unwrap();
        let keys: Vec<&str> = s.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "gen_ai.request.model",
                "http.request.header.authorization",
                "user.email"
            ]
        );
        assert_eq!(s.events.len(), 1);
        assert_eq!(s.events[0].name, "exception");
        let value = |k: &str| match &s
            .attributes
            .iter()
            .find(|a| a.key == k)
            .unwrap()
            .value
            .as_ref()
            .unwrap()
            .value
        {
            Some(Value::StringValue(v)) => v.clone(),
            _ => panic!(),
        };
        assert_eq!(
            value("http.request.header.authorization"),
            "Bearer [REDACTED]"
        );
        assert_eq!(value("user.email"), "[REDACTED]");
        assert_eq!(
            (s.trace_id, s.span_id, s.name),
            (vec![1; 16], vec![2; 8], "chat".to_owned())
        );
    }

    #[test]
    fn hash_replaces_content_with_a_stable_digest() {
        let bytes = span().encode_to_vec();
        let r = redactor(ContentMode::Hash);
        let out = r.rewrite(&bytes).unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("4111"));
        let s = Span::decode(&out[..]).unwrap();
        let v = |i: usize| format!("{:?}", s.attributes[i].value);
        assert!(v(1).contains("sha256:"));
        assert_eq!(v(1), v(2), "equal prompts hash equally");
        assert_eq!(
            s.events.len(),
            2,
            "hash keeps events, hashing their content"
        );
        assert!(format!("{:?}", s.events[0].attributes[0].value).contains("sha256:"));
    }

    #[test]
    fn a_span_without_content_is_not_copied() {
        let clean = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            attributes: vec![
                kv("gen_ai.request.model", "gpt-4o"),
                kv("user.email", "nobody"),
            ],
            ..Default::default()
        };
        assert!(
            redactor(ContentMode::Drop)
                .rewrite(&clean.encode_to_vec())
                .unwrap()
                .is_none()
        );
        let off = PrivacyConfig::default();
        assert!(Redactor::new(&off).unwrap().is_none());
    }

    /// One span with these string attributes, masked by `globs` with the `email` pattern;
    /// returns the keys whose values were masked.
    fn masked_keys(globs: &[&str], keys: &[&str]) -> Vec<String> {
        let cfg = PrivacyConfig {
            content: ContentMode::Keep,
            mask: MaskConfig {
                attributes: globs.iter().map(|g| g.to_string()).collect(),
                patterns: vec!["email".into()],
            },
        };
        assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
        let span = Span {
            attributes: keys
                .iter()
                .map(|k| kv(k, "contact bob@example.org now"))
                .collect(),
            ..Default::default()
        };
        let out = Redactor::new(&cfg)
            .unwrap()
            .unwrap()
            .rewrite(&span.encode_to_vec())
            .unwrap()
            .unwrap_or_else(|| span.encode_to_vec());
        Span::decode(&out[..])
            .unwrap()
            .attributes
            .iter()
            .filter(|a| format!("{:?}", a.value).contains(MASK))
            .map(|a| a.key.clone())
            .collect()
    }

    #[test]
    fn every_documented_glob_form_masks() {
        let keys = [
            "note.text",
            "user.note.text",
            "user.email",
            "user.emails",
            "a.b",
            "textual",
        ];
        assert_eq!(
            masked_keys(&["*.text"], &keys),
            ["note.text", "user.note.text"],
            "leading *"
        );
        assert_eq!(
            masked_keys(&["user.*.text"], &keys),
            ["user.note.text"],
            "inner *"
        );
        assert_eq!(
            masked_keys(&["user.*"], &keys),
            ["user.note.text", "user.email", "user.emails"],
            "trailing *"
        );
        assert_eq!(masked_keys(&["user.email?"], &keys), ["user.emails"], "?");
        assert_eq!(
            masked_keys(&["{a.b,textual}"], &keys),
            ["a.b", "textual"],
            "alternatives"
        );
        assert_eq!(masked_keys(&["user.email"], &keys), ["user.email"], "exact");
    }

    #[test]
    fn a_mask_that_can_never_mask_is_refused() {
        let problems = |attributes: &[&str], patterns: &[&str]| {
            PrivacyConfig {
                content: ContentMode::Keep,
                mask: MaskConfig {
                    attributes: attributes.iter().map(|s| s.to_string()).collect(),
                    patterns: patterns.iter().map(|s| s.to_string()).collect(),
                },
            }
            .validate()
        };
        let said = |p: Vec<(String, String)>| format!("{p:?}");
        assert!(said(problems(&["user.*"], &[])).contains("mask.patterns"));
        assert!(said(problems(&[], &["email"])).contains("mask.attributes"));
        assert!(
            said(problems(&["^user\\..*$"], &["email"]))
                .contains("looks like a regular expression")
        );
        assert!(said(problems(&["user.[x"], &["email"])).contains("not a valid glob"));
        assert!(said(problems(&["user.*"], &["a*"])).contains("empty string"));
        assert!(problems(&["*.text", "user.*"], &["email", "api_key"]).is_empty());
    }
}
