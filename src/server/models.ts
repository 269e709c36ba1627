// `model` names: the base model's id selects no adapter, an adapter's name selects it.
// GET /v1/models lists them in OpenAI's shape, adapters naming the base as parent.

import type { Context } from "hono";
import type { ServingEngine } from "../engine/types.js";
import { modelNotFound } from "./errors.js";

export interface ResolvedModel {
  /** The name the client asked for (echoed in responses and used as the metrics label). */
  readonly model: string;
  /** Adapter to run, null for the base model. */
  readonly adapter: string | null;
}

/** The adapter a request's `model` selects; absent = the base model; unknown = 404. */
export function resolveModel(engine: ServingEngine, model: string | null | undefined): ResolvedModel {
  if (model === null || model === undefined || model === engine.modelId) return { model: engine.modelId, adapter: null };
  if (engine.listAdapters().some((a) => a.name === model)) return { model, adapter: model };
  throw modelNotFound(model);
}

export interface ModelCard {
  id: string;
  object: "model";
  created: number;
  owned_by: "inlaid";
  root: string;
  parent: string | null;
  max_model_len: number;
}

export function modelCards(engine: ServingEngine, created: number): ModelCard[] {
  const card = (id: string, root: string, parent: string | null): ModelCard => ({
    id, object: "model", created, owned_by: "inlaid", root, parent, max_model_len: engine.maxModelLen,
  });
  return [card(engine.modelId, engine.modelId, null), ...engine.listAdapters().map((a) => card(a.name, a.path, engine.modelId))];
}

export function listModels(engine: ServingEngine, created: number) {
  return (c: Context): Response => c.json({ object: "list", data: modelCards(engine, created) });
}

export function retrieveModel(engine: ServingEngine, created: number) {
  return (c: Context): Response => {
    const id = c.req.param("id") ?? "";
    const card = modelCards(engine, created).find((m) => m.id === id);
    if (!card) throw modelNotFound(id);
    return c.json(card);
  };
}
