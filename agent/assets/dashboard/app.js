// The dashboard's logic: polls /api/v1/cluster and /api/v1/usage, follows /api/v1/events and
// streams chat answers, all with fetch so that one Authorization header (the key the person
// enters once, kept in localStorage) works everywhere; EventSource cannot send headers. Data
// only ever reaches the page through textContent and SVG attributes, never as markup.
'use strict';

const KEY_STORE = 'llm-cluster.api-key';
const HISTORY = 60; // usage samples kept for the charts
const USAGE_EVERY_MS = 2000;
const CLUSTER_EVERY_MS = 1000;
const MAX_EVENTS = 200;
const SVG = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// --- the API key ---------------------------------------------------------------------------

let apiKey = localStorage.getItem(KEY_STORE) || '';
let asking = null;
let keyGiven = null;

/** Shows the key form once, however many requests were refused; resolves when a key is given. */
function askKey(refused) {
  if (!asking) {
    asking = new Promise((resolve) => {
      $('key-why').textContent = refused
        ? 'The stored API key was refused; enter another.'
        : 'This cluster needs an API key.';
      $('key-dialog').hidden = false;
      $('key-input').focus();
      keyGiven = resolve;
    });
  }
  return asking;
}

$('key-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const k = $('key-input').value.trim();
  if (!k) return;
  apiKey = k;
  localStorage.setItem(KEY_STORE, k);
  $('key-input').value = '';
  $('key-dialog').hidden = true;
  $('forget-key').hidden = false;
  asking = null;
  if (keyGiven) keyGiven();
});

$('forget-key').addEventListener('click', () => {
  localStorage.removeItem(KEY_STORE);
  apiKey = '';
  $('forget-key').hidden = true;
});
$('forget-key').hidden = !apiKey;

/** fetch with the key; a 401 asks for a key (once for all callers) and retries. */
async function api(path, opts = {}) {
  for (;;) {
    const used = apiKey;
    const headers = new Headers(opts.headers || {});
    if (used) headers.set('Authorization', 'Bearer ' + used);
    const r = await fetch(path, { ...opts, headers, cache: 'no-store' });
    if (r.status !== 401) return r;
    await r.body?.cancel();
    if (apiKey === used) {
      if (used) {
        localStorage.removeItem(KEY_STORE);
        apiKey = '';
        $('forget-key').hidden = true;
      }
      await askKey(Boolean(used));
    }
  }
}

// --- server-sent events over fetch ---------------------------------------------------------

/** Reads an SSE body, calling onEvent({id, event, data}) for each event. */
async function readSse(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const ev = { id: null, event: 'message', data: [] };
      for (const line of block.split('\n')) {
        if (!line || line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'data') ev.data.push(value);
        else if (field === 'event') ev.event = value;
        else if (field === 'id') ev.id = value;
      }
      if (ev.data.length) onEvent({ ...ev, data: ev.data.join('\n') });
    }
  }
}

// --- small DOM helpers ---------------------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

const gib = (b) => (b / 2 ** 30).toFixed(1) + ' GiB';
const mib = (b) => (b / 2 ** 20).toFixed(0) + ' MiB';

// --- the cluster ---------------------------------------------------------------------------

let model = '';

/** Layers per node in config order: the placement's (prima), else rank 0's spec when it names
 *  every node; null when the engine places them (llama.cpp RPC) or they are not known yet. */
function layerCounts(view) {
  const w = view.placement?.windows;
  if (w) return w;
  const spec = view.nodes.find((n) => n.status?.spec?.layer_windows)?.status.spec.layer_windows;
  return spec && spec.length === view.nodes.length ? spec : null;
}

/** Each node's layer window as text ("layers 0–9"); layers run in ring order. */
function layerWindows(view) {
  const counts = layerCounts(view);
  if (!counts) {
    const why = view.engine === 'llama-rpc' ? 'layers split by llama.cpp' : 'layers: not placed yet';
    return view.nodes.map(() => why);
  }
  let first = 0;
  return view.nodes.map((_, i) => {
    const n = counts[i] ?? 0;
    const text = n === 0 ? 'not in the ring' : `layers ${first}–${first + n - 1}`;
    first += n;
    return text;
  });
}

/** The ring in rank order (a node's place in the ring is its spec's rank: a placement may leave
 *  nodes out), with the nodes left out drawn apart. */
