/**
 * Mutation fuzzing of the three stream decoders with inputs derived from the
 * real-QEMU captures in test/fixtures.
 *
 *   node --import tsx test/fuzz/fuzz-decoder.ts [--inputs N] [--seed S] [--workers W]
 *        [--max-input-ms MS] [--hang-ms MS] [--heap-mib MIB] [--out DIR] [--replay K]
 *
 * Bases (built once, deterministically): for every main-channel capture a few
 * "skeletons" — valid streams cut down to tens of KiB at record boundaries
 * (prelude and block list, a trimmed precopy pass, the switchover, trimmed END
 * or postcopy sections, all or some device sections, EOF, with or without the
 * VM description) plus the raw first 64 KiB; the tail of some skeletons as a
 * postcopy-recovery ('resume') channel; the preempt channel whole, cut down,
 * and as RAM records taken from a main stream; the return paths whole plus one
 * synthetic message of every type; multifd channels of the multifd captures
 * cut to their init message and a few packets (decoded with and without the
 * block list, a smaller packet capacity, split packets, one channel). Each
 * base is decoded once and mapped
 * (record spans, length/id/flag fields) so that mutations can aim at fields.
 *
 * Input i of seed s is a pure function of (s, i): mutations (bit flips,
 * truncations, fields pushed to extremes, records dropped/duplicated/swapped/
 * moved, ranges duplicated, splices from other bases) and a chunking (one
 * push, random cuts, cuts at record boundaries, small chunks, byte by byte).
 *
 * Checked per input: the decoder throws nothing but StreamError, with a known
 * code and an offset inside the input; a preempt decoder leaves the main
 * channel's block map alone; for one input in five, the records and the error
 * are the same as with the input pushed whole. Wall time per input is bounded
 * (--max-input-ms; a worker that stops progressing for --hang-ms is a hang)
 * and the heap is sampled (over --heap-mib fails). Every failure is written to
 * DIR (default .tmp/fuzz) as the input's bytes plus a JSON with the seed, the
 * index, the chunking and the error; `--replay K` re-runs one input alone.
 * Exit status 1 on any failure.
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads';
import {
  MultifdDecoder,
  PreemptDecoder,
  ReturnPathDecoder,
  StreamDecoder,
  StreamError,
  encodeReturnPathMessage,
  parseVmDescription,
  vmdescSectionSizes,
  type DeviceSectionSize,
  type KnownBlock,
  type MultifdDecoderOptions,
  type PreemptRecord,
  type ReturnPathMessage,
  type StreamDecoderOptions,
  type StreamErrorCode,
  type StreamRecord,
} from '../../src/stream/index.js';
import { MULTIFD_SCENARIOS, decodeChannel, loadCapture } from '../stream/multifd-capture.js';
import { Rng, chunksAt, decodeMain, mapMainRecords, mapMultifdRecords, mapPreemptRecords, mapReturnPath, mutate, randomCuts, randomMutations, type Mutation, type RecordMap, type RecordSpan } from './mutate.js';

const ROOT = join(import.meta.dirname, '..', '..');
const FIX = join(ROOT, 'test', 'fixtures');

// ---- options ---------------------------------------------------------------------

interface Options {
  inputs: number;
  seed: number;
  workers: number;
  maxInputMs: number;
  hangMs: number;
  heapMiB: number;
  out: string;
  replay: number | undefined;
  consistencyEvery: number;
}

function parseArgs(argv: readonly string[]): Options {
  const o: Options = {
    inputs: 1_000_000,
    seed: Math.floor(Math.random() * 0x7fffffff),
    workers: Math.max(1, availableParallelism()),
    maxInputMs: 2000,
    hangMs: 20_000,
    heapMiB: 512,
    out: join(ROOT, '.tmp', 'fuzz'),
    replay: undefined,
    consistencyEvery: 8,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = argv[i + 1];
    const num = (): number => {
      const n = Number(v?.replace(/_/g, ''));
      if (v === undefined || !Number.isFinite(n) || n < 0) throw new Error(`${a} needs a non-negative number`);
      i++;
      return n;
    };
    switch (a) {
      case '--inputs':
        o.inputs = Math.floor(num());
        break;
      case '--seed':
        o.seed = Math.floor(num()) | 0;
        break;
      case '--workers':
        o.workers = Math.max(1, Math.floor(num()));
        break;
      case '--max-input-ms':
        o.maxInputMs = num();
        break;
      case '--hang-ms':
        o.hangMs = num();
        break;
      case '--heap-mib':
        o.heapMiB = num();
        break;
      case '--consistency-every':
        o.consistencyEvery = Math.floor(num());
        break;
      case '--out':
        if (v === undefined) throw new Error('--out needs a directory');
        o.out = v;
        i++;
        break;
      case '--replay':
        o.replay = Math.floor(num());
        break;
      case '-h':
      case '--help':
        console.log('usage: fuzz-decoder.ts [--inputs N] [--seed S] [--workers W] [--max-input-ms MS] [--hang-ms MS] [--heap-mib MIB] [--consistency-every K] [--out DIR] [--replay K]');
        process.exit(0);
        break;
      default:
        throw new Error(`unknown argument ${a}`);
    }
  }
  return o;
}

// ---- the corpus ---------------------------------------------------------------------

type Target = 'main' | 'resume' | 'preempt' | 'rp' | 'multifd';

interface Base {
  readonly name: string;
  readonly target: Target;
  readonly bytes: Buffer;
  readonly map: RecordMap;
  /** 'resume': the decoder state the channel continues (forked per input). */
  readonly resumeFrom?: StreamDecoder;
  /** Exact device sizes from the base's VM description, for the decoder's exact-size path. */
  readonly deviceSizes?: DeviceSectionSize[];
  /** Relative chance of being picked among the target's bases. */
  readonly weight: number;
}

