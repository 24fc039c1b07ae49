//! Facts some instrumentations write as JSON inside one string attribute: OpenInference's
//! `llm.invocation_parameters` (the request's model) and Langfuse's
//! `langfuse.observation.usage_details` / `cost_details`. Read only from spans that carry
//! those keys, and only when the plain attributes do not already say the same.

use serde::Deserialize;

/// `llm.invocation_parameters`: only the model matters here.
#[derive(Deserialize)]
struct Invocation {
    model: Option<String>,
}

/// The model named in an invocation-parameters JSON object, if any.
pub fn invocation_model(json: &[u8]) -> Option<String> {
    let model = serde_json::from_slice::<Invocation>(json).ok()?.model?;
    let model = model.trim();
    (!model.is_empty()).then(|| model.to_owned())
}

/// A JSON number that may arrive as an integer, a float or a numeric string.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(from = "serde_json::Value")]
struct Count(Option<f64>);

impl From<serde_json::Value> for Count {
    fn from(v: serde_json::Value) -> Self {
        Count(match v {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
    }
}

#[derive(Deserialize, Default)]
struct InputDetails {
    #[serde(default)]
    cached_tokens: Count,
}

#[derive(Deserialize, Default)]
struct OutputDetails {
    #[serde(default)]
    reasoning_tokens: Count,
}

/// The shapes `usage_details` takes: Langfuse's own usage types (`input`, `output`,
/// `input_cached_tokens`...), OpenAI's usage object (`prompt_tokens` with
/// `prompt_tokens_details`) and Anthropic's (`input_tokens` beside
/// `cache_read_input_tokens`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct UsageJson {
    input: Count,
    output: Count,
    total: Count,
    input_cached_tokens: Count,
    input_cache_read: Count,
    input_cache_creation: Count,
    input_cache_write: Count,
    output_reasoning_tokens: Count,
    output_reasoning: Count,
    prompt_tokens: Count,
    completion_tokens: Count,
    total_tokens: Count,
    prompt_tokens_details: Option<InputDetails>,
    completion_tokens_details: Option<OutputDetails>,
    input_tokens: Count,
    output_tokens: Count,
    input_tokens_details: Option<InputDetails>,
    output_tokens_details: Option<OutputDetails>,
    cache_read_input_tokens: Count,
    cache_creation_input_tokens: Count,
}

/// Token counts read from a usage JSON object, the input count including the cached tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JsonUsage {
    pub input: Option<f64>,
    pub output: Option<f64>,
    pub cache_read: Option<f64>,
    pub cache_write: Option<f64>,
    pub reasoning: Option<f64>,
}

fn first(counts: &[Count]) -> Option<f64> {
    counts.iter().find_map(|c| c.0)
}

/// The token counts of a `usage_details` object; `None` when it is not one.
pub fn usage(json: &[u8]) -> Option<JsonUsage> {
    // An object only (serde would also read a struct from an array).
    if json.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let u: UsageJson = serde_json::from_slice(json).ok()?;
    let cached = |d: &Option<InputDetails>| d.as_ref().map_or(Count(None), |d| d.cached_tokens);
    let reasoning =
        |d: &Option<OutputDetails>| d.as_ref().map_or(Count(None), |d| d.reasoning_tokens);
    let openai = u.prompt_tokens.0.is_some() || u.completion_tokens.0.is_some();
    let anthropic = u.input_tokens.0.is_some() || u.cache_read_input_tokens.0.is_some();
    let mut out = JsonUsage::default();
    if openai {
        // OpenAI's prompt tokens include the cached ones.
        out.input = u.prompt_tokens.0;
        out.output = u.completion_tokens.0;
        out.cache_read = cached(&u.prompt_tokens_details).0;
        out.reasoning = reasoning(&u.completion_tokens_details).0;
        if out.input.is_none() {
            out.input = u.total_tokens.0.map(|t| t - out.output.unwrap_or(0.0));
        }
        return Some(out);
    }
    if anthropic {
        // Anthropic's input tokens (and OpenAI's Responses API's, which include the
        // cached ones and say so in input_tokens_details).
        out.output = u.output_tokens.0;
        out.reasoning = reasoning(&u.output_tokens_details).0;
        let responses_cached = cached(&u.input_tokens_details).0;
        out.cache_read = first(&[u.cache_read_input_tokens, Count(responses_cached)]);
        out.cache_write = u.cache_creation_input_tokens.0;
        let extra = if responses_cached.is_some() {
            0.0
        } else {
            out.cache_read.unwrap_or(0.0) + out.cache_write.unwrap_or(0.0)
        };
        out.input = u.input_tokens.0.map(|i| i + extra);
        return Some(out);
    }
    // Langfuse's usage types add up to the total: the cached tokens are beside `input`.
    out.output = u.output.0;
    out.cache_read = first(&[u.input_cached_tokens, u.input_cache_read]);
    out.cache_write = first(&[u.input_cache_creation, u.input_cache_write]);
    out.reasoning = first(&[u.output_reasoning_tokens, u.output_reasoning]);
    let cached = out.cache_read.unwrap_or(0.0) + out.cache_write.unwrap_or(0.0);
    let output = out.output.unwrap_or(0.0);
    out.input = match (u.input.0, first(&[u.total, u.total_tokens])) {
        // A total equal to input + output says the input already includes the cache.
        (Some(i), Some(t)) if cached > 0.0 && (i + output - t).abs() < 0.5 => Some(i),
        (Some(i), _) => Some(i + cached),
        (None, Some(t)) => Some(t - output),
        (None, None) if cached > 0.0 => Some(cached),
        (None, None) => None,
    };
    (out != JsonUsage::default()).then_some(out)
}

