// Scheduling policies decide which waiting requests join the running batch next.
// They see requests only through this narrow view, never device state.

export interface QueuedRequest {
  readonly seqId: number;
  /** Adapter name, "" for the base model. */
  readonly adapter: string;
  /** Arrival time (ms, monotonic). */
  readonly arrival: number;
  readonly promptTokens: number;
  readonly maxTokens: number;
}

export interface SchedulingPolicy {
  readonly name: string;
  /** Waiting requests in the order they should be admitted (the engine admits while capacity lasts). */
  order(waiting: readonly QueuedRequest[], running: readonly QueuedRequest[]): QueuedRequest[];
}
