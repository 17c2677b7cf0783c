export { Channel, type ChannelLimits, type ChannelRole, type ChannelStats } from './channel.js';
export { SourceConnection, DestinationConnection, MigrationListener, type ChannelOptions, type TransportOptions } from './connection.js';
export { parseEndpoint, formatEndpoint, type Endpoint } from './endpoint.js';
export { TransportError, type TransportErrorCode } from './errors.js';
export { BULK_PROFILE, URGENT_PROFILE, applyTuning, type TuningProfile, type EffectiveTuning } from './tuning.js';
export { generatePki, initPkiDir, writePkiDir, loadTlsDir, PKI_FILES, type Pki, type TlsMaterial } from './pki.js';
export { clientTlsOptions, serverTlsOptions, classifyTlsError, type TlsSettings } from './tls.js';
