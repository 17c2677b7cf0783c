import net from 'node:net';
import { it } from 'vitest';
import { writeSync } from 'node:fs';
process.on('exit', (c) => writeSync(2, `EXIT ${c}\n`));
process.on('uncaughtException', (e) => writeSync(2, `UNCAUGHT ${e.stack}\n`));
it('unix listen', async () => {
  const srv = net.createServer((raw) => raw.destroy());
  await new Promise<void>((r) => srv.listen('/tmp/exp/y.sock', r));
  writeSync(2, `listening ${JSON.stringify(process.getActiveResourcesInfo())}\n`);
  const c = net.connect('/tmp/exp/y.sock');
  c.on('error', () => undefined);
  await new Promise((r) => c.on('close', r));
  writeSync(2, `closed\n`);
  await new Promise((r) => srv.close(r));
});
