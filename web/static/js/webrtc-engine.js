// @ts-check
/**
 * MediaStream — one stream's WebRTC peer connection, signaled over the page's shared socket.
 *
 *   const engine = new WebRTCEngine({ streamId: 'plx_cctv_01', videoElement: video });
 *   engine.on('stats', (s) => console.log(s.bitrateKbps));
 *   await engine.connect();
 *   ...
 *   engine.disconnect();
 *
 * Needs websocket-manager.js loaded first. Pages written for the older engine that opened one
 * socket per stream keep working unchanged: every engine now shares WebSocketManager's socket
 * (the old `serverUrl`/`wsUrl`/`signalingUrl` options are still honoured).
 *
 * Events (`engine.on(name, callback)`):
 *   connected     the peer connection is up ({streamId})
 *   disconnected  disconnect() was called ({streamId})
 *   error         something failed ({streamId, message, code, recoverable})
 *   stats         every statsInterval ms: bitrate, packets, frames, fps, ICE state, TTFF…
 *   state         the stream's state changed ({streamId, state, detail, previous})
 *   track         media arrived ({streamId, track, stream})
 *
 * States: idle → connecting → live; reconnecting / offline while the camera or the network
 * recovers (the engine renegotiates by itself); error when it can't (unknown stream,
 * unsupported codec…); closed after disconnect().
 */
