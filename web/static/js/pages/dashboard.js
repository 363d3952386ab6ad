// @ts-check
/**
 * The camera wall: every stream in a grid, all on one shared socket. A tile that scrolls out
 * of view (or is on another page of the layout), or a hidden tab, stops its stream (the server
 * frees it); it resumes when visible. The layout, full screen and tile order are wall.js's.
 * Every engine is on quality 'auto': a grid tile gets a camera's sub stream, an enlarged or
 * full-screen tile its main stream (the engine reports its size; the server switches on the
 * same connection); each tile shows the quality it plays.
 */
(function () {
  'use strict';

  const { fetchStreams, el, formatBitrate, setPill, api, snapshotUrl } = MediaStreamPages;
  const manager = WebSocketManager.getInstance();
  // ?peerConnection=shared: every tile in one RTCPeerConnection (docs/protocol.md).
  if (new URLSearchParams(window.location.search).get('peerConnection') === 'shared') {
    manager.configure({ peerConnection: 'shared' });
  }
  const wall = /** @type {HTMLElement} */ (document.getElementById('wall'));
  const wsStatus = /** @type {HTMLElement} */ (document.getElementById('ws-status'));
  const summary = /** @type {HTMLElement} */ (document.getElementById('summary'));
  const byId = (/** @type {string} */ id) => /** @type {any} */ (document.getElementById(id));
  const layout = new MediaStreamWall.Wall(wall, {
    layout: byId('wall-layout'), previous: byId('wall-previous'), next: byId('wall-next'), page: byId('wall-page'),
  });

  /** @typedef {{id: string, name: string, tile: HTMLElement, engine: WebRTCEngine, visible: boolean, state: string}} Tile */
  /** @type {Map<string, Tile>} */
  const tiles = new Map();

  manager.on('connected', () => setPill(wsStatus, 'connected', 'socket connected'));
  manager.on('disconnected', (e) =>
    setPill(wsStatus, e.willReconnect ? 'reconnecting' : 'waiting', e.willReconnect ? 'socket reconnecting' : 'socket idle'));

  const observer = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      const tile = tiles.get(/** @type {HTMLElement} */ (entry.target).dataset.streamId || '');
      if (!tile) continue;
      tile.visible = entry.isIntersecting;
      update(tile);
    }
  }, { threshold: 0 });

  document.addEventListener('visibilitychange', () => {
    for (const tile of tiles.values()) update(tile);
  });

  /** Start or stop a tile's stream to match whether anyone can see it. @param {Tile} tile */
  function update(tile) {
    const wanted = tile.visible && document.visibilityState === 'visible';
    const running = tile.engine.state !== 'idle' && tile.engine.state !== 'closed';
    if (wanted && !running) {
      tile.engine.connect().catch(() => { /* shown through the state event */ });
    } else if (!wanted && running) {
      const wasLive = tile.state === 'live';
      tile.engine.disconnect();
      show(tile, 'paused', 'paused while not visible');
      // Its last picture stays as the tile's poster (a cached keyframe: no decoding here,
      // and never a camera started just for a poster).
      if (wasLive) posterOf(tile);
    }
    updateSummary();
  }

  /** @param {Tile} tile @param {string} state @param {string|null} [detail] */
  function show(tile, state, detail) {
    tile.state = state;
    tile.tile.dataset.state = state;
    const fallback = state === 'live' && tile.engine.transport === 'fallback'; // video over the socket
    setPill(/** @type {HTMLElement} */ (tile.tile.querySelector('.pill')), state, fallback ? 'live (fallback)' : undefined);
    /** @type {HTMLElement} */ (tile.tile.querySelector('.detail')).textContent =
      state === 'live' || state === 'connecting' ? '' : detail || '';
  }

  function updateSummary() {
    const states = [...tiles.values()].map((t) => t.state);
    const live = states.filter((s) => s === 'live').length;
    summary.textContent = `${live} of ${tiles.size} live`;
  }

  /** @param {Tile} tile */
  function posterOf(tile) {
    const video = /** @type {HTMLVideoElement} */ (tile.tile.querySelector('video'));
    const url = snapshotUrl(tile.id, true);
    const probe = new Image();
    probe.onload = () => { video.poster = url; };
    probe.src = url;
  }

  /** @param {{id: string, name: string, running?: boolean}} stream */
  function addTile(stream) {
    const video = el('video', { muted: true, autoplay: true, playsInline: true });
    const tileElement = el('div', { class: 'tile', dataset: { streamId: stream.id, state: 'idle' }, title: stream.name }, [
      video,
      el('div', { class: 'detail' }),
      el('div', { class: 'overlay' }, [
        el('span', { class: 'name' }, [stream.name]),
        el('span', { class: 'pill', dataset: { state: 'idle' } }, ['idle']),
        el('span', { class: 'quality' }, ['']),
        el('span', { class: 'bitrate' }, ['']),
      ]),
    ]);
    const engine = new WebRTCEngine({ streamId: stream.id, videoElement: video });
    /** @type {Tile} */
    const tile = { id: stream.id, name: stream.name, tile: tileElement, engine, visible: false, state: 'idle' };
    engine.on('state', (s) => {
      if (s.state !== 'closed') show(tile, s.state, s.detail);
      updateSummary();
    });
    engine.on('quality', (q) => showQuality(tileElement, q));
    engine.on('stats', (s) => {
      /** @type {HTMLElement} */ (tileElement.querySelector('.bitrate')).textContent =
        `${formatBitrate(s.bitrateKbps)} · ${s.fps} fps`;
    });
    tiles.set(stream.id, tile);
    layout.add(stream.id, tileElement);
    observer.observe(tileElement);
    if (stream.running) posterOf(tile);
  }

  /**
   * The quality a tile plays, shown only when its stream has more than one.
   * @param {HTMLElement} tileElement @param {import('../webrtc-engine.js').QualityInfo} info
   */
  function showQuality(tileElement, info) {
    const label = /** @type {HTMLElement} */ (tileElement.querySelector('.quality'));
    const size = info.qualities.find((q) => q.name === info.quality);
    label.textContent = info.qualities.length > 1 ? info.quality + (size && size.height ? ` ${size.height}p` : '') : '';
    label.title = `quality ${info.quality} (${info.reason})`;
    tileElement.dataset.quality = info.quality;
  }

  /** @param {string} streamId */
  function removeTile(streamId) {
    const tile = tiles.get(streamId);
    if (!tile) return;
    tile.engine.disconnect();
    observer.unobserve(tile.tile);
    layout.remove(streamId);
    tiles.delete(streamId);
    updateSummary();
  }

  // --- management view (the management API; needs an admin token on a secured server) ---

  const manage = /** @type {HTMLElement} */ (document.getElementById('manage'));
  const table = /** @type {HTMLElement} */ (document.querySelector('#stream-table tbody'));
  const message = /** @type {HTMLElement} */ (document.getElementById('manage-message'));
  const form = /** @type {HTMLFormElement} */ (document.getElementById('add-stream'));

  /** @param {string} text @param {boolean} [failed] */
  function say(text, failed = false) {
    message.textContent = text;
    message.style.color = failed ? 'var(--bad)' : '';
  }

  async function refreshManagement() {
    const streams = await fetchStreams();
    table.replaceChildren(...streams.map((s) => {
      const act = (/** @type {string} */ label, /** @type {() => Promise<unknown>} */ action) =>
        el('button', { type: 'button', onclick: () => run(action, `${s.id}: ${label} done`) }, [label]);
      return el('tr', { dataset: { streamId: s.id } }, [
        el('td', { class: 'mono' }, [s.id]), el('td', {}, [s.name]),
        el('td', { class: 'mono' }, [s.source]),
        el('td', {}, [s.enabled ? s.state : 'stopped by an operator']), el('td', {}, [viewersText(s)]),
        el('td', { class: 'mono owner' }, [s.owner ? s.owner.node : '—']),
        el('td', {}, [
          s.enabled
            ? act('stop', () => api(`/api/streams/${s.id}/stop`, { method: 'POST' }))
            : act('start', () => api(`/api/streams/${s.id}/start`, { method: 'POST' })),
          act('delete', async () => {
            await api(`/api/streams/${s.id}`, { method: 'DELETE' });
            removeTile(s.id);
          }),
        ]),
      ]);
    }));
  }

  /**
   * A stream's viewers, per quality when it has several ("16 (main 1, sub 15)").
   * @param {StreamInfo} stream
   */
  function viewersText(stream) {
    const qualities = stream.qualities || [];
    if (qualities.length < 2) return String(stream.viewers);
    return `${stream.viewers} (${qualities.map((q) => `${q.name} ${q.viewers}`).join(', ')})`;
  }

  /**
   * A cluster's nodes, as GET /api/cluster answers (`nodes` is empty in a single process).
   * @typedef {{id: string, publicUrl: string, state: string, load: number, streams: string[]}} ClusterNodeInfo
   */
  const nodeTable = /** @type {HTMLTableElement} */ (document.getElementById('node-table'));

  /** Show the cluster's nodes; the table stays hidden in a single process. */
  async function refreshNodes() {
    const view = /** @type {{nodeId: string|null, nodes: ClusterNodeInfo[]}} */ (await api('/api/cluster'));
    nodeTable.hidden = view.nodes.length === 0;
    /** @type {HTMLElement} */ (nodeTable.tBodies[0]).replaceChildren(...view.nodes.map((n) =>
      el('tr', { dataset: { nodeId: n.id } }, [
        el('td', { class: 'mono' }, [n.id === view.nodeId ? `${n.id} (this node)` : n.id]),
        el('td', { class: 'mono' }, [n.publicUrl]),
        el('td', {}, [n.state]),
        el('td', {}, [`${Math.round(n.load * 100)} %`]),
        el('td', { class: 'mono' }, [n.streams.join(', ') || '—']),
      ])));
  }

  /** @param {() => Promise<unknown>} action @param {string} done */
  async function run(action, done) {
    try {
      await action();
      say(done);
    } catch (error) {
      say(/** @type {Error} */ (error).message, true);
    }
    await refreshManagement().catch(() => {});
    await refreshNodes().catch(() => {});
  }

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const body = {
      id: String(data.get('id')), source: String(data.get('source')),
      name: String(data.get('name') || ''), on_demand: data.get('on_demand') === 'on',
    };
    run(async () => {
      const created = await api('/api/streams', { method: 'POST', body });
      addTile(/** @type {StreamInfo} */ (created)); // the API answers with the new stream
      form.reset();
    }, `${body.id} added`);
  });

  /** @type {HTMLButtonElement} */ (document.getElementById('manage-toggle')).addEventListener('click', () => {
    manage.hidden = !manage.hidden;
    if (!manage.hidden) {
      refreshManagement().catch((/** @type {Error} */ e) => say(e.message, true));
      refreshNodes().catch((/** @type {Error} */ e) => say(`cluster: ${e.message}`, true));
    }
  });

  /** @type {HTMLSelectElement} */ (document.getElementById('tile-size')).addEventListener('change', (event) => {
    wall.style.setProperty('--tile-min', /** @type {HTMLSelectElement} */ (event.target).value);
  });

  window.addEventListener('pagehide', () => {
    for (const tile of tiles.values()) tile.engine.disconnect();
  });

  fetchStreams()
    .then((streams) => {
      if (!streams.length) wall.replaceWith(el('p', { class: 'empty' }, ['No streams are configured.']));
      for (const stream of streams) addTile(stream);
      updateSummary();
    })
    .catch((/** @type {Error} */ error) => {
      wall.replaceWith(el('p', { class: 'empty' }, [`Cannot list the streams: ${error.message}`]));
    });

  window.msDashboard = { manager, tiles, layout };
})();
