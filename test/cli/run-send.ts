/**
 * The CLI as tests run it: `node --import tsx test/cli/run-send.ts send ...`
 * is `qmt send ...` (src/cli/main.ts, the program users run).
 */
import '../../src/cli/main.js';