interface Corpus {
  readonly byTarget: Record<Target, Base[]>;
  /** The main channel's block map of the preempt capture: the preempt decoder's blocks. */
  readonly preemptBlocks: ReadonlyMap<string, KnownBlock>;
  /** The RAM blocks of the multifd captures (from their main channel): the multifd decoder's block list. */
  readonly multifdBlocks: readonly KnownBlock[];
}

const MAIN_FIXTURES = ['paused-guest.bin', 'running-guest.bin', 'pc-running.bin', 'multiblock.bin', 'xbzrle.bin', 'returnpath-main.bin', 'postcopy-main.bin', 'preempt-main.bin'];

interface Unit {
  /** 'ram' groups can be trimmed; 'device' groups can be dropped. */
  readonly kind: 'single' | 'ram' | 'device' | 'package';
  readonly spans: RecordSpan[];
  readonly label: string;
}

/** Groups a stream's record spans into top-level units: a section (header … footer), a PACKAGED blob, or one record. */
function units(spans: readonly RecordSpan[], records: readonly StreamRecord[]): Unit[] {
  const recs = records.filter((r) => r.type !== 'package-end');
  const out: Unit[] = [];
  let i = 0;
  while (i < spans.length) {
    const s = spans[i]!;
    const r = recs[i]!;
    if (r.type === 'command' && r.command.cmd === 'packaged') {
      let j = i + 1;
      while (j < spans.length && !(recs[j]!.type === 'command' && (recs[j] as { command: { cmd: string } }).command.cmd === 'postcopy-run')) j++;
      out.push({ kind: 'package', spans: spans.slice(i, j + 1), label: 'package' });
      i = j + 1;
      continue;
    }
    if (r.type === 'section') {
      let j = i + 1;
      while (j < spans.length && spans[j]!.type !== 'footer') j++;
      const kind = r.idstr === 'ram' ? 'ram' : 'device';
      out.push({ kind, spans: spans.slice(i, j + 1), label: `${r.kind} ${r.idstr}` });
      i = j + 1;
      continue;
    }
    out.push({ kind: 'single', spans: [s], label: s.type });
    i++;
  }
  return out;
}

/** A RAM section cut to its header, the records within `bytes`, its EOS and footer. */
function trimmedRam(u: Unit, bytes: number, from = 1): RecordSpan[] {
  const inner = u.spans.slice(1, -2);
  const kept: RecordSpan[] = [];
  let n = 0;
  for (const s of inner.slice(Math.min(from, inner.length) - 1)) {
    if (n + (s.end - s.start) > bytes && kept.length > 0) break;
    kept.push(s);
    n += s.end - s.start;
  }
  return [u.spans[0]!, ...kept, ...u.spans.slice(-2)];
}

function concatSpans(buf: Buffer, spans: readonly RecordSpan[]): Buffer {
  return Buffer.concat(spans.map((s) => buf.subarray(s.start, s.end)));
}

interface SkeletonRecipe {
  head: number;
  trim: number;
  devices: 'all' | 'odd' | 'first5';
  vmdesc: boolean;
}

const RECIPES: SkeletonRecipe[] = [
  { head: 4096, trim: 4096, devices: 'all', vmdesc: true },
  { head: 16384, trim: 16384, devices: 'all', vmdesc: false },
  { head: 1024, trim: 1024, devices: 'odd', vmdesc: true },
  { head: 32768, trim: 2048, devices: 'first5', vmdesc: false },
];

/** A valid, much shorter stream built from a capture's own records (see the file comment). */
function skeleton(buf: Buffer, us: readonly Unit[], recipe: SkeletonRecipe): { bytes: Buffer; resumeSplit: number } {
  const spans: RecordSpan[] = [];
  let firstPartDone = false;
  let xbzrleDone = false;
  let postListenPartDone = false;
  let afterPackage = false;
  let resumeSplit = 0;
  let device = 0;
  const lastPrecopyPart = us.reduce((last, u, i) => (u.kind === 'ram' && u.label === 'part ram' && !us.slice(0, i).some((x) => x.kind === 'package') ? i : last), -1);
  us.forEach((u, i) => {
    if (u.kind === 'package') afterPackage = true;
    if (u.kind === 'ram' && u.label === 'part ram') {
      if (!firstPartDone) {
        spans.push(...trimmedRam(u, recipe.head));
        firstPartDone = true;
        resumeSplit = spans.reduce((s, x) => s + x.end - x.start, 0);
        return;
      }
      const hasXbzrle = u.spans.some((s) => s.type === 'ram-xbzrle');
      if (hasXbzrle && !xbzrleDone) {
        const first = u.spans.findIndex((s) => s.type === 'ram-xbzrle');
        spans.push(...trimmedRam(u, 8192, Math.max(1, first - 2)));
        xbzrleDone = true;
        return;
      }
      if (afterPackage && !postListenPartDone) {
        spans.push(...trimmedRam(u, recipe.trim));
        postListenPartDone = true;
      }
      return; // other precopy passes: left out
    }
    if (u.kind === 'ram' && u.label === 'end ram') {
      spans.push(...trimmedRam(u, recipe.trim));
      return;
    }
    if (u.kind === 'device' && i > lastPrecopyPart && !afterPackage) {
      const k = device++;
      if (recipe.devices === 'odd' && k % 2 === 0) return;
      if (recipe.devices === 'first5' && k >= 5) return;
      spans.push(...u.spans);
      return;
    }
    if (u.kind === 'single' && u.spans[0]!.type === 'vmdesc' && !recipe.vmdesc) return;
    spans.push(...u.spans);
  });
  return { bytes: concatSpans(buf, spans), resumeSplit };
}

