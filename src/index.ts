/**
 * qemu-migration-transport: QEMU 10.0's live-migration protocol, byte for byte.
 * `stream` is the wire format (pure, no I/O).
 */
export * from './stream/index.js';
