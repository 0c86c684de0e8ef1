// Local SQS + S3 endpoint for dev and tests. Started by devstack/processes.py.
// Request logging is off (it costs about a third of the throughput); prints "READY <port>" once listening
// and exits when stdin closes (its parent has gone).
import { startFauxqs } from "fauxqs";

const port = Number(process.argv[2] ?? 0);
const server = await startFauxqs({ port, logger: false, host: "127.0.0.1" });
process.stdout.write(`READY ${server.port}\n`);

const stop = async () => {
  await server.stop();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
// The parent holds our stdin open: when it dies, even by kill -9, the emulator goes with it.
process.stdin.on("end", stop);
process.stdin.on("close", stop);
process.stdin.resume();
