//! The pricing model: USD per million tokens for input, output, cache reads and writes, with
//! long-context tiers; a built-in table, the config's entries and a pricing file that is
//! re-read while running.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::Deserialize;

use super::quirks::ZeroCost;

/// Rates of one tier, USD per million tokens. A missing cache rate bills those tokens at
/// the input rate.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rates {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    #[serde(default)]
    pub cache_read_per_mtok: Option<f64>,
    #[serde(default)]
    pub cache_write_per_mtok: Option<f64>,
}

/// A higher tier that applies to the whole call once its prompt exceeds a size.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContext {
    /// The tier applies when the prompt (input tokens, cached ones included) is larger.
    pub above_input_tokens: u64,
    #[serde(flatten)]
    pub rates: Rates,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub rates: Rates,
    pub long_context: Option<LongContext>,
}

/// The tokens of one call. Per the OpenTelemetry GenAI conventions `input` includes the
/// cached tokens; an instrumentation that reports them separately (input smaller than the
/// cache tokens) is recognised and billed accordingly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl Price {
    /// Cached input tokens are billed once, at the cache price; the rest of the input at the
    /// input price; reasoning tokens are part of the output.
    pub fn cost(&self, u: &Usage) -> f64 {
        let cached = u.cache_read + u.cache_write;
        let (uncached, prompt) = if u.input >= cached {
            (u.input - cached, u.input)
        } else {
            (u.input, u.input + cached)
        };
        let r = match self.long_context {
            Some(lc) if prompt > lc.above_input_tokens => lc.rates,
            _ => self.rates,
        };
        (uncached as f64 * r.input_per_mtok
            + u.cache_read as f64 * r.cache_read_per_mtok.unwrap_or(r.input_per_mtok)
            + u.cache_write as f64 * r.cache_write_per_mtok.unwrap_or(r.input_per_mtok)
            + u.output as f64 * r.output_per_mtok)
            / 1e6
    }
}

const fn rates(input: f64, output: f64, cache_read: f64, cache_write: f64) -> Rates {
    Rates {
        input_per_mtok: input,
        output_per_mtok: output,
        cache_read_per_mtok: if cache_read < 0.0 {
            None
        } else {
            Some(cache_read)
        },
        cache_write_per_mtok: if cache_write < 0.0 {
            None
        } else {
            Some(cache_write)
        },
    }
}

const fn tier(above: u64, r: Rates) -> Option<LongContext> {
    Some(LongContext {
        above_input_tokens: above,
        rates: r,
    })
}

/// No separate cache price (billed at the input rate).
const NONE: f64 = -1.0;
const ANTHROPIC: &str = "anthropic.com/pricing, read 2025-11-01";
const OPENAI: &str = "openai.com/api/pricing, read 2025-11-01";
const GOOGLE: &str = "ai.google.dev/gemini-api/docs/pricing, read 2025-11-01";
const MISTRAL: &str = "mistral.ai/pricing, read 2025-11-01";
const DEEPSEEK: &str = "api-docs.deepseek.com/quick_start/pricing, read 2025-11-01 (V3.2)";
const META: &str = "together.ai/pricing (Meta Llama, serverless), read 2025-11-01";

/// One built-in price: the model id it covers (and that id's dated or versioned forms).
pub struct Builtin {
    pub id: &'static str,
    pub price: Price,
    pub source: &'static str,
}

const fn b(
    id: &'static str,
    r: Rates,
    long_context: Option<LongContext>,
    source: &'static str,
) -> Builtin {
    Builtin {
        id,
        price: Price {
            rates: r,
            long_context,
        },
        source,
    }
}

