import type { GenerateOutput, SamplingParams } from "../../src/engine/types.js";

export const GREEDY: SamplingParams = {
  maxTokens: 48, temperature: 0, topP: 1, topK: 0, stop: [], ignoreEos: false, logprobs: -1,
};

export interface Collected {
  tokenIds: number[];
  text: string;
  finishReason: string | null;
  outputs: GenerateOutput[];
}

export async function collect(it: AsyncIterable<GenerateOutput>): Promise<Collected> {
  const outputs: GenerateOutput[] = [];
  for await (const o of it) outputs.push(o);
  return {
    tokenIds: outputs.flatMap((o) => [...o.tokenIds]),
    text: outputs.map((o) => o.text).join(""),
    finishReason: outputs.at(-1)?.finishReason ?? null,
    outputs,
  };
}
