// A fedpriv silo in Node.js, written from proto/ and docs/protocol.md alone.
//
// Its "training" adds --step to every element of a float32 model, so a test can
// check what the coordinator aggregated. Replace train() with real work.
//
//   node silo.js --coordinator HOST:PORT --ca ca.crt --cert silo.crt --key silo.key
//   node silo.js --coordinator HOST:PORT --insecure --identity silo-a   (plain text)
//
// It joins, long-polls for tasks, streams each result back, declines what it
// cannot do (secure aggregation, compression, dtypes other than float32) with
// the reason, and exits 0 when the coordinator says the federation is finished.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");

function parseArgs(argv) {
  const args = { step: 1.0, examples: 10, waitS: 10 };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    const next = () => argv[++i];
    if (key === "--coordinator") args.coordinator = next();
    else if (key === "--ca") args.ca = next();
    else if (key === "--cert") args.cert = next();
    else if (key === "--key") args.key = next();
    else if (key === "--insecure") args.insecure = true;
    else if (key === "--identity") args.identity = next();
    else if (key === "--step") args.step = Number(next());
    else if (key === "--examples") args.examples = Number(next());
    else throw new Error(`unknown argument ${key}`);
  }
  if (!args.coordinator) throw new Error("--coordinator HOST:PORT is required");
  if (args.insecure ? !args.identity : !(args.ca && args.cert && args.key)) {
    throw new Error("give --ca, --cert and --key, or --insecure with --identity");
  }
  return args;
}