/// Standard-tier prices, USD per million tokens: (input, output, cache read, cache write).
#[rustfmt::skip]
/// Anthropic's cache write is the 5-minute write; OpenAI, Google and DeepSeek bill no cache
/// write.
pub const BUILTIN: &[Builtin] = &[
    b("claude-opus-4-5", rates(5.0, 25.0, 0.50, 6.25), None, ANTHROPIC),
    b("claude-opus-4-1", rates(15.0, 75.0, 1.50, 18.75), None, ANTHROPIC),
    b("claude-opus-4", rates(15.0, 75.0, 1.50, 18.75), None, ANTHROPIC),
    b("claude-sonnet-4-5", rates(3.0, 15.0, 0.30, 3.75), tier(200_000, rates(6.0, 22.50, 0.60, 7.50)), ANTHROPIC),
    b("claude-sonnet-4", rates(3.0, 15.0, 0.30, 3.75), tier(200_000, rates(6.0, 22.50, 0.60, 7.50)), ANTHROPIC),
    b("claude-haiku-4-5", rates(1.0, 5.0, 0.10, 1.25), None, ANTHROPIC),
    b("claude-3-7-sonnet", rates(3.0, 15.0, 0.30, 3.75), None, ANTHROPIC),
    b("claude-3-5-sonnet", rates(3.0, 15.0, 0.30, 3.75), None, ANTHROPIC),
    b("claude-3-5-haiku", rates(0.80, 4.0, 0.08, 1.0), None, ANTHROPIC),
    b("claude-3-opus", rates(15.0, 75.0, 1.50, 18.75), None, ANTHROPIC),
    b("claude-3-haiku", rates(0.25, 1.25, 0.03, 0.30), None, ANTHROPIC),
    b("gpt-5", rates(1.25, 10.0, 0.125, NONE), None, OPENAI),
    b("gpt-5-mini", rates(0.25, 2.0, 0.025, NONE), None, OPENAI),
    b("gpt-5-nano", rates(0.05, 0.40, 0.005, NONE), None, OPENAI),
    b("gpt-4.1", rates(2.0, 8.0, 0.50, NONE), None, OPENAI),
    b("gpt-4.1-mini", rates(0.40, 1.60, 0.10, NONE), None, OPENAI),
    b("gpt-4.1-nano", rates(0.10, 0.40, 0.025, NONE), None, OPENAI),
    b("gpt-4o", rates(2.50, 10.0, 1.25, NONE), None, OPENAI),
    b("gpt-4o-mini", rates(0.15, 0.60, 0.075, NONE), None, OPENAI),
    b("o1", rates(15.0, 60.0, 7.50, NONE), None, OPENAI),
    b("o3", rates(2.0, 8.0, 0.50, NONE), None, OPENAI),
    b("o3-mini", rates(1.10, 4.40, 0.55, NONE), None, OPENAI),
    b("o4-mini", rates(1.10, 4.40, 0.275, NONE), None, OPENAI),
    b("gpt-4-turbo", rates(10.0, 30.0, NONE, NONE), None, OPENAI),
    b("gpt-3.5-turbo", rates(0.50, 1.50, NONE, NONE), None, OPENAI),
    b("gemini-2.5-pro", rates(1.25, 10.0, 0.125, NONE), tier(200_000, rates(2.50, 15.0, 0.25, NONE)), GOOGLE),
    b("gemini-2.5-flash", rates(0.30, 2.50, 0.03, NONE), None, GOOGLE),
    b("gemini-2.5-flash-lite", rates(0.10, 0.40, 0.01, NONE), None, GOOGLE),
    b("gemini-2.0-flash", rates(0.10, 0.40, 0.025, NONE), None, GOOGLE),
    b("gemini-2.0-flash-lite", rates(0.075, 0.30, NONE, NONE), None, GOOGLE),
    b("gemini-1.5-pro", rates(1.25, 5.0, NONE, NONE), tier(128_000, rates(2.50, 10.0, NONE, NONE)), GOOGLE),
    b("mistral-large", rates(2.0, 6.0, NONE, NONE), None, MISTRAL),
    b("mistral-medium", rates(0.40, 2.0, NONE, NONE), None, MISTRAL),
    b("mistral-small", rates(0.10, 0.30, NONE, NONE), None, MISTRAL),
    b("codestral", rates(0.30, 0.90, NONE, NONE), None, MISTRAL),
    b("ministral-8b", rates(0.10, 0.10, NONE, NONE), None, MISTRAL),
    b("deepseek-chat", rates(0.28, 0.42, 0.028, NONE), None, DEEPSEEK),
    b("deepseek-reasoner", rates(0.28, 0.42, 0.028, NONE), None, DEEPSEEK),
    b("llama-4-maverick", rates(0.27, 0.85, NONE, NONE), None, META),
    b("llama-4-scout", rates(0.18, 0.59, NONE, NONE), None, META),
    b("llama-3.3-70b", rates(0.88, 0.88, NONE, NONE), None, META),
    b("llama-3.1-405b", rates(3.50, 3.50, NONE, NONE), None, META),
    b("llama-3.1-70b", rates(0.88, 0.88, NONE, NONE), None, META),
    b("llama-3.1-8b", rates(0.18, 0.18, NONE, NONE), None, META),
];

