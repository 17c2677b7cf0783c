/**
 * The CLI as tests run it: `node --import tsx test/cli/run-qmt.ts receive ...`
 * is `qmt receive ...` (src/cli/main.ts, the program users run).
 */
import '../../src/cli/main.js';
