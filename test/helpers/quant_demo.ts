// Quantized copies of the demo model for serving tests: RTN in the GPTQ layout, with
// optional act-order (desc_act) from a seeded input order. Projections that read the same
// input (q/k/v; gate/up) get the same order, as GPTQ gives them (one Hessian per input),
// unless `splitQkv` gives k_proj of layer 0 its own (its fused group then cannot share one
// g_idx and is served dequantized).

import { loadModelConfig } from "../../src/model/config.js";
import { SafetensorsDir } from "../../src/model/safetensors.js";
import { toF32 } from "../../src/backend/tensor.js";
import { writeQuantizedCheckpoint } from "../../src/quant/checkpoint.js";
import { linearModules } from "../../src/quant/modules.js";
import { quantizeRtn } from "../../src/quant/rtn.js";
import type { QuantizedWeight, QuantSpec } from "../../src/quant/types.js";
import { DEMO_BASE } from "./demo.js";
import { seededPerm, seededRandom } from "./quant_random.js";

const INPUT_OF: Record<string, number> = { q_proj: 0, k_proj: 0, v_proj: 0, o_proj: 1, gate_proj: 2, up_proj: 2, down_proj: 3 };

export function quantizeDemo(out: string, spec: QuantSpec, opts: { splitQkv?: boolean } = {}): void {
  const cfg = loadModelConfig(DEMO_BASE);
  const src = SafetensorsDir.open(DEMO_BASE);
  try {
    const weights = new Map<string, QuantizedWeight>();
    for (const m of linearModules(cfg)) {
      const t = src.get(`${m.name}.weight`);
      let seed = m.layer * 4 + INPUT_OF[m.proj]!;
      if (opts.splitQkv && m.layer === 0 && m.proj === "k_proj") seed += 1000;
      const perm = spec.descAct ? seededPerm(m.inDim, seededRandom(seed)) : undefined;
      weights.set(m.name, quantizeRtn(toF32(t.data, t.dtype), m.outDim, m.inDim, spec, perm ? { perm } : {}));
    }
    writeQuantizedCheckpoint({ baseDir: DEMO_BASE, outDir: out, spec, weights });
  } finally {
    src.close();
  }
}