/// Suffix words that name a variant of the same model at the same price.
const SAME_PRICE_SUFFIXES: &[&str] = &[
    "latest",
    "instruct",
    "preview",
    "exp",
    "versatile",
    "instant",
];
/// Bedrock cross-region inference-profile prefixes.
const BEDROCK_REGIONS: &[&str] = &["us.", "eu.", "apac.", "global.", "us-gov."];
/// Bedrock model-vendor prefixes.
const BEDROCK_VENDORS: &[&str] = &[
    "anthropic.",
    "meta.",
    "mistral.",
    "deepseek.",
    "openai.",
    "google.",
];

/// Reduces a model id as instrumentations report it to the form the table uses:
/// lower case, no provider or path prefix (`openai/`, `publishers/google/models/`), no
/// Bedrock region, vendor or version (`us.anthropic.…-v2:0`), no Vertex `@date`.
pub fn normalize(model: &str) -> String {
    let mut m = model.trim().to_ascii_lowercase();
    if let Some(i) = m.rfind('/') {
        m = m[i + 1..].to_owned();
    }
    for region in BEDROCK_REGIONS {
        if let Some(rest) = m.strip_prefix(region)
            && BEDROCK_VENDORS.iter().any(|v| rest.starts_with(v))
        {
            m = rest.to_owned();
        }
    }
    for vendor in BEDROCK_VENDORS {
        if let Some(rest) = m.strip_prefix(vendor) {
            m = rest.to_owned();
        }
    }
    if let Some(i) = m.find([':', '@']) {
        m.truncate(i);
    }
    // Bedrock spells Llama versions `llama3-1-70b`; the table, `llama-3.1-70b`.
    if let Some(rest) = m.strip_prefix("llama")
        && let Some(major) = rest.chars().next().filter(char::is_ascii_digit)
    {
        let after = &rest[1..];
        m = match after.strip_prefix('-').and_then(|r| r.split_once('-')) {
            Some((minor, tail))
                if minor.len() == 1 && minor.chars().all(|c| c.is_ascii_digit()) =>
            {
                format!("llama-{major}.{minor}-{tail}")
            }
            _ => format!("llama-{major}{after}"),
        };
    }
    // Bedrock and Vertex version suffix: `-v1`, `-v2`.
    if let Some(i) = m.rfind("-v")
        && m[i + 2..].chars().all(|c| c.is_ascii_digit())
        && i + 2 < m.len()
    {
        m.truncate(i);
    }
    m
}

/// `model` (normalized) is `id`, or `id` plus a dated, numbered or same-price suffix.
fn is_version_of(model: &str, id: &str) -> bool {
    let Some(rest) = model.strip_prefix(id) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix('-') else {
        return rest.is_empty();
    };
    rest.starts_with(|c: char| c.is_ascii_digit())
        || SAME_PRICE_SUFFIXES
            .iter()
            .any(|s| rest == *s || rest.starts_with(&format!("{s}-")))
}

/// Glob match where `*` matches any (possibly empty) run of characters.
fn glob_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// One `llm.pricing` entry (also the format of the pricing file).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingEntry {
    /// Glob (`*` = any run) matched case-insensitively against the model id as reported
    /// and against its normalized form.
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(flatten)]
    pub rates: Rates,
    #[serde(default)]
    pub long_context: Option<LongContext>,
}

