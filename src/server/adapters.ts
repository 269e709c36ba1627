// vLLM's dynamic LoRA endpoints: POST /v1/load_lora_adapter {lora_name, lora_path} and
// POST /v1/unload_lora_adapter {lora_name}. Success answers are plain text, as vLLM's are.

import type { Context } from "hono";
import type { ServingEngine } from "../engine/types.js";
import { readJson, validate } from "./body.js";
import { ApiError, toApiError } from "./errors.js";
import { LoadAdapterSchema, UnloadAdapterSchema } from "./schemas.js";

export function loadAdapter(engine: ServingEngine) {
  return async (c: Context): Promise<Response> => {
    const { lora_name: name, lora_path: path } = validate(LoadAdapterSchema, await readJson(c));
    if (name === engine.modelId) {
      throw new ApiError(400, `'${name}' is the base model's name; pick another lora_name.`, "invalid_value", "lora_name");
    }
    if (engine.listAdapters().some((a) => a.name === name)) {
      throw new ApiError(400, `The lora adapter '${name}' has already been loaded; unload it first to replace it.`, "adapter_exists", "lora_name");
    }
    try {
      await engine.loadAdapter(name, path);
    } catch (err) {
      // Everything that goes wrong reading a path the client named is the client's to fix.
      throw toApiError(err, true);
    }
    return c.text(`Success: LoRA adapter '${name}' added successfully.`);
  };
}

export function unloadAdapter(engine: ServingEngine) {
  return async (c: Context): Promise<Response> => {
    const { lora_name: name } = validate(UnloadAdapterSchema, await readJson(c));
    await engine.unloadAdapter(name);
    return c.text(`Success: LoRA adapter '${name}' removed successfully.`);
  };
}
