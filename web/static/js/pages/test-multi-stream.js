// @ts-check
/** The acceptance page: every stream on one shared socket, with live stats and a log. */
(function () {
  'use strict';

  const { fetchStreams, el, formatBitrate, formatDuration, setPill } = MediaStreamPages;
  const manager = WebSocketManager.getInstance();

  const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
  const cards = $('cards');
  const logBox = $('activity-log');
  const connectAll = /** @type {HTMLButtonElement} */ ($('connect-all'));
  const disconnectAll = /** @type {HTMLButtonElement} */ ($('disconnect-all'));
  /** @type {Map<string, WebRTCEngine>} */
  const engines = new Map();
  // ?relay=1 forces WebRTC through TURN (with none configured it can't connect: the engines
  // fall back to video over the socket); ?fallback=always|never and ?fallbackAfterMs=N choose
  // when they do, ?webrtcRetryMs=N how soon they try WebRTC again meanwhile; ?audio=1 plays
  // the cameras' sound too.
  const query = new URLSearchParams(window.location.search);
  const fallbackMode = query.get('fallback');
  const fallbackAfterMs = Number(query.get('fallbackAfterMs')) || undefined;
  const webrtcRetryMs = Number(query.get('webrtcRetryMs')) || undefined;
  /** @type {Partial<import('../webrtc-engine.js').EngineOptions>} */
  const engineOptions = {
    iceTransportPolicy: query.get('relay') === '1' ? 'relay' : 'all',
    fallback: fallbackMode === 'always' || fallbackMode === 'never' ? fallbackMode : 'auto',
    fallbackAfterMs,
    webrtcRetryMs,
    audio: query.get('audio') === '1',
  };

  /** @param {string} text @param {'info'|'warn'|'error'} [level] */
  function log(text, level = 'info') {
    const time = new Date().toLocaleTimeString();
    logBox.append(el('div', { class: level }, [`${time}  ${text}`]));
    logBox.scrollTop = logBox.scrollHeight;
    while (logBox.childElementCount > 500) logBox.firstElementChild?.remove();
  }

  manager.on('connected', (e) => {
    setPill($('ws-status'), 'connected');
    $('instance-id').textContent = manager.instanceId;
    log(`WebSocket connected${e.reconnected ? ' again' : ''} (manager instance ${manager.instanceId})`);
  });
  manager.on('disconnected', (e) => {
    setPill($('ws-status'), e.willReconnect ? 'reconnecting' : 'closed');
    log(`WebSocket closed (${e.code})${e.willReconnect ? ', reconnecting…' : ''}`, e.willReconnect ? 'warn' : 'info');
  });
  manager.on('reconnecting', (e) => log(`reconnect attempt ${e.attempt} in ${e.delay} ms`, 'warn'));
  manager.on('welcome', (info) => log(`server ${info.server} ${info.version}, connection ${info.connectionId}`));
  manager.on('error', (e) => log(`socket error: ${e.message}`, 'error'));

  function showMetrics() {
    const m = manager.getMetrics();
    $('streams-active').textContent = String(m.streamsActive);
    $('messages').textContent = `${m.messagesSent} / ${m.messagesReceived}`;
    $('latency').textContent = m.averageLatency === null ? '–' : `${m.averageLatency} ms`;
    $('uptime').textContent = m.uptime ? formatDuration(m.uptime) : '–';
  }
  setInterval(showMetrics, 1000);

  /** @param {{id: string, name: string}} stream */
  function addCard(stream) {
    const video = el('video', { muted: true, autoplay: true, playsInline: true });
    const pill = el('span', { class: 'pill', dataset: { state: 'connecting' } }, ['connecting']);
    const field = (/** @type {string} */ name, /** @type {string} */ label) =>
      el('div', {}, [el('dt', {}, [label]), el('dd', { class: `stat-${name}` }, ['–'])]);
    const card = el('article', { class: 'panel stream-card', dataset: { streamId: stream.id } }, [
      el('div', { class: 'card-head' }, [el('span', { class: 'name' }, [stream.name]),
        el('span', { class: 'muted mono' }, [stream.id]), pill]),
      video,
      el('dl', {}, [
        field('bitrate', 'Bitrate'), field('packets', 'Packets'), field('ice', 'ICE state'),
        field('frames', 'Frames decoded'), field('fps', 'FPS'), field('ttff', 'First frame'),
      ]),
    ]);
    cards.append(card);
    const stat = (/** @type {string} */ name) => /** @type {HTMLElement} */ (card.querySelector(`.stat-${name}`));

    const engine = new WebRTCEngine({ streamId: stream.id, videoElement: video, ...engineOptions });
    engines.set(stream.id, engine);
    engine.on('state', (s) => {
      // Video over the socket (no WebRTC): the tile says so.
      setPill(pill, s.state, s.state === 'live' && engine.transport === 'fallback' ? 'live (fallback)' : undefined);
      log(`${stream.id}: ${s.state}${s.detail ? ` — ${s.detail}` : ''}`, s.state === 'error' ? 'error' : 'info');
    });
    engine.on('connected', () => log(`${stream.id}: peer connected`));
    engine.on('error', (e) => log(`${stream.id}: ${e.message}${e.code ? ` (${e.code})` : ''}`, 'error'));
    engine.on('stats', (s) => {
      stat('bitrate').textContent = formatBitrate(s.bitrateKbps);
      stat('packets').textContent = `${s.packetsReceived}${s.packetsLost ? ` (${s.packetsLost} lost)` : ''}`;
      stat('ice').textContent = s.iceState;
      stat('frames').textContent = String(s.framesDecoded);
      stat('fps').textContent = String(s.fps);
      stat('ttff').textContent = s.timeToFirstFrameMs === null ? '–' : `${s.timeToFirstFrameMs} ms`;
    });
    engine.connect().catch((/** @type {Error} */ error) => log(`${stream.id}: ${error.message}`, 'error'));
  }

  connectAll.addEventListener('click', async () => {
    connectAll.disabled = true;
    try {
      const streams = await fetchStreams();
      log(`connecting ${streams.length} streams over one WebSocket`);
      for (const stream of streams) if (!engines.has(stream.id)) addCard(stream);
      disconnectAll.disabled = false;
    } catch (error) {
      log(`cannot list the streams: ${/** @type {Error} */ (error).message}`, 'error');
      connectAll.disabled = false;
    }
  });

  disconnectAll.addEventListener('click', () => {
    for (const [streamId, engine] of engines) {
      engine.disconnect();
      log(`${streamId}: disconnected`);
    }
    engines.clear();
    cards.replaceChildren();
    disconnectAll.disabled = true;
    connectAll.disabled = false;
    showMetrics();
  });

  window.addEventListener('pagehide', () => {
    for (const engine of engines.values()) engine.disconnect();
  });
  window.msTestPage = { manager, engines };
})();
