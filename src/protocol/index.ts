export { DestinationSession, type DestinationOptions, type DestinationEvents, type DestinationResult, type DestinationStats, type ReceivedDeviceSection } from './destination.js';
export { MigrationError, type MigrationErrorCode, type MigrationPhase } from './errors.js';
export { InMemorySink, type GuestMemorySink } from './memory.js';
export { DirectorySink, blockFileName } from './directory-sink.js';
export { LatencyHistogram, type LatencySummary } from './latency.js';
export type { PageRequestResult } from './page-tracker.js';
export { writeSavedVm, readSavedVmManifest, RAM_DIR, DEVICES_DIR, MANIFEST, type SavedVmManifest } from './saved-vm.js';
