export { TunnelEntry, startTunnelEntry, type TunnelEntryOptions } from './entry.js';
export { TunnelExit, startTunnelExit, type TunnelExitOptions } from './exit.js';
export { type TunnelCommonOptions } from './options.js';
export {
  TunnelEnd,
  type TunnelConnectionEvent,
  type TunnelConnectionReport,
  type TunnelEndKind,
  type TunnelEvents,
  type TunnelHopTotals,
  type TunnelReport,
  type TunnelRole,
  type TunnelSessionReport,
} from './session.js';