function drawRing(view, windows) {
  const links = $('ring-links');
  const nodes = $('ring-nodes');
  links.replaceChildren();
  nodes.replaceChildren();
  const counts = layerCounts(view);
  const all = view.nodes.map((node, i) => ({ node, i, rank: node.status?.spec?.rank ?? node.rank }));
  const members = all.filter(({ i }) => !counts || counts[i] > 0).sort((a, b) => a.rank - b.rank);
  const outside = all.filter(({ i }) => counts && !(counts[i] > 0));
  const n = members.length;
  const cx = 180, cy = outside.length ? 150 : 165, r = n > 1 ? (outside.length ? 85 : 100) : 0, nodeR = 26;
  const at = (k) => {
    const a = -Math.PI / 2 + (2 * Math.PI * k) / Math.max(n, 1);
    return [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  };
  for (let k = 0; n > 1 && k < n; k++) {
    const [x1, y1] = at(k);
    const [x2, y2] = at((k + 1) % n);
    const d = Math.hypot(x2 - x1, y2 - y1);
    const ux = (x2 - x1) / d, uy = (y2 - y1) / d;
    // Two ranks link both ways: side by side, not on top of each other.
    const ox = n === 2 ? -uy * 7 : 0, oy = n === 2 ? ux * 7 : 0;
    links.append(svg('line', {
      x1: x1 + ux * nodeR + ox, y1: y1 + uy * nodeR + oy,
      x2: x2 - ux * (nodeR + 2) + ox, y2: y2 - uy * (nodeR + 2) + oy,
      class: 'link', 'marker-end': 'url(#arrow)',
    }));
  }
  const place = ({ node, i, rank }, x, y, radius, label) => {
    const g = svg('g', { class: 'ring-node', 'data-rank': node.rank, 'data-state': node.state });
    g.append(svg('circle', { cx: x, cy: y, r: radius, class: `node-circle st-${node.state}` }));
    g.append(svg('text', { x, y: y + 4 }, label));
    const below = y >= cy ? y + radius + 14 : y - radius - 22;
    g.append(svg('text', { x, y: below }, `${node.facts?.hostname ?? node.address} · ${node.state}`));
    const receiving = receivingText(node);
    g.append(svg('text', { x, y: below + 13, class: receiving ? 'window receiving' : 'window' }, receiving ?? windows[i]));
    const where = rank === node.rank ? '' : ` (node ${node.rank} of the config)`;
    g.append(svg('title', {}, `rank ${rank}${where} at ${node.address} (agent ${node.agent}): ${node.state}`));
    nodes.append(g);
  };
  members.forEach((m, k) => place(m, ...at(k), nodeR, m.rank === m.node.rank ? `rank ${m.rank}` : `rank ${m.rank}*`));
  outside.forEach((o, k) => place(o, 70 + k * 110, 270, 14, `node ${o.node.rank}`));
}

function fact(dl, name, value, cls) {
  if (value === null || value === undefined || value === '') return;
  dl.append(el('dt', '', name));
  dl.append(el('dd', cls || '', value));
}

function hashText(m) {
  if (!m) return null;
  const h = m.hash;
  let t = h.state === 'done' ? `sha256 ${h.sha256.slice(0, 12)}…` :
    h.state === 'not_required' ? 'not read here (weights over RPC)' :
    h.state === 'error' ? `error: ${h.message}` : h.state;
  if (m.matches_expected === true) t += ' (matches the configured hash)';
  if (m.matches_expected === false) t += ' (DIFFERS from the configured hash)';
  if (m.size) t += `, ${mib(m.size)}`;
  return t;
}

/** One delivery of a model file to the node (the view's `transfers`: the text is the one
 *  `llm-agent status` prints), with a bar while it runs. */
function transferRow(dl, t) {
  dl.append(el('dt', '', 'transfer'));
  const dd = el('dd', `transfer tr-${t.state}`);
  dd.dataset.state = t.state;
  dd.dataset.model = t.model;
  if (t.percent !== null && t.percent !== undefined) dd.dataset.percent = t.percent;
  if (t.state === 'running') {
    const bar = el('progress');
    bar.max = 100;
    // No value: an indeterminate bar while the size is not known yet.
    if (dd.dataset.percent !== undefined) bar.value = t.percent;
    dd.append(bar);
  }
  dd.append(el('span', t.state === 'failed' ? 'error' : '', t.text));
  dl.append(dd);
}

/** "receiving chat 42 %" under a node in the ring while a model file comes to it. */
function receivingText(node) {
  const t = (node.transfers || []).find((x) => x.state === 'running');
  return t ? `receiving ${t.model} ${t.percent ?? 0} %` : null;
}

function networkText(keys) {
  if (!keys || !keys.length) return [null, ''];
  const counts = {};
  for (const k of keys) counts[k.state] = (counts[k.state] || 0) + 1;
  const text = Object.entries(counts).map(([s, c]) => `${c} ${s.replace(/_/g, ' ')}`).join(', ');
  const detail = keys.map((k) => `${k.key} = ${k.after ?? k.before ?? '?'} (wanted ${k.wanted}): ${k.state}${k.reason ? ' — ' + k.reason : ''}`).join('\n');
  return [text, detail];
}

function drawNodes(view, windows) {
  const box = $('nodes');
  box.replaceChildren();
  view.nodes.forEach((node, i) => {
    const f = node.facts;
    const st = node.status;
    const card = el('div', `node st-${node.state}`);
    card.dataset.rank = node.rank;
    card.dataset.state = node.state;
    const rank = st?.spec?.rank ?? node.rank;
    const counts = layerCounts(view);
    const name = counts && !(counts[i] > 0) ? `node ${node.rank} (not in the ring)`
      : rank === node.rank ? `rank ${rank}` : `rank ${rank} (node ${node.rank})`;
    card.append(el('h3', '', `${name} · ${f?.hostname ?? node.address} · ${node.state}`));
    const dl = el('dl');
    fact(dl, 'address', `${node.address} (agent ${node.agent})`);
    fact(dl, 'process', st?.pid ? `pid ${st.pid}${st.unit ? ' · ' + st.unit : ''}` : st?.unit);
    fact(dl, 'layers', windows[i]);
    fact(dl, 'engine', f ? `${f.engine} ${f.engine_version ?? '(version unknown)'}` : null);
    fact(dl, 'package', f ? (f.engine_package ? `${f.engine_package.name} ${f.engine_package.version}` : 'not from a package') : null);
    const bin = f?.binaries?.find((b) => b.used_by_this_rank);
    fact(dl, 'binary', bin ? (bin.path ?? `${bin.name} (not found)`) : null);
    fact(dl, 'model', hashText(f?.model));
    for (const t of node.transfers || []) transferRow(dl, t);
    fact(dl, 'memory', f?.memory ? `${gib(f.memory.available_bytes)} free of ${gib(f.memory.total_bytes)}` : null);
    fact(dl, 'cpu', f?.cpu ? `${f.cpu.model}, ${f.cpu.logical_cores} cores` : null);
    if (f?.gpus?.length) fact(dl, 'gpus', f.gpus.map((g) => g.name + (g.memory_total_mib ? ` (${g.memory_total_mib} MiB)` : '')).join(', '));
    const [net, netDetail] = networkText(f?.network);
    fact(dl, 'network', net);
    if (netDetail) dl.lastChild.title = netDetail;
    const exit = st?.exit ? JSON.stringify(st.exit) : null;
    fact(dl, 'error', node.agent_error ?? st?.last_error ?? (node.state === 'exited' ? exit : null), 'error');
    card.append(dl);
    box.append(card);
  });
}

/** Every configured model with its state as /v1/models says it ("loaded", "transferring
 *  42 %", "missing", ...), from the cluster view (a /v1/models poll would count as usage). */
function drawModels(models) {
  $('models-box').hidden = !models.length;
  $('models').replaceChildren(...models.map((m) => {
    const s = el('span', 'model-state', `${m.name}: ${m.state}`);
    s.dataset.model = m.name;
    s.dataset.state = m.state;
    const where = [...m.transfers.map((t) => `rank ${t.rank} receives it from rank ${t.from_rank}`),
      ...(m.missing_on.length ? [`missing on rank ${m.missing_on.join(', ')}`] : [])];
    if (where.length) s.title = where.join('; ');
    return s;
  }));
}

function drawCluster(view) {
  $('cluster-name').textContent = view.cluster;
  const phase = $('phase');
  phase.textContent = view.phase.replace(/_/g, ' ');
  phase.dataset.phase = view.phase;
  $('generation').textContent = view.generation;
  $('restarts').textContent = view.restarts;
  $('engine').textContent = view.engine;
  $('model').textContent = view.model.name;
  drawModels(view.models || []);
  model = view.model.name;
  $('chat-model').textContent = model;
  const reason = $('reason');
  reason.hidden = !view.reason;
  reason.textContent = view.reason ? `${view.reason}${view.failures ? ` (${view.failures} failed attempts)` : ''}` : '';
  $('warnings').replaceChildren(...view.warnings.map((w) => el('li', '', w)));
  const windows = layerWindows(view);
  drawRing(view, windows);
  drawNodes(view, windows);
}

async function pollCluster() {
  for (;;) {
    let view = null;
    try {
      const r = await api('/api/v1/cluster');
      if (r.ok) view = await r.json();
      $('conn').textContent = r.ok ? '' : `status: HTTP ${r.status}`;
    } catch (e) {
      $('conn').textContent = 'coordinator unreachable';
      $('phase').dataset.phase = 'unreachable';
      $('phase').textContent = 'unreachable';
    }
    if (view) {
      try {
        drawCluster(view);
      } catch (e) {
        console.error('cannot show the cluster view', e);
      }
    }
    await sleep(CLUSTER_EVERY_MS);
  }
}

// --- load charts from /api/v1/usage deltas -------------------------------------------------

const samples = []; // {t, req, tok}, counters summed over keys
const rates = { req: [], tok: [] };

function drawChart(canvas, values) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const c = canvas.getContext('2d');
  c.setTransform(dpr, 0, 0, dpr, 0, 0);
  c.clearRect(0, 0, w, h);
  const style = getComputedStyle(document.documentElement);
  const max = Math.max(1, ...values);
  c.fillStyle = style.getPropertyValue('--muted');
  c.font = '10px system-ui, sans-serif';
  c.fillText(max.toFixed(max < 10 ? 1 : 0), 2, 10);
  if (values.length < 2) return;
  c.strokeStyle = style.getPropertyValue('--accent');
  c.lineWidth = 1.5;
  c.beginPath();
  values.forEach((v, i) => {
    const x = (w * i) / (HISTORY - 1) + w * (HISTORY - values.length) / (HISTORY - 1);
    const y = h - 2 - ((h - 14) * v) / max;
    if (i === 0) c.moveTo(x, y); else c.lineTo(x, y);
  });
  c.stroke();
}

