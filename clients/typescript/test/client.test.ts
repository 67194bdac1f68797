// The client against a real `spool serve`, started by each test.
import { test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { SpoolClient, SpoolError, type AppendRequest, type Event } from "../src/index.js";
import { startNode } from "./daemon.js";

const logged = (message: string, key?: string): AppendRequest<"activity.logged"> => ({
  kind: "activity.logged",
  stream: "board",
  actor: "agent:ts",
  data: { message },
  ...(key ? { key } : {}),
});

test("appends one event and a batch, over the socket and over HTTP", async () => {
  const node = await startNode();
  try {
    const socket = new SpoolClient({ socketPath: node.socket });
    const one = await socket.append(logged("one"));
    assert.equal(one.position, 1);
    assert.equal(one.duplicate, false);
    const web = new SpoolClient({ url: node.url, token: node.token });
    const batch = await web.appendBatch([logged("two"), logged("three")]);
    assert.deepEqual(batch.map((a) => a.position), [2, 3]);
    const status = await socket.status();
    assert.equal(status.events, 3);
    assert.equal(status.node.label, "ts-test");
    const page = await web.log({ kind: "activity.logged", after: 1 });
    assert.deepEqual(page.events.map((e) => (e.data as { message: string }).message), ["two", "three"]);
    assert.equal(typeof page.events[0].hlc, "string");
    assert.ok(BigInt(page.events[0].hlc) > 2n ** 53n, "the stamp survives as a string");
    // Without the token: refused by name.
    const anonymous = new SpoolClient({ url: node.url });
    await assert.rejects(anonymous.status(), (e: SpoolError) => e.status === 401 && e.code === "unauthorized");
    socket.close();
    web.close();
  } finally {
    await node.dispose();
  }
});

test("a refused batch names its code, field and index, and writes nothing", async () => {
  const node = await startNode();
  try {
    const client = new SpoolClient({ socketPath: node.socket });
    const bad = { kind: "task.scored", stream: "task/1", actor: "triage", data: { i: 11 } } as unknown as AppendRequest;
    await assert.rejects(client.appendBatch([logged("fine"), bad]), (e: SpoolError) => {
      assert.equal(e.status, 400);
      assert.equal(e.code, "invalid_data");
      assert.equal(e.index, 1);
      assert.match(e.field ?? "", /^\/data\//);
      return true;
    });
    await assert.rejects(
      client.append({ ...logged("x"), kind: "no.such" } as unknown as AppendRequest),
      (e: SpoolError) => e.code === "unknown_kind" && e.field === "/kind",
    );
    assert.equal((await client.status()).events, 0);
    client.close();
  } finally {
    await node.dispose();
  }
});

test("a key with the same request is a duplicate; with another, a conflict", async () => {
  const node = await startNode();
  try {
    const client = new SpoolClient({ socketPath: node.socket });
    const first = await client.append(logged("charge card", "order-17"));
    const again = await client.append(logged("charge card", "order-17"));
    assert.equal(again.duplicate, true);
    assert.equal(again.position, first.position);
    await assert.rejects(client.append(logged("refund card", "order-17")), (e: SpoolError) => {
      assert.equal(e.status, 409);
      assert.equal(e.code, "key_conflict");
      assert.equal(e.field, "/key");
      return true;
    });
    assert.equal((await client.status()).events, 1);
    client.close();
  } finally {
    await node.dispose();
  }
});

test("busy answers are retried after their Retry-After, and every event lands once", async () => {
  // A queue of one request: concurrent batches find it full.
  const node = await startNode("[writer]\nqueue_requests_max = 1\n");
  try {
    const waits: number[] = [];
    const client = new SpoolClient({
      socketPath: node.socket,
      retries: 100,
      onRetry: (why) => {
        if (why.code === "busy") waits.push(why.delayMs);
      },
    });
    const batch = (i: number) => Array.from({ length: 2_000 }, (_, j) => logged(`${i}-${j}`));
    const acks = await Promise.all(Array.from({ length: 24 }, (_, i) => client.appendBatch(batch(i))));
    assert.equal(acks.flat().length, 48_000);
    assert.ok(waits.length > 0, "no request was told busy: the test proved nothing");
    assert.ok(waits.every((ms) => ms === 1_000), `waits ${waits}: Retry-After is 1 s`);
    assert.equal((await client.status()).events, 48_000);
    client.close();
  } finally {
    await node.dispose();
  }
});

test("the follower resumes after a dropped connection, without a duplicate or a gap", async () => {
  const node = await startNode();
  try {
    const client = new SpoolClient({ socketPath: node.socket, maxRetryDelayMs: 200 });
    for (let i = 0; i < 5; i++) await client.append(logged(`before ${i}`));
    const seen: number[] = [];
    const stop = new AbortController();
    let reached: () => void = () => {};
    let want = 5;
    const ready = () => new Promise<void>((r) => (reached = r));
    let waiting = ready();
    const following = client.follow({ stream: "board" }, (event: Event) => {
      seen.push(event.position);
      if (seen.length >= want) reached();
    }, stop.signal);
    await waiting;
    // The daemon stops (its streams end) and events are written while it is away.
    await node.stop();
    node.cli(["append"], [1, 2, 3].map((i) => JSON.stringify(logged(`while away ${i}`))).join("\n") + "\n");
    await node.start();
    want = 10;
    waiting = ready();
    for (let i = 0; i < 2; i++) await client.append(logged(`after ${i}`));
    await waiting;
    stop.abort();
    await following;
    assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    client.close();
  } finally {
    await node.dispose();
  }
});

test("after a 413 the connection is closed by name, and the next request succeeds on a new one", async () => {
  const node = await startNode();
  try {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    const ask = (method: string, headers: Record<string, string | number>, body?: Buffer) =>
      new Promise<{ status: number; port: number; connection?: string; text: string }>((resolve, reject) => {
        const request = http.request(
          { host: "127.0.0.1", port: Number(new URL(node.url).port), path: "/v1/events", method, agent,
            headers: { authorization: `Bearer ${node.token}`, ...headers } },
          (response) => {
            const chunks: Buffer[] = [];
            const port = response.socket.localPort ?? 0;
            response.on("data", (c: Buffer) => chunks.push(c));
            response.on("end", () =>
              resolve({
                status: response.statusCode ?? 0,
                port,
                connection: response.headers.connection,
                text: Buffer.concat(chunks).toString(),
              }),
            );
          },
        );
        request.on("error", reject);
        // A body shorter than it declares is written, not ended: the server answers first.
        if (body && Number(headers["content-length"]) > body.length) request.write(body);
        else request.end(body);
      });
    const good = Buffer.from(JSON.stringify(logged("small")));
    const first = await ask("POST", { "content-type": "application/json", "content-length": good.length }, good);
    assert.equal(first.status, 200);
    // Declares more than the limit: refused before the body is read, and the connection is
    // marked closed, so the agent does not reuse it.
    const huge = await ask("POST", { "content-type": "application/json", "content-length": 300 * 1024 * 1024 }, Buffer.from("["));
    assert.equal(huge.status, 413);
    assert.equal(huge.connection, "close");
    assert.equal(JSON.parse(huge.text).code, "too_large");
    const after = await ask("POST", { "content-type": "application/json", "content-length": good.length }, good);
    assert.equal(after.status, 200, after.text);
    assert.notEqual(after.port, huge.port, "a new connection");
    agent.destroy();
  } finally {
    await node.dispose();
  }
});
