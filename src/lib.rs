//! byokd: a vault for end users' own model-provider API keys.
//!
//! See ARCHITECTURE.md for the map of these modules and the rules between them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod api;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod chain;
pub mod client;
pub mod config;
pub mod connection;
pub mod crypto;
#[doc(hidden)]
pub mod fuzzing;
pub mod keyring;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod offline;
pub mod pending;
pub mod quota;
pub mod ratelimit;
pub mod rotation;
pub mod rpcmetrics;
pub mod runner;
pub mod server;
pub mod service;
pub mod store;
pub mod vault;
