// One request's sequence: its tokens, KV blocks, adapter slot and output state.

import type { RegisteredAdapter } from "../lora/registry.js";
import type { IncrementalDetokenizer } from "../model/detokenizer.js";
import type { QueuedRequest } from "../scheduler/policy.js";
import type { Channel } from "./channel.js";
import type { StopMatcher } from "./stop.js";
import type { FinishReason, GenerateOutput, SamplingParams, TokenLogprob } from "./types.js";

export type SeqStatus = "waiting" | "running" | "finished";

export class Sequence implements QueuedRequest {
  status: SeqStatus = "waiting";
  readonly outputIds: number[] = [];
  /** Physical KV blocks, in order. */
  readonly blocks: number[] = [];
  /** Tokens whose K/V are in the cache. */
  computed = 0;
  /** Adapter pool slot while running with an adapter, else -1. */
  slot = -1;
  aborted = false;
  /** The engine has ended it (EOS, length, stop); its last output may still be queued for streaming. */
  done = false;
  /** Text emitted so far (after stop handling). */
  emitted = "";
  firstTokenAt = 0;
  /** Fixed at creation and read for every token of every step: kept on the sequence itself,
   * so taking a step's tokens touches one object per sequence rather than three. */
  readonly promptTokens: number;
  readonly maxTokens: number;
  readonly ignoreEos: boolean;
  /** params.logprobs: top log-probs per token (0: the chosen token's only, -1: none). */
  readonly logprobs: number;
  /** The request has stop strings (its text is matched as its tokens arrive). */
  readonly hasStops: boolean;

  constructor(
    readonly seqId: number,
    readonly requestId: string,
    /** "" = base model. */
    readonly adapter: string,
    /** The adapter as registered when the request arrived (kept even if it is unloaded meanwhile); null = base. */
    readonly lora: RegisteredAdapter | null,
    readonly promptIds: readonly number[],
    readonly params: SamplingParams,
    readonly seed: number,
    readonly arrival: number,
    readonly channel: Channel<GenerateOutput>,
    readonly detok: IncrementalDetokenizer,
    readonly stop: StopMatcher,
  ) {
    this.promptTokens = promptIds.length;
    this.maxTokens = params.maxTokens;
    this.ignoreEos = params.ignoreEos;
    this.logprobs = params.logprobs;
    this.hasStops = stop.active;
  }

  get totalTokens(): number {
    return this.promptTokens + this.outputIds.length;
  }

  tokenAt(i: number): number {
    const n = this.promptTokens;
    return i < n ? this.promptIds[i]! : this.outputIds[i - n]!;
  }

  /** Sends an increment; one with a finish reason is the last and closes the stream. */
  emit(text: string, tokenIds: number[], logprobs: TokenLogprob[], reason: FinishReason | null): void {
    if (this.status === "finished") return;
    this.emitted += text;
    this.channel.push({
      text,
      tokenIds,
      logprobs,
      finishReason: reason,
      promptTokens: this.promptTokens,
      completionTokens: this.outputIds.length,
    });
    if (reason !== null) {
      this.status = "finished";
      this.channel.close();
    }
  }
}
