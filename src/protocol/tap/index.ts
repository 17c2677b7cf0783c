export { startTap, Tap, type TapOptions, type TapReport, type TapEvents, type TapRole, type TapChannelEvent, type TapConnectionReport, type TapTransportErrorReport } from './tap.js';
export {
  MigrationAnalysis,
  type AnalysisReport,
  type AnalysisHooks,
  type DirectionReport,
  type MainChannelReport,
  type Milestone,
  type MultifdChannelReport,
  type MultifdReport,
  type PageAnsweredEvent,
  type PageChannel,
  type PageCounts,
  type PageRequestEvent,
  type ParseErrorReport,
  type PreemptChannelReport,
  type RequestReport,
  type ReturnPathReport,
  type SwitchoverReport,
  type TapDirection,
  type TapPass,
} from './analysis.js';
export { type CaptureFileReport } from './capture.js';
export { type MultifdChannelCounts, type MultifdTotals } from './multifd.js';
