// Load test of the payments.v1 gRPC API: a weighted mix of create / capture /
// refund / get / list (MIX) from a pool of funded accounts.
//   k6 run -e SCENARIO=smoke|load|stress|spike|soak -e TARGET=127.0.0.1:10000 load-tests/k6/payments.js
// See README.md for every variable and threshold.

import {
  cfg, envInt, envNum, envStr, durationSeconds, setupAccounts, doOperation, MIX_OPS, ALL_STATUSES,
  infoThresholds, thresholdResults, metricValues, summaryFiles, table, ms, pct, TREND_STATS,
} from './lib/payments.js';
import { sleep } from 'k6';

const SCENARIO = envStr('SCENARIO', 'smoke').toLowerCase();

// "200:30s,800:1m" -> [{ target: 200, duration: '30s' }, ...]
function parseStages(s) {
  return String(s).split(',').map((p) => p.trim()).filter(Boolean).map((p) => {
    const m = /^(\d+):(\S+)$/.exec(p);
    if (!m) throw new Error(`STAGES: "${p}": use rate:duration, e.g. 400:30s`);
    durationSeconds(m[2]); // validates
    return { target: Number(m[1]), duration: m[2] };
  });
}

// VUs an arrival rate needs: rate x latency; PRE_VUS / MAX_VUS override.
function vus(peakRate) {
  return {
    preAllocatedVUs: envInt('PRE_VUS', Math.max(5, Math.ceil(peakRate / 20))),
    maxVUs: envInt('MAX_VUS', Math.max(50, Math.ceil(peakRate / 2))),
  };
}

function buildScenario() {
  switch (SCENARIO) {
    case 'smoke':
      return {
        executor: 'constant-vus',
        vus: envInt('VUS', 2),
        duration: envStr('DURATION', '20s'),
      };
    case 'load': {
      const rate = envInt('RATE', 100);
      return {
        executor: 'constant-arrival-rate', rate, timeUnit: '1s', duration: envStr('DURATION', '60s'), ...vus(rate),
      };
    }
    case 'soak': {
      const rate = envInt('RATE', 50);
      return {
        executor: 'constant-arrival-rate', rate, timeUnit: '1s', duration: envStr('DURATION', '5m'), ...vus(rate),
      };
    }
    case 'stress': {
      const stages = parseStages(envStr('STAGES', '200:40s,400:40s,600:40s,800:40s,800:20s,0:10s'));
      const peak = Math.max(envInt('START_RATE', 50), ...stages.map((s) => s.target));
      return {
        executor: 'ramping-arrival-rate', startRate: envInt('START_RATE', 50), timeUnit: '1s', stages, ...vus(peak),
      };
    }
    case 'spike': {
      const base = envInt('BASE_RATE', 20);
      const peak = Math.round(base * envNum('SPIKE_FACTOR', 10));
      const hold = envStr('SPIKE_DURATION', '20s');
      const calm = envStr('CALM_DURATION', '20s');
      return {
        executor: 'ramping-arrival-rate',
        startRate: base,
        timeUnit: '1s',
        stages: [
          { target: base, duration: calm }, // low
          { target: peak, duration: '2s' }, // sudden 10x
          { target: peak, duration: hold },
          { target: base, duration: '2s' }, // back
          { target: base, duration: calm },
        ],
        ...vus(peak),
      };
    }
    default:
      throw new Error(`SCENARIO=${SCENARIO}: smoke, load, stress, spike or soak`);
  }
}

const loose = SCENARIO === 'stress' || SCENARIO === 'spike';
const P95 = envNum('P95_MS', loose ? 1000 : 250);
const P99 = envNum('P99_MS', loose ? 2500 : 500);
const MAX_ERROR_RATE = envNum('MAX_ERROR_RATE', 0.01);
const MIN_CHECKS = envNum('MIN_CHECK_RATE', 0.99);

export const options = {
  scenarios: { [SCENARIO]: buildScenario() },
  setupTimeout: envStr('SETUP_TIMEOUT', '2m'),
  summaryTrendStats: TREND_STATS,
  thresholds: {
    payment_errors: [`rate<${MAX_ERROR_RATE}`],
    grpc_req_duration: [`p(95)<${P95}`, `p(99)<${P99}`],
    checks: [`rate>${MIN_CHECKS}`],
    // informational: per-op and per-status values for handleSummary
    ...infoThresholds('grpc_req_duration', 'op', MIX_OPS, 'max>=0'),
    ...infoThresholds('payment_calls', 'op', MIX_OPS, 'count>=0'),
    ...infoThresholds('payment_errors', 'op', MIX_OPS, 'rate>=0'),
    ...infoThresholds('rate_limited', 'op', MIX_OPS, 'count>=0'),
    ...infoThresholds('business_refusals', 'op', MIX_OPS, 'count>=0'),
    ...infoThresholds('payment_calls', 'status', ALL_STATUSES, 'count>=0'),
  },
};

