// The engine's public surface: what the server and CLI hand in and get back.

export type FinishReason = "stop" | "length" | "abort" | "error";

export interface SamplingParams {
  /** New tokens to generate at most. */
  readonly maxTokens: number;
  /** 0 = greedy. */
  readonly temperature: number;
  /** 1 = off. */
  readonly topP: number;
  /** 0 = off. */
  readonly topK: number;
  /** Fixed seed for reproducible sampling; absent = a fresh random seed. */
  readonly seed?: number;
  /** Stop strings: output ends before the first occurrence and excludes it. */
  readonly stop: readonly string[];
  /** Keep generating past EOS (benchmarks). */
  readonly ignoreEos: boolean;
  /** Top log-probs to report per generated token (0 = only the chosen token's, -1 = none). */
  readonly logprobs: number;
}

export interface GenerateRequest {
  /** Unique per request; appears in errors and metrics. */
  readonly id: string;
  /** Tokenized prompt, including BOS when the tokenizer adds one. */
  readonly promptIds: readonly number[];
  /** Adapter name, or null for the base model. */
  readonly adapter: string | null;
  readonly params: SamplingParams;
}

export interface TokenLogprob {
  readonly tokenId: number;
  readonly logprob: number;
  /** Most likely alternatives, best first (length = params.logprobs). */
  readonly top: readonly { readonly tokenId: number; readonly logprob: number }[];
}

/** One increment of a request's output; the last one has `finishReason` set. */
export interface GenerateOutput {
  /** Text that became final with this increment (may be "" while UTF-8 or a possible stop string is held back). */
  readonly text: string;
  /** Tokens generated in this increment. */
  readonly tokenIds: readonly number[];
  /** One entry per token in tokenIds when logprobs >= 0. */
  readonly logprobs: readonly TokenLogprob[];
  readonly finishReason: FinishReason | null;
  readonly promptTokens: number;
  /** Generated tokens so far. */
  readonly completionTokens: number;
}

/** Raised for requests that can never run (unknown adapter, too long...): the server maps `status`. */
export class RequestError extends Error {
  constructor(
    message: string,
    readonly status: 400 | 404 | 413 | 429 | 503,
    readonly code: string,
    readonly param: string | null = null,
  ) {
    super(message);
    this.name = "RequestError";
  }
}

export interface AdapterInfo {
  readonly name: string;
  readonly path: string;
  readonly rank: number;
}

export interface EngineStats {
  /** Requests in the running batch / queued, keyed by adapter name ("" = base model). */
  readonly running: ReadonlyMap<string, number>;
  readonly waiting: ReadonlyMap<string, number>;
  readonly kvBlocksUsed: number;
  readonly kvBlocksTotal: number;
  readonly steps: number;
  /** Decode-only steps run so far, and their total host time (microseconds) excluding the
   * wait for the device: differences between two readings give the host time of the steps between. */
  readonly decodeSteps: number;
  readonly decodeHostUs: number;
  /** Of those steps, the ones that followed another decode step, and their total device-idle
   * time (microseconds): from the previous step's tokens reaching the host to this step's
   * launch returning, plus the bookkeeping after this step's tokens arrive. */
  readonly decodeIdleSteps: number;
  readonly decodeIdleUs: number;
}

/** What the server and CLI need from an engine (src/engine/engine.ts implements it). */
export interface ServingEngine {
  /** Name of the base model (the `model` value that selects no adapter). */
  readonly modelId: string;
  /** Context window: prompt + generated tokens per sequence. */
  readonly maxModelLen: number;
  readonly tokenizer: import("../model/tokenizer.js").TextTokenizer;
  /**
   * Starts a request. Throws RequestError at once for requests that can never run
   * (unknown adapter: 404; prompt + max_tokens beyond the context: 413/400; queue full: 429).
   * The iterator yields increments and ends after the one with finishReason; aborting
   * `signal` (client went away) finishes it with "abort" and frees its KV blocks.
   */
  generate(req: GenerateRequest, signal?: AbortSignal): AsyncIterable<GenerateOutput>;
  listAdapters(): readonly AdapterInfo[];
  /** Loads an adapter under a new name (RequestError 400 if the name is taken); AdapterLoadError says what is wrong with the files. */
  loadAdapter(name: string, path: string): Promise<AdapterInfo>;
  /** Throws RequestError 404 for an unknown name. Requests already running on it finish first. */
  unloadAdapter(name: string): Promise<void>;
  stats(): EngineStats;
  close(): Promise<void>;
}