(function (root) {
  'use strict';

  /** @typedef {'idle'|'connecting'|'live'|'reconnecting'|'offline'|'error'|'closed'} EngineState */
  /**
   * @typedef {object} EngineOptions
   * @property {string} streamId the server's stream id
   * @property {HTMLVideoElement} [videoElement] where the video plays
   * @property {any} [manager] the shared WebSocketManager (default: getInstance())
   * @property {string} [serverUrl] signaling URL (default: this page's origin); `wsUrl`,
   *   `signalingUrl` and `url` are accepted as older spellings
   * @property {string} [token] access token, passed to the manager
   * @property {RTCIceServer[]} [iceServers] default: what the server announced in `welcome`
   * @property {RTCIceTransportPolicy} [iceTransportPolicy] 'relay' forces TURN (default 'all')
   * @property {boolean} [audio] also receive the camera's audio, if it has any (default false;
   *   the video element stays muted until the page unmutes it)
   * @property {number} [statsInterval] ms between `stats` events (default 1000; 0 disables)
   * @property {boolean} [autoReconnect] renegotiate after failures (default true)
   * @property {number} [answerTimeout] ms to wait for the answer (default 15000)
   * @property {any} [RTCPeerConnection] implementation (tests inject a fake)
   * @property {{setTimeout: Function, clearTimeout: Function, setInterval: Function, clearInterval: Function, now?: () => number}} [timers]
   *   timer functions and a millisecond clock (tests inject a fake clock)
   */
  /**
   * @typedef {object} EngineStats
   * @property {string} streamId
   * @property {number} bitrateKbps video bitrate over the last interval
   * @property {number} packetsReceived
   * @property {number} packetsLost
   * @property {number} framesDecoded
   * @property {number} fps frames decoded per second over the last interval
   * @property {number} width
   * @property {number} height
   * @property {string} iceState the peer's ICE connection state
   * @property {string} connectionState
   * @property {number|null} timeToFirstFrameMs from connect() to the first decoded frame
   * @property {number|null} jitterBufferMs average jitter-buffer delay
   * @property {EngineState} state
   */

  /** Server error codes after which retrying can't help. */
  const FATAL_CODES = new Set([
    'stream_not_found', 'stream_unavailable', 'unsupported_codec', 'invalid_sdp',
    'invalid_message', 'forbidden', 'unauthorized', 'token_expired', 'too_many_streams',
  ]);
  const RETRY_BASE_MS = 1000;
  const RETRY_CAP_MS = 30000;
  const DISCONNECTED_GRACE_MS = 4000; // 'disconnected' often heals by itself; 'failed' does not
  let sessionCounter = 0;

  class WebRTCEngine {
    /** @type {string} */ streamId;
    /** @type {HTMLVideoElement|null} */ videoElement;
    /** @type {RTCPeerConnection|null} */ pc = null;

    /** @type {any} */ #manager;
    /** @type {{setTimeout: Function, clearTimeout: Function, setInterval: Function, clearInterval: Function, now?: () => number}} */
    #timers;
    /** @type {EngineOptions} */ #options;
    /** @type {EngineState} */ #state = 'idle';
    /** @type {Map<string, Set<Function>>} */ #listeners = new Map();
    /** @type {string|null} */ #sessionId = null;
    /** @type {{resolve: (sdp: string) => void, reject: (e: Error) => void, timer: any}|null} */
    #pendingAnswer = null;
    /** @type {(() => void)[]} */ #cleanups = [];
    /** @type {any} */ #statsTimer = null;
    /** @type {any} */ #retryTimer = null;
    /** @type {any} */ #disconnectedTimer = null;
    #retries = 0;
    #connectStartedAt = 0;
    /** @type {number|null} */ #firstFrameAt = null;
    /** @type {{at: number, bytes: number, frames: number}|null} */ #lastSample = null;
    /** @type {EngineStats|null} */ #lastStats = null;
    #serverState = '';
    #announcedConnected = false;
    /** @type {object|null} the handlers registered with the manager, to unregister only ours */
    #handlers = null;
    /** @type {MediaStream|null} what the video element plays: this negotiation's tracks */
    #mediaStream = null;

    /** @param {EngineOptions} options */
    constructor(options) {
      if (!options || typeof options.streamId !== 'string' || !options.streamId) {
        throw new TypeError('WebRTCEngine needs a streamId');
      }
      const Manager = root.WebSocketManager;
      if (!options.manager && !Manager) {
        throw new Error('Load websocket-manager.js before webrtc-engine.js');
      }
      this.#options = options;
      this.streamId = options.streamId;
      this.videoElement = options.videoElement || null;
      this.#manager = options.manager || Manager.getInstance();
      this.#timers = options.timers || {
        setTimeout: (/** @type {Function} */ fn, /** @type {number} */ ms) => setTimeout(fn, ms),
        clearTimeout: (/** @type {any} */ id) => clearTimeout(id),
        setInterval: (/** @type {Function} */ fn, /** @type {number} */ ms) => setInterval(fn, ms),
        clearInterval: (/** @type {any} */ id) => clearInterval(id),
      };
    }

    /** @returns {EngineState} */
    get state() {
      return this.#state;
    }

    /** The session id sent with the current offer (echoed by the server). */
    get sessionId() {
      return this.#sessionId;
    }

    isConnected() {
      return this.#state === 'live';
    }

    /** @returns {EngineStats|null} the latest stats */
    getStats() {
      return this.#lastStats;
    }

    /**
     * @param {string} event connected, disconnected, error, stats, state, track
     * @param {Function} callback
     * @returns {() => void} removes the listener
     */
    on(event, callback) {
      let set = this.#listeners.get(event);
      if (!set) this.#listeners.set(event, (set = new Set()));
      set.add(callback);
      return () => set?.delete(callback);
    }

    /** @param {string} event @param {Function} callback */
    off(event, callback) {
      this.#listeners.get(event)?.delete(callback);
    }

    /**
     * Register with the shared socket and negotiate. Resolves once the answer is applied
     * (media follows; listen to `connected`). Rejects if the server refuses the stream.
     * @returns {Promise<void>}
     */
    async connect() {
      if (this.#state !== 'idle' && this.#state !== 'closed') return;
      this.#retries = 0;
      this.#connectStartedAt = this.#now();
      this.#firstFrameAt = null;
      this.#setState('connecting');
      this.#handlers = {
        answer: (/** @type {any} */ payload, /** @type {any} */ raw) => this.#onAnswer(payload, raw),
        error: (/** @type {any} */ payload, /** @type {any} */ raw) => this.#onServerError(payload, raw),
        state: (/** @type {any} */ payload, /** @type {any} */ raw) => this.#onServerState(payload, raw),
        onReconnect: () => this.#renegotiate('signaling socket reconnected', 0),
      };
      this.#manager.registerStream(this.streamId, this.#handlers);
      this.#cleanups.push(
        this.#manager.on('disconnected', (/** @type {any} */ info) => {
          if (info && info.willReconnect && this.#state !== 'closed') {
            this.#setState('reconnecting', 'signaling socket lost');
          }
        }),
      );
      const url = this.#options.serverUrl || /** @type {any} */ (this.#options).wsUrl ||
        /** @type {any} */ (this.#options).signalingUrl || /** @type {any} */ (this.#options).url;
      try {
        await this.#manager.connect({ url, token: this.#options.token });
        await this.#negotiate();
      } catch (error) {
        const err = /** @type {any} */ (error);
        if (this.#state === 'closed') return;
        const recoverable = err.recoverable !== false;
        this.#emit('error', { streamId: this.streamId, message: err.message, code: err.code, recoverable });
        if (recoverable && this.#autoReconnect) {
          this.#scheduleRetry(err.message);
        } else {
          this.#setState('error', err.message);
          throw error;
        }
      }
    }

    /** Renegotiate now (a new peer connection, a new offer). */
    reconnect() {
      return this.#renegotiate('reconnect() called', 0);
    }

    /**
     * Stop: close the peer connection, stop timers and listeners, end the session on the
     * server and detach the video. Idempotent.
     */
    disconnect() {
      if (this.#state === 'closed' || this.#state === 'idle') {
        this.#state = 'closed';
        return;
      }
      this.#clearTimers();
      for (const cleanup of this.#cleanups.splice(0)) cleanup();
      this.#rejectPendingAnswer(new Error('disconnected'));
      this.#closePeer();
      if (this.#manager.streamHandlers.get(this.streamId) === this.#handlers) {
        this.#manager.unregisterStream(this.streamId);
      }
      this.#handlers = null;
      if (this.videoElement) {
        this.videoElement.srcObject = null;
      }
      this.#setState('closed');
      this.#emit('disconnected', { streamId: this.streamId });
    }

    // --- negotiation ---------------------------------------------------------------------

    async #negotiate() {
      this.#closePeer();
      this.#mediaStream = null;
      this.#announcedConnected = false;
      this.#lastSample = null;
      if (!this.#options.iceServers && this.#manager.whenWelcomed) {
        await this.#manager.whenWelcomed(); // the server's ICE servers (and TURN credentials)
      }
      const sessionId = `${this.#manager.instanceId || 'p'}-${++sessionCounter}`;
      this.#sessionId = sessionId;
      const PeerConnection = this.#options.RTCPeerConnection || root.RTCPeerConnection;
      const iceServers = this.#options.iceServers || this.#manager.serverInfo?.iceServers || [];
      /** @type {RTCPeerConnection} */
      const pc = new PeerConnection({
        iceServers,
        iceTransportPolicy: this.#options.iceTransportPolicy || 'all',
      });
      this.pc = pc;
      pc.addTransceiver('video', { direction: 'recvonly' });
      if (this.#options.audio) pc.addTransceiver('audio', { direction: 'recvonly' });
      pc.ontrack = (event) => this.#attach(event);
      pc.onicecandidate = (event) => {
        if (this.pc !== pc) return;
        const c = event.candidate;
        this.#manager.send('ice', this.streamId, c
          ? { candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex, sessionId }
          : { candidate: '', sdpMid: '0', sdpMLineIndex: 0, sessionId });
      };
      pc.onconnectionstatechange = () => this.#onPeerState(pc);
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      const answer = this.#waitForAnswer();
      this.#manager.send('offer', this.streamId, {
        type: 'offer', sdp: offer.sdp, streamId: this.streamId, sessionId,
      });
      const sdp = await answer;
      if (this.pc !== pc) return; // replaced or closed meanwhile
      await pc.setRemoteDescription({ type: 'answer', sdp });
      this.#startStats();
    }

    /** @returns {Promise<string>} */
    #waitForAnswer() {
      this.#rejectPendingAnswer(new Error('superseded by a new offer'));
      return new Promise((resolve, reject) => {
        const timeout = this.#options.answerTimeout ?? 15000;
        const timer = this.#timers.setTimeout(() => {
          this.#pendingAnswer = null;
          reject(Object.assign(new Error(`No answer from the server within ${timeout} ms`), { code: 'answer_timeout' }));
        }, timeout);
        this.#pendingAnswer = { resolve, reject, timer };
      });
    }

    /** @param {Error} error */
    #rejectPendingAnswer(error) {
      const pending = this.#pendingAnswer;
      if (!pending) return;
      this.#pendingAnswer = null;
      this.#timers.clearTimeout(pending.timer);
      pending.reject(Object.assign(error, { recoverable: true, superseded: true }));
    }

    /** @param {any} sdp @param {any} raw */
    #onAnswer(sdp, raw) {
      if (raw && raw.sessionId && raw.sessionId !== this.#sessionId) return; // an old session's
      const pending = this.#pendingAnswer;
      if (!pending) return;
      this.#pendingAnswer = null;
      this.#timers.clearTimeout(pending.timer);
      pending.resolve(String(sdp));
    }

    /** @param {any} text @param {any} raw */
    #onServerError(text, raw) {
      if (raw && raw.sessionId && raw.sessionId !== this.#sessionId) return;
      const code = raw && raw.code;
      if (code === 'negotiation_in_progress') return; // our earlier offer is still being answered
      const recoverable = !FATAL_CODES.has(code);
      const error = Object.assign(new Error(String(text)), { code, recoverable });
      const pending = this.#pendingAnswer;
      if (pending) {
        this.#pendingAnswer = null;
        this.#timers.clearTimeout(pending.timer);
        pending.reject(error); // connect() or the renegotiation reports it
        return;
      }
      if (code === 'invalid_candidate' || code === 'too_many_candidates') return; // one candidate lost
      this.#emit('error', { streamId: this.streamId, message: String(text), code, recoverable });
      if (recoverable && this.#autoReconnect) {
        this.#scheduleRetry(String(text));
      } else {
        this.#closePeer();
        this.#setState('error', String(text));
      }
    }

    /** @param {any} payload @param {any} raw */
    #onServerState(payload, raw) {
      if (raw && raw.sessionId && raw.sessionId !== this.#sessionId) return;
      const serverState = payload && payload.state;
      this.#serverState = serverState;
      const detail = payload && payload.detail;
      if (serverState === 'reconnecting') this.#setState('reconnecting', detail || 'camera reconnecting');
      else if (serverState === 'offline') this.#setState('offline', detail || 'camera offline');
      else if (serverState === 'live' && this.pc && this.pc.connectionState === 'connected') this.#setState('live');
    }

    /** @param {RTCPeerConnection} pc */
    #onPeerState(pc) {
      if (this.pc !== pc) return;
      const state = pc.connectionState;
      if (state === 'connected') {
        this.#retries = 0;
        if (this.#disconnectedTimer) {
          this.#timers.clearTimeout(this.#disconnectedTimer);
          this.#disconnectedTimer = null;
        }
        if (this.#serverState !== 'reconnecting' && this.#serverState !== 'offline') this.#setState('live');
        if (!this.#announcedConnected) {
          this.#announcedConnected = true;
          this.#emit('connected', { streamId: this.streamId });
        }
      } else if (state === 'failed') {
        this.#renegotiate('peer connection failed', this.#retryDelay());
      } else if (state === 'disconnected' && !this.#disconnectedTimer) {
        this.#disconnectedTimer = this.#timers.setTimeout(() => {
          this.#disconnectedTimer = null;
          if (this.pc === pc && pc.connectionState === 'disconnected') {
            this.#renegotiate('peer connection lost', 0);
          }
        }, DISCONNECTED_GRACE_MS);
      }
    }

    /** @param {string} reason @param {number} delay */
    #renegotiate(reason, delay) {
      if (this.#state === 'closed' || this.#state === 'idle' || !this.#autoReconnect) return;
      if (delay > 0) {
        this.#scheduleRetry(reason, delay);
        return;
      }
      this.#setState('reconnecting', reason);
      this.#negotiate().catch((/** @type {any} */ error) => {
        if (this.#state === 'closed' || error.superseded) return;
        this.#emit('error', { streamId: this.streamId, message: error.message, code: error.code, recoverable: error.recoverable !== false });
        if (error.recoverable === false) {
          this.#closePeer();
          this.#setState('error', error.message);
        } else {
          this.#scheduleRetry(error.message);
        }
      });
    }

    /** @param {string} reason @param {number} [delay] */
    #scheduleRetry(reason, delay = this.#retryDelay()) {
      if (this.#state === 'closed') return;
      if (this.#retryTimer) this.#timers.clearTimeout(this.#retryTimer);
      this.#closePeer();
      this.#setState('reconnecting', `${reason}; retrying in ${Math.round(delay / 100) / 10} s`);
      this.#retryTimer = this.#timers.setTimeout(() => {
        this.#retryTimer = null;
        if (!this.#manager.isConnected()) return; // the manager renegotiates on reconnect
        this.#renegotiate(reason, 0);
      }, delay);
    }

    #retryDelay() {
      const base = Math.min(RETRY_BASE_MS * 2 ** this.#retries, RETRY_CAP_MS);
      this.#retries += 1;
      return Math.round(base * (1 + 0.2 * Math.random()));
    }

    get #autoReconnect() {
      return this.#options.autoReconnect !== false;
    }

    // --- media and stats -------------------------------------------------------------------

    /** @param {RTCTrackEvent} event */
    #attach(event) {
      // The server sends video and audio as separate streams: gather them into one, so the
      // video element plays both (it stays muted until the page unmutes it).
      if (!this.#mediaStream) this.#mediaStream = new MediaStream();
      const stream = this.#mediaStream;
      for (const old of stream.getTracks().filter((t) => t.kind === event.track.kind)) stream.removeTrack(old);
      stream.addTrack(event.track);
      const video = this.videoElement;
      if (video) {
        if (video.srcObject !== stream) {
          video.muted = true; // autoplay needs it; the page may unmute
          video.autoplay = true;
          video.playsInline = true;
          video.srcObject = stream;
        }
        const played = video.play();
        if (played && played.catch) played.catch(() => { /* autoplay refused: the page shows controls */ });
        if (event.track.kind === 'video') this.#watchFirstFrame(video);
      }
      this.#emit('track', { streamId: this.streamId, track: event.track, stream });
    }

    /** @param {HTMLVideoElement} video */
    #watchFirstFrame(video) {
      if (this.#firstFrameAt !== null) return;
      const mark = () => {
        if (this.#firstFrameAt === null) this.#firstFrameAt = this.#now();
      };
      const anyVideo = /** @type {any} */ (video);
      if (typeof anyVideo.requestVideoFrameCallback === 'function') {
        anyVideo.requestVideoFrameCallback(mark);
      } else {
        video.addEventListener('loadeddata', mark, { once: true });
        this.#cleanups.push(() => video.removeEventListener('loadeddata', mark));
      }
    }

    #startStats() {
      const interval = this.#options.statsInterval ?? 1000;
      if (!interval || this.#statsTimer) return;
      this.#statsTimer = this.#timers.setInterval(() => {
        this.#collectStats().catch(() => { /* the peer closed between two samples */ });
      }, interval);
    }

    async #collectStats() {
      const pc = this.pc;
      if (!pc) return;
      const report = await pc.getStats();
      /** @type {any} */ let inbound = null;
      report.forEach((/** @type {any} */ stat) => {
        if (stat.type === 'inbound-rtp' && (stat.kind || stat.mediaType) === 'video') inbound = stat;
      });
      const at = this.#now();
      const bytes = inbound ? inbound.bytesReceived || 0 : 0;
      const frames = inbound ? inbound.framesDecoded || 0 : 0;
      const last = this.#lastSample;
      const seconds = last ? (at - last.at) / 1000 : 0;
      if (frames > 0 && this.#firstFrameAt === null) this.#firstFrameAt = at;
      /** @type {EngineStats} */
      const stats = {
        streamId: this.streamId,
        bitrateKbps: last && seconds > 0 ? Math.round(((bytes - last.bytes) * 8) / seconds / 1000) : 0,
        packetsReceived: inbound ? inbound.packetsReceived || 0 : 0,
        packetsLost: inbound ? Math.max(0, inbound.packetsLost || 0) : 0,
        framesDecoded: frames,
        fps: last && seconds > 0 ? Math.round(((frames - last.frames) / seconds) * 10) / 10 : 0,
        width: inbound ? inbound.frameWidth || 0 : 0,
        height: inbound ? inbound.frameHeight || 0 : 0,
        iceState: pc.iceConnectionState,
        connectionState: pc.connectionState,
        timeToFirstFrameMs: this.#firstFrameAt === null ? null : Math.round(this.#firstFrameAt - this.#connectStartedAt),
        jitterBufferMs: inbound && inbound.jitterBufferEmittedCount
          ? Math.round((inbound.jitterBufferDelay / inbound.jitterBufferEmittedCount) * 1000)
          : null,
        state: this.#state,
      };
      this.#lastSample = { at, bytes, frames };
      this.#lastStats = stats;
      if (this.pc === pc) this.#emit('stats', stats);
    }

    // --- plumbing --------------------------------------------------------------------------

    #now() {
      if (this.#timers.now) return this.#timers.now();
      return typeof performance !== 'undefined' ? performance.now() : Date.now();
    }

    #closePeer() {
      const pc = this.pc;
      this.pc = null;
      if (this.#statsTimer) {
        this.#timers.clearInterval(this.#statsTimer);
        this.#statsTimer = null;
      }
      if (!pc) return;
      pc.ontrack = pc.onicecandidate = pc.onconnectionstatechange = null;
      try {
        pc.close();
      } catch (_) {
        /* already closed */
      }
    }

    #clearTimers() {
      for (const timer of [this.#retryTimer, this.#disconnectedTimer]) if (timer) this.#timers.clearTimeout(timer);
      this.#retryTimer = this.#disconnectedTimer = null;
      if (this.#statsTimer) this.#timers.clearInterval(this.#statsTimer);
      this.#statsTimer = null;
    }

    /** @param {EngineState} state @param {string} [detail] */
    #setState(state, detail) {
      const previous = this.#state;
      if (previous === state && !detail) return;
      this.#state = state;
      this.#emit('state', { streamId: this.streamId, state, previous, detail: detail || null });
    }

    /** @param {string} event @param {any} data */
    #emit(event, data) {
      for (const callback of [...(this.#listeners.get(event) || [])]) {
        try {
          callback(data);
        } catch (error) {
          console.error('[MediaStream]', `${this.streamId}: "${event}" listener failed:`, error);
        }
      }
    }
  }


  root.WebRTCEngine = WebRTCEngine;
  if (typeof module === 'object' && module.exports) module.exports = { WebRTCEngine };
})(typeof window !== 'undefined' ? window : globalThis);
