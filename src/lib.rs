//! spool: an event-sourced, hash-chained, append-only log for a small fleet of nodes.
//!
//! The library holds everything but argument parsing and printing (see `src/main.rs`):
//! `event` (envelope and byte format), `hlc` (the clock), `kinds` (the catalogue), `input` (client
//! requests), `log` (the redb log and its writer), `home` (a node's directory). ARCHITECTURE.md maps
//! them.

pub mod event;
pub mod files;
pub mod hlc;
pub mod home;
pub mod identity;
pub mod input;
pub mod jobs;
pub mod kinds;
pub mod log;
pub mod membership;
pub mod node;
pub mod openapi;
pub mod pairing;
pub mod peertls;
pub mod pgtls;
pub mod priority;
pub mod project;
pub mod serve;
pub mod sync;
pub mod vault;
pub mod wire;

/// What the unit tests share.
#[cfg(test)]
mod testing {
    /// A count the environment may set for a long test (`SPOOL_CRASH_POINTS`, `SPOOL_SIM_SEEDS`),
    /// or `default`.
    pub fn env_count(name: &str, default: u64) -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}
