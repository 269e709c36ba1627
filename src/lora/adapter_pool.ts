// The device-side adapter pool: a fixed number of slots, each holding one adapter's
// A/B for every (layer, projection). Adapters live in host memory (the registry);
// a slot is filled on demand and the least recently used unpinned slot is evicted.
// Running sequences pin their adapter's slot.

import type { Backend, LoraStack } from "../backend/backend.js";
import type { ModelConfig } from "../model/config.js";
import { GROUP_NAMES, LINEAR_GROUPS, groupOf, type Linear, type LinearGroup, type LinearWrapper, type Projection } from "../model/linear.js";
import { groupDims } from "../model/weights.js";
import { LoraLinear } from "./lora_linear.js";
import type { PeftAdapter } from "./peft.js";

interface Slot {
  /** Registry id of the resident adapter, or -1. */
  adapterId: number;
  pins: number;
  lastUsed: number;
}

export class AdapterPool {
  readonly #backend: Backend;
  /** stacks[layer][group]: one stack per fused linear, one split per member projection. */
  readonly #stacks: Record<LinearGroup, LoraStack>[];
  readonly #slots: Slot[];
  #clock = 0;

  constructor(
    backend: Backend,
    readonly config: ModelConfig,
    readonly numSlots: number,
    readonly maxRank: number,
  ) {
    if (numSlots < 1) throw new Error(`the adapter pool needs at least one slot (got ${numSlots})`);
    this.#backend = backend;
    this.#stacks = Array.from({ length: config.numLayers }, () => {
      const row = {} as Record<LinearGroup, LoraStack>;
      for (const g of GROUP_NAMES) {
        const { inDim, outDims } = groupDims(config, g);
        row[g] = backend.createLoraStack(numSlots, maxRank, inDim, outDims);
      }
      return row;
    });
    this.#slots = Array.from({ length: numSlots }, () => ({ adapterId: -1, pins: 0, lastUsed: 0 }));
  }

  /** Decorates the model's projections with the LoRA term. */
  readonly wrap: LinearWrapper = (layer: number, group: LinearGroup, base: Linear): Linear =>
    new LoraLinear(this.#backend, base, this.#stacks[layer]![group]);

  /** Slot holding `adapterId`, or -1. */
  slotOf(adapterId: number): number {
    return this.#slots.findIndex((s) => s.adapterId === adapterId);
  }

  /**
   * Pins `adapter` into a slot, loading it if needed. Returns the slot, or -1 when
   * every slot is pinned by adapters in use (the caller waits for one to finish).
   */
  acquire(adapterId: number, adapter: PeftAdapter): number {
    let slot = this.slotOf(adapterId);
    if (slot < 0) {
      slot = this.#victim();
      if (slot < 0) return -1;
      this.#fill(slot, adapter);
      this.#slots[slot]!.adapterId = adapterId;
    }
    const s = this.#slots[slot]!;
    s.pins++;
    s.lastUsed = ++this.#clock;
    return slot;
  }

  release(slot: number): void {
    const s = this.#slots[slot];
    if (!s || s.pins <= 0) throw new Error(`release of LoRA slot ${slot}, which is not pinned`);
    s.pins--;
  }

  /** Forgets an adapter (after unload); its slot is reused once unpinned. */
  evict(adapterId: number): void {
    const slot = this.slotOf(adapterId);
    if (slot >= 0 && this.#slots[slot]!.pins === 0) this.#slots[slot]!.adapterId = -1;
  }

  get residentCount(): number {
    return this.#slots.filter((s) => s.adapterId >= 0).length;
  }

  #victim(): number {
    let best = -1;
    for (let i = 0; i < this.#slots.length; i++) {
      const s = this.#slots[i]!;
      if (s.pins > 0) continue;
      if (s.adapterId < 0) return i;
      if (best < 0 || s.lastUsed < this.#slots[best]!.lastUsed) best = i;
    }
    return best;
  }

  #fill(slot: number, adapter: PeftAdapter): void {
    if (adapter.maxRank > this.maxRank) {
      throw new Error(`adapter rank ${adapter.maxRank} > max LoRA rank ${this.maxRank}; raise --max-lora-rank`);
    }
    const present = new Set<string>();
    for (const m of adapter.modules) {
      const { group, index } = groupOf(m.module);
      this.#backend.writeLoraSlot(this.#stacks[m.layer]![group], slot, m.rank, m.scale, m.a, m.b, index);
      present.add(`${m.layer}.${m.module}`);
    }
    // Projections this adapter does not target must not keep the previous occupant's weights.
    const empty = new Float32Array(0);
    for (let l = 0; l < this.config.numLayers; l++) {
      for (const g of GROUP_NAMES) {
        (LINEAR_GROUPS[g] as readonly Projection[]).forEach((p, index) => {
          if (!present.has(`${l}.${p}`)) this.#backend.writeLoraSlot(this.#stacks[l]![g], slot, 0, 0, empty, empty, index);
        });
      }
    }
  }

  dispose(): void {
    for (const row of this.#stacks) for (const g of GROUP_NAMES) this.#backend.freeLoraStack(row[g]);
  }
}
