// A client of spool's daemon for the fleet's programs: over the node's Unix socket (the
// default), or over loopback HTTP with the bearer token. No dependency beyond Node.
import http from "node:http";
import { randomUUID } from "node:crypto";
import type { AppendRequest, Ack, Event, Heads, LogPage, LogQuery, Problem, Status } from "./wire.js";
import type { Kind } from "./kinds.js";

export interface ClientOptions {
  /** The daemon's socket: `$SPOOL_HOME/spool.sock`. */
  socketPath?: string;
  /** Or its loopback HTTP address, such as `http://127.0.0.1:7421`, with `token`. */
  url?: string;
  /** The bearer token (`$SPOOL_HOME/serve.token`), for `url`. */
  token?: string;
  /** Times a busy (503) or cut request is sent again (default 5). */
  retries?: number;
  /** Longest wait between two tries, whatever `Retry-After` says (default 30 s). */
  maxRetryDelayMs?: number;
  /** How long one request may take (default 60 s). */
  timeoutMs?: number;
  /** Told before each retry: why, and how long it waits. */
  onRetry?: (why: { status?: number; code?: string; error?: string; delayMs: number }) => void;
}

/** A refusal from the daemon, or a failure to reach it. */
export class SpoolError extends Error {
  readonly status: number;
  readonly code: string;
  readonly field?: string;
  readonly index?: number;
  readonly retryAfterMs?: number;

  constructor(status: number, problem: Problem, retryAfterMs?: number) {
    super(problem.message);
    this.name = "SpoolError";
    this.status = status;
    this.code = problem.code;
    this.field = problem.field;
    this.index = problem.index;
    this.retryAfterMs = retryAfterMs;
  }
}

interface Answer {
  status: number;
  body: Buffer;
  retryAfterMs?: number;
}

/** Errors of a connection that did not answer, where a retry is safe for a keyed request. */
const CUT = new Set(["ECONNRESET", "EPIPE", "ECONNREFUSED", "ENOENT", "ETIMEDOUT"]);

export class SpoolClient {
  private readonly options: Required<Pick<ClientOptions, "retries" | "maxRetryDelayMs" | "timeoutMs">> &
    ClientOptions;
  private readonly agent: http.Agent;
  private readonly base: URL;

  constructor(options: ClientOptions) {
    if (!options.socketPath === !options.url) {
      throw new TypeError("give socketPath or url");
    }
    this.options = { retries: 5, maxRetryDelayMs: 30_000, timeoutMs: 60_000, ...options };
    this.agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
    this.base = new URL(options.url ?? "http://spool");
  }

  /** Closes idle connections (the client may be used again). */
  close(): void {
    this.agent.destroy();
  }

  /** Appends one event; resolves once it is durable. */
  async append<K extends Kind>(request: AppendRequest<K>): Promise<Ack> {
    const keyed = { ...request, key: request.key ?? randomUUID() };
    return this.json<Ack>("POST", "/v1/events", keyed, true);
  }

  /** Appends a batch, all or nothing; resolves once every event is durable. */
  async appendBatch(requests: AppendRequest[]): Promise<Ack[]> {
    // Every event gets a key, so a retry after a cut connection cannot write one twice.
    const keyed = requests.map((r) => ({ ...r, key: r.key ?? randomUUID() }));
    return this.json<Ack[]>("POST", "/v1/events", keyed, true);
  }

  status(): Promise<Status> {
    return this.json<Status>("GET", "/v1/status", undefined, true);
  }

  heads(): Promise<Heads> {
    return this.json<Heads>("GET", "/v1/heads", undefined, true);
  }

  /** One page of events (at most 1 000). */
  log(query: LogQuery = {}): Promise<LogPage> {
    return this.json<LogPage>("GET", `/v1/log${search(query)}`, undefined, true);
  }

