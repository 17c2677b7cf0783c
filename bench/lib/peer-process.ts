/**
 * The latency benchmark's handle on one peer child process (bench/lib/peer.ts):
 * a {@link BenchChild} that speaks {@link PeerCommand}.
 */
import { fileURLToPath } from 'node:url';
import { BenchChild, REPO_ROOT } from './child.js';
import type { PeerCommand } from './protocol.js';

export { REPO_ROOT };

const PEER_SCRIPT = fileURLToPath(new URL('./peer.ts', import.meta.url));

export class PeerProcess extends BenchChild<PeerCommand> {
  /** Starts `peer.ts role`, inside a namespace when `prefix` is `['ip','netns','exec',NS]`. */
  static spawn(name: string, role: 'source' | 'dest', prefix: readonly string[] = []): PeerProcess {
    return new PeerProcess(name, BenchChild.spawnChild(PEER_SCRIPT, [role], prefix));
  }
}
