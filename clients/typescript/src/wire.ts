// The node's API as spool's daemon speaks it (src/wire.rs is the Rust side; the OpenAPI
// description at GET /v1/openapi.json says the same). Stamps (`hlc`) are strings: they are u64
// above 2^53, which a JavaScript number cannot hold.
import type { Kind, KindData } from "./kinds.js";

/** One append request: an event as a client asks for it. */
export interface AppendRequest<K extends Kind = Kind> {
  kind: K;
  /** The aggregate the event belongs to, such as `task/42`. */
  stream: string;
  /** Who caused it: a user, an agent, a strand. */
  actor: string;
  data: KindData[K];
  /** An idempotency key: the same request again answers the first event (`duplicate: true`);
   * another request under the key is refused (`key_conflict`). Keys are per node. */
  key?: string;
  correlation?: string;
  causation?: string;
}

/** The acknowledgement of an appended event, sent once it is durable. */
export interface Ack {
  origin: string;
  seq: number;
  position: number;
  hash: string;
  /** The key named an earlier event made from the same request; nothing was written. */
  duplicate: boolean;
}

/** Every refusal's code (a test keeps it equal to the daemon's, in clients/openapi.json). */
export const CODES = [
  "bad_json",
  "invalid_field",
  "unknown_kind",
  "invalid_data",
  "too_large",
  "bad_query",
  "path_refused",
  "key_conflict",
  "unauthorized",
  "forbidden",
  "not_found",
  "method_not_allowed",
  "timeout",
  "busy",
  "poisoned",
  "halted",
  "unavailable",
  "corrupt",
  "storage",
  "sqlite",
  "postgres",
  "file",
  "internal",
] as const;

export type Code = (typeof CODES)[number];

/** Every refusal's body. */
export interface Problem {
  code: Code;
  message: string;
  /** A JSON Pointer into the request, such as `/data/reasoning`. */
  field?: string;
  /** The refused event's index in a batch. */
  index?: number;
}

export interface Dep {
  origin: string;
  seq: number;
}

/** An event as `spool log` prints it and `GET /v1/events` streams it. */
export interface Event<K extends Kind = Kind> {
  position: number;
  origin: string;
  seq: number;
  hash: string;
  prev: string;
  /** The hybrid logical clock stamp: a u64 as a decimal string. */
  hlc: string;
  /** The stamp's wall-clock part, RFC 3339. */
  time: string;
  deps: Dep[];
  stream: string;
  actor: string;
  kind: K;
  version: number;
  correlation: string | null;
  causation: string | null;
  key: string | null;
  /** The payload; null when this build of spool cannot read the kind or version. */
  data: KindData[K] | null;
  data_error?: string;
  /** The public key (64 hex digits) the origin is bound to: on an origin's first event only. */
  signer?: string;
}

export interface LogQuery {
  after?: number;
  limit?: number;
  stream?: string;
  kind?: Kind;
  origin?: string;
}

export interface LogPage {
  events: Event[];
  /** Where the next page starts; null at the log's end. */
  next: number | null;
}

export interface Head {
  origin: string;
  seq: number;
  hash: string;
  local: boolean;
}

export interface Fork {
  id: { origin: string; seq: number };
  refused: string;
  held: string | null;
}

/** An event refused for who wrote it or how it came signed, kept as evidence. */
export interface RefusedEvent {
  id: { origin: string; seq: number };
  hash: string;
  reason: string;
}

/** One member of the fleet (`spool fleet`). */
export interface FleetMember {
  origin: string;
  key: string | null;
  device_id: string | null;
  label: string | null;
  capabilities: string[];
  admitted_by: { origin: string; seq: number } | null;
  revoked: { by: { origin: string; seq: number }; through: number } | null;
}

export interface Fleet {
  root: string;
  members: FleetMember[];
}

export interface Status {
  node: { id: string; label: string };
  home: string;
  events: number;
  file_bytes: number;
  heads: Head[];
  waiting: number;
  forks: Fork[];
  /** The first 100 refused events; `refused_count` counts them all. */
  refused: RefusedEvent[];
  refused_count: number;
  /** Null for a node made before keys, which takes every origin's events. */
  fleet: Fleet | null;
  halted: string | null;
  unreadable: number;
  /** Only from the daemon. */
  daemon?: {
    commits: number;
    appended: number;
    projected: number;
    lag_events: number;
    panics: number;
    streams: number;
    /** Only with a hub (`[hub] url`). */
    hub?: {
      syncs: number;
      last_sync_ms: number | null;
      pushed: number;
      pulled: number;
      applied: number;
      lag_events: number;
      /** Per origin, at the last round (pushed and pulled since the daemon started). */
      origins: Record<string, HubOrigin>;
      last_error: string | null;
      /** Nodes with the same events in other tables: a divergence. */
      divergent: string[];
    };
    /** The peers of `[[peers]]`, in order. */
    peers: PeerStatus[];
  };
}

/** What the daemon's sync with one peer has done since it started. */
export interface PeerStatus {
  address: string;
  /** The peer's node, once a handshake proved its key. */
  peer: string | null;
  reachable: boolean;
  syncs: number;
  last_sync_ms: number | null;
  sent: number;
  received: number;
  /** Events it held that this node did not, at the last exchange. */
  lag_events: number;
  last_error: string | null;
  divergent: boolean;
}

/** One origin in the hub sync. */
export interface HubOrigin {
  /** The highest seq the hub held of it when the pull began. */
  hub_holds: number;
  /** The highest seq this node held of it when the pull ended. */
  held: number;
  /** hub_holds - held, or 0. */
  lag: number;
  pushed: number;
  pulled: number;
  /** Why its pull stopped before the hub's last event, if it did. */
  refused: string | null;
}

/** The version vector: origin → highest seq held. */
export type Heads = Record<string, number>;

/** `POST /v1/pair/code`: a minted pairing code, shown once. */
export interface PairCode {
  pairing_id: string;
  code: string;
  expires_at_ms: number;
  /** Where the peers' door listens, if it does. */
  address: string | null;
  /** The node's origin: the hash of its key, which `spool pair join --origin` pins. */
  fingerprint: string;
}

/** `GET /v1/pair`: one of the node's pairing codes (never the code). */
export interface Pairing {
  pairing_id: string;
  device: string;
  expires_at_ms: number;
  state: "pending" | "completed" | "expired" | "cancelled";
  device_id: string | null;
}