/// The total of a `cost_details` object (USD): its `total`, else the sum of its parts.
pub fn cost(json: &[u8]) -> Option<f64> {
    let map: std::collections::HashMap<String, Count> = serde_json::from_slice(json).ok()?;
    if let Some(total) = map.get("total").and_then(|c| c.0) {
        return Some(total);
    }
    let parts: Vec<f64> = map.values().filter_map(|c| c.0).collect();
    (!parts.is_empty()).then(|| parts.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_parameters_name_the_model() {
        assert_eq!(
            invocation_model(br#"{"model": "gpt-4o-fails", "stream": true}"#).as_deref(),
            Some("gpt-4o-fails")
        );
        assert_eq!(invocation_model(br#"{"max_tokens": 256}"#), None);
        assert_eq!(invocation_model(br#"{"model": 7}"#), None);
        assert_eq!(invocation_model(b"not json"), None);
    }

    #[test]
    fn usage_in_each_shape_comes_out_with_input_including_the_cache() {
        // What langfuse.openai writes: OpenAI's usage object.
        let openai = usage(
            br#"{"completion_tokens": 300, "prompt_tokens": 1200, "total_tokens": 1500,
                "completion_tokens_details": {"audio_tokens": 0, "reasoning_tokens": 100},
                "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 1000}}"#,
        )
        .unwrap();
        assert_eq!(
            openai,
            JsonUsage {
                input: Some(1200.0),
                output: Some(300.0),
                cache_read: Some(1000.0),
                cache_write: None,
                reasoning: Some(100.0)
            }
        );
        // Anthropic's usage object: the cache beside the input.
        let anthropic = usage(
            br#"{"input_tokens": 200, "cache_read_input_tokens": 1000,
                "cache_creation_input_tokens": 500, "output_tokens": 300}"#,
        )
        .unwrap();
        assert_eq!(anthropic.input, Some(1700.0));
        assert_eq!(
            (anthropic.cache_read, anthropic.cache_write),
            (Some(1000.0), Some(500.0))
        );
        // OpenAI's Responses API: input_tokens includes the cached ones.
        let responses = usage(
            br#"{"input_tokens": 900, "input_tokens_details": {"cached_tokens": 800},
                "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 20}}"#,
        )
        .unwrap();
        assert_eq!(
            (responses.input, responses.cache_read, responses.reasoning),
            (Some(900.0), Some(800.0), Some(20.0))
        );
        // Langfuse's own usage types, which add up to the total.
        let own =
            usage(br#"{"input": 200, "input_cached_tokens": 1000, "output": 300, "total": 1500}"#)
                .unwrap();
        assert_eq!(own.input, Some(1200.0));
        let own_inclusive =
            usage(br#"{"input": 1200, "input_cached_tokens": 1000, "output": 300, "total": 1500}"#)
                .unwrap();
        assert_eq!(
            own_inclusive.input,
            Some(1200.0),
            "the total says it includes"
        );
        assert_eq!(
            usage(br#"{"input": "12", "output": 3}"#).unwrap().input,
            Some(12.0)
        );
        assert_eq!(usage(b"{}"), None);
        assert_eq!(usage(b"[1,2]"), None);
    }

    #[test]
    fn cost_is_the_total_else_the_sum() {
        assert_eq!(cost(br#"{"input": 0, "output": 0, "total": 0}"#), Some(0.0));
        assert_eq!(cost(br#"{"input": 0.25, "output": 0.5}"#), Some(0.75));
        assert_eq!(cost(br#"{}"#), None);
        assert_eq!(cost(b"nope"), None);
    }
}
