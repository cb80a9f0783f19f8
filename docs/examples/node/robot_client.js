#!/usr/bin/env node
// A complete minimal robot-link client in Node.js (docs/robot-link.md): loads the .proto files
// straight from the repository, asks the daemon what the policy expects, records one episode
// (Act -> execute -> ReportStep per step), ends it with an outcome. With --show-refusals it also
// sends a few bad steps to show how the daemon refuses them (the episode stays open and keeps
// its good steps).
//
//   npm install @grpc/grpc-js @grpc/proto-loader
//   node docs/examples/node/robot_client.js 127.0.0.1:50051 --task reach-v3 --steps 20
//
// Prints one JSON object per line (spec, started, refused, ended) so a test can read it.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = process.env.FLEETLOOP_PROTO_ROOT || path.join(__dirname, "..", "..", "..", "proto");
const DEADLINE_MS = 2000; // every call carries a deadline; the daemon never keeps one waiting long

function parseArgs(argv) {
  const args = { address: argv[0] || "127.0.0.1:50051", task: "reach-v3", instruction: "reach the goal",
                 steps: 20, robotId: "", showRefusals: false, demonstration: false };
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--task") args.task = argv[++i];
    else if (a === "--instruction") args.instruction = argv[++i];
    else if (a === "--steps") args.steps = parseInt(argv[++i], 10);
    else if (a === "--robot-id") args.robotId = argv[++i];
    else if (a === "--show-refusals") args.showRefusals = true;
    else if (a === "--demonstration") args.demonstration = true;
    else throw new Error(`unknown argument ${a}`);
  }
  return args;
}

function connect(address) {
  const def = protoLoader.loadSync("fleetloop/v1/robot_link.proto", {
    includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, enums: String, defaults: true,
  });
  const v1 = grpc.loadPackageDefinition(def).fleetloop.v1;
  return new v1.RobotLink(address, grpc.credentials.createInsecure(),
                          { "grpc.max_send_message_length": 32 << 20 });
}

// client.Method(request) as a promise, with a deadline.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + DEADLINE_MS }, (err, response) => {
      if (err) reject(err); else resolve(response);
    });
  });
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
const codeName = (code) => Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// What the robot's sensors give, shaped as the spec says: state_dim floats and, for each camera
// the policy needs, an RGB frame of image_height x image_width sent as "raw" (uint8 HxWxC,
// row-major; "png" works too and is smaller on the wire).
function observation(spec, t, stateDim) {
  const images = spec.cameras.map((camera) => {
    const h = spec.image_height, w = spec.image_width, c = 3;
    return { camera, encoding: "raw", height: h, width: w, channels: c, data: Buffer.alloc(h * w * c, t % 255) };
  });
  const state = Array.from({ length: stateDim }, (_, i) => Math.sin(0.1 * t + i));
  return { images, state };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const client = connect(args.address);

  // 1. What to send: the running policy's spec and the daemon's limits.
  const { spec, limits } = await call(client, "GetSpec", {});
  emit({ event: "spec", spec, limits });
  const stateDim = spec.known ? spec.state_dim : 6;       // a policy that does not state it: our own
  const actionDim = spec.action_dim || 4;

  // 2. Start an episode (a demonstration needs no policy: the human's actions are reported).
  const kind = args.demonstration ? "EPISODE_KIND_DEMONSTRATION" : "EPISODE_KIND_ROLLOUT";
  const started = await call(client, "StartEpisode", { robot_id: args.robotId, task_id: args.task,
                                                       instruction: args.instruction, kind });
  const episodeId = started.episode_id;
  emit({ event: "started", episode_id: episodeId, policy_version: started.policy_version });

  // 3. The control loop: ask for actions, execute row 0 (a real robot executes up to `rows`
  //    rows, reporting each), report what was executed.
  let reported = 0;
  let rows = [];
  for (let t = 0; t < args.steps; t++) {
    const obs = observation(spec, t, stateDim);
    if (!args.demonstration && rows.length === 0) {
      const r = await call(client, "Act", { episode_id: episodeId, observation: obs });
      for (let i = 0; i < r.rows; i++) rows.push(r.actions.slice(i * r.action_dim, (i + 1) * r.action_dim));
    }
    const action = args.demonstration ? Array(actionDim).fill(0.1) : rows.shift();
    const ack = await call(client, "ReportStep", { episode_id: episodeId, observation: obs, action,
                                                   intervention: args.demonstration,
                                                   operator: args.demonstration ? "node-teleop" : "" });
    reported = ack.steps_recorded;

    // 4. (--show-refusals) Bad steps are refused with INVALID_ARGUMENT and a reason; nothing of
    //    them is recorded and the episode goes on.
    if (args.showRefusals && t === 2) {
      const bad = [
        ["wrong action length", { observation: obs, action: Array(actionDim + 1).fill(0) }],
        ["NaN in the action", { observation: obs, action: [NaN, ...Array(actionDim - 1).fill(0)] }],
        ["wrong state length", { observation: { images: obs.images, state: obs.state.slice(1) }, action }],
        ["raw bytes do not match the size", { observation: { images: obs.images.map((im) => ({ ...im, data: Buffer.alloc(5) })),
                                                             state: obs.state }, action }],
        ["undecodable PNG", { observation: { images: obs.images.map((im) => ({ ...im, encoding: "png",
                                                                                data: Buffer.concat([PNG_SIGNATURE, Buffer.from("not really")]) })),
                                             state: obs.state }, action }],
        ["huge image", { observation: { images: obs.images.map((im) => ({ ...im, height: 9000, width: 9000 })),
                                        state: obs.state }, action }],
      ];
      for (const [what, req] of bad) {
        try {
          await call(client, "ReportStep", { episode_id: episodeId, ...req });
          emit({ event: "accepted", what });
        } catch (err) {
          emit({ event: "refused", what, code: codeName(err.code), details: err.details });
        }
      }
    }
  }

  // 5. End with an outcome (who decided it: the robot's own success detector here).
  const end = await call(client, "EndEpisode", { episode_id: episodeId, outcome: "OUTCOME_SUCCESS",
                                                 outcome_source: "LABEL_SOURCE_ROBOT", labelled_by: "node-client" });
  emit({ event: "ended", episode_id: end.episode_id, num_steps: end.num_steps, spooled: end.spooled, reported });
  client.close();
}

main().catch((err) => {
  process.stderr.write(`robot_client: ${err.code !== undefined ? codeName(err.code) + ": " : ""}${err.details || err.message}\n`);
  process.exit(1);
});
