//! `llm:` — pricing, anomalies, label bounds, roll-ups and privacy.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::PricingEntry;
use super::anomaly::AnomalyConfig;
use super::pricing::CostSource;
use crate::otlp::redact::PrivacyConfig;
use crate::units::Dur;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    pub pricing: Vec<PricingEntry>,
    /// A YAML list of pricing entries, re-read every `pricing_reload_interval`; its entries
    /// come before `pricing`'s.
    pub pricing_file: Option<PathBuf>,
    pub pricing_reload_interval: Dur,
    /// Where a call's cost comes from: `auto`, `attribute` or `pricing` (see [`CostSource`]).
    pub cost_source: CostSource,
    pub anomaly: AnomalyConfig,
    pub labels: LabelLimits,
    /// Append the trace's LLM totals and the keeping policy to the root span on export.
    pub trace_rollup: bool,
    pub privacy: PrivacyConfig,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            pricing: Vec::new(),
            pricing_file: None,
            pricing_reload_interval: Dur(Duration::from_secs(30)),
            cost_source: CostSource::default(),
            anomaly: AnomalyConfig::default(),
            labels: LabelLimits::default(),
            trace_rollup: true,
            privacy: PrivacyConfig::default(),
        }
    }
}

/// Bounds on label values taken from span data.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelLimits {
    /// Distinct services with their own label (first seen); later ones are `other`.
    pub max_services: usize,
    /// Distinct models (and providers, operations) with their own label.
    pub max_models: usize,
    /// Users with their own label: the top K by cost.
    pub top_users: usize,
    /// Sessions with their own label: the top K by cost.
    pub top_sessions: usize,
    /// (service, model) pairs with their own series, first seen; later pairs are counted
    /// under (other, other). Bounds the per-call metrics as a whole, whatever the product
    /// of services and models.
    pub max_service_models: usize,
    /// Label sets of the GenAI semantic-convention metrics (operation, provider, request
    /// and response model, error type), first seen; later sets are all `other`.
    pub max_genai_label_sets: usize,
}

impl Default for LabelLimits {
    fn default() -> Self {
        LabelLimits {
            max_services: 200,
            max_models: 200,
            top_users: 100,
            top_sessions: 100,
            max_service_models: 1000,
            max_genai_label_sets: 200,
        }
    }
}

impl LlmConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = self
            .pricing
            .iter()
            .enumerate()
            .flat_map(|(i, e)| {
                e.validate()
                    .into_iter()
                    .map(move |msg| (format!("pricing[{i}]"), msg))
            })
            .collect();
        if let Some(file) = &self.pricing_file {
            let pricing = crate::llm::Pricing::default();
            if let Err(e) = pricing.load_file(file) {
                p.push(("pricing_file".into(), e.message));
            }
        }
        p.extend(
            self.anomaly
                .validate()
                .into_iter()
                .map(|(k, m)| (format!("anomaly.{k}"), m)),
        );
        p.extend(
            self.privacy
                .validate()
                .into_iter()
                .map(|(k, m)| (format!("privacy.{k}"), m)),
        );
        p
    }
}
