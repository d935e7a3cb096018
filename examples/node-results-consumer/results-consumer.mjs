// Reads uploads-consumer's result events from NATS JetStream and checks each against the AsyncAPI
// document (docs/asyncapi.yaml): the schemas there are generated from the daemon's own models, so a
// service in another language learns our messages from the document, not from our code.
//
//   npm ci && NATS_URL=nats://localhost:4222 node results-consumer.mjs
//
// Environment:
//   NATS_URL               nats://localhost:4222 (NATS_USER/NATS_PASSWORD, NATS_TOKEN or NATS_CREDS to log in)
//   RESULTS_STREAM         FILE_PROCESSED
//   RESULTS_FILTER         file.processed.*   (every consumer's results; file.processed.NAME for one)
//   DURABLE                a durable pull consumer of that name, made if missing, each event acknowledged
//                          once handled; unset: an ordered consumer that keeps no state on the server
//   STOP_WHEN_IDLE_MS      stop after this long without a new event (unset: run until interrupted)
//   ASYNCAPI               the document (default: ../../docs/asyncapi.yaml beside this file)
//
// Prints one JSON line per event: {"event_id", "consumer", "valid", ...}; an event the schema refuses is
// logged with the schema's errors and terminated (never redelivered: it is a contract bug, not a hiccup).
// Exits 1 if any event was invalid.

import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import Ajv from "ajv";
import addFormats from "ajv-formats";
import { AckPolicy, DeliverPolicy, connect, credsAuthenticator } from "nats";
import { parse } from "yaml";

const here = dirname(fileURLToPath(import.meta.url));
const env = process.env;
const documentPath = env.ASYNCAPI || resolve(here, "../../docs/asyncapi.yaml");
const stream = env.RESULTS_STREAM || "FILE_PROCESSED";
const filter = env.RESULTS_FILTER || "file.processed.*";
const idleMs = env.STOP_WHEN_IDLE_MS ? Number(env.STOP_WHEN_IDLE_MS) : undefined;

// The document's component schemas, compiled once; refs point at #/components/schemas/NAME.
function validators(path) {
  const document = parse(readFileSync(path, "utf8"));
  if (!String(document.asyncapi).startsWith("3.")) throw new Error(`${path} is not an AsyncAPI 3 document`);
  const ajv = new Ajv({ strict: false, allErrors: true });
  addFormats(ajv);
  const id = "urn:uploads-consumer:asyncapi";
  ajv.addSchema({ $id: id, components: { schemas: document.components.schemas } });
  const message = document.components.messages.resultEvent;
  const name = (ref) => ref.$ref.split("/").pop();
  return {
    payload: ajv.getSchema(`${id}#/components/schemas/${name(message.payload)}`),
    headers: ajv.getSchema(`${id}#/components/schemas/${name(message.headers)}`),
  };
}

function connectOptions() {
  const options = { servers: (env.NATS_URL || "nats://localhost:4222").split(","), name: "node-results-consumer" };
  if (env.NATS_USER) Object.assign(options, { user: env.NATS_USER, pass: env.NATS_PASSWORD });
  if (env.NATS_TOKEN) options.token = env.NATS_TOKEN;
  if (env.NATS_CREDS) options.authenticator = credsAuthenticator(readFileSync(env.NATS_CREDS));
  return options;
}

async function resultsConsumer(nc) {
  const js = nc.jetstream();
  if (!env.DURABLE) return js.consumers.get(stream, { filterSubjects: filter });
  const jsm = await nc.jetstreamManager();
  try {
    await jsm.consumers.info(stream, env.DURABLE);
  } catch {
    await jsm.consumers.add(stream, {
      durable_name: env.DURABLE,
      ack_policy: AckPolicy.Explicit,
      deliver_policy: DeliverPolicy.All,
      filter_subject: filter,
    });
  }
  return js.consumers.get(stream, env.DURABLE);
}

function headersOf(msg) {
  const out = {};
  for (const [key, values] of msg.headers || []) out[key] = values[0];
  return out;
}

const check = validators(documentPath);
const nc = await connect(connectOptions());
const consumer = await resultsConsumer(nc);
const seen = new Set(); // a redelivery, or a republish after the duplicate window: key on event_id and consumer
let invalid = 0;
let timer;
const messages = await consumer.consume({ max_messages: 100 });
const idle = () => {
  clearTimeout(timer);
  if (idleMs !== undefined) timer = setTimeout(() => messages.stop(), idleMs);
};
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => messages.stop());
idle();
for await (const msg of messages) {
  idle();
  let event;
  try {
    event = JSON.parse(new TextDecoder().decode(msg.data));
  } catch (error) {
    event = undefined;
  }
  const headers = headersOf(msg);
  const ok = event !== undefined && check.payload(event) && check.headers(headers);
  if (!ok) {
    invalid += 1;
    const errors = [...(check.payload.errors || []), ...(check.headers.errors || [])];
    console.error(JSON.stringify({ subject: msg.subject, valid: false, errors }));
    if (env.DURABLE) msg.term();
    continue;
  }
  const key = `${event.event_id}:${event.consumer}`;
  console.log(
    JSON.stringify({
      event_id: event.event_id,
      consumer: event.consumer,
      after: event.after,
      file: event.original_filename,
      processors: event.processors,
      valid: true,
      seen_before: seen.has(key),
    }),
  );
  seen.add(key);
  if (env.DURABLE) await msg.ackAck();
}
clearTimeout(timer);
await nc.drain();
process.exit(invalid ? 1 : 0);
