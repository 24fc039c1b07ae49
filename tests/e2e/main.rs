//! The end-to-end tests, in one binary: the real `llmtail` binary on ephemeral ports with
//! OTLP sinks as upstreams, real SDKs as clients, and the deploy files checked by the tools
//! that consume them. `support` is the harness (daemon, sinks, PKI, Prometheus text,
//! memory cgroups); each other module is one area of the contract.

mod support;

mod agent_runs;
mod cluster;
mod delivery;
mod deploy;
mod exporters;
mod faults;
mod fuzz_corpus;
mod grpc;
mod hostile;
mod http;
mod kubernetes;
mod limits;
mod llm;
mod llm_clients;
mod prometheus;
mod reload;
mod rules;
mod scaling;
mod sdk_clients;
mod security;
mod status_page;
mod storage;
mod upgrade;
