//! The fleet: compute-node heartbeats (`openclaw_instances`) and the CLI agents' `bot_*` tables.

use super::types::{Id, Label};
use super::Payload;

payloads! {
    /// A compute node reported in, with what it can do and its role in the fleet.
    pub struct NodeHeartbeat {
        pub host: Id,
        /// Such as `primary`, `worker` or `edge`.
        pub role: Label,
        #[schemars(length(max = 64))]
        pub capabilities: Vec<Label>,
        /// The OptimalOS build the node runs.
        pub version: Option<Label>,
    }

    /// A CLI agent (bot) reported in.
    pub struct BotHeartbeat {
        pub bot_id: Id,
        pub host: Id,
        pub status: Option<Label>,
    }

    /// A bot claimed a piece of work so that no other bot takes it.
    pub struct BotClaimed {
        pub bot_id: Id,
        /// What is claimed, such as `task/<id>`.
        pub resource: Id,
        /// How long the claim holds without a heartbeat, at most a day.
        #[schemars(range(min = 1, max = 86_400_000))]
        pub ttl_ms: u64,
    }

    /// A bot let go of its claim.
    pub struct BotReleased {
        pub bot_id: Id,
        pub resource: Id,
    }
}

impl Payload for NodeHeartbeat {}
impl Payload for BotHeartbeat {}
impl Payload for BotClaimed {}
impl Payload for BotReleased {}