function decodeAllPreempt(buf: Buffer, blocks: ReadonlyMap<string, KnownBlock>): PreemptRecord[] {
  const d = new PreemptDecoder(new Map(blocks));
  const recs = d.push(buf);
  d.end();
  return recs;
}

function decodeAllRp(buf: Buffer): ReturnPathMessage[] {
  const d = new ReturnPathDecoder();
  const m = d.push(buf);
  d.end();
  return m;
}

function buildCorpus(): Corpus {
  const byTarget: Record<Target, Base[]> = { main: [], resume: [], preempt: [], rp: [], multifd: [] };
  let preemptBlocks: ReadonlyMap<string, KnownBlock> = new Map();
  let postListenPages: Buffer | undefined;
  for (const file of MAIN_FIXTURES) {
    const buf = readFileSync(join(FIX, file));
    const d = new StreamDecoder();
    const { records, error } = decodeMain(buf, d);
    if (error) throw new Error(`fixture ${file} does not decode: ${error.describe()}`);
    if (file === 'preempt-main.bin') {
      preemptBlocks = new Map(d.ramBlocks);
      // RAM records of the first post-LISTEN pass, from its first record that names its block.
      const map = mapMainRecords(records);
      const recs = records.filter((r) => r.type !== 'package-end');
      const listen = recs.findIndex((r) => r.type === 'command' && r.command.cmd === 'postcopy-run');
      const first = recs.findIndex((r, i) => i > listen && (r.type === 'ram-page' || r.type === 'ram-zero') && !r.continued);
      let last = first;
      while (last + 1 < recs.length && map.spans[last + 1]!.end - map.spans[first]!.start < 32768 && (recs[last + 1]!.type === 'ram-page' || recs[last + 1]!.type === 'ram-zero')) last++;
      postListenPages = buf.subarray(map.spans[first]!.start, map.spans[last]!.end);
    }
    const map = mapMainRecords(records);
    if (map.spans.at(-1)?.end !== buf.length) throw new Error(`fixture ${file}: record map covers ${map.spans.at(-1)?.end} of ${buf.length} bytes`);
    const us = units(map.spans, records);
    RECIPES.forEach((recipe, k) => {
      const { bytes, resumeSplit } = skeleton(buf, us, recipe);
      const dec = decodeMain(bytes);
      const name = `${file.replace(/\.bin$/, '')}/skeleton${k}`;
      if (dec.error) {
        if (isMainThread) console.error(`corpus: ${name} is not a valid stream (${dec.error.describe()}); left out`);
        return;
      }
      const vm = dec.records.find((r): r is Extract<StreamRecord, { type: 'vmdesc' }> => r.type === 'vmdesc');
      const deviceSizes = vm ? vmdescSectionSizes(parseVmDescription(vm.json)) : undefined;
      // Checking device sizes against a 45 KB VM description costs ~1.5 ms: those bases come up less often.
      byTarget.main.push({ name, target: 'main', bytes, map: mapMainRecords(dec.records), weight: vm ? 1 : 3, ...(deviceSizes ? { deviceSizes } : {}) });
      if (k === 0 || k === 2) {
        const head = new StreamDecoder();
        head.push(bytes.subarray(0, resumeSplit));
        const tail = bytes.subarray(resumeSplit);
        const probe = new StreamDecoder({ channel: 'resume', resumeFrom: head.fork() });
        const rec = decodeMain(tail, probe);
        // A resumed channel names the block of its first page (QEMU resets its last block): tails starting with CONTINUE are no base.
        if (rec.error) return;
        byTarget.resume.push({ name: `${name}/resume`, target: 'resume', bytes: Buffer.from(tail), map: mapMainRecords(rec.records), resumeFrom: head, weight: 1 });
      }
    });
    // The raw first 64 KiB: a stream cut in the middle of a pass.
    const raw = Buffer.from(buf.subarray(0, 65536));
    byTarget.main.push({ name: `${file.replace(/\.bin$/, '')}/first64k`, target: 'main', bytes: raw, map: mapMainRecords(decodeMain(raw).records), weight: 2 });
  }

  // The preempt channel.
  const channel = readFileSync(join(FIX, 'preempt-channel.bin'));
  const chRecs = decodeAllPreempt(channel, preemptBlocks);
  const chMap = mapPreemptRecords(chRecs);
  const firstFour = channel.subarray(0, chMap.spans[3]!.end);
  const eos = Buffer.alloc(8);
  eos.writeUInt32BE(0x10, 4);
  const preemptBases: [string, Buffer][] = [
    ['preempt-channel', channel],
    ['preempt-channel/first4', Buffer.from(firstFour)],
    ['preempt-channel/first4+eos', Buffer.concat([firstFour, eos])],
  ];
  if (postListenPages) preemptBases.push(['preempt-main/postcopy-pages', Buffer.from(postListenPages)]);
  for (const [name, bytes] of preemptBases) {
    const recs = decodeAllPreempt(bytes, preemptBlocks);
    byTarget.preempt.push({ name, target: 'preempt', bytes, map: mapPreemptRecords(recs), weight: 1 });
  }

  // The return paths, and one synthetic message of every type (no capture has RECV_BITMAP or RESUME_ACK).
  const synthetic: ReturnPathMessage[] = [
    { type: 'pong', value: 1 },
    { type: 'switchover-ack' },
    { type: 'req-pages-id', block: 'pc.ram', offset: 0x1000, length: 0x2000 },
    { type: 'req-pages', offset: 0x8000, length: 0x1000 },
    { type: 'recv-bitmap', block: 'pc.bios', bitmap: Uint8Array.from({ length: 16 }, (_, i) => (i * 37) & 0xff) },
    { type: 'resume-ack', value: 1 },
    { type: 'shut', value: 0 },
  ];
  const rpBases: [string, Buffer][] = [
    ['preempt-rp', readFileSync(join(FIX, 'preempt-rp.bin'))],
    ['postcopy-rp', readFileSync(join(FIX, 'postcopy-rp.bin'))],
    ['returnpath-rp', readFileSync(join(FIX, 'returnpath-rp.bin'))],
    ['synthetic-rp', Buffer.concat(synthetic.map((m) => encodeReturnPathMessage(m)))],
  ];
  for (const [name, bytes] of rpBases) byTarget.rp.push({ name, target: 'rp', bytes, map: mapReturnPath(decodeAllRp(bytes)), weight: 1 });

  // Multifd channels: the init message and a few records each (small packets, and one full page packet per capture).
  const multifdBlocks = loadCapture(MULTIFD_SCENARIOS[0]).blocks;
  for (const name of MULTIFD_SCENARIOS) {
    loadCapture(name).channels.forEach((ch, k) => {
      const [init, ...rest] = ch.spans;
      const small = rest.filter((s) => s.end - s.start <= 16 * 4096 + 1344);
      const big = rest.find((s) => s.end - s.start > 64 * 4096);
      const cuts: [string, typeof rest][] = [
        ['first-small', small.slice(0, 6)],
        ['later-small', small.slice(6, 12)],
        ['big', big && k === 0 ? [rest[0]!, big] : []],
      ];
      for (const [label, spans] of cuts) {
        if (spans.length === 0) continue;
        const bytes = Buffer.concat([init!, ...spans].map((x) => ch.bytes.subarray(x.start, x.end)));
        byTarget.multifd.push({ name: `${ch.file.replace(/\.bin$/, '')}/${label}`, target: 'multifd', bytes, map: mapMultifdRecords(decodeChannel(bytes)), weight: label === 'big' ? 1 : 2 });
      }
    });
  }
  return { byTarget, preemptBlocks, multifdBlocks };
}

