import type { QueuedRequest, SchedulingPolicy } from "./policy.js";

/** First come, first served (vLLM / S-LoRA behaviour). */
export class FcfsPolicy implements SchedulingPolicy {
  readonly name = "fcfs";
  order(waiting: readonly QueuedRequest[]): QueuedRequest[] {
    return [...waiting].sort((a, b) => a.arrival - b.arrival || a.seqId - b.seqId);
  }
}