function fleetClient(args) {
  const definition = protoLoader.loadSync("fedpriv/v1/fleet.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const { Fleet } = grpc.loadPackageDefinition(definition).fedpriv.v1;
  const credentials = args.insecure
    ? grpc.credentials.createInsecure()
    : grpc.credentials.createSsl(
        fs.readFileSync(args.ca),
        fs.readFileSync(args.key),
        fs.readFileSync(args.cert),
      );
  // Messages up to 8 MiB each way, as docs/protocol.md fixes.
  const limits = {
    "grpc.max_receive_message_length": 8 << 20,
    "grpc.max_send_message_length": 8 << 20,
  };
  return new Fleet(args.coordinator, credentials, limits);
}

// Every call carries the session id; in plain-text mode also the identity.
function metadataFor(session, args) {
  const md = new grpc.Metadata();
  md.set("fedpriv-session", session);
  if (args.insecure) md.set("fedpriv-silo", args.identity);
  return md;
}

function unary(client, method, request, md) {
  return new Promise((resolve, reject) =>
    client[method](request, md, { deadline: Date.now() + 30_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    ),
  );
}

// The task, then the model's chunks reassembled into one payload.
function pullTask(client, md, waitS) {
  return new Promise((resolve, reject) => {
    const stream = client.PullTask({ wait_s: waitS }, md, {
      deadline: Date.now() + (waitS + 600) * 1000,
    });
    let task = null;
    let payload = null;
    let filled = 0;
    stream.on("data", (message) => {
      if (message.part === "task") {
        task = message.task;
        if (task.model && task.model.tensors.length) {
          payload = Buffer.alloc(Number(task.model.payload_bytes));
        }
      } else if (message.part === "chunk") {
        if (!task || !payload) return reject(new Error("a chunk before the task's model"));
        const offset = Number(message.chunk.offset);
        if (offset !== filled) return reject(new Error(`chunk at ${offset}, expected ${filled}`));
        message.chunk.data.copy(payload, offset);
        filled += message.chunk.data.length;
      }
    });
    stream.on("error", reject);
    stream.on("end", () => {
      if (!task) return reject(new Error("the PullTask stream did not start with a task"));
      if (payload && filled !== payload.length) {
        return reject(new Error(`model ended at ${filled} of ${payload.length} bytes`));
      }
      resolve({ task, payload });
    });
  });
}

// Each tensor starts at the previous one's end rounded up to 8 bytes.
function float32Offsets(header) {
  const offsets = [];
  let at = 0;
  for (const spec of header.tensors) {
    if (spec.dtype !== "DTYPE_FLOAT32") throw new Error(`${spec.name} is ${spec.dtype}`);
    const count = spec.shape.reduce((n, d) => n * Number(d), 1);
    offsets.push({ at, count });
    at = Math.ceil((at + 4 * count) / 8) * 8;
  }
  return offsets;
}

function train(header, payload, step) {
  const update = Buffer.from(payload);
  for (const { at, count } of float32Offsets(header)) {
    for (let i = 0; i < count; i++) {
      const value = Math.fround(update.readFloatLE(at + 4 * i) + step);
      if (!Number.isFinite(value)) throw new Error("the update is not finite");
      update.writeFloatLE(value, at + 4 * i);
    }
  }
  return update;
}

function meanOf(header, payload) {
  let sum = 0;
  let n = 0;
  for (const { at, count } of float32Offsets(header)) {
    for (let i = 0; i < count; i++) sum += payload.readFloatLE(at + 4 * i);
    n += count;
  }
  return n ? sum / n : 0;
}

function pushResult(client, md, header, update) {
  return new Promise((resolve, reject) => {
    const call = client.PushResult(md, { deadline: Date.now() + 300_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
    call.write({ header });
    if (update) {
      const chunkBytes = header.update.chunk_bytes;
      for (let offset = 0; offset < update.length; offset += chunkBytes) {
        call.write({
          chunk: { offset: String(offset), data: update.subarray(offset, offset + chunkBytes) },
        });
      }
    }
    call.end();
  });
}

function decline(client, md, task, reason) {
  console.error(`declining round ${task.round}: ${reason}`);
  return pushResult(client, md, {
    task_id: task.task_id,
    round: task.round,
    kind: task.kind,
    declined_reason: reason.slice(0, 1000),
  });
}

async function runTask(client, md, args, task, payload) {
  if (task.secagg) return decline(client, md, task, "this silo does not do secure aggregation");
  if (task.compression !== "COMPRESSION_NONE") {
    return decline(client, md, task, `this silo does not send ${task.compression}`);
  }
  try {
    float32Offsets(task.model);
  } catch (err) {
    return decline(client, md, task, `this silo trains float32 models only: ${err.message}`);
  }
  const base = { task_id: task.task_id, round: task.round, kind: task.kind };
  if (task.kind === "TASK_KIND_TRAIN") {
    const update = train(task.model, payload, args.step);
    const reply = await pushResult(
      client,
      md,
      {
        ...base,
        num_examples: String(args.examples),
        metrics: { train_loss: { double_value: 0.0 } },
        update: task.model,
        update_compression: "COMPRESSION_NONE",
        compression: "none",
      },
      update,
    );
    console.error(`round ${task.round}: update sent, accepted=${reply.accepted}`);
  } else {
    await pushResult(client, md, {
      ...base,
      num_examples: String(args.examples),
      metrics: { loss: { double_value: meanOf(task.model, payload) } },
    });
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const client = fleetClient(args);
  const md = () => metadataFor(session, args);
  const session = crypto.randomBytes(16).toString("hex"); // 128 bits, once per process
  const joined = await unary(client, "Join", { sdk_version: "node-example/1.0" }, md());
  console.error(`joined federation=${joined.federation} as silo=${joined.silo}`);
  const beat = setInterval(
    () => client.Heartbeat({}, md(), () => {}),
    Math.max(1, joined.heartbeat_interval_s) * 1000,
  );
  try {
    for (;;) {
      const { task, payload } = await pullTask(client, md(), args.waitS);
      if (task.kind === "TASK_KIND_WAIT") continue;
      if (task.kind === "TASK_KIND_FINISHED") {
        console.error("federation finished");
        await unary(client, "Leave", { reason: "finished" }, md());
        return 0;
      }
      await runTask(client, md(), args, task, payload);
    }
  } finally {
    clearInterval(beat);
    client.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`silo stopped: ${err.details || err.message}`);
    process.exit(1);
  },
);
