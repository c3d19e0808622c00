// Builds the browser bundle the node's demo page serves
// (gateway/demo/liveedge.js, committed so that a fresh `go build` embeds it).
// With --check, builds in memory and fails if the committed file differs.
import { build } from "esbuild";
import { readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const here = fileURLToPath(new URL(".", import.meta.url));
const out = fileURLToPath(new URL("../../../gateway/demo/liveedge.js", import.meta.url));
const check = process.argv.includes("--check");

const res = await build({
  entryPoints: [here + "../src/index.ts"],
  bundle: true,
  format: "esm",
  target: "es2020",
  platform: "browser",
  legalComments: "none",
  banner: { js: "// Generated from clientsdk/ts/src by `npm run build` (esbuild). Do not edit." },
  write: false,
});
const js = res.outputFiles[0].text;
if (check) {
  let old = "";
  try {
    old = readFileSync(out, "utf8");
  } catch {}
  if (old !== js) {
    console.error("gateway/demo/liveedge.js is out of date with clientsdk/ts/src: run `npm run build` in clientsdk/ts");
    process.exit(1);
  }
  console.log("bundle up to date");
} else {
  writeFileSync(out, js);
  console.log("wrote", out, js.length, "bytes");
}
