//! llm-relay: a multi-tenant LLM API relay on Pingora. The binary's modules live here so the
//! integration tests and benchmarks can reach them.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod background;
pub mod cache;
pub mod config;
pub mod log_sink;
pub mod metrics;
pub mod proxy;
pub mod secrets;
pub mod store;
