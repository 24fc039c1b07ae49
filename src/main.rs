//! `llmtail`: command line, logging, and the exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llmtail::app::{self as daemon, Ended};
use llmtail::config::Config;
use llmtail::llm::{Pricing, Usage};

/// Tail-sampling OTLP trace processor that understands LLM calls.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Path of the YAML config file.
    #[arg(long, default_value = "config.yaml", global = true)]
    config: PathBuf,
    /// Check the config file, print every problem, and exit (0 valid, 2 invalid).
    #[arg(long)]
    validate: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Replay OTLP/JSON traces (one ExportTraceServiceRequest per line, as the file exporter
    /// writes them, or one document) through the config's sampling rules and print, per
    /// trace, the decision and the policy that made it. Every trace is decided as complete.
    Explain {
        /// The OTLP/JSON file.
        file: PathBuf,
        /// One JSON object per trace instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the price entry a model id matches (with the config's pricing, if the config
    /// file exists) and the cost of a call.
    Pricing {
        /// Model id as instrumentations report it, e.g. anthropic.claude-3-5-sonnet-20241022-v2:0
        model: String,
        #[arg(long, default_value_t = 0)]
        input: u64,
        #[arg(long, default_value_t = 0)]
        output: u64,
        #[arg(long, default_value_t = 0)]
        cache_read: u64,
        #[arg(long, default_value_t = 0)]
        cache_write: u64,
        /// The call's cost attribute (USD), as the span carries it: the output then says
        /// whether llmtail takes it or the price table, and why.
        #[arg(long)]
        cost_attribute: Option<f64>,
        /// The instrumentation scope of the span (its library's quirks apply).
        #[arg(long, default_value = "")]
        scope: String,
        /// The span's provider (`gen_ai.provider.name`).
        #[arg(long)]
        provider: Option<String>,
    },
}

/// What `llmtail pricing` prices: a call as a span reports it.
struct PricedCall<'a> {
    model: &'a str,
    usage: Usage,
    cost_attribute: Option<f64>,
    scope: &'a str,
    provider: Option<&'a str>,
}