function addSample(report) {
  let req = 0, tok = 0;
  for (const k of Object.values(report.keys || {})) {
    req += k.requests || 0;
    tok += k.completion_tokens || 0;
  }
  const now = { t: performance.now() / 1000, req, tok };
  const prev = samples[samples.length - 1];
  samples.push(now);
  if (samples.length > 2) samples.shift();
  if (prev) {
    const dt = Math.max(now.t - prev.t, 0.001);
    // Counters start again from 0 when the coordinator restarts: no negative rates.
    rates.req.push(Math.max(0, now.req - prev.req) / dt);
    rates.tok.push(Math.max(0, now.tok - prev.tok) / dt);
    for (const a of [rates.req, rates.tok]) if (a.length > HISTORY) a.shift();
    $('req-rate').textContent = rates.req[rates.req.length - 1].toFixed(2);
    $('tok-rate').textContent = rates.tok[rates.tok.length - 1].toFixed(1);
  }
  const adm = report.admission || {};
  $('in-flight').textContent = adm.in_flight ?? '–';
  $('queued').textContent = adm.queued ?? '–';
  drawChart($('req-chart'), rates.req);
  drawChart($('tok-chart'), rates.tok);
}

async function pollUsage() {
  for (;;) {
    let report = null;
    try {
      const r = await api('/api/v1/usage');
      if (r.ok) report = await r.json();
    } catch (e) {
      // The cluster poll says the coordinator is unreachable.
    }
    if (report) {
      try {
        addSample(report);
      } catch (e) {
        console.error('cannot show the usage', e);
      }
    }
    await sleep(USAGE_EVERY_MS);
  }
}

