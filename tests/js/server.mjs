// Real servers for the browser client's node tests: a uvicorn app on a free port.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export function python() {
  if (process.env.WSM_PYTHON) return process.env.WSM_PYTHON;
  const venv = path.join(ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

export async function waitFor(predicate, what, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Start `uvicorn app` on a free port with `env` added; resolves with {port, process} once it answers HTTP. */
export async function startServer(app, env = {}, probe = "/") {
  const port = await freePort();
  const proc = spawn(
    python(),
    ["-m", "uvicorn", app, "--host", "127.0.0.1", "--port", String(port), "--log-level", "warning"],
    { cwd: ROOT, stdio: ["ignore", "inherit", "inherit"], env: { ...process.env, PYTHONPATH: ROOT, ...env } },
  );
  const exited = new Promise((resolve) => proc.once("exit", (code) => resolve(code)));
  await waitFor(
    () =>
      Promise.race([
        fetch(`http://127.0.0.1:${port}${probe}`).then(() => true, () => false),
        exited.then((code) => {
          throw new Error(`${app} exited with ${code} (python: ${python()})`);
        }),
      ]),
    app,
  );
  return { port, process: proc };
}

/** Stop a server started by startServer (SIGINT, as uvicorn expects) and wait for it to exit. */
export async function stopServer(server) {
  if (server && server.process.exitCode === null) {
    const gone = new Promise((resolve) => server.process.once("exit", resolve));
    server.process.kill("SIGINT");
    await gone;
  }
}