/// `llmtail pricing`: exit 0 with the match, 1 when the model has no price.
fn pricing(cfg: Option<&Config>, call: &PricedCall) -> ExitCode {
    let (model, usage) = (call.model, call.usage);
    let pricing = Pricing::new(cfg.map_or(&[][..], |c| &c.llm.pricing));
    if let Some(c) = cfg {
        pricing.set_cost_source(c.llm.cost_source);
    }
    let quirks = llmtail::llm::quirks::lookup(call.scope, call.provider);
    let cost = pricing.explain_cost(
        &std::sync::Arc::from(model),
        &usage,
        call.cost_attribute,
        quirks.zero_cost,
    );
    let explain = || {
        println!("library:     {} (its quirks apply)", quirks.library);
        match cost.usd {
            Some(usd) => println!("call cost:   ${usd:.6} from {}", cost.from.describe()),
            None => println!("call cost:   {}", cost.from.describe()),
        }
    };
    if let Some(file) = cfg.and_then(|c| c.llm.pricing_file.as_ref())
        && let Err(e) = pricing.load_file(file)
    {
        eprintln!("{e}");
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    let Some(m) = pricing.lookup(model) else {
        println!(
            "{model}: no price (normalised: {})",
            llmtail::llm::pricing::normalize(model)
        );
        explain();
        return ExitCode::FAILURE;
    };
    let r = m.price.rates;
    let opt = |v: Option<f64>| v.map_or("= input".to_owned(), |v| format!("{v}"));
    println!("model:       {model}");
    println!("matched:     {}", m.source);
    println!(
        "per million: input {}  output {}  cache read {}  cache write {}",
        r.input_per_mtok,
        r.output_per_mtok,
        opt(r.cache_read_per_mtok),
        opt(r.cache_write_per_mtok)
    );
    if let Some(lc) = m.price.long_context {
        println!(
            "above {} input tokens: input {}  output {}  cache read {}  cache write {}",
            lc.above_input_tokens,
            lc.rates.input_per_mtok,
            lc.rates.output_per_mtok,
            opt(lc.rates.cache_read_per_mtok),
            opt(lc.rates.cache_write_per_mtok)
        );
    }
    println!(
        "cost:        ${:.6} for {} input ({} cache read, {} cache write) + {} output tokens",
        m.price.cost(&usage),
        usage.input,
        usage.cache_read,
        usage.cache_write,
        usage.output
    );
    explain();
    ExitCode::SUCCESS
}

/// mimalloc: llmtail allocates and frees many small objects per span across threads; the
/// system allocator spent ~20% of the daemon's CPU in malloc/free under the benchmark.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Protocol libraries whose messages are logged only when they are errors, unless
/// `RUST_LOG` names them: h2 warns once per connection a client resets streams on (rapid
/// reset) and rustls on bad handshakes, which would let any client decide the log's volume.
const QUIET_LIBRARIES: &[&str] = &["h2", "hyper", "rustls", "tonic"];

/// `RUST_LOG` (default `info`), with [`QUIET_LIBRARIES`] at `error` unless it names them.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let mut filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for library in QUIET_LIBRARIES {
        if !spec.contains(library)
            && let Ok(directive) = format!("{library}=error").parse()
        {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// `llmtail explain`: 0 when the file was replayed, 2 for an invalid config, 1 otherwise.
fn explain(config: &std::path::Path, file: &std::path::Path, json: bool) -> ExitCode {
    use llmtail::app::explain;
    let cfg = match Config::load(config) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!("{}: {errors}", config.display());
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let result = std::fs::read_to_string(file)
        .map_err(anyhow::Error::from)
        .and_then(|text| explain::requests(&text))
        .and_then(|requests| explain::explain(&cfg, requests));
    let traces = match result {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e:#}", file.display());
            return ExitCode::FAILURE;
        }
    };
    if json {
        for t in &traces {
            println!("{}", serde_json::to_string(t).unwrap_or_default());
        }
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<32}  {:>5}  {:<8}  {:<20}  {:>8}  {:>11}  {:<5}  {:>5}  {:>9}",
        "TRACE ID", "SPANS", "DECISION", "POLICY", "P", "DURATION_MS", "ERROR", "CALLS", "COST_USD"
    );
    let mut by_policy: std::collections::BTreeMap<(&str, &str), usize> = Default::default();
    for t in &traces {
        println!(
            "{:<32}  {:>5}  {:<8}  {:<20}  {:>8.6}  {:>11.1}  {:<5}  {:>5}  {:>9.6}",
            t.trace_id,
            t.spans,
            t.decision,
            t.policy,
            t.probability,
            t.duration_ms,
            t.error,
            t.llm_calls,
            t.cost_usd
        );
        *by_policy.entry((t.policy, t.decision)).or_default() += 1;
    }
    let kept = traces.iter().filter(|t| t.decision == "kept").count();
    let summary: Vec<String> = by_policy
        .iter()
        .map(|((policy, decision), n)| format!("{policy} {decision} {n}"))
        .collect();
    println!(
        "{} traces: {kept} kept, {} dropped ({})",
        traces.len(),
        traces.len() - kept,
        summary.join(", ")
    );
    ExitCode::SUCCESS
}

/// Exit code for an invalid config, as `--validate` documents.
const EXIT_INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Some(Command::Explain { file, json }) = &cli.command {
        return explain(&cli.config, file, *json);
    }
    if let Some(Command::Pricing {
        model,
        input,
        output,
        cache_read,
        cache_write,
        cost_attribute,
        scope,
        provider,
    }) = &cli.command
    {
        let call = PricedCall {
            model,
            usage: Usage {
                input: *input,
                output: *output,
                cache_read: *cache_read,
                cache_write: *cache_write,
            },
            cost_attribute: *cost_attribute,
            scope,
            provider: provider.as_deref(),
        };
        if !cli.config.exists() {
            return pricing(None, &call);
        }
        return match Config::load(&cli.config) {
            Ok(cfg) => pricing(Some(&cfg), &call),
            Err(errors) => {
                eprintln!("{}: {errors}", cli.config.display());
                ExitCode::from(EXIT_INVALID_CONFIG)
            }
        };
    }
    let cfg = match Config::load(&cli.config) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!("{}: {} problem(s):", cli.config.display(), errors.0.len());
            for p in &errors.0 {
                eprintln!("  {p}");
            }
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    for w in &cfg.warnings {
        eprintln!("{}: warning: {w}", cli.config.display());
    }
    if cli.validate {
        println!("{}: valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(
        cfg,
        Some(cli.config.clone()),
        daemon::termination_signal(),
    )) {
        Ok(Ended::Flushed) => ExitCode::SUCCESS,
        Ok(Ended::TimedOut { lost_spans }) => {
            eprintln!(
                "shutdown timeout: {lost_spans} spans could not be exported (llmtail_spans_lost_total{{reason=\"shutdown\"}})"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("llmtail: {e:#}");
            ExitCode::FAILURE
        }
    }
}
