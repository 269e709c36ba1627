// Server-sent events in OpenAI's streaming format: `data: {json}\n\n` per chunk, then
// `data: [DONE]\n\n`. Chunks are produced on demand (pull), so a slow client slows the
// producer instead of filling memory; a client that goes away cancels the stream.

import { logUnexpected, toApiError } from "./errors.js";

const encoder = new TextEncoder();
const DONE = encoder.encode("data: [DONE]\n\n");

function event(payload: unknown): Uint8Array {
  return encoder.encode(`data: ${JSON.stringify(payload)}\n\n`);
}

/**
 * A text/event-stream response of `chunks`. An error thrown by `chunks` after the
 * headers went out is sent as one OpenAI-shaped `{"error": ...}` event before [DONE]
 * (the official clients raise it). `onCancel` runs when the client disconnects; it
 * must make a pending `chunks.next()` settle (abort the engine requests).
 */
export function sseResponse(chunks: AsyncGenerator<unknown, void>, onCancel: () => void): Response {
  const stream = new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        try {
          const r = await chunks.next();
          if (!r.done) {
            controller.enqueue(event(r.value));
            return;
          }
        } catch (err) {
          const e = toApiError(err);
          logUnexpected("stream", err, e);
          controller.enqueue(event(e.toJSON()));
        }
        controller.enqueue(DONE);
        controller.close();
      },
      cancel() {
        onCancel();
        chunks.return(undefined).catch(() => {});
      },
    },
    // Produce a chunk only when the previous one has been taken.
    { highWaterMark: 0 },
  );
  return new Response(stream, {
    status: 200,
    headers: {
      "Content-Type": "text/event-stream; charset=utf-8",
      "Cache-Control": "no-cache",
      // Proxies such as nginx would otherwise hold tokens back.
      "X-Accel-Buffering": "no",
    },
  });
}
