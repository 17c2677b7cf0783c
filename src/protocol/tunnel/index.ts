export { TunnelEntry, type TunnelEntryOptions } from './entry.js';
export { TunnelExit, type TunnelExitOptions, type TunnelExitEvents } from './exit.js';
export type { TunnelConnectionInfo, TunnelConnectionStats, TunnelEvents, TunnelLimits, TunnelRole, TunnelStats } from './common.js';
