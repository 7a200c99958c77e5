// Shared code of the k6 scripts for the payments.v1 gRPC API (payments.js,
// ratelimit.js): configuration from the environment, the gRPC client, the
// account pool made by setup(), one weighted operation per iteration, the
// outcome metrics and the summary helpers.
//
// API facts this relies on (proto/payments/v1/*.proto, docs/payment-backend.md):
// - money is { amountMinor: int64 minor units, currency: "USD" };
// - every mutation carries an idempotency key, the `idempotency_key` field or
//   the `idempotency-key` metadata header (IDEMPOTENCY_KEY_IN picks which);
//   keys are scoped per `x-client-id`;
// - CreatePayment with CAPTURE_METHOD_MANUAL authorizes (holds) only and
//   CapturePayment moves the money; CAPTURE_METHOD_AUTOMATIC (the default)
//   does both at once; a decline is an OK answer with status DECLINED;
// - FAILED_PRECONDITION is a business refusal (a refund above what is left,
//   an expired authorization, ...), except IDEMPOTENCY_KEY_REUSED, a client bug.

import grpc from 'k6/net/grpc';
import { check } from 'k6';
import { Counter, Rate } from 'k6/metrics';

// ---------------------------------------------------------------- config

export function envInt(name, dflt) {
  const v = __ENV[name];
  if (v === undefined || v === '') return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || Math.floor(n) !== n) throw new Error(`${name}=${v}: not a whole number`);
  return n;
}