// ---- one input ------------------------------------------------------------------------

interface Input {
  index: number;
  base: Base;
  mutations: Mutation[];
  bytes: Buffer;
  cuts: number[];
  callEnd: boolean;
  variant: string;
  options: StreamDecoderOptions;
  rpMaxBitmap: number | undefined;
  multifd: MultifdDecoderOptions;
  consistency: boolean;
}

const TARGET_WEIGHTS: [Target, number][] = [
  ['main', 56],
  ['resume', 7],
  ['preempt', 12],
  ['rp', 13],
  ['multifd', 12],
];

function makeInput(corpus: Corpus, seed: number, index: number, consistencyEvery: number): Input {
  const rng = new Rng(seed, index);
  let roll = rng.int(100);
  let target: Target = 'main';
  for (const [t, w] of TARGET_WEIGHTS) {
    if (roll < w) {
      target = t;
      break;
    }
    roll -= w;
  }
  const bases = corpus.byTarget[target];
  let w = rng.int(bases.reduce((n, b) => n + b.weight, 0));
  const base = bases.find((b) => (w -= b.weight) < 0)!;
  const mutations = randomMutations(rng, base.map, rng.chance(0.1) ? 10 : 4);
  const bytes = mutate(base.bytes, mutations, base.map, bases.map((b) => b.bytes));
  const cuts = randomCuts(rng, bytes.length, base.map);
  const callEnd = !rng.chance(0.05);
  let variant = 'default';
  let options: StreamDecoderOptions = {};
  let rpMaxBitmap: number | undefined;
  let multifd: MultifdDecoderOptions = {};
  const v = rng.int(100);
  if (target === 'main') {
    if (v < 10) {
      variant = 'small-limits';
      options = { maxDeviceSectionBytes: 4096, maxVmdescBytes: 8192, maxPackageBytes: 16384 };
    } else if (v < 20 && base.deviceSizes) {
      variant = 'device-sizes';
      options = { deviceSizes: base.deviceSizes };
    } else if (v < 25) {
      variant = 'no-verify';
      options = { verifyWithVmdesc: false };
    }
  } else if (target === 'rp' && v < 15) {
    variant = 'small-bitmap';
    rpMaxBitmap = 64;
  } else if (target === 'multifd') {
    multifd = { blocks: corpus.multifdBlocks };
    if (v < 15) {
      variant = 'no-blocks';
      multifd = {};
    } else if (v < 25) {
      variant = 'capacity-64';
      multifd = { ...multifd, maxPagesAlloc: 64 };
    } else if (v < 40) {
      variant = 'split-packets';
      multifd = { ...multifd, splitPackets: true };
    } else if (v < 45) {
      variant = 'one-channel';
      multifd = { ...multifd, channels: 1 };
    }
  }
  // Pieces of split packets depend on the chunking by design: no whole-vs-chunked comparison there.
  const consistency = consistencyEvery > 0 && index % consistencyEvery === 0 && variant !== 'split-packets';
  return { index, base, mutations, bytes, cuts, callEnd, variant, options, rpMaxBitmap, multifd, consistency };
}

