/**
 * A QEMU destination's own view of its postcopy faults, from the trace
 * events `postcopy_ram_fault_thread_request` (the fault thread asks for a
 * page) and `postcopy_place_page` / `postcopy_place_page_zero` (a page is
 * placed), logged with `-msg timestamp=on` as `TID@SEC.USEC:event args`.
 */

const LINE = /^\d+@(\d+)\.(\d{6}):(postcopy_ram_fault_thread_request|postcopy_place_page|postcopy_place_page_zero) (.*)$/;
const PAGE_MASK = ~0xfffn;

/**
 * Fault → placed, µs, for every requested page: the first request for a host
 * page (HVA rounded down to 4 KiB) to the next placement of that page.
 * Faults on a page already requested and not yet placed are not counted again.
 */
export function faultToPlaced(log: string): number[] {
  const waiting = new Map<bigint, number>();
  const out: number[] = [];
  for (const line of log.split('\n')) {
    const m = LINE.exec(line);
    if (!m) continue;
    const t = Number(m[1]) * 1e6 + Number(m[2]);
    if (m[3] === 'postcopy_ram_fault_thread_request') {
      const hva = /HVA=0x([0-9a-f]+)/.exec(m[4]!);
      if (!hva) continue;
      const page = BigInt(`0x${hva[1]}`) & PAGE_MASK;
      if (!waiting.has(page)) waiting.set(page, t);
    } else {
      const host = /host=(?:0x)?([0-9a-f]+)/.exec(m[4]!);
      if (!host) continue;
      const page = BigInt(`0x${host[1]}`) & PAGE_MASK;
      const t0 = waiting.get(page);
      if (t0 === undefined) continue;
      waiting.delete(page);
      out.push(t - t0);
    }
  }
  return out;
}