  /**
   * Follows the log: every event after `query.after` that passes the filters, then each new one
   * as it commits, until `signal` aborts. A dropped connection is resumed from the last event
   * seen (`Last-Event-ID`), so no event is delivered twice or skipped.
   */
  async follow(
    query: Omit<LogQuery, "limit">,
    onEvent: (event: Event) => void | Promise<void>,
    signal: AbortSignal,
  ): Promise<void> {
    let last = query.after ?? 0;
    let failures = 0;
    while (!signal.aborted) {
      try {
        await this.stream(query, last, signal, async (id, event) => {
          if (id <= last) return;
          last = id;
          failures = 0;
          await onEvent(event);
        });
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof SpoolError && error.status < 500) throw error;
      }
      if (signal.aborted) return;
      // The stream ended (the daemon restarted, the network blinked): back off, then resume.
      const delayMs = Math.min(100 * 2 ** failures++, this.options.maxRetryDelayMs);
      this.options.onRetry?.({ error: "the event stream ended", delayMs });
      await sleep(delayMs, signal);
    }
  }

  private stream(
    query: Omit<LogQuery, "limit">,
    last: number,
    signal: AbortSignal,
    onEvent: (id: number, event: Event) => Promise<void>,
  ): Promise<void> {
    const { after: _after, ...filters } = query;
    return new Promise((resolve, reject) => {
      const headers: Record<string, string> = { accept: "text/event-stream" };
      if (last > 0) headers["last-event-id"] = String(last);
      const request = http.request(this.target("GET", `/v1/events${search({ ...filters, after: last })}`, headers));
      const abort = () => request.destroy();
      signal.addEventListener("abort", abort, { once: true });
      request.on("error", (error) => {
        signal.removeEventListener("abort", abort);
        reject(error);
      });
      request.on("response", (response) => {
        if (response.statusCode !== 200) {
          const chunks: Buffer[] = [];
          response.on("data", (c: Buffer) => chunks.push(c));
          response.on("end", () => reject(refusal({ status: response.statusCode ?? 0, body: Buffer.concat(chunks) })));
          return;
        }
        let pending = "";
        let id = 0;
        let data: string[] = [];
        let queue = Promise.resolve();
        response.setEncoding("utf8");
        response.on("data", (text: string) => {
          pending += text;
          let end: number;
          while ((end = pending.indexOf("\n")) >= 0) {
            const line = pending.slice(0, end).replace(/\r$/, "");
            pending = pending.slice(end + 1);
            if (line === "") {
              if (data.length > 0) {
                const event = JSON.parse(data.join("\n")) as Event;
                const at = id;
                queue = queue.then(() => onEvent(at, event));
              }
              data = [];
            } else if (line.startsWith("id:")) {
              id = Number(line.slice(3).trim());
            } else if (line.startsWith("data:")) {
              data.push(line.slice(5).replace(/^ /, ""));
            }
          }
        });
        const done = () => {
          signal.removeEventListener("abort", abort);
          queue.then(resolve, reject);
        };
        response.on("end", done);
        response.on("close", done);
        response.on("error", done);
      });
      request.end();
    });
  }

  /** One request with retries: `busy` after its `Retry-After`, and a cut connection when
   * `safe` (reads, and writes whose every event has an idempotency key). */
  private async json<T>(method: string, path: string, body: unknown, safe: boolean): Promise<T> {
    const bytes = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    for (let attempt = 0; ; attempt++) {
      let answer: Answer;
      try {
        answer = await this.send(method, path, bytes);
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code ?? "";
        if (!safe || !CUT.has(code) || attempt >= this.options.retries) throw error;
        const delayMs = Math.min(100 * 2 ** attempt, this.options.maxRetryDelayMs);
        this.options.onRetry?.({ error: code, delayMs });
        await sleep(delayMs);
        continue;
      }
      if (answer.status >= 200 && answer.status < 300) {
        return JSON.parse(answer.body.toString("utf8")) as T;
      }
      const error = refusal(answer);
      if (error.code !== "busy" || attempt >= this.options.retries) throw error;
      const delayMs = Math.min(error.retryAfterMs ?? 1_000, this.options.maxRetryDelayMs);
      this.options.onRetry?.({ status: answer.status, code: error.code, delayMs });
      await sleep(delayMs);
    }
  }

  private send(method: string, path: string, body?: Buffer): Promise<Answer> {
    const headers: Record<string, string | number> = {};
    if (body) {
      headers["content-type"] = "application/json";
      headers["content-length"] = body.length;
    }
    return new Promise((resolve, reject) => {
      const request = http.request(this.target(method, path, headers), (response) => {
        const chunks: Buffer[] = [];
        response.on("data", (c: Buffer) => chunks.push(c));
        response.on("end", () => {
          const retryAfter = Number(response.headers["retry-after"]);
          resolve({
            status: response.statusCode ?? 0,
            body: Buffer.concat(chunks),
            retryAfterMs: Number.isFinite(retryAfter) ? retryAfter * 1_000 : undefined,
          });
        });
        response.on("error", reject);
      });
      request.setTimeout(this.options.timeoutMs, () => request.destroy(Object.assign(new Error("timed out"), { code: "ETIMEDOUT" })));
      request.on("error", reject);
      request.end(body);
    });
  }

  private target(method: string, path: string, headers: Record<string, string | number>): http.RequestOptions {
    if (this.options.token) headers["authorization"] = `Bearer ${this.options.token}`;
    const common = { method, path, headers, agent: this.agent };
    if (this.options.socketPath) return { ...common, socketPath: this.options.socketPath, host: "spool" };
    return { ...common, host: this.base.hostname, port: this.base.port || 80 };
  }
}

/** The refusal an answer carries (its body is a `Problem`, or it says it is not one). */
function refusal(answer: Answer): SpoolError {
  let problem: Problem;
  try {
    problem = JSON.parse(answer.body.toString("utf8")) as Problem;
    if (typeof problem.code !== "string") throw new Error("not a problem");
  } catch {
    problem = { code: "internal", message: `spool answered ${answer.status} without a readable reason` };
  }
  return new SpoolError(answer.status, problem, answer.retryAfterMs);
}

function search(query: LogQuery): string {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null) params.set(name, String(value));
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}
