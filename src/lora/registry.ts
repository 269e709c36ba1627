// Adapters known to the server, by name, held in host memory. The pool
// (adapter_pool.ts) copies them into device slots on demand.

import type { ModelConfig } from "../model/config.js";
import { AdapterLoadError, loadPeftAdapter, type PeftAdapter } from "./peft.js";

export interface RegisteredAdapter {
  /** Unique for the server's lifetime: a reloaded name gets a new id. */
  readonly id: number;
  readonly name: string;
  readonly path: string;
  readonly adapter: PeftAdapter;
}

export class AdapterRegistry {
  readonly #byName = new Map<string, RegisteredAdapter>();
  #nextId = 0;

  constructor(
    readonly config: ModelConfig,
    readonly maxRank: number,
  ) {}

  get(name: string): RegisteredAdapter | undefined {
    return this.#byName.get(name);
  }

  list(): RegisteredAdapter[] {
    return [...this.#byName.values()];
  }

  /** Reads and validates the adapter; throws AdapterLoadError without changing anything. The caller checks the name is free. */
  load(name: string, path: string): RegisteredAdapter {
    if (this.#byName.has(name)) throw new Error(`adapter '${name}' is already registered`);
    const adapter = loadPeftAdapter(path, this.config);
    if (adapter.maxRank > this.maxRank) {
      throw new AdapterLoadError(path, `rank ${adapter.maxRank} > max LoRA rank ${this.maxRank}; restart with a larger --max-lora-rank`);
    }
    const reg = { id: this.#nextId++, name, path, adapter };
    this.#byName.set(name, reg);
    return reg;
  }

  remove(name: string): RegisteredAdapter | undefined {
    const reg = this.#byName.get(name);
    this.#byName.delete(name);
    return reg;
  }
}
