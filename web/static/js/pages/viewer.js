// @ts-check
/** One stream, chosen from the list (or ?stream=ID in the URL). */
(function () {
  'use strict';

  const { fetchStreams, el, formatBitrate, setPill } = MediaStreamPages;
  const select = /** @type {HTMLSelectElement} */ (document.getElementById('stream-select'));
  const video = /** @type {HTMLVideoElement} */ (document.getElementById('video'));
  const statePill = /** @type {HTMLElement} */ (document.getElementById('state'));
  const statsLine = /** @type {HTMLElement} */ (document.getElementById('stats'));
  const detail = /** @type {HTMLElement} */ (document.getElementById('detail'));
  const qualitySelect = /** @type {HTMLSelectElement} */ (document.getElementById('quality-select'));
  const qualityLabel = /** @type {HTMLElement} */ (document.getElementById('quality'));
  /** @type {WebRTCEngine|null} */
  let engine = null;

  /** @param {string} streamId */
  function play(streamId) {
    if (engine) engine.disconnect();
    statsLine.textContent = '–';
    detail.textContent = '';
    const url = new URL(window.location.href);
    url.searchParams.set('stream', streamId);
    history.replaceState(null, '', url);
    // ?relay=1 forces the media through the TURN server (to check a TURN set-up);
    // ?fallback=always|never, ?fallbackAfterMs=N and ?webrtcRetryMs=N choose when the video
    // comes over the socket instead, and how soon WebRTC is tried again meanwhile;
    // ?quality=NAME starts on that quality (the selector's choice otherwise).
    const query = new URLSearchParams(window.location.search);
    const fallback = query.get('fallback');
    const next = new WebRTCEngine({
      streamId, videoElement: video, audio: true,
      iceTransportPolicy: query.get('relay') === '1' ? 'relay' : 'all',
      fallback: fallback === 'always' || fallback === 'never' ? fallback : 'auto',
      fallbackAfterMs: Number(query.get('fallbackAfterMs')) || undefined,
      webrtcRetryMs: Number(query.get('webrtcRetryMs')) || undefined,
      quality: query.get('quality') || qualitySelect.value,
    });
    next.on('quality', (q) => showQuality(q));
    engine = next;
    next.on('state', (s) => {
      setPill(statePill, s.state, s.state === 'live' && next.transport === 'fallback' ? 'live (fallback)' : undefined);
      detail.textContent = s.detail || '';
    });
    next.on('error', (e) => { detail.textContent = `${e.message}${e.code ? ` (${e.code})` : ''}`; });
    next.on('stats', (s) => {
      statsLine.textContent = [
        `${s.width}x${s.height}`, formatBitrate(s.bitrateKbps), `${s.fps} fps`,
        `${s.packetsReceived} packets (${s.packetsLost} lost)`, `ICE ${s.iceState}`,
        s.timeToFirstFrameMs === null ? '' : `first frame after ${s.timeToFirstFrameMs} ms`,
      ].filter(Boolean).join(' · ');
    });
    next.connect().catch(() => { /* shown through the state and error events */ });
  }

  /**
   * The qualities the stream has (in the selector) and the one playing.
   * @param {import('../webrtc-engine.js').QualityInfo} info
   */
  function showQuality(info) {
    const names = ['auto', ...info.qualities.map((q) => q.name)];
    if ([...qualitySelect.options].map((o) => o.value).join() !== names.join()) {
      qualitySelect.replaceChildren(...names.map((name) => el('option', { value: name }, [name])));
      qualitySelect.value = info.requested;
    }
    const size = info.qualities.find((q) => q.name === info.quality);
    qualityLabel.textContent = `playing ${info.quality}${size && size.height ? ` (${size.width}x${size.height})` : ''}, ${info.reason}`;
  }

  select.addEventListener('change', () => {
    qualitySelect.replaceChildren(el('option', { value: 'auto' }, ['auto']));
    qualityLabel.textContent = '';
    play(select.value);
  });
  qualitySelect.addEventListener('change', () => engine && engine.setQuality(qualitySelect.value));
  window.msViewer = { get engine() { return engine; } };
  window.addEventListener('pagehide', () => engine && engine.disconnect());

  fetchStreams()
    .then((streams) => {
      for (const s of streams) select.append(el('option', { value: s.id }, [`${s.name} (${s.id})`]));
      const wanted = new URLSearchParams(window.location.search).get('stream');
      const first = streams.find((s) => s.id === wanted) || streams[0];
      if (first) {
        select.value = first.id;
        play(first.id);
      } else {
        detail.textContent = 'No streams are configured.';
      }
    })
    .catch((/** @type {Error} */ error) => { detail.textContent = `Cannot list the streams: ${error.message}`; });
})();