// --- events --------------------------------------------------------------------------------

let lastSeq = -1;

/** Shows one event; `conn.first` marks the first of a connection. The server replays only what
 *  follows `since`, so an older number on a new connection is a restarted coordinator's. */
function addEvent(ev, conn) {
  let e;
  try { e = JSON.parse(ev.data); } catch { return; }
  const seq = Number(e.seq ?? ev.id);
  const list = $('events');
  if (Number.isFinite(seq)) {
    if (conn.first && seq <= lastSeq) {
      list.prepend(el('li', 'muted', '— the coordinator restarted; its events follow —'));
    }
    lastSeq = seq;
    conn.first = false;
  }
  const kind = e.kind || ev.event;
  const li = el('li');
  li.dataset.kind = kind;
  const at = e.at ? new Date(e.at) : null;
  li.append(el('time', '', at && !isNaN(at) ? at.toLocaleTimeString() : ''));
  li.append(el('span', `kind kind-${kind}`, kind));
  const where = [e.generation !== undefined && e.generation !== null ? `gen ${e.generation}` : '',
    e.rank !== undefined && e.rank !== null ? `rank ${e.rank}` : ''].filter(Boolean).join(' ');
  if (where) li.append(el('span', 'muted', where + ' '));
  const text = kind === 'lagged' && e.message === undefined
    ? `${e.missed ?? 'some'} events were missed (this page was too slow); going on from the oldest held`
    : e.message ?? (e.from && e.to ? `${e.from} → ${e.to}` : e.reason ?? '');
  li.append(el('span', '', text));
  list.prepend(li);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

async function followEvents() {
  const state = $('events-state');
  for (;;) {
    let r;
    try {
      r = await api('/api/v1/events' + (lastSeq >= 0 ? `?since=${lastSeq}` : ''), {
        headers: { Accept: 'text/event-stream' },
      });
    } catch (e) {
      state.textContent = 'reconnecting';
      await sleep(3000);
      continue;
    }
    if (r.status === 404) {
      await r.body?.cancel();
      state.textContent = 'events unavailable';
      state.dataset.state = 'unavailable';
      return;
    }
    if (!r.ok) {
      await r.body?.cancel();
      state.textContent = `events: HTTP ${r.status}, retrying`;
      await sleep(5000);
      continue;
    }
    state.textContent = 'live';
    state.dataset.state = 'live';
    try {
      const conn = { first: true };
      await readSse(r.body, (ev) => addEvent(ev, conn));
    } catch (e) {
      // The connection broke (the coordinator restarted): reconnect from the last event.
    }
    state.textContent = 'reconnecting';
    state.dataset.state = 'reconnecting';
    await sleep(1000);
  }
}

// --- chat ----------------------------------------------------------------------------------

let chat = [];
let stopChat = null;

function chatMsg(role, text) {
  const m = el('div', `msg ${role}`, text);
  $('chat-log').append(m);
  m.scrollIntoView({ block: 'nearest' });
  return m;
}

function errorText(body, r) {
  const msg = body?.error?.message ?? `HTTP ${r.status}`;
  const retry = r.headers.get('Retry-After');
  return retry ? `${msg} (retry after ${retry} s)` : msg;
}

async function sendChat(e) {
  e.preventDefault();
  const input = $('chat-input');
  const text = input.value.trim();
  if (!text || stopChat) return;
  input.value = '';
  chat.push({ role: 'user', content: text });
  chatMsg('user', text);
  const out = chatMsg('assistant', '');
  out.dataset.state = 'waiting';
  const ctl = new AbortController();
  stopChat = ctl;
  $('chat-send').disabled = true;
  $('chat-stop').disabled = false;
  let answer = '';
  try {
    const body = { model, messages: chat, stream: true };
    const max = parseInt($('chat-max').value, 10);
    if (max > 0) body.max_tokens = max;
    const r = await api('/v1/chat/completions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
      signal: ctl.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => null);
      throw new Error(errorText(err, r));
    }
    out.dataset.state = 'streaming';
    await readSse(r.body, (ev) => {
      if (ev.data === '[DONE]') return;
      const j = JSON.parse(ev.data);
      if (j.error) throw new Error(j.error.message);
      const d = j.choices?.[0]?.delta?.content;
      if (d) {
        answer += d;
        out.textContent = answer;
      }
    });
    chat.push({ role: 'assistant', content: answer });
    out.dataset.state = 'done';
  } catch (err) {
    chat.pop();
    if (ctl.signal.aborted) {
      out.textContent = answer + ' [stopped]';
      out.dataset.state = 'stopped';
    } else {
      out.textContent = (answer ? answer + '\n' : '') + `error: ${err.message}`;
      out.classList.add('error');
      out.dataset.state = 'error';
    }
  } finally {
    stopChat = null;
    $('chat-send').disabled = false;
    $('chat-stop').disabled = true;
  }
}

$('chat-form').addEventListener('submit', sendChat);
$('chat-input').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) sendChat(e);
});
$('chat-stop').addEventListener('click', () => stopChat?.abort());
$('chat-clear').addEventListener('click', () => {
  chat = [];
  $('chat-log').replaceChildren();
});

pollCluster();
pollUsage();
followEvents();
