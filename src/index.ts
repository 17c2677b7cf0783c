/**
 * qemu-migration-transport: QEMU 10.0's live-migration protocol, byte for byte,
 * over two sockets (bulk precopy, urgent postcopy).
 *
 * - stream: the wire format (pure, no I/O)
 * - transport: the two channels, TLS/PKI, TCP tuning, backpressure
 * - protocol: the migration sessions
 * - protocol/tap: a protocol-aware relay that measures a migration between two peers
 */
export * from './errors.js';
export * from './stream/index.js';
export * from './transport/index.js';
export * from './protocol/index.js';
export * from './protocol/tap/index.js';