impl PricingEntry {
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.pattern.trim().is_empty() {
            problems.push("match: must not be empty".to_owned());
        }
        let mut check = |key: &str, v: Option<f64>| {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                problems.push(format!("{key}: must be a number ≥ 0, got {v}"));
            }
        };
        for (prefix, r) in std::iter::once(("", &self.rates)).chain(
            self.long_context
                .iter()
                .map(|lc| ("long_context.", &lc.rates)),
        ) {
            check(&format!("{prefix}input_per_mtok"), Some(r.input_per_mtok));
            check(&format!("{prefix}output_per_mtok"), Some(r.output_per_mtok));
            check(
                &format!("{prefix}cache_read_per_mtok"),
                r.cache_read_per_mtok,
            );
            check(
                &format!("{prefix}cache_write_per_mtok"),
                r.cache_write_per_mtok,
            );
        }
        problems
    }

    fn price(&self) -> Price {
        Price {
            rates: self.rates,
            long_context: self.long_context,
        }
    }
}

/// Where a price came from.
#[derive(Debug, Clone, PartialEq)]
pub enum PriceSource {
    File {
        path: PathBuf,
        pattern: String,
    },
    Config {
        pattern: String,
    },
    Builtin {
        id: &'static str,
        source: &'static str,
    },
}

impl std::fmt::Display for PriceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PriceSource::File { path, pattern } => write!(f, "{pattern:?} from {}", path.display()),
            PriceSource::Config { pattern } => write!(f, "{pattern:?} from llm.pricing"),
            PriceSource::Builtin { id, source } => write!(f, "{id} (built-in: {source})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PriceMatch {
    pub price: Price,
    pub source: PriceSource,
}

/// Distinct model ids whose lookup is remembered; past it the memo starts over.
const MEMO_CAPACITY: usize = 4096;

/// Where a call's cost comes from (`llm.cost_source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CostSource {
    /// The span's cost attribute, else the price table; but a cost attribute of 0 on a
    /// call whose tokens the table prices is taken as "unknown", not as free (OpenLIT, for
    /// one, writes 0 for models its own table lacks).
    #[default]
    Auto,
    /// The span's cost attribute whenever there is one (0 included), else the table.
    Attribute,
    /// The price table only; cost attributes are ignored.
    Pricing,
}

/// Where a call's cost came from (`llmtail pricing` says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostFrom {
    /// The span's cost attribute.
    Attribute,
    /// The price table, on the call's tokens (no cost attribute, or `cost_source: pricing`).
    PriceTable,
    /// The price table, because the cost attribute was 0 on tokens it prices.
    PriceTableOverZero,
    /// Neither: no attribute and no price.
    Unpriced,
}

impl CostFrom {
    pub fn describe(self) -> &'static str {
        match self {
            CostFrom::Attribute => "the span's cost attribute",
            CostFrom::PriceTable => "the price table, on the call's tokens",
            CostFrom::PriceTableOverZero => {
                "the price table: the span's cost attribute of 0 is taken as unknown, not \
                 free (llm.cost_source: auto; the library writes 0 for models it cannot price)"
            }
            CostFrom::Unpriced => "unknown: no cost attribute and no price for the model",
        }
    }
}

/// A call's cost and where it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallCost {
    pub usd: Option<f64>,
    pub from: CostFrom,
}

/// The pricing table: the pricing file's entries, then the config's (first match wins),
/// then the built-in table (the longest matching id wins).
#[derive(Debug, Default)]
pub struct Pricing {
    /// `llm.cost_source`, changed live by a reload.
    cost_source: RwLock<CostSource>,
    config: RwLock<Vec<PricingEntry>>,
    file: RwLock<Option<(PathBuf, Vec<PricingEntry>)>>,
    /// Lookups by the model id as reported, so each distinct id is matched once.
    memo: RwLock<HashMap<Arc<str>, Option<Price>>>,
}

/// A pricing file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("pricing file {path}: {message}")]
pub struct PricingFileError {
    pub path: String,
    pub message: String,
}

impl Pricing {
    pub fn new(config: &[PricingEntry]) -> Self {
        Pricing {
            config: RwLock::new(config.to_vec()),
            ..Default::default()
        }
    }

    pub fn cost_source(&self) -> CostSource {
        *self.cost_source.read()
    }

