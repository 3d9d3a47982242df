// Validate an AsyncAPI document with the AsyncAPI parser (the library behind `asyncapi validate`).
// Usage: node ops/asyncapi/validate.mjs docs/asyncapi.yaml
// Prints {"errors": [...], "warnings": [...], "document": <the parsed document, refs resolved>} and
// exits 1 when the parser reports an error (or cannot parse the document at all).
import { readFile } from "node:fs/promises";
import { Parser, fromFile } from "@asyncapi/parser";

const path = process.argv[2];
if (!path) {
  console.error("usage: validate.mjs FILE");
  process.exit(2);
}
const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, path).parse();
const severity = ["error", "warning", "info", "hint"];
const shown = diagnostics.map((d) => ({
  severity: severity[d.severity] ?? String(d.severity),
  code: d.code,
  message: d.message,
  path: d.path.join("."),
}));
const errors = shown.filter((d) => d.severity === "error");
process.stdout.write(
  JSON.stringify({
    errors,
    warnings: shown.filter((d) => d.severity !== "error"),
    document: document ? document.json() : null,
    source: (await readFile(path, "utf8")).length,
  })
);
process.exitCode = errors.length || !document ? 1 : 0;
