// What calibration text the quantizer feeds the model, and how it is tokenized.
//
// A calibration file is jsonl of {prompt, completion}, the same rows `inlaid eval`
// scores. Each row becomes the token sequence the model actually reads while it
// answers that prompt in eval: encode(prompt) (with BOS, as runExactMatch encodes
// prompts) followed by encode(completion) without special tokens. The trailing EOS is
// left out: in eval it is produced, never read. Inputs to every linear are then
// exactly the activations of a correct answer, position by position.

import { readEvalJsonl, type EvalRow } from "../eval/exact_match.js";
import type { TextTokenizer } from "../model/tokenizer.js";

/** Bumped whenever the recipe above changes, so cached Hessians from the old one are not reused. */
export const CALIBRATION_RECIPE = "bos+prompt+completion/v1";

export function calibrationIds(tokenizer: TextTokenizer, row: EvalRow): number[] {
  return [...tokenizer.encode(row.prompt), ...tokenizer.encode(row.completion, false)];
}

/** The first `limit` rows of a calibration file (all when undefined). */
export function readCalibration(path: string, limit?: number): EvalRow[] {
  return readEvalJsonl(path, limit);
}
