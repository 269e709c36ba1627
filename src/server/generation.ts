// One HTTP generation request = one or more engine requests (a choice per prompt and n).
// Generation starts them all or none, merges their outputs in arrival order, and
// aborts whatever is still running when it ends early (client gone, server closing,
// error), so no sequence outlives its HTTP request.

import type { FinishReason, GenerateOutput, SamplingParams, ServingEngine, TokenLogprob } from "../engine/types.js";
import { ApiError, toApiError } from "./errors.js";
import { CLIENT_CLOSED, type ServerMetrics } from "./metrics.js";

/** Most engine requests (prompts x n) one HTTP request may start. */
export const MAX_CHOICES = 1024;

/** Every running Generation, so that closing the server can end them. */
export class InflightRequests {
  readonly #controllers = new Set<AbortController>();
  #closing = false;

  get size(): number {
    return this.#controllers.size;
  }

  /** Registers `c`; returns the function that forgets it. Refuses new work once closing. */
  add(c: AbortController): () => void {
    if (this.#closing) throw new ApiError(503, "The server is shutting down; retry on another replica.", "server_closing");
    this.#controllers.add(c);
    return () => this.#controllers.delete(c);
  }

  /** Refuses new requests and aborts the running ones (their streams end at once). */
  abortAll(): void {
    this.#closing = true;
    for (const c of this.#controllers) c.abort(new Error("server closing"));
  }
}

export interface Choice {
  /** Position in the response's `choices`. */
  readonly index: number;
  readonly promptIds: readonly number[];
  readonly params: SamplingParams;
}

export interface ChoiceEvent {
  readonly index: number;
  readonly out: GenerateOutput;
}

/** What the generation routes share. */
export interface ServerContext {
  readonly engine: ServingEngine;
  readonly metrics: ServerMetrics;
  readonly inflight: InflightRequests;
}

export class Generation {
  readonly #controller: AbortController;
  readonly #iterators: { index: number; it: AsyncIterator<GenerateOutput> }[];
  readonly #forget: () => void;

  private constructor(controller: AbortController, iterators: { index: number; it: AsyncIterator<GenerateOutput> }[], forget: () => void) {
    this.#controller = controller;
    this.#iterators = iterators;
    this.#forget = forget;
  }

  /**
   * Starts one engine request per choice. If the engine refuses one (queue full...),
   * the ones already started are aborted and the error is thrown.
   * `clientSignal` fires when the client disconnects.
   */
  static start(
    ctx: ServerContext,
    requestId: string,
    adapter: string | null,
    model: string,
    choices: readonly Choice[],
    clientSignal: AbortSignal,
    arrival: number,
  ): Generation {
    const controller = new AbortController();
    const forget = ctx.inflight.add(controller);
    const onClientGone = (): void => controller.abort(new Error("client disconnected"));
    clientSignal.addEventListener("abort", onClientGone, { once: true });
    try {
      if (clientSignal.aborted) onClientGone();
      const iterators = choices.map((ch) => {
        const timer = ctx.metrics.sequence(model, arrival);
        const outputs = ctx.engine.generate(
          { id: `${requestId}-${ch.index}`, promptIds: ch.promptIds, adapter, params: ch.params },
          controller.signal,
        );
        return { index: ch.index, it: observed(outputs, (o) => timer.observe(o))[Symbol.asyncIterator]() };
      });
      return new Generation(controller, iterators, () => {
        forget();
        clientSignal.removeEventListener("abort", onClientGone);
      });
    } catch (err) {
      controller.abort(err);
      forget();
      clientSignal.removeEventListener("abort", onClientGone);
      throw err;
    }
  }

  /** Ends every engine request still running (each finishes with "abort"). */
  abort(): void {
    this.#controller.abort(new Error("cancelled"));
  }

  /**
   * Outputs of all choices as they arrive. Ending the iteration early aborts the choices
   * still running; call abort() first if a next() may be pending.
   */
  async *events(): AsyncGenerator<ChoiceEvent> {
    const pending = new Map<number, Promise<{ index: number; r: IteratorResult<GenerateOutput> }>>();
    const pull = (index: number, it: AsyncIterator<GenerateOutput>): void => {
      pending.set(index, it.next().then((r) => ({ index, r })));
    };
    const byIndex = new Map(this.#iterators.map((x) => [x.index, x.it]));
    try {
      for (const { index, it } of this.#iterators) pull(index, it);
      while (pending.size > 0) {
        const { index, r } = await Promise.race(pending.values());
        if (r.done) {
          pending.delete(index);
          continue;
        }
        pull(index, byIndex.get(index)!);
        yield { index, out: r.value };
      }
    } finally {
      if (pending.size > 0) {
        this.abort();
        // Nobody awaits these any more; a late rejection must not become an unhandled one.
        for (const p of pending.values()) p.catch(() => {});
      }
      this.#forget();
    }
  }
}

function observed(outputs: AsyncIterable<GenerateOutput>, see: (o: GenerateOutput) => void): AsyncIterable<GenerateOutput> {
  return {
    [Symbol.asyncIterator]() {
      const it = outputs[Symbol.asyncIterator]();
      return {
        async next() {
          const r = await it.next();
          if (!r.done) see(r.value);
          return r;
        },
      };
    },
  };
}

/** Everything one choice produced. */
export interface ChoiceResult {
  text: string;
  tokenIds: number[];
  logprobs: TokenLogprob[];
  finishReason: FinishReason | null;
  promptTokens: number;
  completionTokens: number;
}

/** Runs a Generation to its end and gathers each choice's output (indexed by choice). */
export async function collectChoices(gen: Generation, count: number): Promise<ChoiceResult[]> {
  const results: ChoiceResult[] = Array.from({ length: count }, () => ({
    text: "", tokenIds: [], logprobs: [], finishReason: null, promptTokens: 0, completionTokens: 0,
  }));
  for await (const { index, out } of gen.events()) {
    const r = results[index]!;
    r.text += out.text;
    r.tokenIds.push(...out.tokenIds);
    r.logprobs.push(...out.logprobs);
    r.promptTokens = out.promptTokens;
    r.completionTokens = out.completionTokens;
    if (out.finishReason !== null) r.finishReason = out.finishReason;
  }
  return results;
}

/**
 * OpenAI's finish_reason for an engine finish. "abort" (the server is closing: a client
 * that went away reads nothing) and "error" (an engine step failed) have no OpenAI
 * equivalent and become errors: a 503 or 500 response, or an error event in a stream.
 */
export function openAiFinishReason(reason: FinishReason | null): "stop" | "length" {
  switch (reason) {
    case "stop":
    case "length":
      return reason;
    case "abort":
    case null:
      throw new ApiError(503, "The request was cancelled because the server is shutting down.", "request_cancelled");
    case "error":
      throw new ApiError(500, "The engine failed while generating this request; the server log has the cause.", "engine_error");
    default:
      return reason satisfies never;
  }
}

/** Metrics status of a generation request that failed with `err`. */
export function failureStatus(err: unknown, clientSignal: AbortSignal): number {
  return clientSignal.aborted ? CLIENT_CLOSED : toApiError(err).status;
}

/**
 * Passes a stream's chunks through and reports its outcome once, when it ends:
 * 200 when complete, 499 when the client went away, else the error's status.
 */
export async function* withOutcome<T>(chunks: AsyncGenerator<T, void>, clientSignal: AbortSignal, done: (status: number) => void): AsyncGenerator<T, void> {
  let status = CLIENT_CLOSED;
  try {
    yield* chunks;
    status = 200;
  } catch (err) {
    status = failureStatus(err, clientSignal);
    throw err;
  } finally {
    done(status);
  }
}
