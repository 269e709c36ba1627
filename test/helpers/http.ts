// Small HTTP helpers for server tests: JSON posts and an SSE reader.

export async function postJson(url: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

/** The OpenAI error object of a response, checking its shape. */
export async function errorOf(res: Response): Promise<{ message: string; type: string; param: string | null; code: string | null }> {
  const json = (await res.json()) as { error: { message: string; type: string; param: string | null; code: string | null } };
  if (!json.error || typeof json.error.message !== "string" || !("param" in json.error) || !("code" in json.error)) {
    throw new Error(`not an OpenAI-shaped error: ${JSON.stringify(json)}`);
  }
  return json.error;
}

/** Reads a whole `text/event-stream` body: the parsed `data:` payloads and whether it ended with [DONE]. */
export async function readSse<T = unknown>(res: Response): Promise<{ events: T[]; done: boolean }> {
  const text = await res.text();
  const events: T[] = [];
  let done = false;
  for (const block of text.split("\n\n")) {
    if (!block.startsWith("data: ")) continue;
    const data = block.slice("data: ".length);
    if (data === "[DONE]") done = true;
    else events.push(JSON.parse(data) as T);
  }
  return { events, done };
}

/** Polls `cond` every 20 ms until it holds or `ms` pass; returns whether it held. */
export async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return cond();
}
