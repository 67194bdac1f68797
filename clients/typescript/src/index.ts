export { SpoolClient, SpoolError } from "./client.js";
export type { ClientOptions } from "./client.js";
export type * from "./wire.js";
export type * from "./kinds.js";
export { KINDS } from "./kinds.js";
export { CODES } from "./wire.js";
