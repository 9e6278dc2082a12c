// Drives the admin UI in headless Chromium and checks what it shows against the
// admin report API, fetched independently from Node.
//
//   TALLY_ADMIN=http://127.0.0.1:PORT TALLY_TOKEN=… TALLY_MERCHANT=acme \
//   TALLY_FROM=2026-03-01 TALLY_TO=2026-03-31 [TALLY_TZ=UTC] \
//   [SCREENSHOT=ui.png] [CHROMIUM=/usr/bin/chromium] node ui.mjs
//
// Prints one JSON line to stdout; exits 0 when everything matched, 1 on any
// mismatch or failure (details on stderr), 2 on missing inputs.
import { readFile } from 'node:fs/promises';
import { chromium } from 'playwright-core';

const CSV_HEADER = 'day,partner_id,currency,clicks,unique_clicks,conversions,revenue,commission,reversed,influenced,self_reported,flagged,flagged_commission';
const COLS = ['day', 'partner_id', 'currency', 'clicks', 'unique_clicks', 'conversions', 'revenue', 'commission', 'reversed', 'flagged', 'flagged_commission'];
const TIMEOUT = 20_000;

const env = process.env;
const missing = ['TALLY_ADMIN', 'TALLY_TOKEN', 'TALLY_MERCHANT', 'TALLY_FROM', 'TALLY_TO'].filter((k) => !env[k]);
if (missing.length) {
  console.error(`missing environment: ${missing.join(', ')}`);
  process.exit(2);
}
const admin = env.TALLY_ADMIN.replace(/\/+$/, '');
const token = env.TALLY_TOKEN;
const merchant = env.TALLY_MERCHANT;
const from = env.TALLY_FROM;
const to = env.TALLY_TO;
const tz = env.TALLY_TZ || 'UTC';
const screenshot = env.SCREENSHOT || 'tally-ui.png';
const executablePath = env.CHROMIUM || '/usr/bin/chromium';

const problems = [];
const fail = (msg) => problems.push(msg);

// The UI renders null as '—' in the currency cell; everything else is String(value).
const cellText = (col, v) => (col === 'currency' && (v === null || v === undefined) ? '—' : String(v ?? ''));
const medianText = (m) => (m === null || m === undefined ? '—' : String(m));

function reportUrl(kind) {
  const q = new URLSearchParams({ from, to, tz });
  return `${admin}/admin/v1/merchants/${encodeURIComponent(merchant)}/reports/${kind}?${q}`;
}

async function apiJson(kind) {
  const res = await fetch(reportUrl(kind), {
    headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
  });
  const body = await res.text();
  if (!res.ok) throw new Error(`API ${kind} report: HTTP ${res.status}: ${body.slice(0, 500)}`);
  return JSON.parse(body);
}

