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
 * Needs websocket-manager.js loaded first (its socket, its event emitter and its backoff are the
 * engine's too). Pages written for the older engine that opened one socket per stream keep
 * working unchanged: every engine now shares WebSocketManager's socket (the old
 * `serverUrl`/`wsUrl`/`signalingUrl` options are still honoured).
 *
 * The engine reaches the manager only through `SignalingChannel` below: the few members it
 * uses, typed, so the manager's internals stay its own.
 *
 * Events (`engine.on(name, callback)`):
 *   connected     the peer connection is up ({streamId})
 *   disconnected  disconnect() was called ({streamId})
 *   error         something failed ({streamId, message, code, recoverable})
 *   stats         every statsInterval ms: bitrate, packets, frames, fps, ICE state, TTFF…
 *   state         the stream's state changed ({streamId, state, detail, previous})
 *   track         media arrived ({streamId, track, stream})
 *   quality       the quality playing ({streamId, quality, requested, reason, qualities})
 *
 * Quality: a stream may have several qualities (a camera's main and sub streams). By default
 * (`quality: 'auto'`) the engine reports its video element's rendered size in device pixels
 * (ResizeObserver × devicePixelRatio, throttled) and whether it is visible
 * (IntersectionObserver and the page's visibility); the server plays the smallest quality that
 * covers it, on the same peer connection. `engine.setQuality('main' | 'sub' | 'auto')` pins one
 * or lets the server choose again; `engine.quality` is the one playing.
 *
 * States: idle → connecting → live; reconnecting / offline while the camera or the network
 * recovers (the engine renegotiates by itself); error when it can't (unknown stream,
 * unsupported codec…); closed after disconnect().
 *
 * Fallback: when the peer connection can't connect (UDP blocked and no TURN server), the
 * engine asks the server for the stream over the signaling socket itself (`fallback`,
 * docs/protocol.md) and plays the fMP4 it sends through Media Source Extensions on the same
 * video element, keeping the playhead near the live edge. `engine.transport` then says
 * 'fallback' (pages show "live (fallback)"); `reconnect()` tries WebRTC again. The option
 * `fallback: 'always'` skips WebRTC, `'never'` keeps retrying WebRTC only. With `audio: true`
 * the fallback carries the camera's Opus or AAC too, where `MediaSource.isTypeSupported` takes
 * it (G.711 never: video only).
 *
 * Going back: while the fallback plays, the engine retries WebRTC in the background (a fresh
 * offer for the same stream on the same socket, after `webrtcRetryMs`, doubling up to
 * `webrtcRetryMaxMs`). The fallback keeps the video element until the new peer connection has
 * decoded a frame; then the element switches to it, the server is told to end the fallback
 * (`close` with `payload.fallback`), and the state goes from live (fallback) to live. The
 * fallback plays the quality asked for like a peer connection: its `fallback` message carries
 * the requested quality and the tile, and `setQuality` and the tile's reports go to it as
 * `quality` messages (a new init segment follows, in the same video element). A background
 * attempt's offer carries them too, the same `quality` messages reach both, and the attempt's
 * `quality` event is held until it takes over.
 */
/** @typedef {import('./websocket-manager.js').Message} Message */
/** @typedef {import('./websocket-manager.js').StreamHandlers} StreamHandlers */
/** @typedef {'idle'|'connecting'|'live'|'reconnecting'|'offline'|'error'|'closed'} EngineState */
/**
 * The engine's seam with the page's signaling socket: exactly what it uses of
 * WebSocketManager, and all it may use. Any object with these members will do (a page may
 * pass its own as `manager`); WebSocketManager is checked against it where the engine takes
 * its instance.
 * @typedef {object} SignalingChannel
 * @property {string} instanceId the manager's id, the prefix of every session id
 * @property {{iceServers?: RTCIceServer[]}} serverInfo what the server announced (its ICE servers)
 * @property {(options?: {url?: string, token?: string}) => Promise<void>} connect open the
 *   socket, or reuse it
 * @property {() => boolean} isConnected
 * @property {(timeoutMs?: number) => Promise<void>} [whenWelcomed] resolves once the server
 *   announced its ICE servers (optional: without it the engine doesn't wait)
 * @property {(type: string, streamId: string, payload?: unknown) => boolean} send
 * @property {(streamId: string, handlers: StreamHandlers) => (() => void)} registerStream
 *   route the stream's messages to `handlers`; returns what unregisters exactly that
 *   registration (the server is told, and the socket closes after the page's last stream)
 * @property {(event: 'disconnected', callback: (info: {willReconnect: boolean}) => void) => (() => void)} on
 *   the engine only follows the socket's loss (it renegotiates through `onReconnect`)
 * @property {'shared'|'per-stream'} [peerConnection] 'shared': the page's streams share one
 *   RTCPeerConnection (`SharedPeerConnection`); default 'per-stream'
 */
/**
 * Timer functions and a millisecond clock (tests inject a fake clock).
 * @typedef {object} Timers
 * @property {(callback: () => void, ms: number) => unknown} setTimeout
 * @property {(id: unknown) => void} clearTimeout
 * @property {(callback: () => void, ms: number) => unknown} setInterval
 * @property {(id: unknown) => void} clearInterval
 * @property {() => number} [now] default: performance.now()
 */
/**
 * @typedef {object} EngineOptions
 * @property {string} streamId the server's stream id
 * @property {HTMLVideoElement} [videoElement] where the video plays
 * @property {SignalingChannel} [manager] the shared socket (default: WebSocketManager.getInstance())
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
 * @property {{new (configuration: RTCConfiguration): RTCPeerConnection}} [RTCPeerConnection]
 *   implementation (tests inject a fake)
 * @property {Timers} [timers]
 * @property {'auto'|'always'|'never'} [fallback] play over the socket with Media Source
 *   Extensions when WebRTC can't connect ('auto', the default), always, or never
 * @property {number} [fallbackAfterMs] how long a peer connection may take to connect before
 *   the engine falls back (default 10000)
 * @property {{new (): MediaSource, isTypeSupported?: (type: string) => boolean}} [MediaSource]
 *   implementation (default: the browser's; tests inject a fake)
 * @property {number} [webrtcRetryMs] while on the fallback, ms before the first background
 *   attempt to go back to WebRTC (default 5000; doubles after each failed attempt; 0: never)
 * @property {number} [webrtcRetryMaxMs] the longest wait between two such attempts (default 60000)
 * @property {string} [wsUrl] older spelling of `serverUrl`
 * @property {string} [signalingUrl] older spelling of `serverUrl`
 * @property {string} [url] older spelling of `serverUrl`
 * @property {string} [quality] the quality to play: a name, or 'auto' (the default: the
 *   server chooses from the element's size, its visibility and the network)
 * @property {number} [tileReportDelayMs] a change of the element's size is told at once, then
 *   at most once per this many ms while it keeps changing (default 200)
 * @property {{new (callback: ResizeObserverCallback): ResizeObserver}} [ResizeObserver]
 *   implementation (default: the browser's; tests inject a fake)
 * @property {{new (callback: IntersectionObserverCallback): IntersectionObserver}} [IntersectionObserver]
 *   implementation (default: the browser's; tests inject a fake)
 */
/**
 * Where the stream is shown, as the server is told (docs/protocol.md, `quality`).
 * @typedef {{width: number, height: number, visible: boolean}} Tile
 */
/**
 * What `quality` listeners receive: the quality playing and why.
 * @typedef {object} QualityInfo
 * @property {string} streamId
 * @property {string} quality the quality whose frames arrive now
 * @property {string} requested what the page asked for: a name, or 'auto'
 * @property {string} reason 'pinned', 'default', 'tile', 'hidden', 'network' or 'switching'
 * @property {{name: string, width: number, height: number}[]} qualities the stream's, best first
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
/**
 * What `error` listeners receive.
 * @typedef {object} EngineError
 * @property {string} streamId
 * @property {string} message
 * @property {string} [code] the server's error code, or the engine's (`answer_timeout`)
 * @property {boolean} recoverable whether the engine retries by itself
 */
/**
 * The events of an engine (`engine.on(name, callback)`), with what each callback receives.
 * @typedef {object} EngineEvents
 * @property {{streamId: string}} connected the peer connection is up
 * @property {{streamId: string}} disconnected disconnect() was called
 * @property {EngineError} error
 * @property {EngineStats} stats
 * @property {{streamId: string, state: EngineState, previous: EngineState, detail: string|null}} state
 * @property {{streamId: string, track: MediaStreamTrack, stream: MediaStream}} track
 * @property {QualityInfo} quality the quality playing changed (or was confirmed)
 */
/**
 * An error of a negotiation: its server code, whether retrying can help, and whether a newer
 * negotiation replaced it (then nobody reports it).
 * @typedef {Error & {code?: string, recoverable?: boolean, superseded?: boolean}} Failure
 */

(function (root) {
  'use strict';

  /** Server error codes after which retrying can't help. */
  const FATAL_CODES = new Set([
    'stream_not_found', 'unknown_quality', 'stream_unavailable', 'unsupported_codec', 'invalid_sdp',
    'invalid_message', 'forbidden', 'unauthorized', 'token_expired', 'too_many_streams',
  ]);
  const DISCONNECTED_GRACE_MS = 4000; // 'disconnected' often heals by itself; 'failed' does not
  /** Server errors that mean this peer connection can't connect: time for the fallback. */
  const UNREACHABLE_CODES = new Set(['negotiation_timeout', 'peer_failed']);
  const FALLBACK_AFTER_MS = 10000;
  /** The fallback's playhead may trail the newest buffered frame by this much before a jump. */
  const LIVE_LAG_MAX_S = 1.0;
  const LIVE_JUMP_TO_S = 0.15; // how far behind the newest frame a jump lands
  const BUFFER_KEPT_S = 10; // played media older than this is removed from the SourceBuffer
  const MAX_QUEUED_SEGMENTS = 60; // segments waiting for the SourceBuffer before a skip
  const TILE_REPORT_DELAY_MS = 200; // at most one tile report per this, while it keeps changing
  const WEBRTC_RETRY_MS = 5000;
  const WEBRTC_RETRY_MAX_MS = 60000;
  /** How often a background attempt's peer connection is asked whether it decoded a frame. */
  const FIRST_FRAME_POLL_MS = 250;
  /**
   * Audio codecs the server may put in the fallback's fMP4 (docs/protocol.md), each with a
   * type to ask `MediaSource.isTypeSupported` about (beside a common H.264 profile).
   */
  const FALLBACK_AUDIO_CODECS = ['opus', 'mp4a.40.2'];
  const PROBE_VIDEO_CODEC = 'avc1.42e01e';
  let sessionCounter = 0;

  /**
   * The RFC 6381 codec string of an fMP4 init segment's H.264 track (`avc1.PPCCLL`, from its
   * avcC box), or null if it has none.
   * @param {Uint8Array} init
   * @returns {string|null}
   */
  function codecOfInit(init) {
    const at = indexOfBox(init, 'avcC');
    if (at < 0 || at + 8 > init.length) return null;
    const hex = (/** @type {number|undefined} */ b) => (b ?? 0).toString(16).padStart(2, '0');
    return `avc1.${hex(init[at + 5])}${hex(init[at + 6])}${hex(init[at + 7])}`;
  }

  /**
   * The RFC 6381 codec string of an fMP4 init segment's audio track (`opus` from its dOps box,
   * `mp4a.40.N` from its esds), or null if it has none.
   * @param {Uint8Array} init
   * @returns {string|null}
   */
  function audioCodecOfInit(init) {
    if (indexOfBox(init, 'dOps') >= 0) return 'opus';
    const esds = indexOfBox(init, 'esds');
    if (esds < 0) return null;
    // ES_Descriptor (tag 3) > DecoderConfigDescriptor (tag 4) > DecoderSpecificInfo (tag 5),
    // whose first 5 bits are the audio object type (ISO/IEC 14496-1 and -3).
    let at = esds + 8; // after the type and the full box's version and flags
    /** @param {number} tag @returns {boolean} */
    const enter = (tag) => {
      if (init[at] !== tag) return false;
      at += 1;
      while ((init[at++] ?? 0) & 0x80) { /* the size, in 7-bit groups */ }
      return at < init.length;
    };
    if (!enter(3)) return 'mp4a.40.2';
    const flags = init[at + 2] ?? 0;
    at += 3; // ES_ID, flags
    if (flags & 0x80) at += 2; // dependsOn_ES_ID
    if (flags & 0x40) at += 1 + (init[at] ?? 0); // URL
    if (flags & 0x20) at += 2; // OCR_ES_Id
    if (!enter(4)) return 'mp4a.40.2';
    at += 13; // object type, stream type, buffer size, bitrates
    if (!enter(5)) return 'mp4a.40.2';
    return `mp4a.40.${(init[at] ?? 0x10) >> 3}`;
  }

  /**
   * Whether a fallback message's media starts the video with a sync sample (a keyframe): the
   * first video (track 1) fragment of the moof + mdat pairs it carries, read from its trun box
   * (ISO/IEC 14496-12 8.8.8); a trun without sample flags counts as one. A message without
   * video (sound only) is not.
   * @param {Uint8Array} fragment
   * @returns {boolean}
   */
  function isKeyFragment(fragment) {
    const u32 = (/** @type {number} */ i) =>
      (((fragment[i] ?? 0) << 24) | ((fragment[i + 1] ?? 0) << 16) | ((fragment[i + 2] ?? 0) << 8) | (fragment[i + 3] ?? 0)) >>> 0;
    const type = (/** @type {number} */ i) => String.fromCharCode(...fragment.subarray(i + 4, i + 8));
    /** The boxes inside [start, end): their offsets. @param {number} start @param {number} end */
    const children = (start, end) => {
      const found = [];
      for (let at = start; at + 8 <= end;) {
        const size = u32(at);
        if (size < 8 || at + size > end) break;
        found.push(at);
        at += size;
      }
      return found;
    };
    for (const moof of children(0, fragment.length).filter((at) => type(at) === 'moof')) {
      for (const traf of children(moof + 8, moof + u32(moof)).filter((at) => type(at) === 'traf')) {
        const boxes = children(traf + 8, traf + u32(traf));
        const tfhd = boxes.find((at) => type(at) === 'tfhd');
        const trun = boxes.find((at) => type(at) === 'trun');
        if (tfhd === undefined || trun === undefined || u32(tfhd + 12) !== 1) continue;
        const flags = u32(trun + 8) & 0xffffff;
        let position = trun + 16; // after the size, type, version/flags and sample_count
        if (flags & 0x1) position += 4; // data_offset
        /** @type {number|null} */ let sampleFlags = null;
        if (flags & 0x4) sampleFlags = u32(position); // first_sample_flags
        else {
          if (flags & 0x100) position += 4; // sample_duration
          if (flags & 0x200) position += 4; // sample_size
          if (flags & 0x400) sampleFlags = u32(position);
        }
        return sampleFlags === null || (sampleFlags & 0x10000) === 0; // sample_is_non_sync_sample
      }
    }
    return false;
  }

  /**
   * Where a box's type (4 ASCII letters) first appears, or -1.
   * @param {Uint8Array} bytes @param {string} type
   */
  function indexOfBox(bytes, type) {
    const codes = [...type].map((c) => c.charCodeAt(0));
    for (let i = 0; i + 4 <= bytes.length; i++) {
      if (bytes[i] === codes[0] && bytes[i + 1] === codes[1] && bytes[i + 2] === codes[2] && bytes[i + 3] === codes[3]) return i;
    }
    return -1;
  }

  /**
   * Plays one stream's fMP4 segments on a video element through a MediaSource: appends them in
   * order (queued while the SourceBuffer is busy, bounded: an overflow skips to the next
   * keyframe), keeps the playhead near the live edge and removes what has long been played.
   */
  class MediaSourcePlayer {
    /** segments skipped because the queue overflowed */
    skipped = 0;
    /** segments appended */
    appended = 0;
    /** @type {string|null} the codecs of the SourceBuffer (`avc1.…,opus`), once opened */
    codecs = null;
    /** @type {HTMLVideoElement} */ #video;
    /** @type {MediaSource} */ #mediaSource;
    /** @type {string} */ #url;
    /** @type {SourceBuffer|null} */ #buffer = null;
    /** @type {import('./websocket-manager.js').MediaSegment[]} */ #queue = [];
    #waitingForKeyframe = false;
    #closed = false;
    #announced = false;
    /** @type {() => void} */ #onPlaying;
    /** @type {(message: string) => void} */ #onError;
    /** @type {() => void} */ #onAudioRefused;
    /** @type {((type: string) => boolean)|null} */ #isTypeSupported;
    /** the browser refused the init's audio: wait for a video-only init */
    #audioRefused = false;

    /**
     * @param {HTMLVideoElement} video
     * @param {{new (): MediaSource, isTypeSupported?: (type: string) => boolean}} MediaSourceImpl
     * @param {() => void} onPlaying called once, when the first fragment is buffered
     * @param {(message: string) => void} onError the browser refused the media
     * @param {() => void} onAudioRefused the browser takes the init's video but not its audio
     *   (the engine asks the server for video only; a video-only init follows)
     */
    constructor(video, MediaSourceImpl, onPlaying, onError, onAudioRefused) {
      this.#video = video;
      this.#onPlaying = onPlaying;
      this.#onError = onError;
      this.#onAudioRefused = onAudioRefused;
      this.#isTypeSupported = MediaSourceImpl.isTypeSupported ? (type) => /** @type {(type: string) => boolean} */ (MediaSourceImpl.isTypeSupported)(type) : null;
      this.#mediaSource = new MediaSourceImpl();
      this.#url = URL.createObjectURL(this.#mediaSource);
      this.#mediaSource.addEventListener('sourceopen', () => this.#pump(), { once: true });
      video.srcObject = null;
      video.muted = true;
      video.autoplay = true;
      video.playsInline = true;
      video.src = this.#url;
    }

    /** @param {import('./websocket-manager.js').MediaSegment} segment */
    append(segment) {
      if (this.#closed) return;
      if (segment.kind === 'fragment') {
        if (this.#waitingForKeyframe && !isKeyFragment(segment.data)) {
          this.skipped += 1;
          return;
        }
        this.#waitingForKeyframe = false;
      }
      this.#queue.push(segment);
      if (this.#queue.length > MAX_QUEUED_SEGMENTS) {
        // The browser can't keep up: drop what waits (keeping any init) and restart at a keyframe.
        const inits = this.#queue.filter((s) => s.kind === 'init');
        this.skipped += this.#queue.length - inits.length;
        this.#queue = inits.slice(-1);
        this.#waitingForKeyframe = true;
      }
      this.#pump();
    }

    /**
     * Stop, and free the MediaSource.
     * @param {{handedOver?: boolean}} [options] `handedOver`: the video element already plays
     *   something else (a peer connection's stream): leave it alone, so its picture stays
     */
    close({ handedOver = false } = {}) {
      if (this.#closed) return;
      this.#closed = true;
      this.#queue = [];
      try {
        if (this.#mediaSource.readyState === 'open') this.#mediaSource.endOfStream();
      } catch (_) {
        /* already ended */
      }
      if (this.#video.src === this.#url) {
        this.#video.removeAttribute('src');
        if (!handedOver) this.#video.load(); // srcObject, when set, took over by itself
      }
      URL.revokeObjectURL(this.#url);
    }

    #pump() {
      if (this.#closed || this.#mediaSource.readyState !== 'open') return;
      const buffer = this.#buffer;
      if (buffer && buffer.updating) return;
      const segment = this.#queue.shift();
      if (!segment) {
        this.#trim();
        return;
      }
      try {
        if (!buffer) {
          if (segment.kind !== 'init') return; // the session always starts with its init
          const opened = this.#open(segment.data);
          if (!opened) {
            this.#pump(); // an init with audio the browser refused: wait for a video-only one
            return;
          }
          this.#buffer = opened;
        }
        /** @type {SourceBuffer} */ (this.#buffer).appendBuffer(/** @type {Uint8Array<ArrayBuffer>} */ (segment.data));
        if (segment.kind === 'fragment') this.appended += 1;
      } catch (error) {
        this.#fail(`the browser refused the video: ${/** @type {Error} */ (error).message}`);
      }
    }

    /**
     * The SourceBuffer for the init's tracks; null when the browser refuses its audio (the
     * engine then asks for video only).
     * @param {Uint8Array} init @returns {SourceBuffer|null}
     */
    #open(init) {
      const codec = codecOfInit(init);
      if (!codec) throw new Error('init segment without an H.264 track');
      const audio = audioCodecOfInit(init);
      if (audio && this.#audioRefused) return null; // still the old session's
      const codecs = audio ? `${codec},${audio}` : codec;
      const supported = this.#isTypeSupported;
      if (audio && supported && !supported(`video/mp4; codecs="${codecs}"`) && supported(`video/mp4; codecs="${codec}"`)) {
        this.#audioRefused = true;
        this.#onAudioRefused();
        return null;
      }
      const buffer = this.#mediaSource.addSourceBuffer(`video/mp4; codecs="${codecs}"`);
      this.codecs = codecs;
      buffer.mode = 'segments';
      buffer.addEventListener('updateend', () => this.#updated());
      buffer.addEventListener('error', () => this.#fail('the browser could not decode the video'));
      return buffer;
    }

    #updated() {
      if (this.#closed) return;
      const video = this.#video;
      const ranges = video.buffered;
      if (ranges.length) {
        const start = ranges.start(0);
        const end = ranges.end(ranges.length - 1);
        if (video.currentTime < start || end - video.currentTime > LIVE_LAG_MAX_S) {
          video.currentTime = Math.max(start, end - LIVE_JUMP_TO_S);
        }
        if (!this.#announced && this.appended > 0) {
          this.#announced = true;
          const played = video.play();
          if (played && played.catch) played.catch(() => { /* autoplay refused: the page shows controls */ });
          this.#onPlaying();
        }
      }
      this.#pump();
    }

    /** Remove media played long ago, so the SourceBuffer stays small. */
    #trim() {
      const buffer = this.#buffer;
      const ranges = this.#video.buffered;
      if (!buffer || buffer.updating || !ranges.length) return;
      const cut = this.#video.currentTime - BUFFER_KEPT_S;
      if (cut - ranges.start(0) > BUFFER_KEPT_S / 2) buffer.remove(0, cut);
    }

    /** @param {string} message */
    #fail(message) {
      if (this.#closed) return;
      this.close();
      this.#onError(message);
    }
  }

  /**
   * What webrtc-engine.js builds on, from websocket-manager.js: loaded first by the page, or
   * required here under Node (the unit tests).
   * @returns {typeof import('./websocket-manager.js')}
   */
  function managerScript() {
    const { WebSocketManager, MediaStreamEmitter } = root;
    if (WebSocketManager && MediaStreamEmitter) {
      return { WebSocketManager, MediaStreamEmitter, backoffDelay: WebSocketManager.backoffDelay };
    }
    if (typeof module === 'object' && module.exports) return require('./websocket-manager.js');
    throw new Error('Load websocket-manager.js before webrtc-engine.js');
  }

  /**
   * @param {unknown} error what a negotiation threw or rejected with
   * @returns {Failure}
   */
  function asFailure(error) {
    return error instanceof Error ? error : new Error(String(error));
  }


  /**
   * One negotiation at a time for a page's shared peer connection (glare between tiles added
   * at once can't happen: the page is the only offerer and offers one after the other).
   * Requests made while a negotiation runs are coalesced into one more run after it: that
   * offer carries every transceiver added meanwhile. Pure logic, no WebRTC (unit tested).
   */
  class NegotiationQueue {
    /** @type {() => Promise<void>} */ #run;
    #running = false;
    /** @type {{resolve: () => void, reject: (error: unknown) => void}[]} waiting for the next run */
    #waiting = [];
    /** runs so far (tests and metrics) */
    runs = 0;

    /** @param {() => Promise<void>} run one negotiation */
    constructor(run) {
      this.#run = run;
    }

    /** Whether a negotiation is running. */
    get busy() {
      return this.#running;
    }

    /**
     * Negotiate again: now, or after the one running (requests made meanwhile share one run).
     * @returns {Promise<void>} settles with the run that started after this request
     */
    request() {
      /** @type {Promise<void>} */
      const done = new Promise((resolve, reject) => this.#waiting.push({ resolve, reject }));
      if (!this.#running) this.#loop();
      return done;
    }

    async #loop() {
      this.#running = true;
      try {
        while (this.#waiting.length) {
          const batch = this.#waiting.splice(0);
          this.runs += 1;
          try {
            await this.#run();
            for (const waiter of batch) waiter.resolve();
          } catch (error) {
            for (const waiter of batch) waiter.reject(error);
          }
        }
      } finally {
        this.#running = false;
      }
    }
  }

  /**
   * What a stream of a shared peer connection hears from it.
   * @typedef {object} SharedMemberHandlers
   * @property {(event: RTCTrackEvent) => void} onTrack its media arrived
   * @property {(text: string, code: string|undefined) => void} onError the server reported an
   *   error about this stream, after it was added
   * @property {(payload: unknown) => void} onState the server's state message for this stream
   * @property {(pc: RTCPeerConnection) => void} onPeerState the connection's state changed
   * @property {(reason: string) => void} onFailed the whole connection is gone (failed, or the
   *   socket reconnected): negotiate again (a new shared connection is made)
   */
  /**
   * One stream in a shared peer connection.
   * @typedef {object} SharedMember
   * @property {string} streamId
   * @property {RTCRtpTransceiver} transceiver its own receiving transceiver
   * @property {RTCRtpReceiver} receiver
   * @property {Promise<void>} ready resolves once an answer that added it is applied
   * @property {() => void} remove stops its transceiver and renegotiates (idempotent)
   */

  /**
   * Offer H.264 only (and its retransmissions) on a shared connection's transceiver: the
   * server sends nothing else, and every codec Chromium offers by default makes each m-line
   * ~5 KB, 16 of them more than a signaling message may carry (limits.max_message_bytes).
   * @param {RTCRtpTransceiver} transceiver
   */
  function preferH264(transceiver) {
    const Receiver = root.RTCRtpReceiver;
    const capabilities = Receiver && Receiver.getCapabilities ? Receiver.getCapabilities('video') : null;
    if (!capabilities || typeof transceiver.setCodecPreferences !== 'function') return;
    const h264 = capabilities.codecs.filter((c) => /^video\/(h264|rtx)$/i.test(c.mimeType));
    // Baseline/constrained baseline with packetization-mode 1 first: what cameras send.
    const rank = (/** @type {RTCRtpCodec} */ c) => (/^video\/rtx$/i.test(c.mimeType) ? 2 : /packetization-mode=1/.test(c.sdpFmtpLine || '') && /profile-level-id=42/.test(c.sdpFmtpLine || '') ? 0 : 1);
    const kept = h264.filter((c) => rank(c) !== 1 || !h264.some((o) => rank(o) === 0)).sort((a, b) => rank(a) - rank(b));
    if (kept.some((c) => /h264/i.test(c.mimeType))) transceiver.setCodecPreferences(kept);
  }

  let sharedPeerCounter = 0;
  /** @type {WeakMap<SignalingChannel, SharedPeerConnection>} the page's shared connection, per socket */
  const sharedPeers = new WeakMap();

  /**
   * Every stream of the page in one RTCPeerConnection (BUNDLE: one ICE and DTLS handshake),
   * opt-in with `WebSocketManager.configure({ peerConnection: 'shared' })`. Streams are added
   * and removed by renegotiation over the page's socket, the page always the offerer
   * (docs/protocol.md, "One peer connection per page"): a transceiver per stream; removing
   * one stops its transceiver (Chromium recycles its m-line later). Negotiations run one at a
   * time (NegotiationQueue); after each answer is applied the page says `applied`, and only
   * then does the server start sending the streams it added (a keyframe sent earlier is lost).
   */
  class SharedPeerConnection {
    /** @type {string} the connection's id on the wire (the envelope's streamId) */ id;
    /** @type {RTCPeerConnection} */ pc;
    /** @type {SignalingChannel} */ #manager;
    /** @type {Map<string, SharedMember & {handlers: SharedMemberHandlers, settled: boolean, resolve: () => void, reject: (e: Failure) => void}>} */
    #members = new Map();
    #queue = new NegotiationQueue(() => this.#negotiate());
    /** @type {{resolve: (sdp: string) => void, reject: (e: Failure) => void, timer: unknown}|null} */ #pendingAnswer = null;
    /** @type {() => void} */ #unregister;
    /** @type {Timers} */ #timers;
    #answerTimeout;
    #closed = false;

    /**
     * The page's shared connection on `manager`'s socket, made on first use.
     * @param {SignalingChannel} manager
     * @param {{RTCPeerConnection: {new (c: RTCConfiguration): RTCPeerConnection}, configuration: RTCConfiguration, timers: Timers, answerTimeout: number}} options
     */
    static of(manager, options) {
      let shared = sharedPeers.get(manager);
      if (!shared || shared.#closed) {
        shared = new SharedPeerConnection(manager, options);
        sharedPeers.set(manager, shared);
      }
      return shared;
    }

    /**
     * The page's shared connection on `manager`'s socket, if one is open (diagnostics, tests).
     * @param {SignalingChannel} manager
     * @returns {SharedPeerConnection|null}
     */
    static current(manager) {
      const shared = sharedPeers.get(manager);
      return shared && !shared.#closed ? shared : null;
    }

    /**
     * @param {SignalingChannel} manager
     * @param {{RTCPeerConnection: {new (c: RTCConfiguration): RTCPeerConnection}, configuration: RTCConfiguration, timers: Timers, answerTimeout: number}} options
     */
    constructor(manager, options) {
      this.#manager = manager;
      this.#timers = options.timers;
      this.#answerTimeout = options.answerTimeout;
      this.id = `~${manager.instanceId || 'p'}-pc${++sharedPeerCounter}`;
      const pc = new options.RTCPeerConnection({ ...options.configuration, bundlePolicy: 'max-bundle' });
      this.pc = pc;
      // The anchor: the first m-line, inactive and never removed. Stopping the first m-line
      // (the BUNDLE tag) makes Chromium gather a new transport, which aiortc can't follow.
      preferH264(pc.addTransceiver('video', { direction: 'inactive' }));
      pc.ontrack = (event) => {
        for (const member of this.#members.values()) {
          if (member.transceiver === event.transceiver) member.handlers.onTrack(event);
        }
      };
      pc.onicecandidate = (event) => {
        const c = event.candidate;
        if (this.#closed) return;
        this.#manager.send('ice', this.id, c
          ? { candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex }
          : { candidate: '', sdpMid: null, sdpMLineIndex: 0 });
      };
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === 'failed') {
          this.#fail('the shared peer connection failed');
          return;
        }
        // Only streams whose answer is applied: the others hear it once they are (#negotiate).
        for (const member of [...this.#members.values()]) if (member.settled) member.handlers.onPeerState(pc);
      };
      this.#unregister = manager.registerStream(this.id, {
        answer: (/** @type {unknown} */ sdp) => this.#onAnswer(String(sdp)),
        error: (/** @type {unknown} */ text, /** @type {Message & {stream?: string}} */ raw) => this.#onError(String(text), raw),
        state: (/** @type {unknown} */ payload) => {
          const stream = typeof payload === 'object' && payload !== null && 'stream' in payload ? payload.stream : null;
          const member = typeof stream === 'string' ? this.#members.get(stream) : undefined;
          if (member) member.handlers.onState(payload);
        },
        onReconnect: () => this.#fail('signaling socket reconnected'),
      });
    }

    /** Streams in the connection now. */
    get size() {
      return this.#members.size;
    }

    /** Negotiations so far. */
    get negotiations() {
      return this.#queue.runs;
    }

    /**
     * Add a stream: a receiving transceiver of its own, and a renegotiation.
     * @param {string} streamId
     * @param {SharedMemberHandlers} handlers
     * @returns {SharedMember}
     */
    add(streamId, handlers) {
      if (this.#closed) throw new Error('this shared peer connection is closed');
      this.#members.get(streamId)?.remove(); // one tile per stream and page
      const transceiver = this.pc.addTransceiver('video', { direction: 'recvonly' });
      preferH264(transceiver);
      /** @type {(() => void)|null} */ let resolve = null;
      /** @type {((e: Failure) => void)|null} */ let reject = null;
      /** @type {Promise<void>} */
      const ready = new Promise((res, rej) => { resolve = res; reject = rej; });
      ready.catch(() => { /* the engine awaits it; unhandled only once it was removed */ });
      const member = {
        streamId, transceiver, receiver: transceiver.receiver, handlers, ready, settled: false,
        resolve: /** @type {() => void} */ (/** @type {unknown} */ (resolve)),
        reject: /** @type {(e: Failure) => void} */ (/** @type {unknown} */ (reject)),
        remove: () => this.#remove(member),
      };
      this.#members.set(streamId, member);
      this.#queue.request().then(() => {
        if (!member.settled && this.#members.get(streamId) === member) {
          member.settled = true;
          member.resolve();
        }
      }, (/** @type {unknown} */ error) => this.#settleFailed(member, asFailure(error)));
      return member;
    }

    /** @param {SharedMember & {settled: boolean, reject: (e: Failure) => void}} member */
    #remove(member) {
      if (this.#members.get(member.streamId) !== member) return;
      this.#members.delete(member.streamId);
      this.#settleFailed(member, Object.assign(new Error('removed'), { superseded: true }));
      if (this.#closed) return;
      try {
        member.transceiver.stop();
      } catch (_) {
        /* the connection closed */
      }
      if (this.#members.size === 0) {
        this.close();
        return;
      }
      this.#queue.request().catch(() => { /* reported by #negotiate */ });
    }

    /** @param {{settled: boolean, reject: (e: Failure) => void}} member @param {Failure} error */
    #settleFailed(member, error) {
      if (member.settled) return;
      member.settled = true;
      member.reject(error);
    }

    /** Close the connection and end it on the server. Idempotent. */
    close() {
      if (this.#closed) return;
      this.#closed = true;
      this.#rejectAnswer(Object.assign(new Error('the shared peer connection closed'), { superseded: true }));
      this.pc.ontrack = this.pc.onicecandidate = this.pc.onconnectionstatechange = null;
      try {
        this.pc.close();
      } catch (_) {
        /* already closed */
      }
      this.#unregister(); // a `close` for the connection: the server ends its streams
      if (sharedPeers.get(this.#manager) === this) sharedPeers.delete(this.#manager);
    }

    /** The whole connection is lost: every stream negotiates again on a new one. @param {string} reason */
    #fail(reason) {
      if (this.#closed) return;
      const members = [...this.#members.values()];
      this.#members.clear();
      this.close();
      for (const member of members) {
        if (!member.settled) this.#settleFailed(member, Object.assign(new Error(reason), { recoverable: true }));
        else member.handlers.onFailed(reason);
      }
    }

    async #negotiate() {
      if (this.#closed || this.#members.size === 0) return;
      const pc = this.pc;
      try {
        const offer = await pc.createOffer();
        await pc.setLocalDescription(offer);
        /** @type {Record<string, string>} */
        const streams = {};
        for (const member of this.#members.values()) {
          if (member.transceiver.mid !== null) streams[member.transceiver.mid] = member.streamId;
        }
        const answer = this.#waitForAnswer();
        const sdp = pc.localDescription ? pc.localDescription.sdp : offer.sdp;
        this.#manager.send('offer', this.id, { type: 'offer', sdp, streams });
        const answerSdp = await answer;
        if (this.#closed) return;
        await pc.setRemoteDescription({ type: 'answer', sdp: answerSdp });
        this.#manager.send('applied', this.id, {});
      } catch (rejection) {
        const error = asFailure(rejection);
        if (!this.#closed && !error.superseded) this.#fail(`renegotiation failed: ${error.message}`);
        throw error;
      }
    }

    /** @returns {Promise<string>} */
    #waitForAnswer() {
      return new Promise((resolve, reject) => {
        const timer = this.#timers.setTimeout(() => {
          this.#pendingAnswer = null;
          reject(Object.assign(new Error(`No answer from the server within ${this.#answerTimeout} ms`), { code: 'answer_timeout' }));
        }, this.#answerTimeout);
        this.#pendingAnswer = { resolve, reject, timer };
      });
    }

    /** @param {string} sdp */
    #onAnswer(sdp) {
      const pending = this.#pendingAnswer;
      if (!pending) return;
      this.#pendingAnswer = null;
      this.#timers.clearTimeout(pending.timer);
      pending.resolve(sdp);
    }

    /** @param {Failure} error */
    #rejectAnswer(error) {
      const pending = this.#pendingAnswer;
      if (!pending) return;
      this.#pendingAnswer = null;
      this.#timers.clearTimeout(pending.timer);
      pending.reject(error);
    }

    /** @param {string} text @param {Message & {stream?: string}} raw */
    #onError(text, raw) {
      const code = raw && raw.code;
      const member = raw && typeof raw.stream === 'string' ? this.#members.get(raw.stream) : undefined;
      if (member) {
        const recoverable = !(code && FATAL_CODES.has(code));
        if (!member.settled) this.#settleFailed(member, Object.assign(new Error(text), { code, recoverable }));
        else member.handlers.onError(text, code);
        return;
      }
      if (raw && typeof raw.stream === 'string') return; // a stream removed meanwhile
      if (code === 'invalid_candidate' || code === 'too_many_candidates') return; // one candidate lost
      this.#rejectAnswer(Object.assign(new Error(text), { code }));
      this.#fail(text);
    }
  }

  class WebRTCEngine {
    /** @type {string} */ streamId;
    /** @type {HTMLVideoElement|null} */ videoElement;
    /** @type {RTCPeerConnection|null} */ pc = null;

    /** @type {SignalingChannel} the page's shared socket, through the engine's seam */
    #manager;
    /** @type {Timers} */ #timers;
    /** @type {EngineOptions} */ #options;
    /** @type {EngineState} */ #state = 'idle';
    /** @type {string|null} the detail of the last state event */ #stateDetail = null;
    /** @type {InstanceType<typeof import('./websocket-manager.js').MediaStreamEmitter<EngineEvents>>} */ #events;
    /** @type {(attempt: number) => number} the shared retry schedule (ms before retry n) */ #backoffDelay;
    /** @type {string|null} */ #sessionId = null;
    /** @type {{resolve: (sdp: string) => void, reject: (e: Failure) => void, timer: unknown}|null} */
    #pendingAnswer = null;
    /** @type {(() => void)[]} */ #cleanups = [];
    /** @type {unknown} the timers' id */ #statsTimer = null;
    /** @type {unknown} the timers' id */ #retryTimer = null;
    /** @type {unknown} the timers' id */ #disconnectedTimer = null;
    #retries = 0;
    #connectStartedAt = 0;
    /** @type {number|null} */ #firstFrameAt = null;
    /** @type {{at: number, bytes: number, frames: number}|null} */ #lastSample = null;
    /** @type {EngineStats|null} */ #lastStats = null;
    #serverState = '';
    #announcedConnected = false;
    /** @type {(() => void)|null} unregisters our handlers from the manager (only ours) */
    #unregister = null;
    /** @type {MediaStream|null} what the video element plays: this negotiation's tracks */
    #mediaStream = null;
    /** @type {MediaSourcePlayer|null} the fallback's player, while the stream plays over the socket */
    #fallback = null;
    /** @type {unknown} the timers' id */ #fallbackTimer = null;
    /** @type {string} the quality asked for: a name, or 'auto' */ #requestedQuality = 'auto';
    /** @type {QualityInfo|null} what the server last said plays */ #qualityInfo = null;
    /** @type {Tile|null} the tile last told to the server */ #toldTile = null;
    /** whether the element is on screen (IntersectionObserver) */ #onScreen = true;
    /** @type {unknown} the timers' id */ #tileTimer = null;
    /** whether the tile changed again since its last report (told when the timer ends) */ #tileDirty = false;
    /** @type {QualityInfo|null} a background attempt's quality, told once it takes over */ #heldQuality = null;
    /** @type {unknown} the timers' id: the next background attempt to go back to WebRTC */
    #webrtcRetryTimer = null;
    /** @type {unknown} the timers' id: polls a background attempt for its first decoded frame */
    #firstFrameWatch = null;
    /** background attempts to go back to WebRTC since the fallback started playing */
    #webrtcAttempts = 0;
    /** @type {SharedMember|null} this stream in the page's shared peer connection, if shared */
    #member = null;
    /** @type {'shared'|'per-stream'} the manager's choice when connect() was called */
    #peerConnectionMode = 'per-stream';

    /** @param {EngineOptions} options */
    constructor(options) {
      if (!options || typeof options.streamId !== 'string' || !options.streamId) {
        throw new TypeError('WebRTCEngine needs a streamId');
      }
      const { WebSocketManager, MediaStreamEmitter, backoffDelay } = managerScript();
      this.#options = options;
      this.streamId = options.streamId;
      this.videoElement = options.videoElement || null;
      this.#manager = options.manager || WebSocketManager.getInstance();
      this.#events = new MediaStreamEmitter((event, error) => {
        console.error('[MediaStream]', `${this.streamId}: "${event}" listener failed:`, error);
      });
      this.#backoffDelay = backoffDelay;
      this.#requestedQuality = options.quality || 'auto';
      this.#timers = options.timers || {
        setTimeout: (callback, ms) => setTimeout(callback, ms),
        clearTimeout: (id) => clearTimeout(/** @type {number|undefined} */ (id)),
        setInterval: (callback, ms) => setInterval(callback, ms),
        clearInterval: (id) => clearInterval(/** @type {number|undefined} */ (id)),
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

    /** @returns {'webrtc'|'fallback'} how the video arrives: a peer connection, or the socket */
    get transport() {
      return this.#fallback ? 'fallback' : 'webrtc';
    }

    /**
     * The fallback, while the stream plays over the socket: segments appended and skipped, the
     * SourceBuffer's codecs (`avc1.…,opus` with audio), and the background attempts to go back
     * to WebRTC so far.
     * @returns {{appended: number, skipped: number, codecs: string|null, webrtcAttempts: number}|null}
     */
    getFallbackStats() {
      const player = this.#fallback;
      if (!player) return null;
      return { appended: player.appended, skipped: player.skipped, codecs: player.codecs, webrtcAttempts: this.#webrtcAttempts };
    }

    /** @returns {EngineStats|null} the latest stats */
    getStats() {
      return this.#lastStats;
    }

    /**
     * Listen to one of the engine's events (see EngineEvents for what each callback receives).
     * @template {keyof EngineEvents} K
     * @param {K} event connected, disconnected, error, stats, state, track
     * @param {(data: EngineEvents[K]) => void} callback
     * @returns {() => void} removes the listener
     */
    on(event, callback) {
      return this.#events.on(event, callback);
    }

    /**
     * @template {keyof EngineEvents} K
     * @param {K} event
     * @param {(data: EngineEvents[K]) => void} callback
     */
    off(event, callback) {
      this.#events.off(event, callback);
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
      this.#peerConnectionMode = this.#manager.peerConnection === 'shared' ? 'shared' : 'per-stream';
      // On a shared peer connection the stream's messages come through the connection's id.
      if (!this.#shared) this.#unregister = this.#manager.registerStream(this.streamId, {
        answer: (/** @type {unknown} */ sdp, /** @type {Message} */ raw) => this.#onAnswer(sdp, raw),
        error: (/** @type {unknown} */ text, /** @type {Message} */ raw) => this.#onServerError(text, raw),
        state: (/** @type {unknown} */ payload, /** @type {Message} */ raw) => this.#onServerState(payload, raw),
        quality: (/** @type {unknown} */ payload, /** @type {Message} */ raw) => this.#onServerQuality(payload, raw),
        onMedia: (segment) => this.#fallback?.append(segment),
        onReconnect: () => this.#renegotiate('signaling socket reconnected', 0),
      });
      this.#cleanups.push(
        this.#manager.on('disconnected', (info) => {
          if (info && info.willReconnect && this.#state !== 'closed') {
            this.#setState('reconnecting', 'signaling socket lost');
          }
        }),
      );
      this.#trackTile();
      const options = this.#options;
      const url = options.serverUrl || options.wsUrl || options.signalingUrl || options.url;
      try {
        await this.#manager.connect({ url, token: options.token });
        await this.#negotiate();
      } catch (error) {
        const err = asFailure(error);
        // Superseded: a newer negotiation (or the fallback) took over and reports for itself.
        if (this.#state === 'closed' || err.superseded) return;
        const recoverable = err.recoverable !== false;
        this.#emit('error', { streamId: this.streamId, message: err.message, code: err.code, recoverable });
        if (recoverable && this.#autoReconnect) {
          this.#scheduleRetry(err.message);
        } else {
          if (this.#member) this.#closePeer(); // its m-line goes: the shared connection renegotiates
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
     * Change when the engine plays over the socket, and act on it now: 'always' switches to the
     * fallback (and stops trying WebRTC in the background); 'never' or 'auto' go back to
     * WebRTC: a fallback that plays keeps its picture while WebRTC is tried in the background
     * (it ends once the new peer connection shows a frame, or the attempts go on with backoff);
     * one that does not play yet is left for a new offer at once ('auto' falls back again if
     * WebRTC still can't connect).
     * @param {'auto'|'always'|'never'} mode
     */
    setFallback(mode) {
      const previous = this.#options.fallback ?? 'auto';
      this.#options = { ...this.#options, fallback: mode };
      if (this.#state === 'idle' || this.#state === 'closed') return;
      const playing = this.#fallback && this.#fallback.appended > 0;
      if (mode === 'always' && !this.#fallback) this.#renegotiate('fallback asked by the page', 0);
      else if (mode === 'always' && this.pc) this.#abandonWebRTCAttempt('the page asked for the fallback');
      else if (mode !== 'always' && playing) {
        // The picture stays until the new peer connection has one of its own.
        this.#webrtcAttempts = 0;
        if (!this.pc) this.#tryWebRTCInBackground();
      } else if (mode !== 'always' && (this.#fallback || previous === 'always')) this.#renegotiate('WebRTC asked by the page', 0);
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
      this.#stopFallback();
      const unregister = this.#unregister;
      this.#unregister = null;
      if (unregister) unregister(); // ends the session on the server, unless another engine took over the id
      if (this.videoElement) {
        this.videoElement.srcObject = null;
      }
      this.#setState('closed');
      this.#emit('disconnected', { streamId: this.streamId });
    }

    // --- negotiation ---------------------------------------------------------------------

    /**
     * A new peer connection and offer. In the background (`background`, while the fallback
     * plays), the fallback keeps the video element and the state until the new connection has
     * decoded a frame (see #promoteWebRTCAttempt).
     * @param {boolean} [background]
     */
    async #negotiate(background = false) {
      this.#closePeer();
      if (this.#shared) {
        await this.#negotiateShared();
        return;
      }
      if (!background) {
        if (this.#options.fallback === 'always') {
          this.#startFallback('asked by the page');
          return;
        }
        this.#stopFallback(); // trying WebRTC (again) in the foreground: the picture goes
        this.#announcedConnected = false;
      }
      this.#mediaStream = null;
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
        type: 'offer', sdp: offer.sdp, streamId: this.streamId, sessionId, ...this.#qualityFields(),
      });
      if (this.#fallbackAllowed || background) {
        const wait = this.#options.fallbackAfterMs ?? FALLBACK_AFTER_MS;
        this.#fallbackTimer = this.#timers.setTimeout(() => {
          this.#fallbackTimer = null;
          if (this.pc !== pc) return;
          if (background) this.#abandonWebRTCAttempt(`no picture over WebRTC within ${wait / 1000} s`);
          else if (pc.connectionState !== 'connected') this.#startFallback(`WebRTC did not connect within ${wait / 1000} s`);
        }, wait);
      }
      const sdp = await answer;
      if (this.pc !== pc) return; // replaced or closed meanwhile
      await pc.setRemoteDescription({ type: 'answer', sdp });
      this.#startStats();
      if (background) this.#watchForFirstFrame(pc);
    }

    /** Whether this engine's stream goes in the page's shared peer connection (fixed at connect()). */
    get #shared() {
      return this.#peerConnectionMode === 'shared';
    }

    /** Join the page's shared peer connection; resolves once the answer that added us is applied. */
    async #negotiateShared() {
      this.#announcedConnected = false;
      this.#mediaStream = null;
      this.#lastSample = null;
      // The socket may have closed meanwhile: a failed shared connection was the manager's
      // last registered stream (connect() reuses an open socket).
      const options = this.#options;
      await this.#manager.connect({ url: options.serverUrl || options.wsUrl || options.signalingUrl || options.url, token: options.token });
      if (!this.#options.iceServers && this.#manager.whenWelcomed) await this.#manager.whenWelcomed();
      if (this.#state === 'closed') return; // disconnected meanwhile
      const shared = SharedPeerConnection.of(this.#manager, {
        RTCPeerConnection: this.#options.RTCPeerConnection || root.RTCPeerConnection,
        configuration: {
          iceServers: this.#options.iceServers || this.#manager.serverInfo?.iceServers || [],
          iceTransportPolicy: this.#options.iceTransportPolicy || 'all',
        },
        timers: this.#timers,
        answerTimeout: this.#options.answerTimeout ?? 15000,
      });
      const member = shared.add(this.streamId, {
        onTrack: (event) => { if (this.#member === member) this.#attach(event); },
        onError: (text, code) => {
          if (this.#member === member) this.#onServerError(text, { type: 'error', streamId: this.streamId, code });
        },
        onState: (payload) => { if (this.#member === member) this.#onServerState(payload, { type: 'state', streamId: this.streamId }); },
        onPeerState: (pc) => { if (this.#member === member) this.#onPeerState(pc); },
        onFailed: (reason) => {
          if (this.#member !== member) return;
          this.#member = null;
          this.pc = null;
          this.#renegotiate(reason, this.#retryDelay());
        },
      });
      this.#member = member;
      this.pc = shared.pc;
      await member.ready;
      if (this.#member !== member) return;
      this.#startStats();
      // Joined a connection that is up already: no state change will say so.
      if (shared.pc.connectionState === 'connected') this.#onPeerState(shared.pc);
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

    /** @param {Failure} error */
    #rejectPendingAnswer(error) {
      const pending = this.#pendingAnswer;
      if (!pending) return;
      this.#pendingAnswer = null;
      this.#timers.clearTimeout(pending.timer);
      pending.reject(Object.assign(error, { recoverable: true, superseded: true }));
    }

    /** @param {unknown} sdp the answer's SDP @param {Message} raw */
    #onAnswer(sdp, raw) {
      if (raw && raw.sessionId && raw.sessionId !== this.#sessionId) return; // an old session's
      const pending = this.#pendingAnswer;
      if (!pending) return;
      this.#pendingAnswer = null;
      this.#timers.clearTimeout(pending.timer);
      pending.resolve(String(sdp));
    }

    /** @param {unknown} text the error's human-readable message @param {Message} raw */
    #onServerError(text, raw) {
      if (raw && raw.sessionId && raw.sessionId !== this.#sessionId) return;
      const code = raw && raw.code;
      if (code === 'negotiation_in_progress') return; // our earlier offer is still being answered
      if (this.#fallback && this.pc && raw && raw.sessionId) {
        // The background attempt's session failed; the fallback plays on.
        if (this.#pendingAnswer) this.#rejectPendingAnswer(new Error(String(text)));
        this.#abandonWebRTCAttempt(String(text));
        return;
      }
      if (code === 'unknown_quality' && this.#onUnknownQuality(String(text))) return;
      const recoverable = !(code && FATAL_CODES.has(code));
      const error = Object.assign(new Error(String(text)), { code, recoverable });
      const pending = this.#pendingAnswer;
      if (pending) {
        this.#pendingAnswer = null;
        this.#timers.clearTimeout(pending.timer);
        pending.reject(error); // connect() or the renegotiation reports it
        return;
      }
      if (code === 'invalid_candidate' || code === 'too_many_candidates') return; // one candidate lost
      if (code && UNREACHABLE_CODES.has(code) && this.pc && !this.#announcedConnected && this.#fallbackAllowed) {
        this.#startFallback(String(text));
        return;
      }
      this.#emit('error', { streamId: this.streamId, message: String(text), code, recoverable });
      if (recoverable && this.#autoReconnect) {
        this.#scheduleRetry(String(text));
      } else {
        this.#closePeer();
        this.#setState('error', String(text));
      }
    }

    /**
     * The server has no quality of the name asked for. A `quality` message's refusal leaves
     * whatever plays as it was (the engine goes back to asking what the server still plays);
     * an offer's or a fallback's would fail again with the same name: no retry.
     * @param {string} text
     * @returns {boolean} whether it was handled here (else: an offer's, handled as a fatal error)
     */
    #onUnknownQuality(text) {
      if (this.#pendingAnswer) {
        this.#requestedQuality = 'auto'; // connect() (or the page, after reconnect()) starts over on auto
        return false;
      }
      const fallbackRefused = this.#fallback && this.#fallback.appended === 0;
      this.#requestedQuality = this.#qualityInfo ? this.#qualityInfo.requested : 'auto';
      this.#emit('error', { streamId: this.streamId, message: text, code: 'unknown_quality', recoverable: false });
      if (fallbackRefused) {
        this.#stopFallback();
        this.#setState('error', text);
      }
      return true;
    }

    /** @param {unknown} payload `{state, detail}` (docs/protocol.md) @param {Message} raw */
    #onServerState(payload, raw) {
      if (raw && raw.sessionId && raw.sessionId !== this.#sessionId) return;
      const fields = typeof payload === 'object' && payload !== null ? payload : {};
      const serverState = 'state' in fields && typeof fields.state === 'string' ? fields.state : '';
      this.#serverState = serverState;
      const detail = 'detail' in fields && typeof fields.detail === 'string' ? fields.detail : '';
      if (this.#fallback && raw && raw.sessionId) return; // a background attempt's: the fallback reports
      if (serverState === 'reconnecting') this.#setState('reconnecting', detail || 'camera reconnecting');
      else if (serverState === 'offline') this.#setState('offline', detail || 'camera offline');
      else if (serverState === 'live' && this.pc && this.pc.connectionState === 'connected') this.#setState('live');
      else if (serverState === 'live' && this.#fallback && this.#fallback.appended > 0) this.#setState('live', 'fallback');
    }

    /** @param {RTCPeerConnection} pc */
    #onPeerState(pc) {
      if (this.pc !== pc) return;
      const state = pc.connectionState;
      if (this.#fallback) {
        // A background attempt: it only takes over once it shows a frame.
        if (state === 'failed' || state === 'closed') this.#abandonWebRTCAttempt('the peer connection failed to connect');
        return;
      }
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
      } else if (state === 'failed' && !this.#announcedConnected && this.#fallbackAllowed) {
        this.#startFallback('the peer connection failed to connect');
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
      this.#negotiate().catch((/** @type {unknown} */ rejection) => {
        const error = asFailure(rejection);
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
        // The manager renegotiates every registered stream on reconnect; on a shared connection
        // the stream is not registered itself, so it goes ahead (the offer waits in the queue).
        if (!this.#manager.isConnected() && !this.#shared) return;
        this.#renegotiate(reason, 0);
      }, delay);
    }

    #retryDelay() {
      return this.#backoffDelay(this.#retries++);
    }

    get #autoReconnect() {
      return this.#options.autoReconnect !== false;
    }

    // --- fallback: video over the socket ------------------------------------------------------

    get #fallbackAllowed() {
      const mode = this.#options.fallback ?? 'auto';
      if (this.#shared) return false; // not on a shared peer connection (yet)
      return mode !== 'never' && this.#mediaSourceImpl !== null && this.videoElement !== null;
    }

    /** @returns {{new (): MediaSource, isTypeSupported?: (type: string) => boolean}|null} */
    get #mediaSourceImpl() {
      return this.#options.MediaSource || root.MediaSource || null;
    }

    /** @param {string} reason */
    #startFallback(reason) {
      const MediaSourceImpl = this.#mediaSourceImpl;
      const video = this.videoElement;
      if (this.#state === 'closed' || !MediaSourceImpl || !video) return;
      this.#clearFallbackTimer();
      this.#rejectPendingAnswer(new Error('falling back to video over the socket'));
      this.#closePeer();
      this.#stopFallback();
      this.#mediaStream = null;
      this.#sessionId = null;
      const player = new MediaSourcePlayer(
        video,
        MediaSourceImpl,
        () => {
          if (this.#fallback !== player) return;
          this.#setState('live', 'fallback');
          if (!this.#announcedConnected) {
            this.#announcedConnected = true;
            this.#emit('connected', { streamId: this.streamId });
          }
          this.#webrtcAttempts = 0;
          this.#scheduleWebRTCAttempt();
        },
        (message) => {
          if (this.#fallback !== player) return;
          this.#fallback = null;
          this.#closePeer(); // a background attempt, if one runs, goes with it
          this.#emit('error', { streamId: this.streamId, message, code: 'fallback_failed', recoverable: false });
          this.#setState('error', message);
        },
        () => {
          if (this.#fallback !== player) return;
          this.#manager.send('fallback', this.streamId, { audio: [], ...this.#qualityFields() });
        },
      );
      this.#fallback = player;
      this.#announcedConnected = false;
      this.#setState('connecting', `video over the socket: ${reason}`);
      // The quality asked for and the tile, as an offer says them: a wall's tile starts on sub.
      const audio = this.#fallbackAudioCodecs(MediaSourceImpl);
      this.#manager.send('fallback', this.streamId, audio.length ? { audio, ...this.#qualityFields() } : this.#qualityFields());
    }

    /**
     * The audio codecs to ask the server for: none unless the page wants audio, else those the
     * browser's Media Source Extensions take beside H.264.
     * @param {{isTypeSupported?: (type: string) => boolean}} MediaSourceImpl
     * @returns {string[]}
     */
    #fallbackAudioCodecs(MediaSourceImpl) {
      if (!this.#options.audio || !MediaSourceImpl.isTypeSupported) return [];
      const supported = /** @type {(type: string) => boolean} */ (MediaSourceImpl.isTypeSupported);
      return FALLBACK_AUDIO_CODECS.filter((codec) => supported(`video/mp4; codecs="${PROBE_VIDEO_CODEC},${codec}"`));
    }

    #stopFallback() {
      const player = this.#fallback;
      this.#fallback = null;
      if (this.#webrtcRetryTimer) this.#timers.clearTimeout(this.#webrtcRetryTimer);
      this.#webrtcRetryTimer = null;
      if (player) player.close();
    }

    // --- going back to WebRTC while the fallback plays -----------------------------------------

    /** The next background attempt, after the backoff (none with fallback 'always'). */
    #scheduleWebRTCAttempt() {
      const first = this.#options.webrtcRetryMs ?? WEBRTC_RETRY_MS;
      if (!first || this.#options.fallback === 'always' || !this.#fallback || this.#state === 'closed') return;
      const cap = Math.max(first, this.#options.webrtcRetryMaxMs ?? WEBRTC_RETRY_MAX_MS);
      const delay = Math.min(first * 2 ** Math.min(this.#webrtcAttempts, 30), cap);
      if (this.#webrtcRetryTimer) this.#timers.clearTimeout(this.#webrtcRetryTimer);
      this.#webrtcRetryTimer = this.#timers.setTimeout(() => {
        this.#webrtcRetryTimer = null;
        this.#tryWebRTCInBackground();
      }, delay);
    }

    #tryWebRTCInBackground() {
      if (!this.#fallback || this.#state === 'closed' || this.pc) return;
      if (!this.#manager.isConnected()) {
        this.#scheduleWebRTCAttempt(); // the manager renegotiates everything on reconnect
        return;
      }
      this.#webrtcAttempts += 1;
      this.#negotiate(true).catch((/** @type {unknown} */ rejection) => {
        const error = asFailure(rejection);
        if (this.#state === 'closed' || error.superseded) return;
        this.#abandonWebRTCAttempt(error.message);
      });
    }

    /** @param {RTCPeerConnection} pc a background attempt whose answer is applied */
    #watchForFirstFrame(pc) {
      if (this.#firstFrameWatch) this.#timers.clearInterval(this.#firstFrameWatch);
      this.#firstFrameWatch = this.#timers.setInterval(() => {
        if (this.pc !== pc || !this.#fallback) return;
        pc.getStats().then((report) => {
          for (const stat of report.values()) {
            if (stat.type === 'inbound-rtp' && (stat.kind || stat.mediaType) === 'video' && stat.framesDecoded > 0) {
              this.#promoteWebRTCAttempt(pc);
              return;
            }
          }
        }).catch(() => { /* closed between two polls */ });
      }, FIRST_FRAME_POLL_MS);
    }

    /**
     * The background attempt decoded a frame: the video element switches to it (the fallback's
     * picture stayed until now), the server ends the fallback, the state is live again.
     * @param {RTCPeerConnection} pc
     */
    #promoteWebRTCAttempt(pc) {
      const player = this.#fallback;
      const stream = this.#mediaStream;
      if (this.pc !== pc || !player || !stream) return;
      this.#stopFirstFrameWatch();
      this.#clearFallbackTimer();
      this.#fallback = null;
      const video = this.videoElement;
      if (video) {
        video.srcObject = stream; // before the MediaSource goes: no empty frame between
        const played = video.play();
        if (played && played.catch) played.catch(() => { /* autoplay refused: the page shows controls */ });
      }
      player.close({ handedOver: true });
      this.#manager.send('close', this.streamId, { fallback: true });
      this.#webrtcAttempts = 0;
      this.#retries = 0;
      if (this.#serverState !== 'reconnecting' && this.#serverState !== 'offline') this.#setState('live');
      const held = this.#heldQuality;
      this.#heldQuality = null;
      if (held) {
        this.#qualityInfo = held;
        this.#emit('quality', held);
      }
    }

    /**
     * A background attempt failed (or the page no longer wants it): the fallback plays on and
     * the next attempt waits longer.
     * @param {string} reason
     */
    #abandonWebRTCAttempt(reason) {
      if (!this.#fallback) return;
      this.#clearFallbackTimer();
      this.#rejectPendingAnswer(new Error(`background attempt to go back to WebRTC abandoned: ${reason}`));
      this.#closePeer();
      this.#mediaStream = null;
      this.#sessionId = null;
      this.#heldQuality = null;
      this.#scheduleWebRTCAttempt();
    }

    #stopFirstFrameWatch() {
      if (this.#firstFrameWatch) this.#timers.clearInterval(this.#firstFrameWatch);
      this.#firstFrameWatch = null;
    }

    #clearFallbackTimer() {
      if (this.#fallbackTimer) this.#timers.clearTimeout(this.#fallbackTimer);
      this.#fallbackTimer = null;
    }

    // --- quality: which of the stream's qualities plays (per tile) ---------------------------

    /** @returns {string|null} the quality playing now, as the server last said (null before) */
    get quality() {
      return this.#qualityInfo ? this.#qualityInfo.quality : null;
    }

    /** @returns {string} the quality asked for: a name, or 'auto' */
    get requestedQuality() {
      return this.#requestedQuality;
    }

    /** @returns {QualityInfo|null} the server's last word on the quality playing */
    getQuality() {
      return this.#qualityInfo;
    }

    /**
     * Play one quality ('main', 'sub'…, as the stream names them), or let the server choose
     * from the element's size and visibility and the network ('auto'). Takes effect on the
     * same peer connection (no new offer), or on the fallback over the socket (a new init
     * segment in the same video element); the `quality` event says when it plays. A name the
     * server refuses (`unknown_quality`) is an `error` event; what plays goes on.
     * @param {string} quality
     * @throws {RangeError} a name the stream doesn't have, once the server has listed its qualities
     */
    setQuality(quality) {
      if (typeof quality !== 'string' || !quality) throw new TypeError('setQuality needs a quality name or "auto"');
      const names = this.#qualityInfo ? this.#qualityInfo.qualities.map((q) => q.name) : [];
      if (quality !== 'auto' && names.length && !names.includes(quality)) {
        throw new RangeError(`setQuality: stream "${this.streamId}" has no quality "${quality}"; it has ${names.join(', ')} (or "auto")`);
      }
      this.#requestedQuality = quality;
      if (this.#hasQualitySession) this.#manager.send('quality', this.streamId, this.#withSessionId(this.#qualityFields()));
    }

    /**
     * Whether a session on the server takes `quality` messages: a WebRTC session (answered
     * or being answered), or the fallback (which follows them too while WebRTC is retried
     * beside it: one message, the server hands it to both).
     */
    get #hasQualitySession() {
      return Boolean((this.pc && this.#sessionId) || this.#fallback);
    }

    /**
     * @template {object} T
     * @param {T} fields @returns {T & {sessionId?: string}} with the WebRTC session's id, if one runs
     */
    #withSessionId(fields) {
      return this.pc && this.#sessionId ? { ...fields, sessionId: this.#sessionId } : fields;
    }

    /** @returns {{quality: string, tile?: Tile}} what an offer or a `quality` message says */
    #qualityFields() {
      const tile = this.#measureTile();
      if (tile) this.#toldTile = tile;
      return tile ? { quality: this.#requestedQuality, tile } : { quality: this.#requestedQuality };
    }

    /** @returns {Tile|null} the element's rendered size in device pixels, and its visibility */
    #measureTile() {
      const video = this.videoElement;
      if (!video || typeof video.getBoundingClientRect !== 'function') return null;
      const rect = video.getBoundingClientRect();
      const ratio = root.devicePixelRatio || 1;
      const pageVisible = typeof document === 'undefined' || document.visibilityState !== 'hidden';
      return {
        width: Math.round(rect.width * ratio),
        height: Math.round(rect.height * ratio),
        visible: this.#onScreen && pageVisible && rect.width > 0 && rect.height > 0,
      };
    }

    /** Follow the element's size and visibility while connected; the cleanups stop it. */
    #trackTile() {
      const video = this.videoElement;
      if (!video) return;
      const report = () => this.#scheduleTileReport();
      const Resize = this.#options.ResizeObserver || root.ResizeObserver;
      if (Resize) {
        const resize = new Resize(report);
        resize.observe(video);
        this.#cleanups.push(() => resize.disconnect());
      }
      const Intersection = this.#options.IntersectionObserver || root.IntersectionObserver;
      if (Intersection) {
        const intersection = new Intersection((entries) => {
          const last = entries[entries.length - 1];
          if (last) this.#onScreen = last.isIntersecting;
          report();
        });
        intersection.observe(video);
        this.#cleanups.push(() => intersection.disconnect());
      }
      if (typeof document !== 'undefined' && document.addEventListener) {
        document.addEventListener('visibilitychange', report);
        this.#cleanups.push(() => document.removeEventListener('visibilitychange', report));
      }
      this.#cleanups.push(() => {
        if (this.#tileTimer) this.#timers.clearTimeout(this.#tileTimer);
        this.#tileTimer = null;
      });
    }

    /**
     * Tell a change at once (a tile made full screen wants main now), then at most once per
     * delay while it keeps changing (a drag, an animation), the last size always told.
     */
    #scheduleTileReport() {
      if (this.#tileTimer) {
        this.#tileDirty = true;
        return;
      }
      this.#reportTile();
      this.#tileDirty = false;
      this.#tileTimer = this.#timers.setTimeout(() => {
        this.#tileTimer = null;
        if (this.#tileDirty) this.#scheduleTileReport();
      }, this.#options.tileReportDelayMs ?? TILE_REPORT_DELAY_MS);
    }

    /** Tell the server the tile, if it changed and a session is up to hear it. */
    #reportTile() {
      const tile = this.#measureTile();
      const told = this.#toldTile;
      if (!tile || !this.#hasQualitySession) return;
      if (told && told.width === tile.width && told.height === tile.height && told.visible === tile.visible) return;
      this.#toldTile = tile;
      this.#manager.send('quality', this.streamId, this.#withSessionId({ tile }));
    }

    /** @param {unknown} payload `{quality, requested, reason, qualities}` @param {Message} raw */
    #onServerQuality(payload, raw) {
      if (raw && raw.sessionId && raw.sessionId !== this.#sessionId) return;
      if (typeof payload !== 'object' || payload === null) return;
      const fields = /** @type {{quality?: unknown, requested?: unknown, reason?: unknown, qualities?: unknown}} */ (payload);
      if (typeof fields.quality !== 'string') return;
      /** @type {QualityInfo} */
      const info = {
        streamId: this.streamId,
        quality: fields.quality,
        requested: typeof fields.requested === 'string' ? fields.requested : this.#requestedQuality,
        reason: typeof fields.reason === 'string' ? fields.reason : '',
        qualities: Array.isArray(fields.qualities) ? fields.qualities : [],
      };
      if (this.#fallback && raw && raw.sessionId) {
        // A background attempt's: the fallback's picture shows until it takes over.
        this.#heldQuality = info;
        return;
      }
      this.#qualityInfo = info;
      this.#emit('quality', info);
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
      if (this.#fallback) {
        // A background attempt: the fallback keeps the element until this stream has a frame.
      } else if (video) {
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
      // Chrome, Safari and Firefox 132+ tell when a frame is painted; older ones only when loaded.
      if (typeof video.requestVideoFrameCallback === 'function') {
        video.requestVideoFrameCallback(mark);
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
      // On a shared connection only this stream's receiver: the connection has every stream's.
      const report = await (this.#member ? this.#member.receiver.getStats() : pc.getStats());
      /** @type {RTCInboundRtpStreamStats|null} */ let inbound = null;
      for (const stat of report.values()) {
        // `mediaType`: the name of `kind` in older browsers.
        if (stat.type === 'inbound-rtp' && (stat.kind || stat.mediaType) === 'video') inbound = stat;
      }
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
          ? Math.round(((inbound.jitterBufferDelay || 0) / inbound.jitterBufferEmittedCount) * 1000)
          : null,
        state: this.#state,
      };
      this.#lastSample = { at, bytes, frames };
      this.#lastStats = stats;
      // A background attempt's numbers are not what the page shows yet (the fallback is).
      if (this.pc === pc && !this.#fallback) this.#emit('stats', stats);
    }

    // --- plumbing --------------------------------------------------------------------------

    #now() {
      if (this.#timers.now) return this.#timers.now();
      return typeof performance !== 'undefined' ? performance.now() : Date.now();
    }

    #closePeer() {
      const pc = this.pc;
      this.pc = null;
      this.#stopFirstFrameWatch();
      if (this.#statsTimer) {
        this.#timers.clearInterval(this.#statsTimer);
        this.#statsTimer = null;
      }
      const member = this.#member;
      this.#member = null;
      if (member) {
        member.remove(); // the shared connection renegotiates without it (or closes, if last)
        return;
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
      for (const timer of [this.#retryTimer, this.#disconnectedTimer, this.#fallbackTimer, this.#webrtcRetryTimer]) if (timer) this.#timers.clearTimeout(timer);
      this.#retryTimer = this.#disconnectedTimer = this.#fallbackTimer = this.#webrtcRetryTimer = null;
      this.#stopFirstFrameWatch();
      if (this.#statsTimer) this.#timers.clearInterval(this.#statsTimer);
      this.#statsTimer = null;
    }

    /** @param {EngineState} state @param {string} [detail] */
    #setState(state, detail) {
      const previous = this.#state;
      // live (fallback) → live is a change a page shows, though the state stays 'live'
      if (previous === state && !detail && !this.#stateDetail) return;
      this.#state = state;
      this.#stateDetail = detail || null;
      this.#emit('state', { streamId: this.streamId, state, previous, detail: detail || null });
    }

    /**
     * @template {keyof EngineEvents} K
     * @param {K} event
     * @param {EngineEvents[K]} data
     */
    #emit(event, data) {
      this.#events.emit(event, data);
    }
  }

  root.WebRTCEngine = WebRTCEngine;
  root.SharedPeerConnection = SharedPeerConnection;
  if (typeof module === 'object' && module.exports) {
    module.exports = { WebRTCEngine, SharedPeerConnection, NegotiationQueue, codecOfInit, audioCodecOfInit, isKeyFragment };
  }
})(typeof window !== 'undefined' ? window : globalThis);
