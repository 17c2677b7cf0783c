/**
 * Runs `cleanup` (namespaces, child processes, temp folders) on SIGINT or
 * SIGTERM before the process exits, `cleanupSync` if that takes over 8 s and
 * on any exit. `on`, not `once`: the QEMU harness re-raises a signal at once
 * when it sees no other listener, which would end the process before the
 * cleanup ran.
 */
export function cleanUpOnSignal(cleanup: () => Promise<void>, cleanupSync: () => void): void {
  let signalled = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (signalled) return;
    signalled = true;
    process.stderr.write(`\n${sig}: cleaning up\n`);
    const force = setTimeout(() => {
      cleanupSync();
      process.exit(130);
    }, 8000);
    void cleanup().finally(() => {
      clearTimeout(force);
      process.exit(sig === 'SIGINT' ? 130 : 143);
    });
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('exit', cleanupSync);
}
