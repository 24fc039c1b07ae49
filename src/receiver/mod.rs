//! Receivers: the protocols spans arrive by. Each hands raw request bytes to the pipeline.

pub mod config;

pub mod auth;
pub mod conn;
pub mod grpc;
pub mod http;
pub mod tls;
