// --api-key: every /v1/* route needs `Authorization: Bearer KEY`. Keys are compared
// through their SHA-256 digests in constant time, so timing says nothing about the key.

import { createHash, timingSafeEqual } from "node:crypto";
import type { MiddlewareHandler } from "hono";
import { ApiError } from "./errors.js";

const digest = (s: string): Buffer => createHash("sha256").update(s, "utf8").digest();

export function requireApiKey(apiKey: string): MiddlewareHandler {
  const expected = digest(apiKey);
  return async (c, next) => {
    const header = c.req.header("authorization") ?? "";
    const m = /^Bearer\s+(.+)$/i.exec(header.trim());
    if (!m || !timingSafeEqual(digest(m[1]!), expected)) {
      const message = m
        ? "Incorrect API key provided."
        : "Missing API key: send it in the Authorization header as 'Bearer KEY'.";
      throw new ApiError(401, message, "invalid_api_key");
    }
    await next();
  };
}
