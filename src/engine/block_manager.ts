// Paged KV-cache bookkeeping: which physical blocks each sequence owns. Pure
// bookkeeping (no device code), so it is tested on its own.

export class BlockManager {
  readonly #free: number[];

  constructor(
    readonly numBlocks: number,
    readonly blockSize: number,
  ) {
    if (numBlocks < 1 || blockSize < 1) throw new Error(`KV cache needs at least one block (got ${numBlocks} x ${blockSize})`);
    // Pop from the end, so low block ids are handed out first.
    this.#free = Array.from({ length: numBlocks }, (_, i) => numBlocks - 1 - i);
  }

  get freeBlocks(): number {
    return this.#free.length;
  }

  get usedBlocks(): number {
    return this.numBlocks - this.#free.length;
  }

  blocksFor(tokens: number): number {
    return Math.ceil(tokens / this.blockSize);
  }

  /** Blocks needed to grow `table` so it covers `tokens` tokens. */
  missing(table: readonly number[], tokens: number): number {
    return Math.max(0, this.blocksFor(tokens) - table.length);
  }

  /** Grows `table` to cover `tokens`; false (and no change) if there are not enough free blocks. */
  grow(table: number[], tokens: number): boolean {
    const need = this.missing(table, tokens);
    if (need > this.#free.length) return false;
    for (let i = 0; i < need; i++) table.push(this.#free.pop()!);
    return true;
  }

  release(table: number[]): void {
    for (const b of table) this.#free.push(b);
    table.length = 0;
  }
}
