export { DestinationSession } from './session.js';
export type { DestinationEvents, DestinationOptions, DestinationResult, DestinationStats, ReceivedDeviceSection } from './types.js';
