// gptossd's dashboard: polls /dashboard/data every 2 s, keeps the last 10 minutes of snapshots
// in memory and draws the page from them: summary tiles, each model's stages, throughput and
// latency charts (inline SVG), each profile's SLO, and a log of the errors this page has seen.
// It contacts nothing but this daemon, and every string from the daemon is set as text (never
// parsed as HTML). The snapshot's fields are documented on the page and in dashboard.rs.
'use strict';

(function () {
  const POLL_MS = 2000;
  const HISTORY_MS = 10 * 60 * 1000;
  const MAX_ERRORS = 50;
  const SVG_NS = 'http://www.w3.org/2000/svg';

  /** Snapshots of the last HISTORY_MS, oldest first: {t: ms since the epoch, snap}. */
  const samples = [];
  /** What went wrong, newest first: {t, kind, text}. */
  const errors = [];
  /** The snapshot before the latest, to see what changed. */
  let previous = null;
  /** The last poll failed. */
  let lost = false;
  let lastSeen = null;

  // ---- Small helpers -------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  /** An HTML element; string children become text nodes. */
  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.className = v;
      else e.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  /** An SVG element. */
  function s(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const sum = (xs) => xs.reduce((a, b) => a + (b || 0), 0);
  const num = (v) => (typeof v === 'number' && isFinite(v) ? v : null);

  const fmt = {
    int: (v) => (num(v) === null ? '—' : Math.round(v).toLocaleString('en-US')),
    ms: (v) => {
      if (num(v) === null) return '—';
      if (v === 0) return '0';
      if (v < 10) return v.toFixed(1).replace(/\.0$/, '') + ' ms';
      if (v < 1000) return Math.round(v) + ' ms';
      return (v / 1000).toFixed(v < 10000 ? 2 : 1).replace(/\.?0+$/, '') + ' s';
    },
    rate: (v) => {
      if (num(v) === null) return '—';
      if (v === 0) return '0';
      if (v < 10) return v.toFixed(1).replace(/\.0$/, '');
      return Math.round(v).toLocaleString('en-US');
    },
    pct: (v) => {
      if (num(v) === null) return '—';
      const p = v * 100;
      return (p > 0 && p < 10 ? p.toFixed(1).replace(/\.0$/, '') : Math.round(p)) + '%';
    },
    span: (secs) => {
      secs = Math.max(0, Math.round(secs));
      if (secs < 60) return secs + ' s';
      if (secs < 3600) return Math.floor(secs / 60) + ' min' + (secs % 60 && secs < 600 ? ' ' + (secs % 60) + ' s' : '');
      if (secs < 86400) return Math.floor(secs / 3600) + ' h ' + Math.floor((secs % 3600) / 60) + ' min';
      return Math.floor(secs / 86400) + ' d ' + Math.floor((secs % 86400) / 3600) + ' h';
    },
    clock: (t) => new Date(t).toLocaleTimeString('en-GB', { hour12: false }),
  };

  /** A round number at or above v (v > 0) whose half is round too: 1, 1.2, 1.6, 2, 3, 4, 5, 6
   *  or 8 × 10^k. */
  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 1.2, 1.6, 2, 3, 4, 5, 6, 8, 10]) if (m * p >= v * 0.9999) return m * p;
    return 10 * p;
  }

  // ---- Reading snapshots ---------------------------------------------------------------------

  const models = (snap) => snap.models || [];
  const profiles = (snap) => snap.profiles || [];
  const allSeries = (snap) => profiles(snap).flatMap((p) => p.series || []);

  /** Per second between two samples of a cumulative counter; null across a reset. */
  function rate(a, b, read) {
    const dt = (b.t - a.t) / 1000;
    const x = read(a.snap);
    const y = read(b.snap);
    if (dt <= 0 || x === null || y === null || y < x) return null;
    return (y - x) / dt;
  }

  const decodeTokens = (snap) => sum(models(snap).map((m) => m.tokens_computed && m.tokens_computed.decode));
  const prefillTokens = (snap) => sum(models(snap).map((m) => m.tokens_computed && m.tokens_computed.prefill));
  const running = (snap) => sum(models(snap).map((m) => m.requests && m.requests.running));
  const waiting = (snap) => sum(models(snap).map((m) => m.requests && m.requests.waiting));

  /** The SLO breaches of `profile` ([] when met); null when the daemon does not report SLOs. */
  function breaches(snap, profile) {
    const slo = snap.slo;
    if (slo === undefined || slo === null) return null;
    let list = [];
    if (Array.isArray(slo)) list = slo.filter((b) => b && b.profile === profile);
    else if (typeof slo === 'object') {
      const mine = slo[profile];
      if (Array.isArray(mine)) list = mine;
      else if (mine && Array.isArray(mine.breaches)) list = mine.breaches;
    }
    return list.map((b) => (typeof b === 'string' ? b : String((b && (b.reason || b.slo)) || 'breach')));
  }

  // ---- Errors --------------------------------------------------------------------------------

  function addError(t, kind, text) {
    errors.unshift({ t, kind, text });
    errors.length = Math.min(errors.length, MAX_ERRORS);
  }

  /** Appends to the error log what `cur` shows that `prev` did not (everything, on load). */
  function noteChanges(prev, cur, t) {
    if (!prev) {
      for (const m of models(cur)) {
        if (m.unhealthy) addError(t, 'unhealthy', `${m.name} is unhealthy: ${m.unhealthy}`);
        for (const st of m.stages || []) {
          if (st.last_error) {
            addError(t, 'stage', `${m.name} stage ${st.index} (${st.restarts} restarts so far): ${st.last_error}`);
          }
        }
      }
      for (const p of profiles(cur)) {
        for (const ser of p.series || []) {
          for (const [reason, n] of Object.entries(ser.errors || {})) {
            if (n > 0) addError(t, 'failure', `${p.name} on ${ser.model}: ${n} failed (${reason}) so far`);
          }
        }
      }
      for (const [code, n] of Object.entries((cur.rejected && cur.rejected.by_code) || {})) {
        if (n > 0) addError(t, 'rejected', `${n} rejected (${code}) so far`);
      }
      return;
    }
    for (const m of models(cur)) {
      const pm = models(prev).find((x) => x.name === m.name);
      if (m.unhealthy && (!pm || pm.unhealthy !== m.unhealthy)) {
        addError(t, 'unhealthy', `${m.name} is unhealthy: ${m.unhealthy}`);
      } else if (!m.unhealthy && pm && pm.unhealthy) {
        addError(t, 'recovered', `${m.name} recovered`);
      }
      for (const st of m.stages || []) {
        const ps = pm && (pm.stages || []).find((x) => x.index === st.index);
        if (ps && st.restarts > ps.restarts) {
          const why = st.last_error ? `: ${st.last_error}` : '';
          addError(t, 'stage', `${m.name} stage ${st.index} restarted (restart ${st.restarts})${why}`);
        } else if (st.last_error && (!ps || ps.last_error !== st.last_error)) {
          addError(t, 'stage', `${m.name} stage ${st.index}: ${st.last_error}`);
        }
      }
    }
    for (const p of profiles(cur)) {
      const pp = profiles(prev).find((x) => x.name === p.name);
      for (const ser of p.series || []) {
        const ps = pp && (pp.series || []).find((x) => x.model === ser.model);
        for (const [reason, n] of Object.entries(ser.errors || {})) {
          const was = (ps && ps.errors && ps.errors[reason]) || 0;
          if (n > was) addError(t, 'failure', `${p.name} on ${ser.model}: ${n - was} failed (${reason})`);
        }
      }
    }
    const was = (prev.rejected && prev.rejected.by_code) || {};
    for (const [code, n] of Object.entries((cur.rejected && cur.rejected.by_code) || {})) {
      if (n > (was[code] || 0)) addError(t, 'rejected', `${n - (was[code] || 0)} rejected (${code})`);
    }
  }

  // ---- Charts --------------------------------------------------------------------------------

  /**
   * Draws `lines` ({label, cls, points: [[t, value or null]]}) into `host` as an SVG line chart
   * over [t0, t1], with the y axis from 0 to a round number above the data. A `target` (an SLO)
   * is drawn as a dashed line when the data comes within half of it.
   */
  function drawChart(host, lines, opts) {
    const width = Math.max(160, Math.floor(host.clientWidth || 300));
    const height = opts.height || 96;
    const pad = { l: 48, r: 8, t: 6, b: 16 };
    let high = 0;
    for (const line of lines) for (const [, v] of line.points) if (v !== null && v > high) high = v;
    const showTarget = num(opts.target) !== null && high >= opts.target * 0.5;
    const top = niceCeil(Math.max(showTarget ? opts.target : 0, high, opts.floor || 1e-9));
    const span = Math.max(1, opts.t1 - opts.t0);
    const x = (t) => pad.l + ((t - opts.t0) / span) * (width - pad.l - pad.r);
    const y = (v) => pad.t + (1 - v / top) * (height - pad.t - pad.b);
    const root = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': opts.label });
    const any = lines.some((line) => line.points.some(([t, v]) => v !== null && t >= opts.t0));
    for (const f of any ? [0, 0.5, 1] : [0]) {
      const v = top * f;
      root.append(s('line', { class: 'gridline', x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v) }));
      root.append(s('text', { class: 'axis', x: pad.l - 6, y: y(v) + 3, 'text-anchor': 'end' }, v === 0 ? '0' : (opts.axis || opts.format)(v)));
    }
    root.append(s('text', { class: 'axis', x: pad.l, y: height - 3 }, '−' + fmt.span(span / 1000)));
    root.append(s('text', { class: 'axis', x: width - pad.r, y: height - 3, 'text-anchor': 'end' }, 'now'));
    if (showTarget) {
      root.append(s('line', { class: 'target', x1: pad.l, x2: width - pad.r, y1: y(opts.target), y2: y(opts.target) }));
    }
    for (const line of lines) {
      let d = '';
      let pen = false;
      let last = null;
      for (const [t, v] of line.points) {
        if (v === null || t < opts.t0) {
          pen = false;
          continue;
        }
        d += `${pen ? 'L' : 'M'}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
        last = [t, v];
      }
      if (d) root.append(s('path', { class: 'line ' + line.cls, d }));
      if (last) root.append(s('circle', { class: line.cls, cx: x(last[0]), cy: y(last[1]), r: 2.5 }));
    }
    if (!any) {
      root.append(s('text', { class: 'empty', x: (pad.l + width) / 2, y: height / 2, 'text-anchor': 'middle' }, opts.empty || 'no data yet'));
    }
    host.replaceChildren(root);
  }

  /** Legend entries: a coloured key, the label and the latest value. */
  function drawLegend(host, lines, format, target) {
    const keys = lines.map((line) => {
      const latest = [...line.points].reverse().find(([, v]) => v !== null);
      return h('span', { class: 'key ' + line.cls }, line.label, h('b', {}, latest ? format(latest[1]) : '—'));
    });
    if (target) keys.push(h('span', { class: 'key target-key' }, target));
    host.replaceChildren(...keys);
  }

  /** The time axis: from the oldest sample (at most 10 minutes back, at least 10 s) to now. */
  function window_() {
    const t1 = samples.length ? samples[samples.length - 1].t : Date.now();
    const t0 = samples.length ? Math.min(samples[0].t, t1 - 10000) : t1 - 10000;
    return { t0: Math.max(t0, t1 - HISTORY_MS), t1 };
  }

  /** Points of a value read from each sample. */
  const track = (read) => samples.map((x) => [x.t, num(read(x.snap))]);
  /** Points of a counter's rate between successive samples. */
  const rateTrack = (read) => samples.slice(1).map((b, i) => [b.t, rate(samples[i], b, read)]);

  // ---- Drawing the page ----------------------------------------------------------------------

  function renderHeader(snap) {
    const status = (snap.health && snap.health.status) || 'unknown';
    const pill = $('health');
    pill.textContent = status;
    pill.dataset.status = status;
    $('uptime').textContent = fmt.span(snap.uptime_seconds || 0);
    $('default-profile').textContent = snap.default_profile || '—';
    document.title = `gptossd · ${status}`;
  }

  function renderConnection() {
    const conn = $('conn');
    if (lost) {
      conn.dataset.live = 'lost';
      conn.textContent = lastSeen ? `cannot reach the daemon · last data ${fmt.clock(lastSeen)}` : 'cannot reach the daemon';
    } else {
      conn.dataset.live = 'true';
      conn.textContent = `live · updated ${fmt.clock(lastSeen)}`;
    }
  }

  function setTile(id, value, sub) {
    $(id).textContent = value;
    $(id + '-sub').textContent = sub;
  }

  function renderTiles(snap) {
    const series = allSeries(snap);
    const total = sum(series.map((x) => x.requests && x.requests.total));
    const failed = sum(series.map((x) => x.requests && x.requests.failed));
    const rejected = (snap.rejected && snap.rejected.total) || 0;
    $('requests-total').textContent = fmt.int(total);
    $('requests-sub').textContent = `${fmt.int(failed)} failed · ${fmt.int(rejected)} rejected`;

    const peak = (read) => Math.max(0, ...samples.map((x) => read(x.snap)));
    setTile('running', fmt.int(running(snap)), `peak ${fmt.int(peak(running))} · 10 min`);
    setTile('waiting', fmt.int(waiting(snap)), `peak ${fmt.int(peak(waiting))} · 10 min`);

    const n = samples.length;
    const decode = n > 1 ? rate(samples[n - 2], samples[n - 1], decodeTokens) : null;
    const prefill = n > 1 ? rate(samples[n - 2], samples[n - 1], prefillTokens) : null;
    $('tokens-rate').textContent = fmt.rate(decode);
    $('tokens-sub').textContent = `generated · prefill ${fmt.rate(prefill)}/s`;

    const inUse = sum(models(snap).map((m) => m.kv_cache && m.kv_cache.blocks_in_use));
    const blocks = sum(models(snap).map((m) => m.kv_cache && m.kv_cache.blocks_total));
    setTile('kv', blocks ? fmt.pct(inUse / blocks) : '—', `${fmt.int(inUse)} of ${fmt.int(blocks)} blocks`);

    const queries = sum(models(snap).map((m) => m.prefix_cache && m.prefix_cache.queries));
    const hits = sum(models(snap).map((m) => m.prefix_cache && m.prefix_cache.hits));
    setTile('prefix', queries ? fmt.pct(hits / queries) : '—', queries ? `${fmt.int(hits)} / ${fmt.int(queries)} tokens` : 'no prompts yet');

    const rc = snap.response_cache;
    if (rc && typeof rc === 'object') {
      const asked = (rc.hits || 0) + (rc.misses || 0);
      setTile('response-cache', asked ? fmt.pct((rc.hits || 0) / asked) : '—', `${fmt.int(rc.hits || 0)} hits · ${fmt.int(rc.misses || 0)} misses`);
    } else {
      setTile('response-cache', '—', 'not reported');
    }
  }

  function modelState(m) {
    if (m.unhealthy) return 'unhealthy';
    if (m.ready) return 'ready';
    return m.started ? 'degraded' : 'loading';
  }

  function describeRecovery(r) {
    if (!r) return '';
    if (r.kind === 'cool_down') {
      return ` — crash-loop cool-down: tried again in ${fmt.span(r.retry_in_seconds || 0)}, or at once by POST /stages/{k}/restart on the control socket`;
    }
    return ' — fix the cause, then restart the stage (POST /stages/{k}/restart on the control socket)';
  }

  function layers(st) {
    const [a, b] = st.layers || [0, 0];
    return b - a > 1 ? `${a}–${b - 1}` : String(a);
  }

  function stageRow(m, st) {
    return h('tr', { 'data-model': m.name, 'data-stage': st.index, class: st.restarts > 0 ? 'restarted' : null },
      h('td', { class: 'num' }, st.index),
      h('td', { class: 'opt', title: `layers [${(st.layers || []).join(', ')})` }, layers(st)),
      h('td', { class: 'mono opt', title: st.detail || null }, st.device || '—'),
      h('td', { class: 'mono pid' }, st.pid === null || st.pid === undefined ? '—' : st.pid),
      h('td', { class: 'state' }, h('span', { class: 'pill', 'data-status': st.state }, st.state)),
      h('td', { class: 'num restarts' }, st.restarts),
      h('td', { class: 'num opt steps' }, fmt.int(st.steps_done)),
      h('td', { class: 'last-error' + (st.last_error ? '' : ' none') }, st.last_error || '—'));
  }

  function renderModels(snap) {
    const cards = models(snap).map((m) => {
      const kv = m.kv_cache || {};
      const pc = m.prefix_cache || {};
      const hitRate = pc.queries ? pc.hits / pc.queries : null;
      const bar = (label, value, detail) => h('div', {},
        `${label} `, h('b', {}, fmt.pct(value)), detail ? ` · ${detail}` : '',
        h('div', { class: 'bar' }, barFill(value)));
      const stages = m.stages || [];
      return h('article', { class: 'card model', 'data-model': m.name },
        h('div', { class: 'model-head' },
          h('h2', {}, m.name),
          h('span', { class: 'pill', 'data-status': modelState(m) }, modelState(m)),
          h('span', { class: 'facts' }, `${m.size} · ${m.backend} · ${stages.length} stage${stages.length === 1 ? '' : 's'} · epoch ${m.epoch}${m.test_model ? ' · test model' : ''}`)),
        m.unhealthy ? h('div', { class: 'model-alert' }, m.unhealthy + describeRecovery(m.recovery)) : null,
        h('div', { class: 'bars' },
          bar('KV cache', kv.usage, `${fmt.int(kv.blocks_in_use)} / ${fmt.int(kv.blocks_total)} blocks`),
          bar('Prefix-cache hits', hitRate, pc.queries ? `${fmt.int(pc.hits)} / ${fmt.int(pc.queries)} tokens` : 'no prompts yet'),
          h('div', {}, 'running ', h('b', {}, fmt.int(m.requests && m.requests.running)),
            ' · waiting ', h('b', {}, fmt.int(m.requests && m.requests.waiting)),
            ` · replayed ${fmt.int(m.replayed)} · preempted ${fmt.int(m.preemptions)}`)),
        h('div', { class: 'table-wrap' },
          h('table', {},
            h('thead', {}, h('tr', {},
              h('th', { class: 'num' }, 'Stage'), h('th', { class: 'opt' }, 'Layers'), h('th', { class: 'opt' }, 'Device'),
              h('th', {}, 'PID'), h('th', {}, 'State'), h('th', { class: 'num' }, 'Restarts'),
              h('th', { class: 'num opt' }, 'Steps'), h('th', {}, 'Last crash reason'))),
            h('tbody', {}, ...stages.map((st) => stageRow(m, st))))));
    });
    if (!cards.length) cards.push(h('div', { class: 'card' }, 'No model is configured.'));
    $('models').replaceChildren(...cards);
  }

  /** A bar's filled part, its width set through the CSS object model (no inline style text). */
  function barFill(value) {
    const fill = h('i');
    fill.style.width = `${Math.round(Math.min(1, Math.max(0, num(value) || 0)) * 100)}%`;
    return fill;
  }

  function renderThroughput() {
    const w = window_();
    const tokens = [
      { label: 'generated tok/s', cls: 'c0', points: rateTrack(decodeTokens) },
      { label: 'prefill tok/s', cls: 'c2', points: rateTrack(prefillTokens) },
    ];
    drawLegend($('tokens-legend'), tokens, fmt.rate);
    drawChart($('tokens-chart'), tokens, { ...w, format: fmt.rate, label: 'tokens per second', floor: 1 });
    const queue = [
      { label: 'running', cls: 'c0', points: track(running) },
      { label: 'waiting', cls: 'c1', points: track(waiting) },
    ];
    drawLegend($('queue-legend'), queue, fmt.int);
    drawChart($('queue-chart'), queue, { ...w, format: fmt.int, axis: fmt.rate, label: 'requests running and waiting', floor: 1 });
  }

  /** p50 and p95 lines of one latency (`ttft_ms` or `e2e_ms`) of a profile, per model. */
  function latencyLines(profile, key, models) {
    const lines = [];
    models.forEach((model, i) => {
      const read = (q) => (snap) => {
        const p = profiles(snap).find((x) => x.name === profile);
        const ser = p && (p.series || []).find((x) => x.model === model);
        return ser && ser[key] ? ser[key][q] : null;
      };
      const suffix = models.length > 1 ? ` · ${model}` : '';
      lines.push({ label: 'p50' + suffix, cls: 'c' + ((2 * i) % 4), points: track(read('p50')) });
      lines.push({ label: 'p95' + suffix, cls: 'c' + ((2 * i + 1) % 4), points: track(read('p95')) });
    });
    return lines;
  }

  function renderProfiles(snap) {
    const w = window_();
    const container = $('profiles');
    const cards = [];
    const charts = [];
    for (const p of profiles(snap)) {
      const series = p.series || [];
      const requests = sum(series.map((x) => x.requests && x.requests.total));
      const failed = sum(series.map((x) => x.requests && x.requests.failed));
      const targets = p.slo_targets || {};
      const list = breaches(snap, p.name);
      const slo = list === null ? 'unknown' : list.length ? 'breach' : 'met';
      const sloText = list === null ? 'SLO —' : list.length ? 'SLO breached' : 'SLO met';
      const names = [...new Set(samples.flatMap((x) => {
        const q = profiles(x.snap).find((y) => y.name === p.name);
        return q ? (q.series || []).map((y) => y.model) : [];
      }))];
      const ttftHost = h('div', { class: 'chart' });
      const e2eHost = h('div', { class: 'chart' });
      const ttftLegend = h('div', { class: 'legend' });
      const e2eLegend = h('div', { class: 'legend' });
      const route = p.model ? `on ${p.model}${p.fallback ? ' (fallback)' : ''}` : 'no usable model';
      cards.push(h('article', { class: 'card profile', 'data-profile': p.name },
        h('div', { class: 'profile-head' },
          h('h2', {}, p.name),
          p.default ? h('span', { class: 'default' }, 'default') : null,
          h('span', { class: 'pill slo', 'data-status': slo, title: list === null ? 'this daemon does not report SLO status' : null }, sloText)),
        h('div', { class: 'profile-facts' }, `${route} · ${fmt.int(requests)} requests · ${fmt.int(failed)} failed`),
        h('div', { class: 'profile-facts' }, `SLO: TTFT p95 ≤ ${fmt.ms(targets.ttft_p95_ms)} · end to end p95 ≤ ${fmt.ms(targets.e2e_p95_ms)} · errors ≤ ${fmt.pct(targets.error_rate)}`),
        list && list.length ? h('ul', { class: 'breaches' }, ...list.map((r) => h('li', {}, r))) : null,
        h('div', { class: 'chart-title' }, 'Time to first token'), ttftLegend, ttftHost,
        h('div', { class: 'chart-title' }, 'End to end'), e2eLegend, e2eHost));
      charts.push(() => {
        const ttft = latencyLines(p.name, 'ttft_ms', names);
        const e2e = latencyLines(p.name, 'e2e_ms', names);
        const target = (v) => (num(v) === null ? null : `SLO p95 ≤ ${fmt.ms(v)}`);
        drawLegend(ttftLegend, ttft, fmt.ms, target(targets.ttft_p95_ms));
        drawLegend(e2eLegend, e2e, fmt.ms, target(targets.e2e_p95_ms));
        const empty = requests ? 'no finished request yet' : 'no requests yet';
        drawChart(ttftHost, ttft, { ...w, format: fmt.ms, label: `${p.name} time to first token`, target: targets.ttft_p95_ms, floor: 1, empty });
        drawChart(e2eHost, e2e, { ...w, format: fmt.ms, label: `${p.name} end-to-end latency`, target: targets.e2e_p95_ms, floor: 1, empty });
      });
    }
    container.replaceChildren(...cards);
    for (const draw of charts) draw();
  }

  function renderErrors() {
    const items = errors.map((e) => h('li', { 'data-kind': e.kind },
      h('time', { datetime: new Date(e.t).toISOString() }, fmt.clock(e.t)),
      h('span', { class: 'what' }, e.text)));
    if (!items.length) items.push(h('li', { class: 'empty' }, 'none seen'));
    $('errors').replaceChildren(...items);
  }

  function render() {
    if (!samples.length) return;
    const snap = samples[samples.length - 1].snap;
    renderHeader(snap);
    renderConnection();
    renderTiles(snap);
    renderModels(snap);
    renderThroughput();
    renderProfiles(snap);
    renderErrors();
  }

  // ---- Polling -------------------------------------------------------------------------------

  function receive(snap, t) {
    samples.push({ t, snap });
    while (samples.length && samples[0].t < t - HISTORY_MS) samples.shift();
    if (lost) addError(t, 'recovered', 'the daemon answers again');
    lost = false;
    lastSeen = t;
    noteChanges(previous, snap, t);
    previous = snap;
    render();
  }

  async function poll() {
    try {
      const response = await fetch('/dashboard/data', { cache: 'no-store' });
      if (!response.ok) throw new Error(`/dashboard/data answered ${response.status}`);
      receive(await response.json(), Date.now());
    } catch (e) {
      if (!lost) addError(Date.now(), 'connection', `cannot reach the daemon (${e.message})`);
      lost = true;
      renderConnection();
      renderErrors();
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  let resizing = false;
  window.addEventListener('resize', () => {
    if (resizing) return;
    resizing = true;
    requestAnimationFrame(() => {
      resizing = false;
      render();
    });
  });

  poll();
})();
