// Progress for long commands (loading, eval, quantization...): a cli-progress bar on
// a terminal, plain lines otherwise (logs, CI, pipes), so output stays readable when
// it is not a terminal. Everything goes to stderr: stdout is for results.

import cliProgress from "cli-progress";

export interface ProgressReporter {
  /** A one-off status line ("loading adapter reverse"). */
  note(message: string): void;
  /** Starts counted work: `total` units of `unit` ("prompts", "layers"). */
  start(label: string, total: number, unit?: string): void;
  /** Units done so far (monotonic). */
  update(done: number): void;
  /** Ends the counted work; safe to call twice or without start(). */
  stop(): void;
}

export interface ProgressOptions {
  /** Where to write (default process.stderr). */
  readonly stream?: NodeJS.WriteStream;
  /** Force bar (true) or plain lines (false); default: whether `stream` is a TTY. */
  readonly tty?: boolean;
  /** Plain mode prints a line each time this fraction of the work is crossed (default 0.1). */
  readonly every?: number;
  /** Print nothing (for --quiet or embedding). */
  readonly quiet?: boolean;
}

export function createProgress(opts: ProgressOptions = {}): ProgressReporter {
  const stream = opts.stream ?? process.stderr;
  if (opts.quiet) return { note() {}, start() {}, update() {}, stop() {} };
  const tty = opts.tty ?? stream.isTTY === true;
  return tty ? new BarProgress(stream) : new LineProgress(stream, opts.every ?? 0.1);
}

class BarProgress implements ProgressReporter {
  readonly #stream: NodeJS.WriteStream;
  #bar: cliProgress.SingleBar | null = null;

  constructor(stream: NodeJS.WriteStream) {
    this.#stream = stream;
  }

  note(message: string): void {
    // Clear the bar's line, print the note, and let the bar redraw below it.
    if (this.#bar) this.#stream.write("\r\x1b[K");
    this.#stream.write(`${message}\n`);
    this.#bar?.render();
  }

  start(label: string, total: number, unit = ""): void {
    this.stop();
    this.#bar = new cliProgress.SingleBar(
      {
        stream: this.#stream,
        format: `${label} [{bar}] {percentage}% | {value}/{total}${unit ? ` ${unit}` : ""} | {duration_formatted} elapsed, ETA {eta_formatted}`,
        hideCursor: true,
        etaBuffer: 50,
        fps: 10,
      },
      cliProgress.Presets.shades_classic,
    );
    this.#bar.start(total, 0);
  }

  update(done: number): void {
    this.#bar?.update(done);
  }

  stop(): void {
    this.#bar?.stop();
    this.#bar = null;
  }
}

class LineProgress implements ProgressReporter {
  readonly #stream: NodeJS.WriteStream;
  readonly #every: number;
  #label = "";
  #unit = "";
  #total = 0;
  #done = 0;
  #printedStep = -1;
  #startedAt = 0;
  #active = false;

  constructor(stream: NodeJS.WriteStream, every: number) {
    this.#stream = stream;
    this.#every = every > 0 && every <= 1 ? every : 0.1;
  }

  note(message: string): void {
    this.#stream.write(`${message}\n`);
  }

  start(label: string, total: number, unit = ""): void {
    this.stop();
    this.#label = label;
    this.#unit = unit;
    this.#total = total;
    this.#done = 0;
    this.#printedStep = 0;
    this.#startedAt = performance.now();
    this.#active = true;
    this.#line();
  }

  update(done: number): void {
    if (!this.#active) return;
    this.#done = done;
    const step = this.#total > 0 ? Math.floor(done / this.#total / this.#every + 1e-9) : 0;
    if (step > this.#printedStep) {
      this.#printedStep = step;
      this.#line();
    }
  }

  stop(): void {
    if (!this.#active) return;
    this.#active = false;
    // The last update already printed 100%; otherwise say where it stopped.
    if (this.#done < this.#total) this.#line();
  }

  #line(): void {
    const pct = this.#total > 0 ? Math.floor((100 * this.#done) / this.#total) : 100;
    const secs = ((performance.now() - this.#startedAt) / 1000).toFixed(1);
    const unit = this.#unit ? ` ${this.#unit}` : "";
    this.#stream.write(`${this.#label}: ${this.#done}/${this.#total}${unit} (${pct}%) ${secs} s\n`);
  }
}