    pub fn set_cost_source(&self, source: CostSource) {
        *self.cost_source.write() = source;
    }

    /// The cost of a call: from its cost attribute or the price of its tokens, as
    /// `llm.cost_source` says; `None` when neither is known.
    pub fn call_cost(
        &self,
        model: &Arc<str>,
        usage: &Usage,
        attribute: Option<f64>,
    ) -> Option<f64> {
        self.explain_cost(model, usage, attribute, ZeroCost::Unknown)
            .usd
    }

    /// The cost of a call and where it came from. `zero` says what a cost attribute of 0
    /// means for the library that wrote it (its row in `llm::quirks`).
    pub fn explain_cost(
        &self,
        model: &Arc<str>,
        usage: &Usage,
        attribute: Option<f64>,
        zero: ZeroCost,
    ) -> CallCost {
        let priced = || {
            self.price(model).map(|p| CallCost {
                usd: Some(p.cost(usage)),
                from: CostFrom::PriceTable,
            })
        };
        let unpriced = CallCost {
            usd: None,
            from: CostFrom::Unpriced,
        };
        let attr = |usd| CallCost {
            usd: Some(usd),
            from: CostFrom::Attribute,
        };
        match (self.cost_source(), attribute) {
            (CostSource::Pricing, _) | (_, None) => priced().unwrap_or(unpriced),
            (CostSource::Attribute, Some(cost)) => attr(cost),
            (CostSource::Auto, Some(cost)) if cost == 0.0 && zero == ZeroCost::Unknown => {
                match priced() {
                    Some(p) if p.usd.is_some_and(|usd| usd > 0.0) => CallCost {
                        from: CostFrom::PriceTableOverZero,
                        ..p
                    },
                    _ => attr(cost),
                }
            }
            (CostSource::Auto, Some(cost)) => attr(cost),
        }
    }

    /// Replaces the `llm.pricing` entries (config reload); lookups start afresh.
    pub fn set_config(&self, config: &[PricingEntry]) {
        *self.config.write() = config.to_vec();
        self.memo.write().clear();
    }

    /// Reads (or re-reads) the pricing file: a YAML list of `llm.pricing` entries. On an
    /// error the previous file's entries stay in force.
    pub fn load_file(&self, path: &Path) -> Result<usize, PricingFileError> {
        let err = |message: String| PricingFileError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let entries: Vec<PricingEntry> =
            serde_yaml_ng::from_str(&text).map_err(|e| err(e.to_string()))?;
        let problems: Vec<String> = entries.iter().flat_map(|e| e.validate()).collect();
        if !problems.is_empty() {
            return Err(err(problems.join("; ")));
        }
        let n = entries.len();
        *self.file.write() = Some((path.to_owned(), entries));
        self.memo.write().clear();
        Ok(n)
    }

    /// The price of `model`, remembered per distinct id.
    pub fn price(&self, model: &Arc<str>) -> Option<Price> {
        if let Some(p) = self.memo.read().get(model) {
            return *p;
        }
        let p = self.lookup(model).map(|m| m.price);
        let mut memo = self.memo.write();
        if memo.len() >= MEMO_CAPACITY {
            memo.clear();
        }
        memo.insert(model.clone(), p);
        p
    }

