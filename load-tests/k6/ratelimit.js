// The rate-limit scenario: CreatePayment for KEYS merchants (x-merchant-id
// m-1..m-KEYS), each at OFFERED calls/s, well above tollgate's per-merchant
// GCRA limit (LIMIT_RATE/s, LIMIT_BURST), for DURATION. Run it through a
// tollgate configured with that limit (this script does not configure it):
//   k6 run -e TARGET=127.0.0.1:10000 -e LIMIT_RATE=20 -e LIMIT_BURST=5 load-tests/k6/ratelimit.js
// Passes when every key got at most LIMIT_RATE x (seconds + JITTER) +
// LIMIT_BURST calls through (JITTER, default 0.1 s: the calls offered over
// DURATION reach Redis, whose clock decides, over DURATION give or take what
// scheduling and the network add), the refused (RESOURCE_EXHAUSTED) share is within SHARE_TOLERANCE
// of 1 - LIMIT_RATE/OFFERED, and nothing failed otherwise.

import exec from 'k6/execution';
import { Counter, Rate } from 'k6/metrics';
import {
  cfg, envInt, envNum, envStr, durationSeconds, setupAccounts, createPaymentFor, merchantName,
  statusName, code, OK, RESOURCE_EXHAUSTED, ALL_STATUSES, infoThresholds, thresholdResults, metricValues,
  summaryFiles, table, ms, pct, TREND_STATS,
} from './lib/payments.js';

const KEYS = envInt('KEYS', 4);
const LIMIT_RATE = envNum('LIMIT_RATE', 20); // units per second
const LIMIT_BURST = envInt('LIMIT_BURST', 5);
const OFFERED = envNum('OFFERED', 3 * LIMIT_RATE); // calls per second per key
const DURATION = envStr('DURATION', '20s');
const SECONDS = durationSeconds(DURATION);
const TOLERANCE = envNum('SHARE_TOLERANCE', 0.1); // relative, of the expected share
const JITTER = envNum('JITTER', 0.1); // seconds the calls' span in Redis may exceed DURATION

if (KEYS < 1) throw new Error('KEYS must be at least 1');
if (!(LIMIT_RATE > 0) || !(OFFERED > 0)) throw new Error('LIMIT_RATE and OFFERED must be positive');

const MERCHANTS = Array.from({ length: KEYS }, (_, i) => merchantName(i + 1));
// GCRA: at most the burst at once, then the rate, over the span the calls
// took in Redis.
const BOUND = Math.floor(LIMIT_RATE * (SECONDS + JITTER) + LIMIT_BURST);
const EXPECTED_SHARE = Math.max(0, 1 - LIMIT_RATE / OFFERED);
const SHARE_LO = Math.max(0, EXPECTED_SHARE * (1 - TOLERANCE));
const SHARE_HI = Math.min(1, EXPECTED_SHARE * (1 + TOLERANCE));

const offered = new Counter('offered'); // calls made, tag merchant
const allowed = new Counter('allowed'); // answered OK, tag merchant
const limited = new Counter('limited'); // answered RESOURCE_EXHAUSTED, tag merchant
const limitedShare = new Rate('limited_share');
const otherErrors = new Counter('other_errors'); // anything else, tags merchant and status

// A whole number of arrivals per time unit (k6 needs an integer rate).
function arrival(perSecond) {
  if (Number.isInteger(perSecond)) return { rate: perSecond, timeUnit: '1s' };
  return { rate: Math.round(perSecond * 100), timeUnit: '100s' };
}

const scenarios = {};
for (const m of MERCHANTS) {
  scenarios[`key_${m}`] = {
    executor: 'constant-arrival-rate',
    ...arrival(OFFERED),
    duration: DURATION,
    preAllocatedVUs: envInt('PRE_VUS', Math.max(2, Math.ceil(OFFERED / 20))),
    maxVUs: envInt('MAX_VUS', Math.max(20, Math.ceil(OFFERED / 2))),
    exec: 'drive',
    env: { MERCHANT: m },
    tags: { merchant: m },
  };
}

const thresholds = {
  limited_share: [`rate>=${SHARE_LO}`, `rate<=${SHARE_HI}`],
  other_errors: ['count==0'],
  ...infoThresholds('offered', 'merchant', MERCHANTS, 'count>=0'),
  ...infoThresholds('limited', 'merchant', MERCHANTS, 'count>=0'),
  ...infoThresholds('payment_calls', 'status', ALL_STATUSES, 'count>=0'),
};
for (const m of MERCHANTS) thresholds[`allowed{merchant:${m}}`] = [`count<=${BOUND}`];

export const options = {
  scenarios,
  thresholds,
  setupTimeout: envStr('SETUP_TIMEOUT', '2m'),
  summaryTrendStats: TREND_STATS,
};

