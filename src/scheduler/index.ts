import { FcfsPolicy } from "./fcfs.js";
import type { SchedulingPolicy } from "./policy.js";

export const POLICIES = ["fcfs"] as const;
export type PolicyName = (typeof POLICIES)[number];

export function createPolicy(name: string): SchedulingPolicy {
  switch (name) {
    case "fcfs":
      return new FcfsPolicy();
    default:
      throw new Error(`unknown scheduling policy '${name}'; available: ${POLICIES.join(", ")}`);
  }
}