type Pushable = { push(c: Uint8Array): readonly unknown[]; end(): unknown; readonly error?: StreamError | undefined };

function makeDecoder(corpus: Corpus, input: Input, blocks: Map<string, KnownBlock>): Pushable {
  switch (input.base.target) {
    case 'main':
      return new StreamDecoder(input.options);
    case 'resume':
      return new StreamDecoder({ ...input.options, channel: 'resume', resumeFrom: input.base.resumeFrom!.fork() });
    case 'preempt':
      return new PreemptDecoder(blocks);
    case 'rp':
      return new ReturnPathDecoder(input.rpMaxBitmap === undefined ? {} : { maxBitmapBytes: input.rpMaxBitmap });
    case 'multifd':
      return new MultifdDecoder(input.multifd);
  }
}

/** What decoding produced: a compact signature of the records, and the error. */
interface Outcome {
  records: number;
  signature: number;
  error: StreamError | undefined;
}

const mix = (h: number, x: number): number => Math.imul(h ^ (x | 0), 16777619) ^ Math.floor(x / 0x1_0000_0000);

/** FNV-style hash of what identifies a record: its type, command, offset, section and payload length. */
function hashRecord(h: number, r: unknown): number {
  const m = r as { type: string; packetNum?: bigint; normal?: Float64Array; zero?: Float64Array; id?: number };
  // A multifd packet's `data` is the chunk it arrived in (its length depends on the chunking): hash its lists instead.
  if (m.type === 'multifd-packet') return (mix(mix(mix(h, 0x6d66), Number(BigInt.asUintN(32, m.packetNum ?? 0n))), (m.normal?.length ?? 0) * 65536 + (m.zero?.length ?? 0)) >>> 0);
  if (m.type === 'multifd-init') return mix(mix(h, 0x6d69), m.id ?? -1) >>> 0;
  const o = r as { type: string; offset?: number; sectionId?: number; data?: Uint8Array; json?: Uint8Array; command?: { cmd: string } };
  h = mix(h, o.type.length * 256 + o.type.charCodeAt(0) + o.type.charCodeAt(o.type.length - 1) * 65536);
  if (o.command) h = mix(h, o.command.cmd.length * 256 + o.command.cmd.charCodeAt(o.command.cmd.length - 1));
  if (o.offset !== undefined) h = mix(h, o.offset);
  if (o.sectionId !== undefined) h = mix(h, o.sectionId);
  if (o.data) h = mix(h, o.data.length);
  if (o.json) h = mix(h, o.json.length);
  return h >>> 0;
}

/** Pushes `chunks` and (optionally) ends; only a StreamError is caught. */
function run(dec: Pushable, chunks: readonly Uint8Array[], callEnd: boolean): Outcome {
  let records = 0;
  let signature = 2166136261;
  const take = (rs: unknown) => {
    if (Array.isArray(rs)) for (const r of rs) {
      records++;
      signature = hashRecord(signature, r);
    }
  };
  try {
    for (const c of chunks) take(dec.push(c));
    if (callEnd) take(dec.end());
  } catch (e) {
    if (!(e instanceof StreamError)) throw e;
    return { records, signature, error: e };
  }
  return { records, signature, error: dec.error };
}

const CODES = new Set<StreamErrorCode>([
  'truncated', 'bad-magic', 'unsupported-version', 'unknown-record-type', 'unexpected-record', 'bad-configuration', 'unknown-subsection', 'unknown-section', 'bad-footer',
  'unknown-command', 'bad-command-length', 'bad-command', 'bad-ram-flags', 'bad-block-list', 'unknown-ram-block', 'continue-without-block', 'page-out-of-range', 'bad-zero-fill',
  'bad-xbzrle', 'length-too-large', 'device-boundary-not-found', 'device-size-mismatch', 'package-overrun', 'package-without-run', 'bad-vmdesc', 'trailing-data',
  'bad-return-path-message', 'bad-bitmap', 'unsupported', 'bad-multifd-init', 'bad-multifd-packet', 'unaligned-page',
]);

interface Failure {
  kind: 'non-stream-error' | 'bad-error-fields' | 'inconsistent' | 'shared-blocks-modified' | 'slow' | 'hang' | 'heap' | 'worker-crash';
  /** Groups failures of the same cause (first line of the message, code). */
  signature: string;
  detail: string;
}

interface Checked {
  outcome: Outcome | undefined;
  failures: Failure[];
  ms: number;
}

function blocksEqual(a: ReadonlyMap<string, KnownBlock>, b: ReadonlyMap<string, KnownBlock>): boolean {
  if (a.size !== b.size) return false;
  for (const [k, v] of a) if (b.get(k)?.length !== v.length) return false;
  return true;
}

