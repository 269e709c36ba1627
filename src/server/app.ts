// The OpenAI-compatible HTTP server: routes, middleware order, error mapping, and
// startServer, which listens and shuts down cleanly (open streams end, sockets close).

import { type AddressInfo } from "node:net";
import { serve, type ServerType } from "@hono/node-server";
import { Hono, type Context } from "hono";
import { bodyLimit } from "hono/body-limit";
import type { ServingEngine } from "../engine/types.js";
import { loadAdapter, unloadAdapter } from "./adapters.js";
import { requireApiKey } from "./auth.js";
import { chatCompletions } from "./chat.js";
import { completions } from "./completions.js";
import { ApiError, errorResponse } from "./errors.js";
import { InflightRequests, type ServerContext } from "./generation.js";
import { ServerMetrics } from "./metrics.js";
import { listModels, retrieveModel } from "./models.js";

export interface AppOptions {
  /** When set, /v1/* needs `Authorization: Bearer KEY` (/health and /metrics stay open). */
  readonly apiKey?: string | undefined;
  /** Largest request body accepted (default 16 MiB); larger ones get 413 before they are read. */
  readonly maxBodyBytes?: number | undefined;
}

export interface ServerOptions extends AppOptions {
  readonly host: string;
  /** 0 = any free port. */
  readonly port: number;
}

export interface InlaidApp {
  readonly app: Hono;
  readonly metrics: ServerMetrics;
  /** Requests in flight; closing the server aborts them. */
  readonly inflight: InflightRequests;
}

export interface RunningServer {
  /** `http://host:port`, without a trailing slash. */
  readonly url: string;
  /** Stops accepting connections, ends open requests and streams, and resolves once the socket is closed. */
  close(): Promise<void>;
}

export const DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024;

/** Path -> methods, for telling 405 (known path, other method) from 404. */
const ROUTES: ReadonlyMap<RegExp, readonly string[]> = new Map([
  [/^\/health$/, ["GET"]],
  [/^\/metrics$/, ["GET"]],
  [/^\/v1\/models$/, ["GET"]],
  [/^\/v1\/models\/.+$/, ["GET"]],
  [/^\/v1\/completions$/, ["POST"]],
  [/^\/v1\/chat\/completions$/, ["POST"]],
  [/^\/v1\/load_lora_adapter$/, ["POST"]],
  [/^\/v1\/unload_lora_adapter$/, ["POST"]],
]);

export function createApp(engine: ServingEngine, opts: AppOptions = {}): InlaidApp {
  const metrics = new ServerMetrics(engine);
  const inflight = new InflightRequests();
  const ctx: ServerContext = { engine, metrics, inflight };
  const created = Math.floor(Date.now() / 1000);
  const maxBodyBytes = opts.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES;

  const app = new Hono();
  app.onError((err, c) => errorResponse(c, err));
  app.notFound((c) => {
    const methods = [...ROUTES].find(([re]) => re.test(c.req.path))?.[1];
    if (methods) {
      c.header("Allow", methods.join(", "));
      return errorResponse(c, new ApiError(405, `${c.req.method} is not allowed on ${c.req.path}; use ${methods.join(" or ")}.`, "method_not_allowed"));
    }
    return errorResponse(c, new ApiError(404, `There is no route ${c.req.method} ${c.req.path}.`, "not_found"));
  });

  app.get("/health", (c) => c.json({ status: "ok" }));
  app.get("/metrics", async (c) => c.body(await metrics.registry.metrics(), 200, { "Content-Type": metrics.registry.contentType }));

  if (opts.apiKey) app.use("/v1/*", requireApiKey(opts.apiKey));
  // Refuses by Content-Length before reading; a chunked body is counted as it streams in.
  app.use(
    "*",
    bodyLimit({
      maxSize: maxBodyBytes,
      onError: (c: Context) =>
        errorResponse(c, new ApiError(413, `The request body is larger than the server's limit of ${maxBodyBytes} bytes.`, "request_too_large")),
    }),
  );

  app.get("/v1/models", listModels(engine, created));
  app.get("/v1/models/:id{.+}", retrieveModel(engine, created));
  app.post("/v1/completions", completions(ctx));
  app.post("/v1/chat/completions", chatCompletions(ctx));
  app.post("/v1/load_lora_adapter", loadAdapter(engine));
  app.post("/v1/unload_lora_adapter", unloadAdapter(engine));
  return { app, metrics, inflight };
}

/** Serves `engine` on host:port until close(). Rejects when the port cannot be bound. */
export async function startServer(engine: ServingEngine, opts: ServerOptions): Promise<RunningServer> {
  const { app, inflight } = createApp(engine, opts);
  const server = await new Promise<ServerType>((resolve, reject) => {
    const s = serve({ fetch: app.fetch, hostname: opts.host, port: opts.port });
    s.once("error", reject);
    s.once("listening", () => {
      s.off("error", reject);
      resolve(s);
    });
  });
  server.on("error", (err) => process.stderr.write(`inlaid: server error: ${err.message}\n`));
  const addr = server.address() as AddressInfo;
  const host = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;
  let closing: Promise<void> | null = null;
  return {
    url: `http://${host}:${addr.port}`,
    close() {
      closing ??= new Promise<void>((resolve) => {
        // Stop accepting, end every request in flight (streams send their last event),
        // and close keep-alive sockets as they go idle; whatever is still open after a
        // grace period is cut.
        const http = server as import("node:http").Server;
        const idle = setInterval(() => http.closeIdleConnections(), 25);
        const cut = setTimeout(() => http.closeAllConnections(), 2000);
        server.close(() => {
          clearInterval(idle);
          clearTimeout(cut);
          resolve();
        });
        inflight.abortAll();
        http.closeIdleConnections();
      });
      return closing;
    },
  };
}
