/** The source session lives in ./source/ (one module per step); this path keeps existing imports working. */
export * from './source/session.js';
