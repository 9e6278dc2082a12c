// tally admin reports page. No framework, no external assets; runs under
// `default-src 'self'` (no inline script or style). Data only ever reaches the
// DOM through textContent / setAttribute, never innerHTML.
'use strict';

(() => {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const DAY_MS = 86400000;
  const FIGURES = ['clicks', 'unique_clicks', 'conversions', 'revenue', 'commission', 'reversed', 'flagged', 'flagged_commission'];

  // The admin token lives only here: never in storage, cookies or the URL.
  let token = '';
  let current = null; // the query whose results are on screen
  let seq = 0;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) e.setAttribute(k, String(v));
    }
    for (const k of kids) if (k !== undefined && k !== null) e.append(k);
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---- API ---------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem || {};
    }
  }

  const merchantPath = (m) => `/admin/v1/merchants/${encodeURIComponent(m)}`;
  const reportPath = (q, kind) =>
    `${merchantPath(q.merchant)}/reports/${kind}?${new URLSearchParams({ from: q.from, to: q.to, tz: q.tz })}`;
  const ledgerPath = (q) =>
    `${merchantPath(q.merchant)}/ledger?${new URLSearchParams({ from: q.from, to: q.to, tz: q.tz })}`;

  async function api(path, accept) {
    const res = await fetch(path, {
      headers: { Authorization: `Bearer ${token}`, Accept: accept },
      cache: 'no-store',
      credentials: 'omit',
      referrerPolicy: 'no-referrer',
    });
    if (!res.ok) {
      let problem = {};
      try { problem = JSON.parse(await res.text()) || {}; } catch (_) { /* not JSON */ }
      throw new ApiError(res.status, problem);
    }
    return res;
  }

  async function apiJson(path) {
    const res = await api(path, 'application/json');
    return res.json().catch(() => { throw new Error(`Unreadable JSON from ${path.split('?')[0]}`); });
  }

  // ---- status and errors -------------------------------------------------

  function setStatus(text) { $('status').textContent = text; }
  function setExports(on) { $('csv-partners').disabled = !on; $('csv-ledger').disabled = !on; }

  function clearError() { $('error').replaceChildren(); $('error').hidden = true; }

  function showError(e) {
    const box = $('error');
    box.replaceChildren();
    if (e instanceof ApiError) {
      const p = e.problem;
      const head = e.status === 401
        ? `The admin token was refused (401${p.title ? ` ${p.title}` : ''}).`
        : `${p.title || 'Request failed'} (HTTP ${e.status})`;
      box.append(el('strong', null, head));
      if (p.detail) box.append(' ', el('span', null, p.detail));
      if (p.code) box.append(' ', el('code', { class: 'code' }, String(p.code)));
    } else {
      box.append(el('strong', null, 'Request failed: '), String((e && e.message) || e));
    }
    box.hidden = false;
  }

  // ---- formatting --------------------------------------------------------

  const pct = (x) => (typeof x === 'number' && Number.isFinite(x) ? `${(x * 100).toFixed(1)}%` : '—');
  const str = (v) => (v === null || v === undefined ? '' : String(v));

  function dayRange(from, to) {
    const out = [];
    const a = Date.parse(`${from}T00:00:00Z`);
    const b = Date.parse(`${to}T00:00:00Z`);
    if (!Number.isFinite(a) || !Number.isFinite(b)) return out;
    for (let t = a; t <= b && out.length < 3700; t += DAY_MS) out.push(new Date(t).toISOString().slice(0, 10));
    return out;
  }

  function niceAxis(max) {
    // Four equal intervals with a 1/2/5 step, so both y axes share gridlines.
    const raw = max / 4;
    let step = 1;
    if (raw > 0) {
      const p = 10 ** Math.floor(Math.log10(raw));
      const f = raw / p;
      step = Math.max(1, (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p);
    }
    return { max: step * 4, ticks: [0, 1, 2, 3, 4].map((i) => i * step) };
  }

  const tickText = (v) => v.toLocaleString('en-US');

  // ---- rendering: program health -----------------------------------------

  function stat(label, value, sub) {
    return el('div', { class: 'stat' }, el('div', { class: 'stat-label' }, label), value, sub ? el('div', { class: 'stat-sub' }, sub) : null);
  }

  function breakdown(obj) {
    const list = el('ul', { class: 'breakdown' });
    for (const [k, n] of Object.entries(obj || {}).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))) {
      list.append(el('li', { 'data-key': k }, el('span', null, k), el('span', { class: 'num' }, String(n))));
    }
    if (!list.childElementCount) list.append(el('li', { class: 'muted' }, '—'));
    return list;
  }

  function renderProgram(p) {
    const host = $('program-body');
    host.replaceChildren();

    const revenue = Array.isArray(p.revenue) ? p.revenue : [];
    if (revenue.length) {
      const body = el('tbody');
      for (const r of revenue) {
        const cur = str(r.currency);
        body.append(el('tr', { 'data-currency': cur },
          el('th', { scope: 'row' }, cur || '—'),
          el('td', { class: 'num', id: `program-total-${cur}` }, str(r.total)),
          el('td', { class: 'num', id: `program-sourced-${cur}` }, str(r.sourced)),
          el('td', { class: 'num muted' }, pct(r.sourced_share)),
          el('td', { class: 'num', id: `program-influenced-${cur}` }, str(r.influenced)),
          el('td', { class: 'num muted' }, pct(r.influenced_share))));
      }
      const head = el('tr', null, ...['Currency', 'Total revenue', 'Sourced', 'Share', 'Influenced', 'Share']
        .map((h, i) => el('th', i ? { class: 'num' } : null, h)));
      host.append(el('table', { class: 'revenue' }, el('thead', null, head), body));
    } else {
      host.append(el('p', { class: 'muted' }, 'No revenue in this range.'));
    }

    const ap = p.active_partners || {};
    const ttf = p.time_to_first_conversion || {};
    const median = ttf.median_days === null || ttf.median_days === undefined ? '—' : String(ttf.median_days);
    const qualified = Array.isArray(ttf.partners) ? ttf.partners.length : 0;

    host.append(el('div', { class: 'stats' },
      stat('Active partners', el('div', { class: 'stat-value', id: 'active-total' }, str(ap.total)),
        `as of ${str(ap.as_of) || '—'} · ${str(ap.window_days) || '?'}-day window`),
      stat('By kind', breakdown(ap.by_kind)),
      stat('By tier', breakdown(ap.by_tier)),
      stat('Median days to first conversion', el('div', { class: 'stat-value', id: 'median-days' }, median),
        `${qualified} partner${qualified === 1 ? '' : 's'} with a first conversion`)));
  }

  // ---- rendering: chart ----------------------------------------------------

  function renderChart(from, to, rows) {
    const per = new Map(dayRange(from, to).map((d) => [d, { conversions: 0, clicks: 0 }]));
    for (const r of rows) {
      if (!per.has(r.day)) per.set(r.day, { conversions: 0, clicks: 0 });
      const v = per.get(r.day);
      v.conversions += Number(r.conversions) || 0;
      v.clicks += Number(r.clicks) || 0;
    }
    const days = [...per.keys()].sort();
    const host = $('chart');
    host.replaceChildren();
    if (!days.length) { host.append(el('p', { class: 'muted' }, 'No days in range.')); return; }

    const W = 1160, H = 300, L = 56, R = 56, T = 36, B = 46;
    const iw = W - L - R, ih = H - T - B;
    const vals = days.map((d) => per.get(d));
    const conv = niceAxis(Math.max(0, ...vals.map((v) => v.conversions)));
    const clk = niceAxis(Math.max(0, ...vals.map((v) => v.clicks)));
    const slot = iw / days.length;
    const cx = (i) => L + slot * (i + 0.5);
    const yConv = (v) => T + ih - (v / conv.max) * ih;
    const yClk = (v) => T + ih - (v / clk.max) * ih;

    const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'Conversions and clicks per day', class: 'chart-svg' });
    root.append(svg('title', null, `Conversions (bars) and clicks (line) per day, ${from} to ${to}`));

    conv.ticks.forEach((v, i) => {
      const y = yConv(v);
      root.append(svg('line', { x1: L, x2: W - R, y1: y, y2: y, class: i ? 'grid' : 'axis' }));
      root.append(svg('text', { x: L - 8, y: y + 4, class: 'tick tick-conv', 'text-anchor': 'end' }, tickText(v)));
      root.append(svg('text', { x: W - R + 8, y: y + 4, class: 'tick tick-clicks', 'text-anchor': 'start' }, tickText(clk.ticks[i])));
    });

    const every = Math.max(1, Math.ceil(days.length / 16));
    const bw = Math.max(1, Math.min(40, slot * 0.66));
    const points = [];
    days.forEach((d, i) => {
      const v = per.get(d);
      const g = svg('g', { class: 'day', 'data-day': d, 'data-conversions': v.conversions, 'data-clicks': v.clicks });
      g.append(svg('title', null, `${d}: ${v.conversions} conversion${v.conversions === 1 ? '' : 's'}, ${v.clicks} click${v.clicks === 1 ? '' : 's'}`));
      g.append(svg('rect', { x: L + slot * i, y: T, width: slot, height: ih, class: 'hit' }));
      const y = yConv(v.conversions);
      g.append(svg('rect', { x: cx(i) - bw / 2, y, width: bw, height: T + ih - y, class: 'bar' }));
      root.append(g);
      points.push(`${cx(i).toFixed(1)},${yClk(v.clicks).toFixed(1)}`);
      if (i % every === 0) {
        root.append(svg('line', { x1: cx(i), x2: cx(i), y1: T + ih, y2: T + ih + 4, class: 'axis' }));
        root.append(svg('text', { x: cx(i), y: T + ih + 17, class: 'tick', 'text-anchor': 'middle' }, d.slice(5)));
      }
    });
    if (points.length > 1) root.append(svg('polyline', { points: points.join(' '), class: 'line' }));
    if (days.length <= 62) for (const p of points) { const [x, y] = p.split(','); root.append(svg('circle', { cx: x, cy: y, r: 2.5, class: 'dot' })); }

    root.append(svg('text', { x: L + iw / 2, y: H - 6, class: 'axis-title', 'text-anchor': 'middle' }, `Day (${from} to ${to}, MM-DD)`));
    root.append(svg('text', { x: 4, y: T - 14, class: 'axis-title tick-conv', 'text-anchor': 'start' }, 'Conversions'));
    root.append(svg('text', { x: W - 4, y: T - 14, class: 'axis-title tick-clicks', 'text-anchor': 'end' }, 'Clicks'));

    const lg = svg('g', { class: 'legend', transform: `translate(${W - R - 340},${T - 26})` });
    lg.append(svg('rect', { x: 0, y: 0, width: 12, height: 12, class: 'bar' }));
    lg.append(svg('text', { x: 18, y: 10 }, 'Conversions (left axis)'));
    lg.append(svg('line', { x1: 180, x2: 200, y1: 6, y2: 6, class: 'line' }));
    lg.append(svg('text', { x: 206, y: 10 }, 'Clicks (right axis)'));
    root.append(lg);

    host.append(root);
  }

  // ---- rendering: rows table -----------------------------------------------

  function renderRows(rows) {
    const body = $('rows').tBodies[0];
    const frag = document.createDocumentFragment();
    for (const r of rows) {
      const tr = el('tr', { 'data-day': str(r.day), 'data-partner': str(r.partner_id), 'data-currency': str(r.currency) },
        el('td', { 'data-col': 'day' }, str(r.day)),
        el('td', { 'data-col': 'partner_id' }, str(r.partner_id)),
        el('td', { 'data-col': 'currency' }, r.currency === null || r.currency === undefined ? '—' : String(r.currency)));
      for (const c of FIGURES) tr.append(el('td', { 'data-col': c, class: 'num' }, str(r[c])));
      frag.append(tr);
    }
    body.replaceChildren(frag);
    $('rows-empty').hidden = rows.length > 0;
  }

  // ---- actions -------------------------------------------------------------

  function readQuery() {
    const q = {
      merchant: $('merchant').value.trim(),
      from: $('from').value,
      to: $('to').value,
      tz: $('tz').value.trim() || 'UTC',
    };
    if (!$('token').value) throw new Error('Enter the admin token.');
    if (!q.merchant) throw new Error('Enter a merchant id.');
    if (!/^\d{4}-\d{2}-\d{2}$/.test(q.from) || !/^\d{4}-\d{2}-\d{2}$/.test(q.to)) throw new Error('Pick both dates.');
    if (q.from > q.to) throw new Error('"From" is after "To".');
    return q;
  }

  async function load(ev) {
    ev.preventDefault();
    const my = ++seq;
    clearError();
    let q;
    try { q = readQuery(); } catch (e) { showError(e); document.body.dataset.state = 'error'; return; }
    token = $('token').value;
    document.body.dataset.state = 'loading';
    $('load').disabled = true;
    setStatus('Loading…');
    try {
      const [partners, program] = await Promise.all([apiJson(reportPath(q, 'partners')), apiJson(reportPath(q, 'program'))]);
      if (my !== seq) return;
      const rows = Array.isArray(partners.rows) ? partners.rows : [];
      const from = partners.from || q.from;
      const to = partners.to || q.to;
      $('scope').textContent = `${partners.merchant_id || q.merchant} · ${from} to ${to} · ${partners.tz || q.tz}`;
      renderProgram(program);
      renderChart(from, to, rows);
      renderRows(rows);
      current = q;
      setExports(true);
      $('csv-status').textContent = '';
      $('results').hidden = false;
      setStatus(`Loaded ${rows.length} rows`);
      document.body.dataset.state = 'loaded';
    } catch (e) {
      if (my !== seq) return;
      current = null;
      $('results').hidden = true;
      setExports(false);
      setStatus('');
      showError(e);
      document.body.dataset.state = 'error';
    } finally {
      if (my === seq) $('load').disabled = false;
    }
  }

  function save(blob, name) {
    const url = URL.createObjectURL(blob);
    const a = el('a', { href: url, download: name, class: 'hidden-link' });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000); // revoking at once can cancel the download
  }

  async function download(kind) {
    const q = current;
    if (!q) return;
    const btn = $(`csv-${kind}`);
    const name = `${kind}-${q.from}-${q.to}.csv`;
    btn.disabled = true;
    clearError();
    $('csv-status').textContent = `Downloading ${name}…`;
    try {
      const res = await api(kind === 'partners' ? reportPath(q, 'partners') : ledgerPath(q), 'text/csv');
      save(new Blob([await res.arrayBuffer()], { type: 'text/csv' }), name);
      $('csv-status').textContent = `Saved ${name}`;
    } catch (e) {
      $('csv-status').textContent = '';
      showError(e);
    } finally {
      btn.disabled = current === null;
    }
  }

  function defaultDates() {
    const pad = (n) => String(n).padStart(2, '0');
    const now = new Date();
    const ymd = (d) => `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    if (!$('from').value) $('from').value = ymd(new Date(now.getFullYear(), now.getMonth(), 1));
    if (!$('to').value) $('to').value = ymd(now);
  }

  function init() {
    defaultDates();
    $('query').addEventListener('submit', load);
    $('csv-partners').addEventListener('click', () => download('partners'));
    $('csv-ledger').addEventListener('click', () => download('ledger'));
  }

  init(); // the script is loaded with `defer`: the document is parsed
})();