async function main() {
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  let summary = { rows: 0, checked_cells: 0, program_ok: false, screenshot };
  try {
    const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    page.on('pageerror', (e) => fail(`page error: ${e.message}`));
    page.on('console', (m) => {
      if (/Content[- ]Security[- ]Policy|Refused to (execute|apply|load|connect)/i.test(m.text())) fail(`CSP violation: ${m.text()}`);
    });

    const nav = await page.goto(`${admin}/admin/ui`, { waitUntil: 'load' });
    if (!nav || nav.status() !== 200) throw new Error(`GET /admin/ui: HTTP ${nav ? nav.status() : 'no response'}`);

    await page.fill('#token', token);
    await page.fill('#merchant', merchant);
    await page.fill('#from', from);
    await page.fill('#to', to);
    await page.fill('#tz', tz);
    await page.click('#load');
    await page.waitForFunction(() => ['loaded', 'error'].includes(document.body.dataset.state), null, { timeout: TIMEOUT });
    if ((await page.evaluate(() => document.body.dataset.state)) === 'error') {
      const text = (await page.textContent('#error')) || '';
      console.error(`UI reported an error: ${text.trim()}`);
      await page.screenshot({ path: screenshot, fullPage: true }).catch(() => {});
      return { code: 1, summary };
    }

    const [partners, program] = await Promise.all([apiJson('partners'), apiJson('program')]);
    const apiRows = Array.isArray(partners.rows) ? partners.rows : [];

    // --- table rows -------------------------------------------------------
    const uiRows = await page.$$eval('#rows tbody tr', (trs) => trs.map((tr) => ({
      day: tr.getAttribute('data-day'),
      partner: tr.getAttribute('data-partner'),
      currency: tr.getAttribute('data-currency'),
      cells: Object.fromEntries([...tr.querySelectorAll('[data-col]')].map((td) => [td.getAttribute('data-col'), td.textContent])),
    })));
    if (uiRows.length !== apiRows.length) fail(`table has ${uiRows.length} rows, API has ${apiRows.length}`);

    const keyOf = (day, partner, currency) => JSON.stringify([day, partner, currency]);
    const byKey = new Map();
    for (const r of uiRows) {
      const k = keyOf(r.day, r.partner, r.currency);
      if (!byKey.has(k)) byKey.set(k, []);
      byKey.get(k).push(r);
    }
    let checked = 0;
    for (const a of apiRows) {
      const k = keyOf(String(a.day), String(a.partner_id), a.currency === null || a.currency === undefined ? '' : String(a.currency));
      const candidates = byKey.get(k) || [];
      if (!candidates.length) { fail(`API row not in table: ${JSON.stringify(a)}`); continue; }
      const ui = candidates.shift();
      for (const col of COLS) {
        const want = cellText(col, a[col]);
        const got = ui.cells[col];
        checked += 1;
        if (got !== want) fail(`row ${k} column ${col}: table ${JSON.stringify(got)}, API ${JSON.stringify(want)}`);
      }
    }
    const status = ((await page.textContent('#status')) || '').trim();
    if (status !== `Loaded ${apiRows.length} rows`) fail(`#status says ${JSON.stringify(status)}`);

    // --- program figures ----------------------------------------------------
    const text = (id) => page.evaluate((i) => { const e = document.getElementById(i); return e ? e.textContent : null; }, id);
    const before = problems.length;
    const revenue = Array.isArray(program.revenue) ? program.revenue : [];
    for (const r of revenue) {
      for (const [field, prefix] of [['total', 'program-total-'], ['sourced', 'program-sourced-'], ['influenced', 'program-influenced-']]) {
        const id = `${prefix}${r.currency ?? ''}`;
        const got = await text(id);
        if (got !== String(r[field])) fail(`#${id}: page ${JSON.stringify(got)}, API ${JSON.stringify(String(r[field]))}`);
      }
    }
    const shownCurrencies = await page.$$eval('[id^="program-total-"]', (els) => els.length);
    if (shownCurrencies !== revenue.length) fail(`page shows ${shownCurrencies} revenue currencies, API has ${revenue.length}`);
    const activeWant = String(program.active_partners?.total);
    const activeGot = await text('active-total');
    if (activeGot !== activeWant) fail(`#active-total: page ${JSON.stringify(activeGot)}, API ${activeWant}`);
    const medianWant = medianText(program.time_to_first_conversion?.median_days);
    const medianGot = await text('median-days');
    if (medianGot !== medianWant) fail(`#median-days: page ${JSON.stringify(medianGot)}, API ${JSON.stringify(medianWant)}`);
    const programOk = problems.length === before;

    // --- the token stays in memory --------------------------------------------
    const stored = await page.evaluate(() => ({ local: localStorage.length, session: sessionStorage.length, cookie: document.cookie }));
    if (!(stored.local === 0 && stored.session === 0 && stored.cookie === '')) fail(`page stored something: ${JSON.stringify(stored)}`);
    if (page.url().includes(token)) fail('token appears in the page URL');

    // --- CSV export ---------------------------------------------------------------
    try {
      const [download] = await Promise.all([
        page.waitForEvent('download', { timeout: TIMEOUT }),
        page.click('#csv-partners'),
      ]);
      const wantName = `partners-${from}-${to}.csv`;
      if (download.suggestedFilename() !== wantName) fail(`CSV file name ${JSON.stringify(download.suggestedFilename())}, want ${wantName}`);
      const failure = await download.failure();
      if (failure) throw new Error(failure);
      const csv = await readFile(await download.path(), 'utf8');
      const first = csv.split(/\r?\n/, 1)[0];
      if (first !== CSV_HEADER) fail(`CSV starts with ${JSON.stringify(first.slice(0, 200))}`);
    } catch (e) {
      const err = ((await page.textContent('#error').catch(() => '')) || '').trim();
      fail(`partners CSV download: ${e.message}${err ? ` (page error: ${err})` : ''}`);
    }

    await page.screenshot({ path: screenshot, fullPage: true });
    summary = { rows: apiRows.length, checked_cells: checked, program_ok: programOk, screenshot };
    return { code: problems.length ? 1 : 0, summary };
  } finally {
    await browser.close();
  }
}

let code = 1;
try {
  const out = await main();
  code = out.code;
  console.log(JSON.stringify(out.summary));
} catch (e) {
  fail(e && e.stack ? e.stack : String(e));
}
for (const p of problems) console.error(p);
if (problems.length) code = 1;
process.exit(code);
