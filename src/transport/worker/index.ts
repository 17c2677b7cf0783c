export { socketTransferSupported, socketTransferWhy, type ThreadMode } from './support.js';
export { spawnWorker } from './spawn.js';
export { AtomicRing } from './ring.js';