function check(corpus: Corpus, input: Input): Checked {
  const failures: Failure[] = [];
  const t0 = performance.now();
  const blocks = new Map(corpus.preemptBlocks);
  let outcome: Outcome | undefined;
  try {
    outcome = run(makeDecoder(corpus, input, blocks), chunksAt(input.bytes, input.cuts), input.callEnd);
    const e = outcome.error;
    if (e && (!CODES.has(e.code) || !Number.isSafeInteger(e.offset) || e.offset < 0 || e.offset > input.bytes.length || typeof e.message !== 'string')) {
      failures.push({ kind: 'bad-error-fields', signature: `bad-error-fields ${e.code} ${e.message.replace(/\d+/g, 'N').slice(0, 80)}`, detail: `StreamError ${e.code} at offset ${e.offset} of a ${input.bytes.length}-byte input: ${e.message}` });
    }
    if (input.base.target === 'preempt' && !blocksEqual(blocks, corpus.preemptBlocks)) {
      failures.push({
        kind: 'shared-blocks-modified',
        signature: 'preempt decoder changed the shared block map',
        detail: `the block map given to PreemptDecoder (shared with the main channel) changed: ${JSON.stringify([...blocks.values()])}`,
      });
    }
    if (input.consistency) {
      const whole = run(makeDecoder(corpus, input, new Map(corpus.preemptBlocks)), [input.bytes], input.callEnd);
      const same = whole.records === outcome.records && whole.signature === outcome.signature && whole.error?.code === outcome.error?.code && whole.error?.offset === outcome.error?.offset;
      if (!same) {
        const fmt = (o: Outcome) => `${o.records} records (sig ${o.signature.toString(16)}), ${o.error ? o.error.describe() : 'no error'}`;
        const sameError = whole.error?.code === outcome.error?.code && whole.error?.offset === outcome.error?.offset;
        const ok = input.callEnd ? 'accepted' : 'no error yet (end() not called)';
        failures.push({
          kind: 'inconsistent',
          signature:
            sameError && whole.records < outcome.records
              ? `inconsistent ${input.base.target}: records parsed before an error in the same push are dropped`
              : `inconsistent ${input.base.target}: whole ${whole.error?.code ?? ok}, chunked ${outcome.error?.code ?? ok}${sameError ? ' (same error, other records)' : ''}`,
          detail: `chunked (${input.cuts.length + 1} chunks): ${fmt(outcome)}; whole: ${fmt(whole)}`,
        });
      }
    }
  } catch (e) {
    const err = e as Error;
    const first = (err?.stack ?? String(e)).split('\n').slice(0, 3).join(' | ');
    failures.push({ kind: 'non-stream-error', signature: `${err?.name ?? typeof e}: ${String(err?.message ?? e).replace(/\d+/g, 'N').slice(0, 100)}`, detail: err?.stack ?? String(e) });
    void first;
  }
  const ms = performance.now() - t0;
  return { outcome, failures, ms };
}

function describeInput(input: Input, seed: number): Record<string, unknown> {
  return {
    seed,
    index: input.index,
    replay: `node --import tsx test/fuzz/fuzz-decoder.ts --seed ${seed} --replay ${input.index}`,
    target: input.base.target,
    base: input.base.name,
    variant: input.variant,
    options: input.options.deviceSizes ? { ...input.options, deviceSizes: `${input.options.deviceSizes.length} sizes from the base's VM description` } : input.options,
    rpMaxBitmap: input.rpMaxBitmap,
    multifd: input.base.target === 'multifd' ? { ...input.multifd, blocks: input.multifd.blocks ? `${input.multifd.blocks.length} blocks of the capture` : undefined } : undefined,
    mutations: input.mutations,
    bytes: input.bytes.length,
    chunkSizes: chunksAt(input.bytes, input.cuts).map((c) => c.length),
    callEnd: input.callEnd,
  };
}

function writeRepro(out: string, seed: number, input: Input, failure: Failure, extra: Record<string, unknown> = {}): string {
  mkdirSync(out, { recursive: true });
  const stem = join(out, `seed${seed}-input${input.index}-${failure.kind}`);
  writeFileSync(`${stem}.bin`, input.bytes);
  writeFileSync(`${stem}.json`, `${JSON.stringify({ ...describeInput(input, seed), failure, ...extra }, null, 2)}\n`);
  return stem;
}

// ---- worker ------------------------------------------------------------------------

interface WorkerConfig {
  opts: Options;
  worker: number;
  /** [current input index, 1 while decoding] per worker. */
  shared: SharedArrayBuffer;
}

interface Progress {
  type: 'progress' | 'done';
  worker: number;
  done: number;
  slowest: { ms: number; index: number; base: string; bytes: number };
  heapMax: number;
  arrayBuffersMax: number;
  outcomes: Record<string, number>;
  failures: { kind: string; signature: string; index: number; file: string }[];
  totalMs: number;
}

