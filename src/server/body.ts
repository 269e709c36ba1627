// Reads a JSON request body and validates it, turning every problem into a 400 that
// names the field and what was expected.

import type { Context } from "hono";
import type { z } from "zod";
import { ApiError } from "./errors.js";

export async function readJson(c: Context): Promise<unknown> {
  const text = await c.req.text();
  if (text.trim() === "") throw new ApiError(400, "The request body is empty; send a JSON object.", "invalid_json");
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ApiError(400, `The request body is not valid JSON (${(e as Error).message}).`, "invalid_json");
  }
}

/** Validates `body` against `schema`; a failure is a 400 naming the fields at fault (`param`: the first). */
export function validate<S extends z.ZodType>(schema: S, body: unknown): z.infer<S> {
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new ApiError(400, `The request body must be a JSON object, got ${describe(body)}.`, "invalid_type");
  }
  const r = schema.safeParse(body);
  if (r.success) return r.data;
  // Name every problem (a few at most), so one round trip fixes the request; `param` is the first.
  const issues = r.error.issues.slice(0, 3);
  const message = issues.map((i) => `Invalid value for '${formatPath(i.path)}': ${explain(i, valueAt(body, i.path))}.`).join(" ");
  const code = issues[0]!.code === "invalid_type" || issues[0]!.code === "invalid_union" ? "invalid_type" : "invalid_value";
  throw new ApiError(400, message, code, formatPath(issues[0]!.path));
}

/** `messages[0].content` from ["messages", 0, "content"]. */
function formatPath(path: readonly PropertyKey[]): string {
  let s = "";
  for (const k of path) s += typeof k === "number" ? `[${k}]` : s === "" ? String(k) : `.${String(k)}`;
  return s || "body";
}

function valueAt(body: unknown, path: readonly PropertyKey[]): unknown {
  let v: unknown = body;
  for (const k of path) {
    if (v === null || typeof v !== "object") return undefined;
    v = (v as Record<PropertyKey, unknown>)[k];
  }
  return v;
}

const ARTICLE: Readonly<Record<string, string>> = {
  int: "an integer",
  number: "a number",
  string: "a string",
  boolean: "a boolean (true or false)",
  array: "an array",
  object: "an object",
};

function explain(issue: z.core.$ZodIssue, input: unknown): string {
  switch (issue.code) {
    case "invalid_type":
      if (input === undefined) return `this field is required (expected ${ARTICLE[issue.expected] ?? issue.expected})`;
      return `expected ${ARTICLE[issue.expected] ?? issue.expected}, got ${describe(input)}`;
    case "invalid_union":
      // Unions carry their own message ("expected a string or an array of strings").
      return input === undefined ? `this field is required (${issue.message})` : `${issue.message}, got ${describe(input)}`;
    case "too_small":
      if (issue.origin === "array" || issue.origin === "string") return `must have at least ${issue.minimum} ${issue.origin === "array" ? "item(s)" : "character(s)"}`;
      return `must be ${issue.inclusive ? ">=" : ">"} ${issue.minimum}, got ${describe(input)}`;
    case "too_big":
      if (issue.origin === "array" || issue.origin === "string") return `must have at most ${issue.maximum} ${issue.origin === "array" ? "item(s)" : "character(s)"}`;
      return `must be ${issue.inclusive ? "<=" : "<"} ${issue.maximum}, got ${describe(input)}`;
    default:
      return `${issue.message}${input === undefined ? "" : `, got ${describe(input)}`}`;
  }
}

function describe(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  switch (typeof v) {
    case "string":
      return `the string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v)}`;
    case "number":
    case "boolean":
      return String(v);
    case "object":
      return "an object";
    default:
      return typeof v;
  }
}