export function envNum(name, dflt) {
  const v = __ENV[name];
  if (v === undefined || v === '') return dflt;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name}=${v}: not a number`);
  return n;
}

export function envStr(name, dflt) {
  const v = __ENV[name];
  return v === undefined || v === '' ? dflt : v;
}

export function envBool(name, dflt) {
  const v = __ENV[name];
  if (v === undefined || v === '') return dflt;
  return /^(1|true|yes|on)$/i.test(v);
}

// "90s", "5m", "1h30m", "250ms", "20" (seconds) -> seconds.
export function durationSeconds(s) {
  const str = String(s).trim();
  if (/^\d+(\.\d+)?$/.test(str)) return Number(str);
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  const unit = { ms: 0.001, s: 1, m: 60, h: 3600 };
  let total = 0;
  let used = 0;
  let m;
  while ((m = re.exec(str)) !== null) {
    total += Number(m[1]) * unit[m[2]];
    used += m[0].length;
  }
  if (used !== str.length || used === 0) throw new Error(`duration "${s}": use e.g. 20s, 5m, 1h30m`);
  return total;
}

export const cfg = {
  target: envStr('TARGET', '127.0.0.1:10000'),
  tls: envBool('TLS', false), // plaintext (h2c) unless TLS=true
  callTimeout: envStr('CALL_TIMEOUT', '5s'),
  accounts: envInt('ACCOUNTS', 20), // payer accounts; payees: max(ACCOUNTS, MERCHANTS)
  merchants: envInt('MERCHANTS', 10), // x-merchant-id m-1..m-N
  clients: envInt('CLIENTS', 10), // x-client-id c-1..c-N, one per VU (round robin)
  currency: envStr('CURRENCY', 'USD'),
  fundMinor: envInt('FUND_MINOR', 1e13), // deposited on every payer account
  amountMin: envInt('AMOUNT_MIN', 100),
  amountMax: envInt('AMOUNT_MAX', 10000),
  manualShare: envNum('MANUAL_CAPTURE_SHARE', 0.5), // share of creates that only authorize
  mix: envStr('MIX', 'create=50,capture=20,refund=10,get=15,list=5'),
  keyIn: envStr('IDEMPOTENCY_KEY_IN', 'field'), // field | header
};
if (cfg.keyIn !== 'field' && cfg.keyIn !== 'header') throw new Error(`IDEMPOTENCY_KEY_IN=${cfg.keyIn}: field or header`);
if (cfg.amountMin < 1 || cfg.amountMax < cfg.amountMin) throw new Error('need 1 <= AMOUNT_MIN <= AMOUNT_MAX');

// A target as a file-name part: 127.0.0.1:10000 -> 127.0.0.1_10000.
export function safeName(s) {
  return String(s).replace(/[^A-Za-z0-9._-]+/g, '_').replace(/^[._]+/, '') || 'target';
}

function fileUrlToPath(u) {
  return decodeURIComponent(String(u).replace(/^file:\/\//, ''));
}

// load-tests/results/, from this file's location (whatever the cwd).
export const RESULTS_DIR = fileUrlToPath(import.meta.resolve('../../results'));

// The default JSON summary path; SUMMARY_JSON overrides it.
export function summaryJsonPath(scenario) {
  const set = envStr('SUMMARY_JSON', '');
  if (set) return set;
  return `${RESULTS_DIR}/${safeName(scenario)}-${safeName(cfg.target)}.json`;
}

// k6 cannot create folders: see at init whether the default one exists
// (open() says "can't be used with directories" when it does).
export const resultsDirExists = (() => {
  try {
    open(RESULTS_DIR);
    return false; // a file, not a folder
  } catch (e) {
    return /directories/.test(String(e));
  }
})();

// Files of the summary (handleSummary's return value): the JSON file unless
// its default folder is missing, with a note on stdout then.
export function summaryFiles(scenario, text, json) {
  const out = {};
  const path = summaryJsonPath(scenario);
  if (envStr('SUMMARY_JSON', '') || resultsDirExists) {
    out[path] = JSON.stringify(json, null, 2) + '\n';
    text += `JSON summary: ${path}\n`;
  } else {
    text += `JSON summary NOT written: ${RESULTS_DIR} does not exist (k6 cannot create it): mkdir -p it, or set SUMMARY_JSON\n`;
  }
  out.stdout = text;
  return out;
}

// ---------------------------------------------------------------- gRPC

// PROTO_DIR: the folder holding payments/v1/*.proto; relative values are
// relative to the main script's folder (load-tests/k6/); by default the
// repository's proto/ found from this file.
export const PROTO_DIR = envStr('PROTO_DIR', '') || fileUrlToPath(import.meta.resolve('../../../proto'));

export const client = new grpc.Client();
client.load([PROTO_DIR], 'payments/v1/accounts.proto', 'payments/v1/payments.proto');

let connected = false;
export function connect() {
  if (connected) return;
  client.connect(cfg.target, { plaintext: !cfg.tls, timeout: '10s' });
  connected = true;
}

export const STATUS_NAMES = [
  'OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED', 'NOT_FOUND',
  'ALREADY_EXISTS', 'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'FAILED_PRECONDITION',
  'ABORTED', 'OUT_OF_RANGE', 'UNIMPLEMENTED', 'INTERNAL', 'UNAVAILABLE', 'DATA_LOSS',
  'UNAUTHENTICATED',
];
export const OK = 0;
export const RESOURCE_EXHAUSTED = 8;
export const FAILED_PRECONDITION = 9;
// The status of an answer as a number.
export const code = (res) => Number(res.status);

// Not a gRPC status: invoke() threw (no connection, a bad message).
export const CLIENT_ERROR = 'CLIENT_ERROR';
export const ALL_STATUSES = STATUS_NAMES.concat([CLIENT_ERROR]);

// res.status is a Go codes.Code: == compares as a number, but it stringifies
// as its name ("OK"), so index by Number().
export function statusName(code) {
  const n = Number(code);
  return STATUS_NAMES[n] || (n === -1 ? CLIENT_ERROR : `CODE_${n}`);
}

// The ErrorInfo reason of an error answer, if any.
export function errorReason(res) {
  const details = (res && res.error && res.error.details) || [];
  for (const d of details) {
    if (d && d.reason && String(d['@type'] || '').endsWith('ErrorInfo')) return d.reason;
  }
  for (const d of details) {
    const v = d && d.violations && d.violations[0];
    if (v && v.type) return v.type;
  }
  return '';
}

// ---------------------------------------------------------------- metrics

// Every answer, tagged op and status (gRPC status name).
export const calls = new Counter('payment_calls');
// Errors among all calls: anything but OK, RESOURCE_EXHAUSTED (a rate-limit
// refusal) and a business FAILED_PRECONDITION.
export const errors = new Rate('payment_errors');
export const rateLimited = new Counter('rate_limited');
// FAILED_PRECONDITION other than IDEMPOTENCY_KEY_REUSED, tagged op and reason.
export const businessRefusals = new Counter('business_refusals');
// CreatePayment answered OK with status DECLINED (an empty payer account).
export const declines = new Counter('payments_declined');

let logged = 0;
function record(op, res) {
  const status = statusName(res.status);
  calls.add(1, { op, status });
  let error = false;
  if (code(res) === OK) {
    // fine
  } else if (code(res) === RESOURCE_EXHAUSTED) {
    rateLimited.add(1, { op });
  } else if (code(res) === FAILED_PRECONDITION && errorReason(res) !== 'IDEMPOTENCY_KEY_REUSED') {
    businessRefusals.add(1, { op, reason: errorReason(res) || 'unknown' });
  } else {
    error = true;
  }
  errors.add(error, { op });
  if (error && logged < 3) {
    logged++;
    console.warn(`VU ${__VU} ${op}: ${status} ${res.error ? res.error.message : ''}`);
  }
}

export function merchantName(i) {
  return `m-${i}`;
}

function clientId() {
  return `c-${__VU > 0 ? ((__VU - 1) % cfg.clients) + 1 : 1}`;
}

function newKey(op) {
  return `k6-${op}-${crypto.randomUUID()}`; // at most 64 characters
}

// One unary call with the metadata every call carries; a mutation gets a
// fresh idempotency key. Records the outcome unless opts.record is false.
export function call(op, method, req, merchant, opts = {}) {
  const metadata = { 'x-merchant-id': merchant, 'x-client-id': clientId() };
  if (opts.mutation) {
    const key = newKey(op);
    if (cfg.keyIn === 'header') metadata['idempotency-key'] = key;
    else req.idempotencyKey = key;
  }
  let res;
  try {
    res = client.invoke(method, req, { metadata, tags: { op }, timeout: cfg.callTimeout });
  } catch (e) {
    res = { status: -1, message: null, error: { message: String(e) } };
  }
  if (opts.record !== false) record(op, res);
  return res;
}

export const ok = (res) => code(res) === OK;

// ---------------------------------------------------------------- setup

function mustOk(what, res) {
  if (!ok(res)) {
    throw new Error(`setup: ${what}: ${statusName(res.status)} ${res.error ? JSON.stringify(res.error) : ''}`);
  }
  return res.message;
}

// Creates `payers` funded payer accounts and `payees` payee accounts, payee j
// belonging to merchant m-((j % merchants) + 1). Returns the pool for the VUs.
export function setupAccounts({ payers = cfg.accounts, merchants = cfg.merchants, payees } = {}) {
  if (payers < 1 || merchants < 1) throw new Error('need ACCOUNTS >= 1 and MERCHANTS >= 1');
  const nPayees = Math.max(payees || payers, merchants);
  connect();
  const pool = { payers: [], payees: {}, merchants, currency: cfg.currency };
  for (let i = 0; i < payers; i++) {
    const m = merchantName((i % merchants) + 1);
    const acct = mustOk('CreateAccount (payer)', call('setup', 'payments.v1.AccountService/CreateAccount',
      { owner: `k6-payer-${i + 1}`, currency: cfg.currency }, m, { mutation: true, record: false }));
    mustOk('Deposit', call('setup', 'payments.v1.AccountService/Deposit',
      { accountId: acct.id, amount: { amountMinor: cfg.fundMinor, currency: cfg.currency } }, m,
      { mutation: true, record: false }));
    pool.payers.push(acct.id);
  }
  for (let j = 0; j < nPayees; j++) {
    const m = merchantName((j % merchants) + 1);
    const acct = mustOk('CreateAccount (payee)', call('setup', 'payments.v1.AccountService/CreateAccount',
      { owner: m, currency: cfg.currency }, m, { mutation: true, record: false }));
    (pool.payees[m] = pool.payees[m] || []).push(acct.id);
  }
  return pool;
}

// ---------------------------------------------------------------- the mix

export const OPS = ['create', 'capture', 'cancel', 'refund', 'get', 'list', 'refunds', 'balance'];

export function parseMix(s) {
  const mix = [];
  let total = 0;
  for (const part of String(s).split(',').map((p) => p.trim()).filter(Boolean)) {
    const m = /^([a-z]+)\s*=\s*(\d+(?:\.\d+)?)$/.exec(part);
    if (!m || OPS.indexOf(m[1]) < 0) throw new Error(`MIX: "${part}": use op=weight with op in ${OPS.join(', ')}`);
    const w = Number(m[2]);
    if (w > 0) {
      mix.push({ op: m[1], weight: w });
      total += w;
    }
  }
  if (total <= 0) throw new Error(`MIX=${s}: no positive weight`);
  return { mix, total };
}

export const MIX = parseMix(cfg.mix);
// The ops a run can report: the mix, plus create (the fallback of the rest).
export const MIX_OPS = ['create'].concat(MIX.mix.map((e) => e.op).filter((op) => op !== 'create'));

function pickOp() {
  let r = Math.random() * MIX.total;
  for (const e of MIX.mix) {
    if ((r -= e.weight) < 0) return e.op;
  }
  return MIX.mix[MIX.mix.length - 1].op;
}

const rnd = (n) => Math.floor(Math.random() * n);
const pick = (a) => a[rnd(a.length)];
const amount = () => cfg.amountMin + rnd(cfg.amountMax - cfg.amountMin + 1);
const minor = (money) => (money ? Number(money.amountMinor || 0) : 0);

// What this VU created: operations act on these only, so they never race
// with another VU and never refund more than was captured.
const CAP = 500;
const mine = {
  pending: [], // manual authorizations not captured yet { id, merchant, amount }
  refundable: [], // captured, not fully refunded { id, merchant, captured, refunded }
  known: [], // every payment { id, merchant, payee }
  refunded: [], // payments with a refund { id, merchant }
};
function remember(list, item) {
  list.push(item);
  if (list.length > CAP) list.shift();
}
function takeRandom(list) {
  return list.splice(rnd(list.length), 1)[0];
}

function create(pool, manual) {
  const merchant = merchantName(1 + rnd(pool.merchants));
  const payee = pick(pool.payees[merchant]);
  const req = {
    payerAccountId: pick(pool.payers),
    payeeAccountId: payee,
    amount: { amountMinor: amount(), currency: pool.currency },
    captureMethod: manual ? 'CAPTURE_METHOD_MANUAL' : 'CAPTURE_METHOD_AUTOMATIC',
    description: 'k6 load test',
    metadata: { source: 'k6', vu: String(__VU) },
  };
  const res = call('create', 'payments.v1.PaymentService/CreatePayment', req, merchant, { mutation: true });
  if (!ok(res)) return res;
  const p = res.message;
  if (p.status === 'PAYMENT_STATUS_DECLINED') declines.add(1, { reason: p.declineCode });
  check(p, {
    'create: not declined': (x) => x.status !== 'PAYMENT_STATUS_DECLINED',
    'create: status as asked': (x) => x.status === 'PAYMENT_STATUS_DECLINED'
      || x.status === (manual ? 'PAYMENT_STATUS_REQUIRES_CAPTURE' : 'PAYMENT_STATUS_CAPTURED'),
  });
  if (p.status === 'PAYMENT_STATUS_DECLINED') return res;
  remember(mine.known, { id: p.id, merchant, payee });
  if (manual) remember(mine.pending, { id: p.id, merchant, amount: minor(p.amount) });
  else remember(mine.refundable, { id: p.id, merchant, captured: minor(p.amountCaptured), refunded: 0 });
  return res;
}

function capture() {
  const p = takeRandom(mine.pending);
  const req = { paymentId: p.id };
  // Mostly the whole authorization; sometimes a part (the rest is released).
  const partial = Math.random() < 0.3;
  if (partial) req.amountMinor = Math.max(1, Math.floor(p.amount * (0.5 + Math.random() / 2)));
  const res = call('capture', 'payments.v1.PaymentService/CapturePayment', req, p.merchant, { mutation: true });
  if (ok(res)) {
    const x = res.message;
    check(x, { 'capture: captured': (y) => y.status === 'PAYMENT_STATUS_CAPTURED' && minor(y.amountCaptured) > 0 });
    remember(mine.refundable, { id: p.id, merchant: p.merchant, captured: minor(x.amountCaptured), refunded: 0 });
  } else if (code(res) === RESOURCE_EXHAUSTED) {
    remember(mine.pending, p); // try again later
  }
  return res;
}

function cancel() {
  const p = takeRandom(mine.pending);
  const res = call('cancel', 'payments.v1.PaymentService/CancelPayment',
    { paymentId: p.id, reason: 'k6: customer abandoned the checkout' }, p.merchant, { mutation: true });
  if (ok(res)) check(res.message, { 'cancel: canceled': (y) => y.status === 'PAYMENT_STATUS_CANCELED' });
  else if (code(res) === RESOURCE_EXHAUSTED) remember(mine.pending, p);
  return res;
}

function refund() {
  const i = rnd(mine.refundable.length);
  const p = mine.refundable[i];
  const left = p.captured - p.refunded;
  const req = { paymentId: p.id, reason: 'k6: returned goods' };
  // Half of them refund what is left (amount absent), half a part of it.
  if (Math.random() < 0.5 && left > 1) req.amountMinor = 1 + rnd(left - 1);
  const res = call('refund', 'payments.v1.PaymentService/RefundPayment', req, p.merchant, { mutation: true });
  if (ok(res)) {
    check(res.message, { 'refund: succeeded': (r) => r.status === 'REFUND_STATUS_SUCCEEDED' });
    p.refunded += minor(res.message.amount);
    remember(mine.refunded, { id: p.id, merchant: p.merchant });
    if (p.refunded >= p.captured) mine.refundable.splice(i, 1);
  } else if (code(res) !== RESOURCE_EXHAUSTED) {
    mine.refundable.splice(i, 1); // refused for good: leave it alone
  }
  return res;
}

function get() {
  const p = pick(mine.known);
  const res = call('get', 'payments.v1.PaymentService/GetPayment', { paymentId: p.id }, p.merchant);
  if (ok(res)) check(res.message, { 'get: the payment asked for': (y) => y.id === p.id });
  return res;
}

function list() {
  const p = pick(mine.known);
  const res = call('list', 'payments.v1.PaymentService/ListPayments', { accountId: p.payee, pageSize: 20 }, p.merchant);
  if (ok(res)) check(res.message, { 'list: not empty': (y) => (y.payments || []).length > 0 });
  return res;
}

function refunds() {
  const p = pick(mine.refunded);
  const res = call('refunds', 'payments.v1.PaymentService/ListRefunds', { paymentId: p.id, pageSize: 20 }, p.merchant);
  if (ok(res)) check(res.message, { 'refunds: not empty': (y) => (y.refunds || []).length > 0 });
  return res;
}

function balance(pool) {
  const res = call('balance', 'payments.v1.AccountService/GetAccountBalance',
    { accountId: pick(pool.payers) }, merchantName(1 + rnd(pool.merchants)));
  if (ok(res)) check(res.message, { 'balance: has available': (y) => !!y.available });
  return res;
}

// One operation picked by the MIX weights. An operation with nothing of this
// VU's to act on yet creates a payment instead (manual for capture/cancel).
export function doOperation(pool) {
  connect();
  const op = pickOp();
  switch (op) {
    case 'capture':
      return mine.pending.length ? capture() : create(pool, true);
    case 'cancel':
      return mine.pending.length ? cancel() : create(pool, true);
    case 'refund':
      return mine.refundable.length ? refund() : create(pool, false);
    case 'get':
      return mine.known.length ? get() : create(pool, Math.random() < cfg.manualShare);
    case 'list':
      return mine.known.length ? list() : create(pool, Math.random() < cfg.manualShare);
    case 'refunds':
      return mine.refunded.length ? refunds() : (mine.refundable.length ? refund() : create(pool, false));
    case 'balance':
      return balance(pool);
    default:
      return create(pool, Math.random() < cfg.manualShare);
  }
}

// One CreatePayment (automatic capture) for a given merchant; records the
// outcome like every other call. For ratelimit.js.
export function createPaymentFor(pool, merchant) {
  connect();
  const req = {
    payerAccountId: pick(pool.payers),
    payeeAccountId: pick(pool.payees[merchant]),
    amount: { amountMinor: amount(), currency: pool.currency },
    captureMethod: 'CAPTURE_METHOD_AUTOMATIC',
    description: 'k6 rate-limit test',
  };
  return call('create', 'payments.v1.PaymentService/CreatePayment', req, merchant, { mutation: true });
}

// ---------------------------------------------------------------- summary helpers

export function ms(v) {
  if (v === undefined || v === null || Number.isNaN(v)) return '-';
  if (v >= 1000) return `${(v / 1000).toFixed(2)}s`;
  return `${v.toFixed(v < 10 ? 2 : 1)}ms`;
}

export function pct(v) {
  return v === undefined || v === null || Number.isNaN(v) ? '-' : `${(v * 100).toFixed(2)}%`;
}

export function pad(s, n, right) {
  s = String(s);
  if (s.length >= n) return s;
  const fill = ' '.repeat(n - s.length);
  return right ? fill + s : s + fill;
}

// Rows of strings -> aligned text; first column left, the rest right.
export function table(rows) {
  const widths = [];
  for (const r of rows) r.forEach((c, i) => { widths[i] = Math.max(widths[i] || 0, String(c).length); });
  return rows.map((r) => r.map((c, i) => pad(c, widths[i], i > 0)).join('  ')).join('\n') + '\n';
}

export function metricValues(data, name) {
  const m = data.metrics[name];
  return m ? m.values : undefined;
}

// The thresholds of the run as [{ metric, expr, ok }] (informational ones,
// count>=0 / max>=0 / rate>=0, left out).
export function thresholdResults(data) {
  const out = [];
  for (const name of Object.keys(data.metrics).sort()) {
    const th = data.metrics[name].thresholds || {};
    for (const expr of Object.keys(th)) {
      if (/^(count|max|rate)>=0$/.test(expr)) continue;
      out.push({ metric: name, expr, ok: th[expr].ok });
    }
  }
  return out;
}

// Informational submetric thresholds so that handleSummary sees per-tag values.
export function infoThresholds(metric, tag, values, expr) {
  const t = {};
  for (const v of values) t[`${metric}{${tag}:${v}}`] = [expr];
  return t;
}

export const TREND_STATS = ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)', 'count'];