function workerMain(cfg: WorkerConfig): void {
  const { opts, worker } = cfg;
  const state = new Int32Array(cfg.shared);
  const corpus = buildCorpus();
  const slowest = { ms: 0, index: -1, base: '', bytes: 0 };
  let heapMax = 0;
  let arrayBuffersMax = 0;
  const outcomes: Record<string, number> = {};
  let failures: Progress['failures'] = [];
  const seen = new Map<string, number>();
  let done = 0;
  let totalMs = 0;
  const report = (type: Progress['type']) => {
    parentPort!.postMessage({ type, worker, done, slowest, heapMax, arrayBuffersMax, outcomes, failures, totalMs } satisfies Progress);
    failures = [];
  };
  let lastReport = performance.now();
  for (let i = worker; i < opts.inputs; i += opts.workers) {
    Atomics.store(state, worker * 2, i);
    Atomics.store(state, worker * 2 + 1, 1);
    const input = makeInput(corpus, opts.seed, i, opts.consistencyEvery);
    const r = check(corpus, input);
    Atomics.store(state, worker * 2 + 1, 0);
    done++;
    totalMs += r.ms;
    if (r.ms > slowest.ms) Object.assign(slowest, { ms: r.ms, index: i, base: `${input.base.name} (${input.variant})`, bytes: input.bytes.length });
    if (r.ms > opts.maxInputMs) r.failures.push({ kind: 'slow', signature: `slow input (> ${opts.maxInputMs} ms) on ${input.base.target}`, detail: `${r.ms.toFixed(1)} ms` });
    const key = r.outcome ? (r.outcome.error ? `${input.base.target}:${r.outcome.error.code}` : `${input.base.target}:accepted`) : `${input.base.target}:threw`;
    outcomes[key] = (outcomes[key] ?? 0) + 1;
    for (const f of r.failures) {
      const n = seen.get(f.signature) ?? 0;
      seen.set(f.signature, n + 1);
      // Three reproductions per distinct cause are plenty.
      const file = n < 3 ? writeRepro(opts.out, opts.seed, input, f) : '';
      failures.push({ kind: f.kind, signature: f.signature, index: i, file });
    }
    if ((done & 255) === 0) {
      const m = process.memoryUsage();
      heapMax = Math.max(heapMax, m.heapUsed);
      arrayBuffersMax = Math.max(arrayBuffersMax, m.arrayBuffers);
      if (m.heapUsed > opts.heapMiB * 1024 * 1024) {
        const f: Failure = { kind: 'heap', signature: 'heap above the limit', detail: `heapUsed ${(m.heapUsed / 2 ** 20).toFixed(0)} MiB after input ${i}` };
        failures.push({ kind: f.kind, signature: f.signature, index: i, file: writeRepro(opts.out, opts.seed, input, f) });
        report('done');
        return;
      }
      const now = performance.now();
      if (now - lastReport > 2000) {
        lastReport = now;
        report('progress');
      }
    }
  }
  const m = process.memoryUsage();
  heapMax = Math.max(heapMax, m.heapUsed);
  arrayBuffersMax = Math.max(arrayBuffersMax, m.arrayBuffers);
  report('done');
}

// ---- main thread ---------------------------------------------------------------------

/**
 * Workers do not inherit `--import tsx` on Node 20: each one registers tsx
 * itself, then loads this file.
 */
const WORKER_BOOT = new URL(
  `data:text/javascript,${encodeURIComponent(`const { register } = await import(${JSON.stringify(import.meta.resolve('tsx/esm/api'))}); register(); await import(${JSON.stringify(import.meta.url)});`)}`,
);

const MiB = (n: number) => `${(n / 2 ** 20).toFixed(0)} MiB`;

function replay(opts: Options): void {
  const corpus = buildCorpus();
  const input = makeInput(corpus, opts.seed, opts.replay!, opts.consistencyEvery);
  const r = check(corpus, input);
  console.log(JSON.stringify(describeInput(input, opts.seed), null, 2));
  console.log(`decoded in ${r.ms.toFixed(2)} ms: ${r.outcome ? `${r.outcome.records} records, ${r.outcome.error ? r.outcome.error.describe() : 'accepted'}` : 'threw'}`);
  for (const f of r.failures) {
    const stem = writeRepro(opts.out, opts.seed, input, f);
    console.log(`FAIL ${f.kind}: ${f.detail}\n  written to ${stem}.{bin,json}`);
  }
  process.exitCode = r.failures.length > 0 ? 1 : 0;
}

