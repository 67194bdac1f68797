// Every schema compiles with Ajv exactly as schemas/README.md shows, and the snippet's
// validator agrees with spool on a golden event.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync, writeFileSync, mkdtempSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const schemas = resolve("..", "..", "schemas");
const readme = readFileSync(join(schemas, "README.md"), "utf8");
const snippet = [...readme.matchAll(/```js\n([\s\S]*?)```/g)]
  .map((m) => m[1])
  .find((code) => code.includes("new Ajv2020"));
const SHOWN = "schemas/task.scored/v1.schema.json";

test("the README's Ajv snippet compiles all 49 schemas as written", async () => {
  assert.ok(snippet, "schemas/README.md lost its Ajv snippet");
  assert.ok(snippet.includes(SHOWN));
  const files = readdirSync(schemas, { withFileTypes: true })
    .filter((e) => e.isDirectory())
    .flatMap((e) =>
      readdirSync(join(schemas, e.name))
        .filter((f) => f.endsWith(".schema.json"))
        .map((f) => join(schemas, e.name, f)),
    );
  assert.equal(files.length, 49);
  // The snippet runs as a module beside node_modules, with each schema's path in place of the
  // one it shows.
  const dir = mkdtempSync(join(resolve("dist"), "snippet-"));
  try {
    for (const [i, file] of files.entries()) {
      const module = join(dir, `s${i}.mjs`);
      writeFileSync(module, snippet.replace(SHOWN, file));
      const { validate } = await import(pathToFileURL(module).href);
      assert.equal(typeof validate, "function", file);
      const golden = JSON.parse(readFileSync(file.replace(".schema.json", ".golden.json"), "utf8"));
      assert.ok(validate(golden.data), `${file}: the golden data is refused`);
      if (file.includes("task.scored")) {
        assert.equal(validate({ ...golden.data, i: 11 }), false, "i is 0 to 10");
        assert.equal(validate({ ...golden.data, rank: 2 ** 33 }), false, "rank is a uint32");
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the client's codes are the daemon's (clients/openapi.json)", async () => {
  const { CODES } = await import("../src/index.js");
  const openapi = JSON.parse(readFileSync(resolve("..", "openapi.json"), "utf8"));
  const daemon: string[] = openapi.components.schemas.Code.oneOf.flatMap(
    (variant: { enum?: string[]; const?: string }) => variant.enum ?? [variant.const],
  );
  assert.deepEqual([...CODES].sort(), daemon.sort());
});
