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
  ) {}

  get promptTokens(): number {
    return this.promptIds.length;
  }

  get maxTokens(): number {
    return this.params.maxTokens;
  }

  get totalTokens(): number {
    return this.promptIds.length + this.outputIds.length;
  }

  tokenAt(i: number): number {
    return i < this.promptIds.length ? this.promptIds[i]! : this.outputIds[i - this.promptIds.length]!;
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
