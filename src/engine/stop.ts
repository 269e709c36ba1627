// Stop strings over streamed text: output ends before the first occurrence of any stop
// string and excludes it, whatever the split into deltas.
//
// "First" means first to complete, as the stream is stopped as soon as a stop string
// appears (vLLM, OpenAI); among those completing at the same character, the longest
// wins. This differs from "earliest start" only when a stop string ends inside a longer
// one that starts earlier (stops ["a", "caa"], text "bcaa": output "bc", not "b"), and it
// never needs text from beyond the stop.
//
// Invariant: nothing emitted can be the start of a stop-string occurrence. After each
// push, the held-back tail is the longest suffix of the unemitted text that is a proper
// prefix of some stop string; everything before it is emitted. No occurrence lies wholly
// inside the held tail (the previous push would have found it), so the first one to
// complete lies in held + delta, and indexOf over that finds it.

export interface StopResult {
  /** Text safe to emit now (before the stop string when `stopped`). */
  readonly text: string;
  /** A stop string completed: the stream is over; later pushes return nothing. */
  readonly stopped: boolean;
}

export class StopMatcher {
  readonly #stops: readonly string[];
  readonly #maxLen: number;
  /** Text received but not emitted: could still begin a stop string. */
  #held = "";
  #stopped = false;

  /** Empty stop strings are ignored (they would match everywhere). */
  constructor(stops: readonly string[]) {
    this.#stops = [...new Set(stops.filter((s) => s.length > 0))];
    this.#maxLen = this.#stops.reduce((m, s) => Math.max(m, s.length), 0);
  }

  /** Whether there are stop strings at all (without, push returns its input). */
  get active(): boolean {
    return this.#stops.length > 0;
  }

  get stopped(): boolean {
    return this.#stopped;
  }

  push(delta: string): StopResult {
    if (this.#stopped) return { text: "", stopped: true };
    if (this.#stops.length === 0) return { text: delta, stopped: false };
    const buf = this.#held + delta;

    // Earliest end, then earliest start (indexOf gives each stop's earliest end).
    let first = -1;
    let firstEnd = Infinity;
    for (const s of this.#stops) {
      const i = buf.indexOf(s);
      if (i < 0) continue;
      const end = i + s.length;
      if (end < firstEnd || (end === firstEnd && i < first)) {
        first = i;
        firstEnd = end;
      }
    }
    if (first >= 0) {
      this.#stopped = true;
      this.#held = "";
      return { text: buf.slice(0, first), stopped: true };
    }

    const keep = this.#partialSuffixLength(buf);
    this.#held = buf.slice(buf.length - keep);
    return { text: buf.slice(0, buf.length - keep), stopped: false };
  }

  /** End of stream: the held-back text (no stop string completed). */
  flush(): string {
    const out = this.#stopped ? "" : this.#held;
    this.#held = "";
    return out;
  }

  /** Length of the longest suffix of `buf` that is a proper prefix of some stop string. */
  #partialSuffixLength(buf: string): number {
    for (let k = Math.min(buf.length, this.#maxLen - 1); k > 0; k--) {
      const tail = buf.slice(buf.length - k);
      if (this.#stops.some((s) => s.length > k && s.startsWith(tail))) return k;
    }
    return 0;
  }
}
