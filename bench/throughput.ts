// Offline throughput of the engine on the demo (or any model): B requests with
// round-robin adapters so every step mixes them, fixed output length (EOS ignored).
// Prints one JSON object.  npx tsx bench/throughput.ts [--batch 64] [--gen 32] [--device cpu]

import { parseArgs } from "node:util";
import { cpus } from "node:os";
import { join } from "node:path";
import { createEngine } from "../src/engine/engine.js";

const { values } = parseArgs({
  options: {
    model: { type: "string", default: join("examples", "demo", "base") },
    batch: { type: "string", default: "64" },
    gen: { type: "string", default: "32" },
    device: { type: "string", default: "cpu" },
    "no-adapters": { type: "boolean", default: false },
  },
});
const B = Number(values.batch), G = Number(values.gen);
const tasks = ["reverse", "sort", "caesar", "mirror"];
const adapters = values["no-adapters"] ? {} : Object.fromEntries(tasks.map((t) => [t, join("examples", "demo", "adapters", t)]));
const engine = await createEngine({ modelDir: values.model!, adapters, device: values.device as "cpu", maxBatch: Math.max(B, 1) });
const words = ["kto", "bram", "zu", "fh", "ro", "az", "yrukm", "clc", "ao", "htkom"];
const prompts = Array.from({ length: B }, (_, i) => engine.tokenizer.encode(Array.from({ length: 3 + (i % 4) }, (_, j) => words[(i + j * 3) % words.length]).join(" ") + " ="));
const names = Object.keys(adapters);
const t0 = performance.now();
let firstTokenAt = 0;
let generated = 0;
await Promise.all(prompts.map(async (promptIds, i) => {
  const it = engine.generate({
    id: `b${i}`, promptIds, adapter: names.length ? names[i % names.length]! : null,
    params: { maxTokens: G, temperature: 0, topP: 1, topK: 0, stop: [], ignoreEos: true, logprobs: -1 },
  });
  for await (const o of it) {
    if (!firstTokenAt && o.tokenIds.length) firstTokenAt = performance.now();
    generated += o.tokenIds.length;
  }
}));
const seconds = (performance.now() - t0) / 1000;
const promptTokens = prompts.reduce((n, p) => n + p.length, 0);
console.log(JSON.stringify({
  bench: "throughput", machine: `${cpus().length}x ${cpus()[0]?.model ?? "cpu"}`, backend: engine.backendName,
  model: values.model, batch: B, adapters: names.length, prompt_tokens: promptTokens, generated_tokens: generated,
  seconds: +seconds.toFixed(3), output_tokens_per_s: +(generated / seconds).toFixed(1),
  total_tokens_per_s: +((generated + promptTokens) / seconds).toFixed(1), first_step_s: +((firstTokenAt - t0) / 1000).toFixed(3),
  steps: engine.stats().steps,
}));
await engine.close();