    /// Finds the price of `model` and says where it came from.
    pub fn lookup(&self, model: &str) -> Option<PriceMatch> {
        let raw = model.trim().to_ascii_lowercase();
        let normal = normalize(model);
        let matches = |e: &PricingEntry| {
            let pattern = e.pattern.to_ascii_lowercase();
            glob_match(&pattern, &raw) || glob_match(&pattern, &normal)
        };
        if let Some((path, entries)) = &*self.file.read()
            && let Some(e) = entries.iter().find(|e| matches(e))
        {
            return Some(PriceMatch {
                price: e.price(),
                source: PriceSource::File {
                    path: path.clone(),
                    pattern: e.pattern.clone(),
                },
            });
        }
        if let Some(e) = self.config.read().iter().find(|e| matches(e)) {
            return Some(PriceMatch {
                price: e.price(),
                source: PriceSource::Config {
                    pattern: e.pattern.clone(),
                },
            });
        }
        BUILTIN
            .iter()
            .filter(|b| is_version_of(&normal, b.id))
            .max_by_key(|b| b.id.len())
            .map(|b| PriceMatch {
                price: b.price,
                source: PriceSource::Builtin {
                    id: b.id,
                    source: b.source,
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(model: &str) -> Option<&'static str> {
        match Pricing::default().lookup(model)?.source {
            PriceSource::Builtin { id, .. } => Some(id),
            _ => None,
        }
    }

    #[test]
    fn dated_ids_prefixes_and_cloud_ids_match() {
        let cases = [
            ("claude-3-5-sonnet-20241022", Some("claude-3-5-sonnet")),
            (
                "anthropic.claude-3-5-sonnet-20241022-v2:0",
                Some("claude-3-5-sonnet"),
            ),
            (
                "us.anthropic.claude-sonnet-4-20250514-v1:0",
                Some("claude-sonnet-4"),
            ),
            ("claude-3-5-sonnet-v2@20241022", Some("claude-3-5-sonnet")),
            (
                "publishers/google/models/gemini-2.5-pro",
                Some("gemini-2.5-pro"),
            ),
            (
                "projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash-001",
                Some("gemini-2.5-flash"),
            ),
            ("gemini-2.5-pro-preview-06-05", Some("gemini-2.5-pro")),
            ("gemini-2.5-flash-lite", Some("gemini-2.5-flash-lite")),
            ("openai/gpt-4o", Some("gpt-4o")),
            ("gpt-4o-2024-08-06", Some("gpt-4o")),
            ("gpt-4o-mini-2024-07-18", Some("gpt-4o-mini")),
            ("claude-sonnet-4-5-20250929", Some("claude-sonnet-4-5")),
            ("claude-opus-4-1-20250805", Some("claude-opus-4-1")),
            ("mistral-large-latest", Some("mistral-large")),
            ("mistral-large-2411", Some("mistral-large")),
            (
                "meta-llama/Llama-3.3-70B-Instruct-Turbo",
                Some("llama-3.3-70b"),
            ),
            ("meta.llama3-1-70b-instruct-v1:0", Some("llama-3.1-70b")),
            ("us.meta.llama3-3-70b-instruct-v1:0", Some("llama-3.3-70b")),
            (
                "llama-4-maverick-17b-128e-instruct-fp8",
                Some("llama-4-maverick"),
            ),
            ("deepseek-chat", Some("deepseek-chat")),
            ("gpt-4o-audio-preview", None),
            ("o3-pro", None),
            ("my-fine-tune", None),
        ];
        for (model, want) in cases {
            assert_eq!(builtin(model), want, "{model}");
        }
    }

    #[test]
    fn cached_tokens_are_billed_once_at_the_cache_price() {
        let p = Pricing::default()
            .lookup("claude-3-5-sonnet")
            .unwrap()
            .price;
        // GenAI semantics: 10,000 input tokens of which 8,000 cache reads, 1,000 cache writes.
        let inclusive = Usage {
            input: 10_000,
            output: 1_000,
            cache_read: 8_000,
            cache_write: 1_000,
        };
        let want = (1_000.0 * 3.0 + 8_000.0 * 0.30 + 1_000.0 * 3.75 + 1_000.0 * 15.0) / 1e6;
        assert!(
            (p.cost(&inclusive) - want).abs() < 1e-12,
            "{}",
            p.cost(&inclusive)
        );
        // Anthropic's own reporting: input excludes cache tokens. Same call, same cost.
        let exclusive = Usage {
            input: 1_000,
            ..inclusive
        };
        assert!((p.cost(&exclusive) - want).abs() < 1e-12);
        // Without cache tokens: plain input price.
        let plain = Usage {
            input: 10_000,
            output: 0,
            ..Default::default()
        };
        assert!((p.cost(&plain) - 0.03).abs() < 1e-12);
    }

    #[test]
    fn long_context_tier_applies_above_its_threshold() {
        let p = Pricing::default()
            .lookup("claude-sonnet-4-20250514")
            .unwrap()
            .price;
        let small = Usage {
            input: 200_000,
            output: 1_000,
            ..Default::default()
        };
        let large = Usage {
            input: 200_001,
            output: 1_000,
            ..Default::default()
        };
        assert!((p.cost(&small) - (200_000.0 * 3.0 + 1_000.0 * 15.0) / 1e6).abs() < 1e-9);
        assert!((p.cost(&large) - (200_001.0 * 6.0 + 1_000.0 * 22.5) / 1e6).abs() < 1e-9);
        let g = Pricing::default().lookup("gemini-2.5-pro").unwrap().price;
        let big = Usage {
            input: 300_000,
            output: 10_000,
            cache_read: 100_000,
            cache_write: 0,
        };
        let want = (200_000.0 * 2.5 + 100_000.0 * 0.25 + 10_000.0 * 15.0) / 1e6;
        assert!((g.cost(&big) - want).abs() < 1e-9);
    }

    #[test]
    fn file_then_config_then_builtin() {
        let config = [PricingEntry {
            pattern: "gpt-4o*".into(),
            rates: rates(1.0, 1.0, NONE, NONE),
            long_context: None,
        }];
        let pricing = Pricing::new(&config);
        assert!(matches!(
            pricing.lookup("gpt-4o").unwrap().source,
            PriceSource::Config { .. }
        ));
        assert!(matches!(
            pricing.lookup("claude-3-haiku").unwrap().source,
            PriceSource::Builtin { .. }
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prices.yaml");
        std::fs::write(
            &file,
            "- {match: \"gpt-4o\", input_per_mtok: 9, output_per_mtok: 9}\n",
        )
        .unwrap();
        let model: Arc<str> = Arc::from("gpt-4o");
        assert_eq!(pricing.price(&model).unwrap().rates.input_per_mtok, 1.0);
        assert_eq!(pricing.load_file(&file).unwrap(), 1);
        assert_eq!(
            pricing.price(&model).unwrap().rates.input_per_mtok,
            9.0,
            "reload clears the memo"
        );
        std::fs::write(
            &file,
            "- {match: \"\", input_per_mtok: -1, output_per_mtok: 9}\n",
        )
        .unwrap();
        assert!(pricing.load_file(&file).is_err());
        assert_eq!(
            pricing.price(&model).unwrap().rates.input_per_mtok,
            9.0,
            "a bad file keeps the last good one"
        );
    }

    #[test]
    fn glob() {
        assert!(glob_match("a*", "abc"));
        assert!(glob_match("*c", "abc"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXcYb"));
        assert!(glob_match("abc", "abc"));
        assert!(!glob_match("abc", "abcd"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    #[test]
    fn a_zero_cost_attribute_on_priceable_tokens_is_not_taken_as_free() {
        let pricing = Pricing::default();
        let gpt: Arc<str> = Arc::from("gpt-4o");
        let unknown: Arc<str> = Arc::from("in-house-model-7");
        let usage = Usage {
            input: 1_000_000,
            output: 0,
            cache_read: 0,
            cache_write: 0,
        };
        // auto (the default): a 0 the table can price is replaced by the price.
        assert_eq!(pricing.call_cost(&gpt, &usage, Some(0.0)), Some(2.5));
        assert_eq!(
            pricing.call_cost(&unknown, &usage, Some(0.0)),
            Some(0.0),
            "nothing better known"
        );
        assert_eq!(
            pricing.call_cost(&gpt, &usage, Some(0.7)),
            Some(0.7),
            "a real figure is kept"
        );
        assert_eq!(pricing.call_cost(&gpt, &usage, None), Some(2.5));
        assert_eq!(pricing.call_cost(&unknown, &usage, None), None, "unpriced");
        pricing.set_cost_source(CostSource::Attribute);
        assert_eq!(pricing.call_cost(&gpt, &usage, Some(0.0)), Some(0.0));
        assert_eq!(pricing.call_cost(&gpt, &usage, None), Some(2.5));
        pricing.set_cost_source(CostSource::Pricing);
        assert_eq!(pricing.call_cost(&gpt, &usage, Some(0.7)), Some(2.5));
        assert_eq!(pricing.call_cost(&unknown, &usage, Some(0.7)), None);
    }
}
