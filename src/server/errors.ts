// OpenAI-shaped errors: every failure the server answers is one ApiError, rendered as
// {"error": {"message", "type", "param", "code"}}. Engine, tokenizer and adapter-loader
// errors are mapped here, once; anything unexpected becomes a 500 without a stack trace.

import type { Context } from "hono";
import { RequestError } from "../engine/types.js";
import { AdapterLoadError } from "../lora/peft.js";
import { ChatTemplateError } from "../model/tokenizer.js";

export type ApiStatus = 400 | 401 | 404 | 405 | 413 | 429 | 500 | 503;

/** The `type` field per status: the names of the official client's error classes where it has one. */
const TYPE_BY_STATUS: Readonly<Record<ApiStatus, string>> = {
  400: "BadRequestError",
  401: "AuthenticationError",
  404: "NotFoundError",
  405: "MethodNotAllowedError",
  413: "RequestTooLargeError",
  429: "RateLimitError",
  500: "InternalServerError",
  503: "ServiceUnavailableError",
};

export class ApiError extends Error {
  constructor(
    readonly status: ApiStatus,
    message: string,
    readonly code: string | null = null,
    readonly param: string | null = null,
  ) {
    super(message);
    this.name = "ApiError";
  }

  get type(): string {
    return TYPE_BY_STATUS[this.status];
  }

  toJSON(): { error: { message: string; type: string; param: string | null; code: string | null } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export function modelNotFound(model: string, param = "model"): ApiError {
  return new ApiError(404, `The model \`${model}\` does not exist.`, "model_not_found", param);
}

/** Programming errors: a bug of ours, never the client's. */
function isBug(err: Error): boolean {
  return err instanceof TypeError || err instanceof RangeError || err instanceof ReferenceError || err instanceof SyntaxError;
}

/**
 * The ApiError for anything a handler threw. `clientErrorsAs400` is for operations whose
 * every ordinary failure is about what the client sent (loading an adapter from a path
 * it named); elsewhere an unknown error is ours (500).
 */
export function toApiError(err: unknown, clientErrorsAs400 = false): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof RequestError) return new ApiError(err.status, err.message, err.code, err.param);
  if (err instanceof ChatTemplateError) return new ApiError(400, err.message, err.code, "messages");
  if (err instanceof AdapterLoadError) return new ApiError(400, err.message, "invalid_adapter", "lora_path");
  if (clientErrorsAs400 && err instanceof Error && !isBug(err)) return new ApiError(400, err.message, "invalid_value", null);
  const why = err instanceof Error ? err.message : String(err);
  return new ApiError(500, `The server had an error while processing the request: ${why}`, "internal_error");
}

/** Logs errors that are not the client's (500s that we did not raise ourselves) to stderr, with their stack. */
export function logUnexpected(where: string, err: unknown, e: ApiError): void {
  if (e.status === 500 && !(err instanceof ApiError)) {
    process.stderr.write(`inlaid: ${where}: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
  }
}

/** Writes the error as the response. */
export function errorResponse(c: Context, err: unknown): Response {
  const e = toApiError(err);
  logUnexpected(`${c.req.method} ${c.req.path}`, err, e);
  return c.json(e.toJSON(), e.status);
}