async function main(): Promise<void> {
  const opts = parseArgs(process.argv.slice(2));
  if (opts.replay !== undefined) return replay(opts);
  const workers = Math.min(opts.workers, Math.max(1, opts.inputs));
  opts.workers = workers;
  const t0 = performance.now();
  {
    const c = buildCorpus();
    const sizes = (t: Target) => c.byTarget[t].map((b) => b.bytes.length);
    const avg = (xs: number[]) => Math.round(xs.reduce((s, x) => s + x, 0) / Math.max(1, xs.length));
    console.log(
      `fuzz: seed ${opts.seed}, ${opts.inputs} inputs, ${workers} workers; bases: ` +
        (['main', 'resume', 'preempt', 'rp', 'multifd'] as const).map((t) => `${t} ${c.byTarget[t].length} (avg ${avg(sizes(t))} B)`).join(', '),
    );
  }
  const shared = new SharedArrayBuffer(8 * workers);
  const state = new Int32Array(shared);
  const progress = new Map<number, Progress>();
  const failures: Progress['failures'] = [];
  const signatures = new Map<string, number>();
  let failed = false;
  const onFailures = (fs: Progress['failures']) => {
    for (const f of fs) {
      failures.push(f);
      const n = signatures.get(f.signature) ?? 0;
      signatures.set(f.signature, n + 1);
      if (n === 0) console.log(`FAIL ${f.kind} at input ${f.index}: ${f.signature}${f.file ? `\n  reproduction: ${f.file}.{bin,json}` : ''}`);
      failed = true;
    }
  };
  const pool: Worker[] = [];
  const finished = new Promise<void>((resolveAll) => {
    let running = workers;
    for (let w = 0; w < workers; w++) {
      const worker = new Worker(WORKER_BOOT, {
        workerData: { opts, worker: w, shared } satisfies WorkerConfig,
        resourceLimits: { maxOldGenerationSizeMb: Math.max(opts.heapMiB * 2, 256) },
      });
      pool.push(worker);
      let ended = false;
      const end = () => {
        if (ended) return;
        ended = true;
        if (--running === 0) resolveAll();
      };
      worker.on('message', (p: Progress) => {
        progress.set(p.worker, p);
        onFailures(p.failures);
        if (p.type === 'done') end();
      });
      worker.on('error', (e) => {
        const index = Atomics.load(state, w * 2);
        const corpus = buildCorpus();
        const input = makeInput(corpus, opts.seed, index, opts.consistencyEvery);
        const f: Failure = { kind: 'worker-crash', signature: `worker crashed: ${e.message}`, detail: e.stack ?? e.message };
        onFailures([{ kind: f.kind, signature: f.signature, index, file: writeRepro(opts.out, opts.seed, input, f) }]);
        end();
      });
      worker.on('exit', () => end());
    }
  });
  // Watchdog: a worker stuck on one input is a hang (synchronous code cannot be timed out from inside).
  const lastSeen = Array.from({ length: workers }, () => ({ index: -1, since: performance.now() }));
  let lastPrint = performance.now();
  const watchdog = setInterval(() => {
    const now = performance.now();
    for (let w = 0; w < workers; w++) {
      const index = Atomics.load(state, w * 2);
      const busy = Atomics.load(state, w * 2 + 1) === 1;
      const seen = lastSeen[w]!;
      if (index !== seen.index || !busy) {
        seen.index = index;
        seen.since = now;
        continue;
      }
      if (now - seen.since > opts.hangMs) {
        const input = makeInput(buildCorpus(), opts.seed, index, opts.consistencyEvery);
        const f: Failure = { kind: 'hang', signature: `input still running after ${opts.hangMs} ms`, detail: `worker ${w}` };
        onFailures([{ kind: f.kind, signature: f.signature, index, file: writeRepro(opts.out, opts.seed, input, f) }]);
        seen.since = Infinity;
        void pool[w]!.terminate();
      }
    }
    if (now - lastPrint > 10_000) {
      lastPrint = now;
      const done = [...progress.values()].reduce((s, p) => s + p.done, 0);
      const secs = (now - t0) / 1000;
      const heap = Math.max(0, ...[...progress.values()].map((p) => p.heapMax));
      console.log(`  ${done} / ${opts.inputs} inputs, ${(done / secs).toFixed(0)} inputs/s, heap max ${MiB(heap)}, ${failures.length} failures`);
    }
  }, 250);
  await finished;
  clearInterval(watchdog);
  const secs = (performance.now() - t0) / 1000;
  const all = [...progress.values()];
  const done = all.reduce((s, p) => s + p.done, 0);
  const slowest = all.map((p) => p.slowest).reduce((a, b) => (b.ms > a.ms ? b : a), { ms: 0, index: -1, base: '', bytes: 0 });
  const heapMax = Math.max(0, ...all.map((p) => p.heapMax));
  const abMax = Math.max(0, ...all.map((p) => p.arrayBuffersMax));
  const decodeMs = all.reduce((s, p) => s + p.totalMs, 0);
  const outcomes: Record<string, number> = {};
  for (const p of all) for (const [k, n] of Object.entries(p.outcomes)) outcomes[k] = (outcomes[k] ?? 0) + n;
  const byTarget = new Map<string, [string, number][]>();
  for (const [k, n] of Object.entries(outcomes)) {
    const [t, what] = k.split(':') as [string, string];
    byTarget.set(t, [...(byTarget.get(t) ?? []), [what, n]]);
  }
  console.log('outcomes:');
  for (const [t, list] of byTarget) {
    const total = list.reduce((s, [, n]) => s + n, 0);
    list.sort((a, b) => b[1] - a[1]);
    console.log(`  ${t.padEnd(8)} ${String(total).padStart(8)}: ${list.slice(0, 8).map(([w, n]) => `${w} ${((100 * n) / total).toFixed(1)}%`).join(', ')}${list.length > 8 ? `, … (${list.length} outcomes)` : ''}`);
  }
  if (signatures.size > 0) {
    console.log('failures by cause:');
    for (const [sig, n] of signatures) console.log(`  ${String(n).padStart(7)} × ${sig}`);
  }
  // A slow input is often a GC pause or the other worker's burst: time it again, alone.
  let rerun = '';
  if (slowest.index >= 0) {
    const corpus = buildCorpus();
    const input = makeInput(corpus, opts.seed, slowest.index, opts.consistencyEvery);
    const times = Array.from({ length: 5 }, () => check(corpus, input).ms).sort((a, b) => a - b);
    rerun = `, ${times[2]!.toFixed(1)} ms median when re-run alone`;
  }
  failed ||= done < opts.inputs;
  console.log(
    `fuzz ${failed ? 'FAILED' : 'passed'}: ${done} inputs in ${secs.toFixed(1)} s (${(done / secs).toFixed(0)} inputs/s, mean ${(decodeMs / Math.max(1, done)).toFixed(3)} ms/input), ` +
      `seed ${opts.seed}, ${failures.length} failures (${signatures.size} causes); slowest ${slowest.ms.toFixed(1)} ms (input ${slowest.index}, ${slowest.base}, ${slowest.bytes} B${rerun}); ` +
      `heap max ${MiB(heapMax)} (limit ${opts.heapMiB} MiB), array buffers max ${MiB(abMax)}`,
  );
  process.exitCode = failed ? 1 : 0;
}

if (isMainThread) {
  main().catch((e: unknown) => {
    console.error(e);
    process.exitCode = 2;
  });
} else {
  workerMain(workerData as WorkerConfig);
}
