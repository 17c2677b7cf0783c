export { Channel, channelName, type ChannelLimits, type ChannelRole, type ChannelStats } from './channel.js';
export { SourceConnection, DestinationConnection, MigrationListener, type ChannelOptions, type ListenOptions, type TransportOptions } from './connection.js';
export { MultifdChannels } from './multifd-channels.js';
export {
  DEFAULT_MAX_PENDING_CONNECTIONS,
  DEFAULT_QUALIFY_TIMEOUT_MS,
  type ChannelStart,
  type QualifyOptions,
  type StrangerEvent,
  type StrangerReason,
} from './qualify.js';
export { parseEndpoint, formatEndpoint, type Endpoint } from './endpoint.js';
export { TransportError, type ChannelName, type TransportErrorCode } from './errors.js';
export { BULK_PROFILE, URGENT_PROFILE, SOCKOPT_UNAVAILABLE_WARNING, applyTuning, type TuningProfile, type EffectiveTuning } from './tuning.js';
export { generatePki, initPkiDir, writePkiDir, loadTlsDir, PKI_FILES, type Pki, type TlsMaterial } from './pki.js';
export { clientTlsOptions, serverTlsOptions, classifyTlsError, checkAllowedPeer, certificateNames, type TlsSettings } from './tls.js';
export { OPENSSL_NO_TICKETS_CONF } from './openssl-conf.js';
export { AUTO_THREADS_MIN_CORES, availableCores, socketTransferSupported, type ThreadMode } from './worker/support.js';