const SLEEP = envNum('SLEEP', 0.1); // think time of smoke's VUs (seconds)

export function setup() {
  return setupAccounts();
}

export default function (pool) {
  doOperation(pool);
  if (SCENARIO === 'smoke' && SLEEP > 0) sleep(SLEEP);
}

export function handleSummary(data) {
  const seconds = data.state.testRunDurationMs / 1000;
  const total = (metricValues(data, 'payment_calls') || {}).count || 0;
  const dur = metricValues(data, 'grpc_req_duration') || {};
  const err = metricValues(data, 'payment_errors') || {};
  const num = (name) => (metricValues(data, name) || {}).count || 0;
  const ops = {};
  const rows = [['op', 'calls', 'rps', 'p50', 'p95', 'p99', 'max', 'errors', 'limited', 'refused']];
  for (const op of MIX_OPS) {
    const c = (metricValues(data, `payment_calls{op:${op}}`) || {}).count || 0;
    const d = metricValues(data, `grpc_req_duration{op:${op}}`) || {};
    const e = metricValues(data, `payment_errors{op:${op}}`) || {};
    const l = num(`rate_limited{op:${op}}`);
    const r = num(`business_refusals{op:${op}}`);
    ops[op] = {
      calls: c, rps: c / seconds, p50: d.med, p95: d['p(95)'], p99: d['p(99)'], max: d.max, errorRate: e.rate || 0, rateLimited: l, businessRefusals: r,
    };
    if (c > 0) rows.push([op, c, (c / seconds).toFixed(1), ms(d.med), ms(d['p(95)']), ms(d['p(99)']), ms(d.max), pct(e.rate || 0), l, r]);
  }
  rows.push(['all', total, (total / seconds).toFixed(1), ms(dur.med), ms(dur['p(95)']), ms(dur['p(99)']), ms(dur.max), pct(err.rate || 0), num('rate_limited'), num('business_refusals')]);
  const statuses = {};
  for (const s of ALL_STATUSES) {
    const c = (metricValues(data, `payment_calls{status:${s}}`) || {}).count || 0;
    if (c > 0) statuses[s] = c;
  }
  const ths = thresholdResults(data);
  const passed = ths.every((t) => t.ok);
  let text = `\npayments.v1 k6  scenario=${SCENARIO}  target=${cfg.target}  run=${seconds.toFixed(1)}s (setup included)\n`;
  text += `mix=${cfg.mix}  accounts=${cfg.accounts}  merchants=${cfg.merchants}\n`;
  text += `calls=${total}  rps=${(total / seconds).toFixed(1)}  iterations=${num('iterations')}  dropped_iterations=${num('dropped_iterations')}  vus_max=${(metricValues(data, 'vus_max') || {}).value || '-'}\n\n`;
  text += table(rows);
  text += `\nerror rate (payment_errors) ${pct(err.rate || 0)} (${err.passes || 0} of ${total})`;
  text += `  rate-limited ${num('rate_limited')}  business refusals ${num('business_refusals')}  declined ${num('payments_declined')}\n`;
  text += `by status: ${Object.keys(statuses).map((s) => `${s}=${statuses[s]}`).join('  ') || '-'}\n`;
  text += `checks: ${pct((metricValues(data, 'checks') || {}).rate)}\n\nthresholds:\n`;
  for (const t of ths) {
    const v = metricValues(data, t.metric) || {};
    const stat = /^p\(\d+\)/.test(t.expr) ? ms(v[t.expr.match(/^p\(\d+\)/)[0]]) : pct(v.rate);
    text += `  ${t.ok ? 'PASS' : 'FAIL'}  ${t.metric} ${t.expr}  (${stat})\n`;
  }
  text += `RESULT: ${passed ? 'PASS' : 'FAIL'}\n`;
  const json = {
    script: 'payments.js',
    scenario: SCENARIO,
    target: cfg.target,
    passed,
    runSeconds: seconds,
    calls: total,
    rps: total / seconds,
    latencyMs: { p50: dur.med, p95: dur['p(95)'], p99: dur['p(99)'], max: dur.max },
    errorRate: err.rate || 0,
    rateLimited: num('rate_limited'),
    businessRefusals: num('business_refusals'),
    declined: num('payments_declined'),
    droppedIterations: num('dropped_iterations'),
    ops,
    statuses,
    thresholds: ths,
    config: { ...cfg, p95Ms: P95, p99Ms: P99, maxErrorRate: MAX_ERROR_RATE, scenario: options.scenarios[SCENARIO] },
    metrics: data.metrics,
  };
  return summaryFiles(SCENARIO, text, json);
}
