// Prometheus metrics of one server, in a registry of its own (never prom-client's
// global one, so two servers in one process do not mix their counts).
//
// Request outcomes are counted per HTTP generation request: `status` is the HTTP status,
// except for streams, which are 200 from their first byte and are counted when they
// end: 200 when finished, 499 when the client went away, 500/503 when the engine failed
// or shut down mid-stream. Token counters and TTFT/TPOT are per engine request (one
// per choice). Queue gauges are read from engine.stats() at scrape time.

import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { GenerateOutput, ServingEngine } from "../engine/types.js";

/** Status counted for a stream whose client disconnected (nginx's convention). */
export const CLIENT_CLOSED = 499;

// Buckets reach down to milliseconds for small models and up to minutes for long outputs.
const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80];
const TPOT_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5];
const E2E_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480];

export class ServerMetrics {
  readonly registry = new Registry();
  readonly #requests: Counter<"model" | "status">;
  readonly #promptTokens: Counter<"model">;
  readonly #generationTokens: Counter<"model">;
  readonly #e2e: Histogram<"model">;
  readonly #ttft: Histogram<"model">;
  readonly #tpot: Histogram<"model">;

  constructor(engine: ServingEngine) {
    const registers = [this.registry];
    this.#requests = new Counter({
      name: "inlaid_requests_total",
      help: "Generation requests by model and outcome (HTTP status; 499 = client closed a stream)",
      labelNames: ["model", "status"],
      registers,
    });
    this.#promptTokens = new Counter({ name: "inlaid_prompt_tokens_total", help: "Prompt tokens prefilled", labelNames: ["model"], registers });
    this.#generationTokens = new Counter({ name: "inlaid_generation_tokens_total", help: "Tokens generated", labelNames: ["model"], registers });
    this.#e2e = new Histogram({
      name: "inlaid_e2e_latency_seconds",
      help: "Arrival to last token of successful requests",
      labelNames: ["model"],
      buckets: E2E_BUCKETS,
      registers,
    });
    this.#ttft = new Histogram({ name: "inlaid_ttft_seconds", help: "Arrival to first token", labelNames: ["model"], buckets: TTFT_BUCKETS, registers });
    this.#tpot = new Histogram({
      name: "inlaid_tpot_seconds",
      help: "Mean time per output token after the first",
      labelNames: ["model"],
      buckets: TPOT_BUCKETS,
      registers,
    });

    // Every served model appears in the queue gauges, at 0 when idle.
    const byModel = (counts: ReadonlyMap<string, number>): Map<string, number> => {
      const m = new Map<string, number>([[engine.modelId, 0], ...engine.listAdapters().map((a) => [a.name, 0] as const)]);
      for (const [adapter, n] of counts) m.set(adapter === "" ? engine.modelId : adapter, n);
      return m;
    };
    new Gauge({
      name: "inlaid_requests_running",
      help: "Requests in the running batch, by adapter (the base model's id for no adapter)",
      labelNames: ["adapter"],
      registers,
      collect() {
        this.reset();
        for (const [adapter, n] of byModel(engine.stats().running)) this.set({ adapter }, n);
      },
    });
    new Gauge({
      name: "inlaid_requests_waiting",
      help: "Requests queued, by adapter (the base model's id for no adapter)",
      labelNames: ["adapter"],
      registers,
      collect() {
        this.reset();
        for (const [adapter, n] of byModel(engine.stats().waiting)) this.set({ adapter }, n);
      },
    });
    new Gauge({
      name: "inlaid_kv_blocks_used",
      help: "KV-cache blocks in use",
      registers,
      collect() {
        this.set(engine.stats().kvBlocksUsed);
      },
    });
    new Gauge({
      name: "inlaid_kv_blocks_total",
      help: "KV-cache blocks in all",
      registers,
      collect() {
        this.set(engine.stats().kvBlocksTotal);
      },
    });
    new Gauge({
      name: "inlaid_kv_cache_usage_ratio",
      help: "Fraction of KV-cache blocks in use (0..1)",
      registers,
      collect() {
        const s = engine.stats();
        this.set(s.kvBlocksTotal > 0 ? s.kvBlocksUsed / s.kvBlocksTotal : 0);
      },
    });
  }

  /** One generation request ended with `status`; `arrival` is its performance.now() at arrival. */
  requestDone(model: string, status: number, arrival: number): void {
    this.#requests.inc({ model, status: String(status) });
    if (status === 200) this.#e2e.observe({ model }, (performance.now() - arrival) / 1000);
  }

  /** Watches the outputs of one engine request that arrived at `arrival`. */
  sequence(model: string, arrival: number): SequenceTimer {
    return new SequenceTimer(arrival, (ttft) => this.#ttft.observe({ model }, ttft), (prompt, generated, tpot) => {
      this.#promptTokens.inc({ model }, prompt);
      this.#generationTokens.inc({ model }, generated);
      if (tpot !== null) this.#tpot.observe({ model }, tpot);
    });
  }
}

export class SequenceTimer {
  #firstTokenAt: number | null = null;
  #done = false;

  constructor(
    readonly arrival: number,
    readonly onFirstToken: (ttftSeconds: number) => void,
    readonly onFinish: (promptTokens: number, generatedTokens: number, tpotSeconds: number | null) => void,
  ) {}

  observe(out: GenerateOutput): void {
    if (this.#done) return;
    const now = performance.now();
    if (this.#firstTokenAt === null && out.tokenIds.length > 0) {
      this.#firstTokenAt = now;
      this.onFirstToken((now - this.arrival) / 1000);
    }
    if (out.finishReason !== null) {
      this.#done = true;
      const n = out.completionTokens;
      const tpot = this.#firstTokenAt !== null && n > 1 ? (now - this.#firstTokenAt) / 1000 / (n - 1) : null;
      this.onFinish(out.promptTokens, n, tpot);
    }
  }
}
