// @ts-check
/** Helpers shared by the MediaStream pages (not needed by pages of your own). */

/**
 * One stream as GET /api/streams lists it (the fields the pages read; the `Stream` schema of
 * /api/openapi.json has them all).
 * @typedef {object} StreamInfo
 * @property {string} id
 * @property {string} name
 * @property {'stopped'|'starting'|'live'|'reconnecting'|'offline'} state
 * @property {string|null} detail what the state means right now
 * @property {number} viewers
 * @property {string} codec
 * @property {string} source with credentials removed
 * @property {boolean} enabled false once stopped through the API
 * @property {boolean} running whether its source runs now
 * @property {{name: string, viewers: number, running: boolean, width: number, height: number}[]} [qualities]
 *   best first (one, "main", for a stream with a plain source)
 * @property {{node: string, epoch: number}|null} [owner] in a cluster, the node reading its
 *   source (null: none now, or a single process)
 */

// A global `var` (a property of `window`, as before) so the page scripts loaded after this one,
// and the type checker, see it.
// eslint-disable-next-line no-var
var MediaStreamPages = (function (root) {
  'use strict';

  /**
   * The access token the page was opened with (`page.html?token=…`), if the server needs
   * one. It is handed to the shared socket, and then dropped from the address bar so it
   * isn't bookmarked or shared by accident.
   */
  const token = new URLSearchParams(root.location.search).get('token');
  if (token) {
    root.WebSocketManager.getInstance().configure({ token });
    const url = new URL(root.location.href);
    url.searchParams.delete('token');
    history.replaceState(null, '', url);
  }

  /**
   * The server's streams the page may watch, from GET /api/streams.
   * @returns {Promise<StreamInfo[]>}
   */
  async function fetchStreams() {
    const headers = token ? { Authorization: `Bearer ${token}` } : undefined;
    const response = await fetch('/api/streams', { cache: 'no-store', headers });
    if (response.status === 401) throw new Error('this server needs an access token (open the page with ?token=…)');
    if (!response.ok) throw new Error(`GET /api/streams: ${response.status}`);
    return (await response.json()).streams;
  }

  /**
   * A new element: `el('video', {muted: true}, [...children])`.
   * @template {keyof HTMLElementTagNameMap} K
   * @param {K} tag
   * @param {Record<string, any>} [props] element properties, plus `class`, `dataset` and `on…`
   *   listeners (`any`: each key takes its own kind of value)
   * @param {(Node|string)[]} [children]
   * @returns {HTMLElementTagNameMap[K]}
   */
  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key === 'class') node.className = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else Object.assign(node, { [key]: value });
    }
    for (const child of children) node.append(child);
    return node;
  }

  /** @param {number|null|undefined} kbps */
  function formatBitrate(kbps) {
    if (!kbps) return '0 kbps';
    return kbps >= 1000 ? `${(kbps / 1000).toFixed(1)} Mbps` : `${kbps} kbps`;
  }

  /** @param {number} ms */
  function formatDuration(ms) {
    const seconds = Math.floor(ms / 1000);
    const h = Math.floor(seconds / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    const s = seconds % 60;
    return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
  }

  /**
   * Set a state pill's text and colour.
   * @param {HTMLElement} pill
   * @param {string} state
   * @param {string} [text]
   */
  function setPill(pill, state, text) {
    pill.dataset.state = state;
    pill.textContent = text || state;
  }

  /**
   * Call the server's JSON API with the page's token.
   * @param {string} path e.g. '/api/streams/cam-1/stop'
   * @param {{method?: string, body?: unknown}} [options] `body` is sent as JSON
   * @returns {Promise<unknown>} the decoded body (null for 204)
   */
  async function api(path, options = {}) {
    /** @type {Record<string, string>} */
    const headers = { 'Content-Type': 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, {
      method: options.method || 'GET',
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      cache: 'no-store',
    });
    const body = response.status === 204 ? null : await response.json();
    if (!response.ok) {
      const field = body && body.field ? ` (${body.field})` : '';
      throw new Error(`${(body && body.error) || response.statusText}${field}`);
    }
    return body;
  }

  /**
   * The URL of a stream's still picture; `cachedOnly` never starts a stopped camera.
   * @param {string} streamId
   * @param {boolean} [cachedOnly]
   */
  function snapshotUrl(streamId, cachedOnly = true) {
    const query = new URLSearchParams({ t: String(Date.now()) });
    if (cachedOnly) query.set('cached', '1');
    if (token) query.set('token', token);
    return `/api/streams/${encodeURIComponent(streamId)}/snapshot.jpg?${query}`;
  }

  return { fetchStreams, el, formatBitrate, formatDuration, setPill, api, snapshotUrl };
})(window);
