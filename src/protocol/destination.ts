/** The destination session; its modules are under ./destination/. */
export * from './destination/index.js';
