// Starts a real `spool serve` for a test: a fresh home, its socket, loopback HTTP and token.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createServer } from "node:net";

/** The binary under test: $SPOOL_BIN, else the checkout's debug build. */
export const SPOOL = process.env.SPOOL_BIN ?? resolve("..", "..", "target", "debug", "spool");

export interface Node {
  home: string;
  socket: string;
  url: string;
  token: string;
  /** Runs the CLI on the home. */
  cli(args: string[], input?: string): string;
  /** Starts the daemon (again). */
  start(): Promise<void>;
  /** SIGTERM, waiting for the drain. */
  stop(): Promise<void>;
  /** Stops it and removes the home. */
  dispose(): Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.on("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address ? address.port : 0;
      server.close(() => done(port));
    });
  });
}

export async function startNode(config = ""): Promise<Node> {
  const dir = mkdtempSync(join(tmpdir(), "spool-ts-"));
  const home = join(dir, "node");
  const cli = (args: string[], input = ""): string => {
    const run = spawnSync(SPOOL, ["--home", home, ...args], { input, encoding: "utf8" });
    if (run.status !== 0) throw new Error(`spool ${args.join(" ")}: ${run.stderr}`);
    return run.stdout;
  };
  cli(["init", "--label", "ts-test"]);
  if (config) writeFileSync(join(home, "spool.toml"), config);
  const port = await freePort();
  const socket = join(home, "spool.sock");
  let child: ChildProcess | undefined;
  const node: Node = {
    home,
    socket,
    url: `http://127.0.0.1:${port}`,
    token: "",
    cli,
    async start() {
      child = spawn(SPOOL, ["--home", home, "serve", "--http", `127.0.0.1:${port}`], { stdio: "ignore" });
      const started = Date.now();
      while (!existsSync(socket)) {
        if (Date.now() - started > 30_000) throw new Error("spool serve did not start");
        await new Promise((r) => setTimeout(r, 20));
      }
      node.token = readFileSync(join(home, "serve.token"), "utf8").trim();
    },
    async stop() {
      const running = child;
      if (!running || running.exitCode !== null) return;
      const exited = new Promise((r) => running.once("exit", r));
      running.kill("SIGTERM");
      await exited;
    },
    async dispose() {
      await node.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await node.start();
  return node;
}