export function setup() {
  return setupAccounts({ payers: cfg.accounts, merchants: KEYS });
}

export function drive(pool) {
  const merchant = __ENV.MERCHANT || exec.scenario.name.replace(/^key_/, '');
  const res = createPaymentFor(pool, merchant);
  offered.add(1, { merchant });
  const c = code(res);
  if (c === OK) allowed.add(1, { merchant });
  else if (c === RESOURCE_EXHAUSTED) limited.add(1, { merchant });
  else otherErrors.add(1, { merchant, status: statusName(c) });
  limitedShare.add(c === RESOURCE_EXHAUSTED, { merchant });
}

export default drive;

export function handleSummary(data) {
  const count = (name) => (metricValues(data, name) || {}).count || 0;
  const share = metricValues(data, 'limited_share') || {};
  const dur = metricValues(data, 'grpc_req_duration') || {};
  const lines = [];
  const keys = {};
  const rows = [['key', 'offered', 'offered/s', 'allowed', 'bound', 'limited', 'limited share', 'result']];
  for (const m of MERCHANTS) {
    const o = count(`offered{merchant:${m}}`);
    const a = count(`allowed{merchant:${m}}`);
    const l = count(`limited{merchant:${m}}`);
    const th = data.metrics[`allowed{merchant:${m}}`];
    const passed = th ? th.thresholds[`count<=${BOUND}`].ok : a <= BOUND;
    keys[m] = { offered: o, allowed: a, limited: l, bound: BOUND, share: o ? l / o : 0, passed };
    rows.push([m, o, (o / SECONDS).toFixed(1), a, BOUND, l, pct(o ? l / o : 0), passed ? 'PASS' : 'FAIL']);
  }
  const shareOk = share.rate >= SHARE_LO && share.rate <= SHARE_HI;
  const others = count('other_errors');
  const statuses = {};
  for (const s of ALL_STATUSES) {
    const c = count(`payment_calls{status:${s}}`);
    if (c > 0) statuses[s] = c;
  }
  const ths = thresholdResults(data);
  const passed = ths.every((t) => t.ok);
  lines.push('');
  lines.push(`tollgate rate limit (k6)  target=${cfg.target}  keys=${KEYS}  limit=${LIMIT_RATE}/s burst ${LIMIT_BURST} (GCRA)  offered=${OFFERED}/s per key  duration=${DURATION}`);
  lines.push(`bound per key = ${LIMIT_RATE} x (${SECONDS}s + ${JITTER}s) + ${LIMIT_BURST} = ${BOUND}; dropped_iterations=${count('dropped_iterations')}; latency p50 ${ms(dur.med)} p95 ${ms(dur['p(95)'])} p99 ${ms(dur['p(99)'])}`);
  lines.push('');
  let text = lines.join('\n') + '\n' + table(rows) + '\n';
  for (const m of MERCHANTS) {
    const k = keys[m];
    text += `${k.passed ? 'PASS' : 'FAIL'}  ${m}: allowed ${k.allowed} ${k.allowed <= k.bound ? '<=' : '>'} bound ${k.bound} (offered ${k.offered}, limited ${k.limited})\n`;
  }
  text += `${shareOk ? 'PASS' : 'FAIL'}  limited share ${pct(share.rate)} (${share.passes || 0} of ${(share.passes || 0) + (share.fails || 0)}) within ${pct(SHARE_LO)}..${pct(SHARE_HI)} (expected ${pct(EXPECTED_SHARE)} = 1 - ${LIMIT_RATE}/${OFFERED}, +-${pct(TOLERANCE)} of it)\n`;
  text += `${others === 0 ? 'PASS' : 'FAIL'}  other errors (not OK, not RESOURCE_EXHAUSTED): ${others}\n`;
  text += `by status: ${Object.keys(statuses).map((s) => `${s}=${statuses[s]}`).join('  ') || '-'}\n`;
  text += `RESULT: ${passed ? 'PASS' : 'FAIL'}\n`;
  const json = {
    script: 'ratelimit.js',
    scenario: 'ratelimit',
    target: cfg.target,
    passed,
    limit: { rate: LIMIT_RATE, burst: LIMIT_BURST, algorithm: 'gcra', key: 'x-merchant-id' },
    offeredPerKey: OFFERED,
    durationSeconds: SECONDS,
    boundPerKey: BOUND,
    limitedShare: { measured: share.rate, expected: EXPECTED_SHARE, low: SHARE_LO, high: SHARE_HI, passed: shareOk },
    otherErrors: others,
    keys,
    statuses,
    latencyMs: { p50: dur.med, p95: dur['p(95)'], p99: dur['p(99)'], max: dur.max },
    thresholds: ths,
    metrics: data.metrics,
  };
  return summaryFiles('ratelimit', text, json);
}
