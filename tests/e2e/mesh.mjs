// Processes of the end-to-end tests: ./blip2mesh commands in their own process groups, never left behind.
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const START_TIMEOUT_MS = 300_000;   // ./blip2mesh builds the CLI first when the sources changed

const children = new Set();
// Last resort if this process dies without running the after() hooks: no mesh is left behind.
process.on("exit", () => { for (const child of children) killGroup(child, "SIGKILL"); });
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => process.exit(130));

function killGroup(child, signal) {
  try { process.kill(-child.pid, signal); } catch { /* already gone */ }
}

export async function freePorts(count) {
  const servers = await Promise.all(Array.from({ length: count }, () => new Promise((resolve, reject) => {
    const server = createServer().once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve(server));
  })));
  const ports = servers.map((s) => s.address().port);
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))));
  return ports;
}

/** Starts ./blip2mesh ARGS in its own process group; resolves once a stdout line matches `ready`. */
export async function startProcess(args, ready) {
  const child = spawn("./blip2mesh", args, { cwd: root, detached: true, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let stdout = "";
  let stderr = "";
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  child.stderr.on("data", (d) => { stderr = (stderr + d).slice(-8000); });
  const stop = async () => {
    if (!children.has(child)) return;
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");   // `up` stops every service it started
      const timer = setTimeout(() => killGroup(child, "SIGKILL"), 45_000);
      await exited;
      clearTimeout(timer);
    }
    killGroup(child, "SIGKILL");   // anything the process left in its group
    children.delete(child);
  };
  const line = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${args[0]} not ready after ${START_TIMEOUT_MS} ms\n${stderr}`)), START_TIMEOUT_MS);
    child.stdout.on("data", (d) => {
      stdout += d;
      const match = stdout.split("\n").find((l) => ready.test(l));
      if (match) { clearTimeout(timer); resolve(match); }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`./blip2mesh ${args[0]} exited (${code ?? signal}) before it was ready\n${stderr}`));
    });
  }).catch(async (e) => { await stop(); throw e; });
  child.stdout.resume();
  return { child, stdout: () => stdout, line, stop };
}

/** `up` on MODEL with ARGS; resolves once it is ready, with the gRPC and HTTP addresses and each stage's address. */
export async function startMesh(model, args = []) {
  const [port, httpPort] = await freePorts(2);
  const mesh = await startProcess(["up", "--model", model, "--port", String(port), "--http-port", String(httpPort), ...args], /^ready /);
  // "service NAME ADDRESS" lines: where each stage listens, for gateways of the tests' own in front of them.
  const stages = Object.fromEntries(mesh.stdout().split("\n").map((l) => l.split(" ")).filter((p) => p[0] === "service")
    .map(([, name, address]) => [name, address]));
  return { ...mesh, stages, grpc: `127.0.0.1:${port}`, http: `http://127.0.0.1:${httpPort}` };
}

/** A lone gateway on MODEL with ARGS in front of the mesh's stages; resolves once it serves. */
export async function startGateway(mesh, model, args) {
  const [port, httpPort] = await freePorts(2);
  const gateway = await startProcess(["serve", "gateway", "--model", model, "--port", String(port), "--http-port", String(httpPort),
    "--vision", mesh.stages.vision, "--qformer", mesh.stages.qformer, "--decoder", mesh.stages["decoder-0"], ...args], /Application started/);
  return { ...gateway, http: `http://127.0.0.1:${httpPort}` };
}
