// @ts-check
/** Helpers shared by the MediaStream pages (not needed by pages of your own). */
(function (root) {
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
   * @returns {Promise<{id: string, name: string, state: string, viewers: number, codec: string}[]>}
   */
  async function fetchStreams() {
    const headers = token ? { Authorization: `Bearer ${token}` } : undefined;
    const response = await fetch('/api/streams', { cache: 'no-store', headers });
    if (response.status === 401) throw new Error('this server needs an access token (open the page with ?token=…)');
    if (!response.ok) throw new Error(`GET /api/streams: ${response.status}`);
    return (await response.json()).streams;
  }

  /**
   * @param {string} tag
   * @param {Record<string, any>} [props]
   * @param {(Node|string)[]} [children]
   * @returns {HTMLElement}
   */
  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key === 'class') node.className = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else /** @type {any} */ (node)[key] = value;
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
   * @param {{method?: string, body?: any}} [options]
   * @returns {Promise<any>} the decoded body (null for 204)
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

  root.MediaStreamPages = { fetchStreams, el, formatBitrate, formatDuration, setPill, api, snapshotUrl };
})(window);
