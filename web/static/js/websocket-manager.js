// @ts-check
/**
 * MediaStream — the page's one signaling socket, shared by every stream on the page.
 *
 * Load it before webrtc-engine.js:
 *   <script src="/static/js/websocket-manager.js"></script>
 *   <script src="/static/js/webrtc-engine.js"></script>
 *
 * Every stream registers its handlers under its streamId; incoming messages are routed by
 * streamId, then by type. Messages for a stream nobody registered are logged, never thrown.
 * The protocol is documented in docs/protocol.md.
 *
 * One socket per browser: where the browser has SharedWorker and Web Locks (and unless
 * `configure({ shared: false })`), the socket lives in a shared worker
 * (shared-socket-worker.js, beside this script) and every tab of the origin signals through it;
 * the peer connections stay in each tab. The page's API is the same either way; `getMetrics()`
 * says which it is (`shared`). docs/architecture.md, "The browser's one socket", has the design.
 *
 * No build step, no dependencies: a plain script that defines `WebSocketManager` on the page
 * (and exports it under Node for the unit tests). It also defines what webrtc-engine.js builds
 * on, so that pages still load exactly these two scripts: `MediaStreamEmitter`, the one event
 * emitter of both, and `WebSocketManager.backoffDelay`, the one retry schedule of both.
 */
/** @typedef {'debug'|'info'|'warn'|'error'|'silent'} LogLevel */
/**
 * One protocol message (docs/protocol.md), as sent and as received. The payload's shape
 * depends on the type, so it stays `unknown` until the code that knows the type reads it.
 * @typedef {{type: string, streamId: string|null, payload?: unknown, code?: string, sessionId?: string}} Message
 */
/**
 * One handler of a stream's messages: the message's payload, then the whole message. The
 * payload is `any` here on purpose: its shape depends on the message type (docs/protocol.md),
 * so each handler declares the shape it expects (`unknown` if it checks for itself).
 * @typedef {(payload: any, raw: Message) => void} StreamHandler
 */
/**
 * Handlers of one stream. Each key is a message type (`answer`, `ice`, `state`, `error`) or
 * its `on`-prefixed form (`onAnswer`…); `onReconnect` (or `reconnect`) is called after the
 * socket came back, so the stream can negotiate again; `onMedia` takes the stream's binary
 * messages (video over the socket, when the stream asked for the `fallback`).
 * @typedef {{[type: string]: StreamHandler | undefined}
 *   & {onReconnect?: (info: {streamId: string}) => void, reconnect?: (info: {streamId: string}) => void,
 *      onMedia?: (segment: MediaSegment) => void}} StreamHandlers
 */
/**
 * One binary message of the fallback (docs/protocol.md, "Video over the socket"): an fMP4 init
 * segment or media fragment for one stream.
 * @typedef {{kind: 'init'|'fragment', streamId: string, data: Uint8Array}} MediaSegment
 */
/**
 * What the server says first on every socket (`welcome`): the ICE servers to use, TURN
 * credentials included.
 * @typedef {{server?: string, version?: string, connectionId?: string, iceServers?: RTCIceServer[]}} ServerInfo
 */
/**
 * The page-wide events of WebSocketManager (`manager.on(name, callback)`), with what each
 * callback receives.
 * @typedef {object} ManagerEvents
 * @property {{url: string, reconnected: boolean}} connected the socket is open
 * @property {{code: number, reason: string, willReconnect: boolean}} disconnected the socket closed
 * @property {{attempt: number, delay: number}} reconnecting the next attempt starts in `delay` ms
 * @property {{streams: number}} reconnected the socket is back; every stream renegotiates
 * @property {ServerInfo} welcome the server's `welcome` arrived
 * @property {Message} message any message arrived (before it is routed)
 * @property {{message: string, url?: string, code?: string}} error the socket failed, or the server reported an error for no stream
 * @property {Message} unknownStream a message arrived for a stream nobody registered
 * @property {{streamId: string, streams: number}} streamRegistered
 * @property {{streamId: string, streams: number}} streamUnregistered
 */
/**
 * Timer functions and a millisecond clock (tests inject a fake clock).
 * @typedef {object} Clock
 * @property {(callback: () => void, ms: number) => unknown} setTimeout
 * @property {(id: unknown) => void} clearTimeout
 * @property {() => number} now
 */
/**
 * @typedef {object} ManagerOptions
 * @property {string} [url] signaling URL; default: the page's own origin + /ws (ws: or wss:)
 * @property {string} [token] sent as the `token` query parameter (browsers can't set headers)
 * @property {LogLevel} [logLevel]
 * @property {number} [pingInterval] ms between latency pings while connected (default 10000)
 * @property {number} [maxQueue] messages kept while disconnected (default 1000)
 * @property {{new (url: string): WebSocket}} [WebSocket] WebSocket implementation (tests inject a fake)
 * @property {Clock} [clock]
 * @property {() => number} [random] a source of numbers in [0, 1), for the jitter
 * @property {boolean} [shared] signal through the browser's one socket, held by a shared worker
 *   (default: wherever the browser has SharedWorker and Web Locks); false: this page's own socket.
 *   Takes effect at the next connect() after a disconnect. `?mediastreamShared=0` on the page's
 *   URL (or `localStorage.mediastreamShared = '0'`) sets it without code.
 * @property {string} [workerUrl] the shared worker's script (default: shared-socket-worker.js
 *   beside this script, with this script's `?v=` version)
 * @property {SharedSocketPlatform['SharedWorker']} [SharedWorker] implementation (tests inject a fake)
 * @property {LockManager} [locks] Web Locks (tests inject a fake)
 */
/**
 * @typedef {{SharedWorker: {new (url: string, options: {name: string}): {port: MessagePort, onerror: ((event: ErrorEvent) => void)|null}},
 *   locks: LockManager}} SharedSocketPlatform
 */
/**
 * What a tab tells the shared worker (shared-socket-worker.js), one message per postMessage.
 * `hello` comes first: the tab holds the Web Lock `lock` for its lifetime, and the worker ends
 * the tab's sessions when it gets that lock (the tab is gone: closed, crashed or discarded).
 * @typedef {{op: 'hello', tabId: string, lock: string, protocol: number}
 *   | {op: 'connect', requestId: number, url: string, token: string|null, streams: string[],
 *      settings: LaneSettings}
 *   | {op: 'configure', url: string, token: string|null}
 *   | {op: 'register', streamId: string}
 *   | {op: 'unregister', streamId: string}
 *   | {op: 'send', messages: Message[]}
 *   | {op: 'disconnect'}} TabToWorker
 */
/**
 * What the shared worker tells a tab. `event` carries the socket's page-wide events (and the
 * tab's `connected`/`reconnecting` as the worker sees them); `message`/`media` are the tab's
 * streams' messages; `reconnect` asks a stream to negotiate again.
 * @typedef {{op: 'ready', protocol: number, workerLock: string}
 *   | {op: 'connected', requestId: number}
 *   | {op: 'connectFailed', requestId: number, message: string}
 *   | {op: 'event', name: 'connected'|'disconnected'|'reconnecting'|'reconnected'|'error', data: any,
 *      connected: boolean, reconnecting: boolean}
 *   | {op: 'welcome', serverInfo: ServerInfo}
 *   | {op: 'message', message: Message}
 *   | {op: 'media', segment: MediaSegment}
 *   | {op: 'reconnect', streamId: string}
 *   | {op: 'metrics', metrics: SharedSocketMetrics}} WorkerToTab
 */
/**
 * The settings of a socket the worker opens for a tab (its first tab's; later tabs share it).
 * @typedef {{logLevel: LogLevel, pingInterval: number, maxQueue: number}} LaneSettings
 */
/**
 * The browser's sockets as the shared worker counts them, for one tab's `getMetrics()`.
 * @typedef {{messagesSent: number, messagesReceived: number, averageLatency: number|null,
 *   connectedAt: number|null, sockets: number, tabs: number}} SharedSocketMetrics
 */
/**
 * What `getMetrics()` returns: the write-up's five figures, then whether the socket is the
 * browser's shared one, how many sockets carry this page's streams, and how many tabs share them.
 * @typedef {{messagesSent: number, messagesReceived: number, averageLatency: number|null,
 *   uptime: number, streamsActive: number, shared: boolean, sockets: number, tabs: number}} ManagerMetrics
 */

(function (root) {
  'use strict';

  const LEVELS = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 };
  /** Messages that must not wait behind routine ones (negotiation in flight). */
  const URGENT_TYPES = new Set(['offer', 'ice', 'close', 'fallback']);
  const BACKOFF_BASE_MS = 1000;
  const BACKOFF_CAP_MS = 30000;
  const BACKOFF_JITTER = 0.2; // up to +20 % of the delay, so pages don't retry in lockstep
  const OPEN = 1;
  const MEDIA_FRAMING_VERSION = 1;
  /** @type {{[kind: number]: 'init'|'fragment'}} */
  const MEDIA_KINDS = { 1: 'init', 2: 'fragment' };

  /**
   * Read one binary message: `version << 4 | kind` (1 byte), the stream id's length (2 bytes,
   * big endian), the stream id (UTF-8), then the fMP4 payload.
   * @param {ArrayBuffer|Uint8Array} buffer
   * @returns {MediaSegment}
   * @throws {Error} naming what is wrong with the message
   */
  function parseMediaMessage(buffer) {
    const bytes = buffer instanceof Uint8Array ? buffer : new Uint8Array(buffer);
    if (bytes.length < 3) throw new Error(`binary message of ${bytes.length} bytes is shorter than its header`);
    const [head = 0, high = 0, low = 0] = bytes;
    const version = head >> 4;
    if (version !== MEDIA_FRAMING_VERSION) throw new Error(`binary framing version ${version}; expected ${MEDIA_FRAMING_VERSION}`);
    const kind = MEDIA_KINDS[head & 0x0f];
    if (!kind) throw new Error(`binary message of unknown kind ${head & 0x0f}`);
    const length = (high << 8) | low;
    if (3 + length > bytes.length) throw new Error(`stream id of ${length} bytes overruns the message`);
    const streamId = new TextDecoder().decode(bytes.subarray(3, 3 + length));
    return { kind, streamId, data: bytes.subarray(3 + length) };
  }

  /**
   * The delay before retry number `attempt` (0-based): min(1000·2^attempt, 30000) ms, plus up to
   * 20 % jitter. The one retry schedule of the browser side: the manager's reconnects and each
   * engine's renegotiations (as `WebSocketManager.backoffDelay`).
   * @param {number} attempt
   * @param {() => number} [random] a source of numbers in [0, 1)
   * @returns {number} milliseconds
   */
  function backoffDelay(attempt, random = Math.random) {
    const base = Math.min(BACKOFF_BASE_MS * 2 ** attempt, BACKOFF_CAP_MS);
    return Math.round(base * (1 + BACKOFF_JITTER * random()));
  }

  /**
   * Listeners by event name: the one event emitter of the browser side (the manager's page-wide
   * events and each engine's). A listener that throws is reported to `onListenerError` and
   * doesn't keep the others, or the code that emitted, from running.
   * @template {object} Events event name → what its listeners receive
   */
  class MediaStreamEmitter {
    /**
     * The listeners of each event. `any`: one map holds the listeners of every event, each
     * typed by `on()` for its own event's data.
     * @type {Map<string, Set<(data: any) => void>>}
     */
    listeners = new Map();
    /** @type {(event: string, error: unknown) => void} */ #onListenerError;

    /** @param {(event: string, error: unknown) => void} onListenerError told when a listener throws */
    constructor(onListenerError) {
      this.#onListenerError = onListenerError;
    }

    /**
     * @template {keyof Events & string} K
     * @param {K} event
     * @param {(data: Events[K]) => void} callback
     * @returns {() => void} removes the listener
     */
    on(event, callback) {
      let set = this.listeners.get(event);
      if (!set) this.listeners.set(event, (set = new Set()));
      set.add(callback);
      return () => this.off(event, callback);
    }

    /**
     * @template {keyof Events & string} K
     * @param {K} event
     * @param {(data: Events[K]) => void} callback
     */
    off(event, callback) {
      this.listeners.get(event)?.delete(callback);
    }

    /**
     * Call every listener of `event` with `data`, each in turn; listeners added or removed
     * meanwhile take effect from the next emit.
     * @template {keyof Events & string} K
     * @param {K} event
     * @param {Events[K]} data
     */
    emit(event, data) {
      for (const callback of [...(this.listeners.get(event) || [])]) {
        try {
          callback(data);
        } catch (error) {
          this.#onListenerError(event, error);
        }
      }
    }
  }

  /**
   * @param {unknown} value
   * @returns {value is {[key: string]: unknown}}
   */
  function isObject(value) {
    return typeof value === 'object' && value !== null;
  }

  /**
   * Whether a decoded frame has a message's shape: an object with a string `type` (the rest is
   * checked where it is read).
   * @param {unknown} value
   * @returns {value is Message}
   */
  function isMessage(value) {
    return isObject(value) && typeof value.type === 'string';
  }

  /** @type {WebSocketManager|null} */
  let instance = null;

  /**
   * Whether to share the browser's socket, chosen on the page itself: `?mediastreamShared=0`
   * (or 1) in its URL, or `localStorage.mediastreamShared = '0'` — to rule the shared worker in
   * or out while debugging, with no code change. Null when neither says.
   * @returns {boolean|null}
   */
  function storedSharedOption() {
    try {
      const fromUrl = root.location && new URLSearchParams(root.location.search).get('mediastreamShared');
      const value = fromUrl || (root.localStorage && root.localStorage.getItem('mediastreamShared'));
      return value === '0' || value === 'false' ? false : value === '1' || value === 'true' ? true : null;
    } catch (_) {
      return null;
    }
  }

  /** The tab ↔ worker message format's version: a worker of another version is not used. */
  const SHARED_PROTOCOL = 1;
  /** A SharedWorker is found by script URL and name: the protocol version keeps versions apart. */
  const WORKER_NAME = `mediastream-signaling-v${SHARED_PROTOCOL}`;
  const WORKER_READY_TIMEOUT_MS = 5000;
  /**
   * This script's own URL, `?v=` version included (the server versions every /static URL a
   * page names), read while the script runs: the worker script is beside it, same version.
   */
  const OWN_SCRIPT_URL = (() => {
    const script = root.document ? root.document.currentScript : null;
    return typeof HTMLScriptElement !== 'undefined' && script instanceof HTMLScriptElement ? script.src : null;
  })();

  /**
   * What a page needs to share the browser's socket (tests inject fakes): SharedWorker and Web
   * Locks, or null where the browser lacks either (and inside the worker itself).
   * @param {ManagerOptions} options
   * @returns {SharedSocketPlatform|null}
   */
  function sharingPlatform(options) {
    const SharedWorkerImpl = options.SharedWorker || root.SharedWorker;
    const locks = options.locks || (root.navigator ? root.navigator.locks : undefined);
    return typeof SharedWorkerImpl === 'function' && locks ? { SharedWorker: SharedWorkerImpl, locks } : null;
  }

  /** A short random id (manager instances, tabs, worker locks). */
  function randomId() {
    return Math.random().toString(36).slice(2, 10);
  }

  /**
   * A tab's link to the shared worker that holds the browser's socket. The tab holds a Web Lock
   * for its lifetime and names it in its `hello`: the worker waits for that lock, and gets it
   * when the tab is gone (closed, crashed, discarded, navigated away) — a worker can't see a
   * port close. The other way round, the worker holds its own lock for its lifetime, and the tab
   * waits for it to learn that the worker died.
   */
  class SharedSocketLink {
    tabId = randomId();
    /** @type {MessagePort|null} */ #port = null;
    #workerUrl;
    /** @type {SharedSocketPlatform} */ #platform;
    /** @type {(message: WorkerToTab) => void} */ #onMessage;
    /** @type {() => void} */ #onLost;
    /** @type {(() => void)|null} lets go of the tab's lock */ #releaseTabLock = null;
    #closed = false;

    /**
     * @param {SharedSocketPlatform} platform
     * @param {string} workerUrl
     * @param {(message: WorkerToTab) => void} onMessage every message of the worker after `ready`
     * @param {() => void} onLost the worker is gone
     */
    constructor(platform, workerUrl, onMessage, onLost) {
      this.#platform = platform;
      this.#workerUrl = workerUrl;
      this.#onMessage = onMessage;
      this.#onLost = onLost;
    }

    /**
     * Take the tab's lock, start the worker (or join the running one) and wait for its `ready`.
     * @returns {Promise<void>}
     * @throws {Error} the worker can't be started, doesn't answer, or speaks another version
     */
    async open() {
      const { locks, SharedWorker: SharedWorkerImpl } = this.#platform;
      const lock = `mediastream-tab-${this.tabId}`;
      await new Promise((held, failed) => {
        locks
          .request(lock, () => new Promise((release) => {
            this.#releaseTabLock = () => release(undefined);
            held(undefined);
          }))
          .catch(failed);
      });
      const worker = new SharedWorkerImpl(this.#workerUrl, { name: WORKER_NAME });
      const port = worker.port;
      this.#port = port;
      /** @type {WorkerToTab} */
      const ready = await new Promise((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`the shared worker ${this.#workerUrl} did not answer within ${WORKER_READY_TIMEOUT_MS} ms`)),
          WORKER_READY_TIMEOUT_MS,
        );
        worker.onerror = () => {
          clearTimeout(timer);
          reject(new Error(`the shared worker ${this.#workerUrl} failed to start`));
        };
        let answered = false;
        port.onmessage = (event) => {
          if (answered) {
            this.#onMessage(event.data);
            return;
          }
          answered = true;
          clearTimeout(timer);
          resolve(event.data);
        };
        this.post({ op: 'hello', tabId: this.tabId, lock, protocol: SHARED_PROTOCOL });
      });
      if (ready.op !== 'ready' || ready.protocol !== SHARED_PROTOCOL) {
        throw new Error(`the shared worker speaks protocol ${'protocol' in ready ? ready.protocol : '?'}; this page ${SHARED_PROTOCOL}`);
      }
      locks
        .request(ready.workerLock, () => {
          if (!this.#closed) this.#onLost();
        })
        .catch(() => { /* the page is going away */ });
    }

    /** @param {TabToWorker} message */
    post(message) {
      if (this.#port && !this.#closed) this.#port.postMessage(message);
    }

    /** Leave the worker: the tab's lock goes (the worker ends what is left of the tab's sessions). */
    close() {
      if (this.#closed) return;
      this.#closed = true;
      if (this.#releaseTabLock) this.#releaseTabLock();
      if (this.#port) {
        this.#port.onmessage = null;
        this.#port.close();
      }
    }
  }

  /**
   * A log level chosen on the page itself: `?mediastreamLog=debug` in its URL, or
   * `localStorage.mediastreamLog = 'debug'` — so debugging needs no code change.
   * @returns {LogLevel|null}
   */
  function storedLogLevel() {
    try {
      const fromUrl = root.location && new URLSearchParams(root.location.search).get('mediastreamLog');
      const level = fromUrl || (root.localStorage && root.localStorage.getItem('mediastreamLog'));
      return level && level in LEVELS ? /** @type {LogLevel} */ (level) : null;
    } catch (_) {
      return null;
    }
  }

  class WebSocketManager {
    /** @type {WebSocket|null} the page's one signaling socket */
    ws = null;
    /** @type {Map<string, StreamHandlers>} handlers of each registered stream */
    streamHandlers = new Map();
    /** @type {MediaStreamEmitter<ManagerEvents>} */
    #events = new MediaStreamEmitter((event, error) => this.#log('error', `listener of "${event}" failed:`, error));
    /** page-wide event listeners, by event name (the emitter's own map) */
    globalHandlers = this.#events.listeners;
    /** whether the socket is open */
    connected = false;
    /** whether the socket was lost and is being reopened */
    reconnecting = false;
    /** a short random id, logged, to confirm every stream shares one manager */
    instanceId = Math.random().toString(36).slice(2, 8);
    /** @type {ServerInfo} what the server said in its `welcome` */
    serverInfo = {};
    /** whether this socket's `welcome` (with the ICE servers to use) has arrived */
    welcomed = false;
    /** @type {(() => void)[]} */ #welcomeWaiters = [];

    /** @type {string|undefined} */ #url;
    /** @type {string|undefined} */ #token;
    /** @type {LogLevel} */ #logLevel = 'warn';
    #pingInterval = 10000;
    #maxQueue = 1000;
    /** @type {{new (url: string): WebSocket}} */ #WebSocket;
    /** @type {Clock} */ #clock;
    /** @type {() => number} */ #random;
    /** @type {Promise<void>|null} */ #connecting = null;
    /** @type {((error: Error) => void)|null} rejects the open in progress */ #abortOpen = null;
    /** @type {Message[]} */ #urgent = [];
    /** @type {Message[]} */ #routine = [];
    #wanted = false; // the page wants a socket (not disconnected on purpose)
    #attempt = 0;
    /** @type {unknown} the clock's timer id */ #reconnectTimer = null;
    /** @type {unknown} the clock's timer id */ #pingTimer = null;
    #connectedAt = 0;
    #messagesSent = 0;
    #messagesReceived = 0;
    /** @type {number[]} */ #latencies = [];
    #nextPing = 1;
    /** @type {Map<number, number>} */ #pendingPings = new Map();
    /** @type {boolean|undefined} configure({shared}); undefined: wherever the browser can */ #sharedOption;
    /** @type {SharedSocketPlatform|null} SharedWorker and Web Locks, where the browser has them */ #platform;
    /** @type {string|undefined} */ #workerUrl;
    /** @type {SharedSocketLink|null} the link to the shared worker, once it answered */ #link = null;
    #linkFailed = false; // the shared worker could not be used: this page keeps its own socket
    #usingShared = false; // the current connection goes through the shared worker
    #nextRequest = 1;
    /** @type {Map<number, {resolve: () => void, reject: (error: Error) => void}>} */ #requests = new Map();
    /** @type {SharedSocketMetrics|null} the worker's latest figures */ #sharedMetrics = null;

    /** @param {ManagerOptions} [options] */
    constructor(options = {}) {
      this.#WebSocket = options.WebSocket || root.WebSocket;
      this.#platform = sharingPlatform(options);
      this.#clock = options.clock || {
        setTimeout: (callback, ms) => setTimeout(callback, ms),
        clearTimeout: (id) => clearTimeout(/** @type {number|undefined} */ (id)),
        now: () => Date.now(),
      };
      this.#random = options.random || Math.random;
      this.#logLevel = storedLogLevel() || 'warn';
      this.#sharedOption = storedSharedOption() ?? undefined;
      this.configure(options);
      this.#log('debug', `WebSocketManager instance ${this.instanceId} created`);
    }

    /**
     * The page's one manager, created on first use.
     * @param {ManagerOptions} [options] used on creation; later calls may pass url/token/logLevel
     * @returns {WebSocketManager}
     */
    static getInstance(options) {
      if (!instance) {
        instance = new WebSocketManager(options);
      } else if (options) {
        instance.configure(options);
      }
      return instance;
    }

    /** Forget the page's instance (tests only). */
    static resetInstance() {
      if (instance) instance.disconnect();
      instance = null;
    }

    /**
     * The reconnect delay before attempt `attempt` (0-based): min(1000·2^n, 30000) ms, plus
     * up to 20 % jitter. The engines retry on the same schedule.
     */
    static backoffDelay = backoffDelay;

    /** Read one binary message of the fallback (see `parseMediaMessage`). */
    static parseMediaMessage = parseMediaMessage;

    /** The version of the messages between a tab and the shared worker (shared-socket-worker.js). */
    static sharedProtocol = SHARED_PROTOCOL;

    /** @param {ManagerOptions} options */
    configure(options) {
      if (options.url) this.#url = options.url;
      if (options.token !== undefined) this.#token = options.token;
      if (options.logLevel) this.setLogLevel(options.logLevel);
      if (options.pingInterval !== undefined) this.#pingInterval = options.pingInterval;
      if (options.maxQueue !== undefined) this.#maxQueue = options.maxQueue;
      if (options.shared !== undefined) this.#sharedOption = options.shared;
      if (options.workerUrl) this.#workerUrl = options.workerUrl;
      if (this.#usingShared && this.#link && (options.url || options.token !== undefined)) {
        // A new token (or server) for the streams to come; the worker decides what moves.
        this.#link.post({ op: 'configure', url: this.#baseUrl(), token: this.#token ?? null });
      }
    }

    /** @param {LogLevel} level 'debug' shows the routing; the default 'warn' keeps quiet */
    setLogLevel(level) {
      if (!(level in LEVELS)) throw new Error(`Unknown log level "${level}"`);
      this.#logLevel = level;
    }

    /** @returns {LogLevel} */
    getLogLevel() {
      return this.#logLevel;
    }

    /**
     * Open the socket, or reuse it. Resolves once it is open.
     * @param {{url?: string, token?: string}} [options]
     * @returns {Promise<void>}
     */
    connect(options = {}) {
      this.configure(options);
      this.#wanted = true;
      if (this.connected) {
        this.#log('debug', `instance ${this.instanceId}: reusing the existing socket`);
        return Promise.resolve();
      }
      if (this.#connecting) {
        this.#log('debug', `instance ${this.instanceId}: reusing the socket being opened`);
        return this.#connecting;
      }
      this.#connecting = (this.#wantsShared() ? this.#openShared() : this.#open()).finally(() => {
        this.#connecting = null;
      });
      return this.#connecting;
    }

    /** Close the socket on purpose: no reconnect. Idempotent. */
    disconnect() {
      this.#wanted = false;
      this.reconnecting = false;
      if (this.#usingShared) {
        this.#usingShared = false;
        if (this.#link) this.#link.post({ op: 'disconnect' }); // the worker ends this page's sessions
        this.welcomed = false;
        this.#sharedMetrics = null;
      }
      for (const request of this.#requests.values()) request.reject(new Error('disconnect() called'));
      this.#requests.clear();
      const abortOpen = this.#abortOpen;
      this.#abortOpen = null;
      // An open in progress ends here, not never: its onclose won't run.
      if (abortOpen) abortOpen(Object.assign(new Error('disconnect() called while the socket was opening'), { code: 'aborted' }));
      this.#attempt = 0;
      if (this.#reconnectTimer !== null) {
        this.#clock.clearTimeout(this.#reconnectTimer);
        this.#reconnectTimer = null;
      }
      this.#stopPings();
      const ws = this.ws;
      this.ws = null;
      this.#urgent = [];
      this.#routine = [];
      if (ws) {
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        try {
          ws.close(1000, 'page closed its streams');
        } catch (_) {
          /* already closed */
        }
      }
      if (this.connected) {
        this.connected = false;
        this.#log('info', `instance ${this.instanceId}: socket closed`);
        this.emit('disconnected', { code: 1000, reason: 'disconnect()', willReconnect: false });
      }
    }

    isConnected() {
      return this.connected;
    }

    /**
     * Resolves once the server's `welcome` has arrived on the current socket (it carries the
     * ICE servers, TURN credentials included), or after `timeoutMs` for servers that send
     * none.
     * @param {number} [timeoutMs]
     * @returns {Promise<void>}
     */
    whenWelcomed(timeoutMs = 3000) {
      if (this.welcomed) return Promise.resolve();
      return new Promise((resolve) => {
        const timer = this.#clock.setTimeout(() => finish(), timeoutMs);
        const finish = () => {
          this.#clock.clearTimeout(timer);
          this.#welcomeWaiters = this.#welcomeWaiters.filter((w) => w !== finish);
          resolve();
        };
        this.#welcomeWaiters.push(finish);
      });
    }

    /**
     * Send one message now, or queue it until the socket is open. Offers, ICE candidates and
     * closes go ahead of routine messages.
     * @param {string} type
     * @param {string|null} streamId
     * @param {unknown} [payload] anything JSON can carry
     * @returns {boolean} true if sent now, false if queued
     */
    send(type, streamId, payload) {
      this.#enqueue({ type, streamId, payload });
      return this.#flush() > 0;
    }

    /**
     * Send several messages in one go (urgent ones first).
     * @param {{type: string, streamId?: string|null, payload?: unknown}[]} messages
     * @returns {number} how many went out now
     */
    sendBatch(messages) {
      for (const m of messages) this.#enqueue({ type: m.type, streamId: m.streamId ?? null, payload: m.payload });
      return this.#flush();
    }

    /**
     * Route this stream's messages to `handlers`.
     * @param {string} streamId
     * @param {StreamHandlers} handlers
     * @returns {() => void} unregisters the stream, if these handlers are still its own (a
     *   later registration under the same id is left alone)
     */
    registerStream(streamId, handlers) {
      this.streamHandlers.set(streamId, handlers);
      if (this.#usingShared && this.#link) this.#link.post({ op: 'register', streamId });
      this.#log(
        'debug',
        `instance ${this.instanceId}: stream ${streamId} registered; streams managed: ${this.streamHandlers.size}`,
      );
      this.emit('streamRegistered', { streamId, streams: this.streamHandlers.size });
      return () => {
        if (this.streamHandlers.get(streamId) === handlers) this.unregisterStream(streamId);
      };
    }

    /**
     * Stop routing this stream, and end its session on the server. When the last stream
     * leaves, the socket is closed.
     * @param {string} streamId
     */
    unregisterStream(streamId) {
      if (!this.streamHandlers.delete(streamId)) return;
      if (this.#usingShared && this.#link) this.#link.post({ op: 'unregister', streamId }); // the worker sends the close
      else if (this.connected) this.send('close', streamId);
      this.#log(
        'debug',
        `instance ${this.instanceId}: stream ${streamId} unregistered; streams managed: ${this.streamHandlers.size}`,
      );
      this.emit('streamUnregistered', { streamId, streams: this.streamHandlers.size });
      if (this.streamHandlers.size === 0) {
        this.#log('info', `instance ${this.instanceId}: last stream left, closing the socket`);
        this.disconnect();
      }
    }

    /**
     * Listen to a page-wide event: connected, disconnected, reconnecting, reconnected,
     * welcome, message, error, unknownStream, streamRegistered, streamUnregistered (see
     * ManagerEvents for what each callback receives).
     * @template {keyof ManagerEvents} K
     * @param {K} event
     * @param {(data: ManagerEvents[K]) => void} callback
     * @returns {() => void} removes the listener
     */
    on(event, callback) {
      return this.#events.on(event, callback);
    }

    /**
     * @template {keyof ManagerEvents} K
     * @param {K} event
     * @param {(data: ManagerEvents[K]) => void} callback
     */
    off(event, callback) {
      this.#events.off(event, callback);
    }

    /**
     * Call the listeners of `event`; one that throws is logged and the others still run.
     * @template {keyof ManagerEvents} K
     * @param {K} event
     * @param {ManagerEvents[K]} data
     */
    emit(event, data) {
      this.#events.emit(event, data);
    }

    /**
     * The socket's figures. On the browser's shared socket the message counts, latency and
     * uptime are the shared socket's (every tab's traffic), `streamsActive` is this page's.
     * @returns {ManagerMetrics}
     */
    getMetrics() {
      if (this.#usingShared) {
        const shared = this.#sharedMetrics;
        return {
          messagesSent: shared ? shared.messagesSent : 0,
          messagesReceived: shared ? shared.messagesReceived : 0,
          averageLatency: shared ? shared.averageLatency : null,
          // The worker's clock is the wall clock: so is this one.
          uptime: this.connected && shared && shared.connectedAt !== null ? Math.max(0, Date.now() - shared.connectedAt) : 0,
          streamsActive: this.streamHandlers.size,
          shared: true,
          sockets: shared ? shared.sockets : 0,
          tabs: shared ? shared.tabs : 1,
        };
      }
      const latencies = this.#latencies;
      return {
        messagesSent: this.#messagesSent,
        messagesReceived: this.#messagesReceived,
        averageLatency: latencies.length
          ? Math.round((latencies.reduce((a, b) => a + b, 0) / latencies.length) * 10) / 10
          : null,
        uptime: this.connected ? this.#clock.now() - this.#connectedAt : 0,
        streamsActive: this.streamHandlers.size,
        shared: false,
        sockets: this.connected ? 1 : 0,
        tabs: 1,
      };
    }

    /** Measure the round trip once now (also done every pingInterval while connected). */
    ping() {
      if (this.#usingShared) {
        this.send('ping', null, {}); // the worker measures it, on every socket of this page
        return;
      }
      const id = this.#nextPing++;
      this.#pendingPings.set(id, this.#clock.now());
      if (this.#pendingPings.size > 10) {
        const [oldest] = this.#pendingPings.keys(); // its pong is long overdue
        if (oldest !== undefined) this.#pendingPings.delete(oldest);
      }
      this.send('ping', null, { id });
    }

    // --- internals -------------------------------------------------------------------------

    /** @returns {Promise<void>} */
    #open() {
      return new Promise((resolve, reject) => {
        const url = this.#socketUrl();
        this.#log('debug', `instance ${this.instanceId}: opening ${url.replace(/token=[^&]*/, 'token=***')}`);
        /** @type {WebSocket} */
        let ws;
        try {
          ws = new this.#WebSocket(url);
        } catch (error) {
          reject(error);
          return;
        }
        this.ws = ws;
        this.#abortOpen = (error) => reject(error);
        ws.binaryType = 'arraybuffer'; // video over the socket (fallback) arrives as binary messages
        let opened = false;
        ws.onopen = () => {
          opened = true;
          this.#abortOpen = null;
          const wasReconnecting = this.reconnecting;
          this.connected = true;
          this.reconnecting = false;
          this.#attempt = 0;
          this.#connectedAt = this.#clock.now();
          this.#log('info', `instance ${this.instanceId}: socket connected`);
          if (wasReconnecting) {
            // Queued while the socket was down: they belong to sessions the server forgot.
            // Every stream negotiates afresh just below.
            this.#urgent = [];
            this.#routine = [];
          }
          this.#flush();
          this.#startPings();
          this.emit('connected', { url, reconnected: wasReconnecting });
          if (wasReconnecting) this.#renegotiateAll();
          resolve();
        };
        ws.onmessage = (event) => this.#receive(event.data);
        ws.onerror = () => {
          this.emit('error', { message: 'WebSocket error', url });
        };
        ws.onclose = (event) => {
          if (this.ws !== ws) return;
          this.ws = null;
          const wasConnected = this.connected;
          this.connected = false;
          this.welcomed = false;
          this.#stopPings();
          this.#pendingPings.clear();
          const willReconnect = this.#wanted && this.streamHandlers.size > 0;
          if (wasConnected) {
            this.#log('warn', `instance ${this.instanceId}: socket closed (${event.code} ${event.reason || ''})`);
            this.emit('disconnected', { code: event.code, reason: event.reason, willReconnect });
          }
          if (!opened) reject(new Error(`Could not open the signaling socket ${url} (${event.code})`));
          if (willReconnect) this.#scheduleReconnect();
        };
      });
    }

    /** The signaling URL without the token. */
    #baseUrl() {
      if (this.#url) return this.#url;
      const location = root.location;
      if (!location) throw new Error('WebSocketManager needs a url outside a browser page');
      return `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws`;
    }

    #socketUrl() {
      let url = this.#baseUrl();
      if (this.#token) {
        url += `${url.includes('?') ? '&' : '?'}token=${encodeURIComponent(this.#token)}`;
      }
      return url;
    }

    #scheduleReconnect() {
      if (this.#reconnectTimer !== null) return;
      this.reconnecting = true;
      const delay = WebSocketManager.backoffDelay(this.#attempt, this.#random);
      this.#attempt += 1;
      this.#log('info', `instance ${this.instanceId}: reconnecting in ${delay} ms (attempt ${this.#attempt})`);
      this.emit('reconnecting', { attempt: this.#attempt, delay });
      this.#reconnectTimer = this.#clock.setTimeout(() => {
        this.#reconnectTimer = null;
        if (!this.#wanted || this.streamHandlers.size === 0) {
          this.reconnecting = false;
          return;
        }
        this.#open().catch(() => {
          /* onclose has scheduled the next attempt */
        });
      }, delay);
    }

    #renegotiateAll() {
      this.emit('reconnected', { streams: this.streamHandlers.size });
      for (const streamId of [...this.streamHandlers.keys()]) this.#renegotiate(streamId);
    }

    /** @param {Message} message */
    #enqueue(message) {
      const queue = URGENT_TYPES.has(message.type) ? this.#urgent : this.#routine;
      queue.push(message);
      const total = this.#urgent.length + this.#routine.length;
      if (total > this.#maxQueue) {
        // Routine messages are the ones worth losing; urgent ones only as a last resort.
        const dropped = this.#routine.length ? this.#routine.shift() : this.#urgent.shift();
        this.#log('warn', `outgoing queue full (${this.#maxQueue}); dropped a "${dropped?.type}" message`);
      }
    }

    /** @returns {number} messages sent */
    #flush() {
      if (this.#usingShared && this.#link) {
        // The worker's socket queues them (urgent first) while it is not open.
        const messages = [...this.#urgent.splice(0), ...this.#routine.splice(0)];
        if (messages.length) this.#link.post({ op: 'send', messages });
        for (const message of messages) this.#log('debug', `→ ${message.type} ${message.streamId ?? ''} (shared socket)`);
        return this.connected ? messages.length : 0;
      }
      const ws = this.ws;
      if (!ws || ws.readyState !== OPEN) return 0;
      let sent = 0;
      while (this.#urgent.length || this.#routine.length) {
        const message = /** @type {Message} */ (this.#urgent.length ? this.#urgent.shift() : this.#routine.shift());
        ws.send(JSON.stringify(message));
        this.#messagesSent += 1;
        sent += 1;
        this.#log('debug', `→ ${message.type} ${message.streamId ?? ''}`);
      }
      return sent;
    }

    /** @param {string|ArrayBuffer} data a text frame (JSON), or a binary one (fallback video) */
    #receive(data) {
      this.#messagesReceived += 1;
      if (typeof data !== 'string') {
        this.#receiveMedia(data);
        return;
      }
      /** @type {unknown} */
      let message;
      try {
        message = JSON.parse(data);
      } catch (error) {
        this.#log('warn', 'ignoring a message that is not JSON');
        return;
      }
      if (!isMessage(message)) {
        this.#log('warn', 'ignoring a message without a type');
        return;
      }
      this.#log('debug', `← ${message.type} ${message.streamId ?? ''}`);
      this.emit('message', message);
      if (message.streamId === null || message.streamId === undefined) {
        this.#receiveGlobal(message);
        return;
      }
      this.#routeToStream(message.streamId, message);
    }

    /** @param {string} streamId @param {Message} message one stream's message */
    #routeToStream(streamId, message) {
      const handlers = this.streamHandlers.get(streamId);
      if (!handlers) {
        this.#log('debug', `no stream "${streamId}" registered for a "${message.type}" message`);
        this.emit('unknownStream', message);
        return;
      }
      const name = message.type;
      const handler = handlers[name] || handlers[`on${name[0]?.toUpperCase()}${name.slice(1)}`];
      if (!handler) {
        this.#log('debug', `stream ${message.streamId} has no "${name}" handler`);
        return;
      }
      try {
        handler(message.payload, message);
      } catch (error) {
        this.#log('error', `stream ${message.streamId}: "${name}" handler failed:`, error);
      }
    }

    /** @param {ArrayBuffer} data */
    #receiveMedia(data) {
      /** @type {MediaSegment} */
      let segment;
      try {
        segment = parseMediaMessage(data);
      } catch (error) {
        this.#log('warn', `ignoring a binary message: ${/** @type {Error} */ (error).message}`);
        return;
      }
      this.#routeMedia(segment);
    }

    /** @param {MediaSegment} segment */
    #routeMedia(segment) {
      const handler = this.streamHandlers.get(segment.streamId)?.onMedia;
      if (!handler) {
        this.#log('debug', `no stream "${segment.streamId}" takes video over the socket`);
        return;
      }
      try {
        handler(segment);
      } catch (error) {
        this.#log('error', `stream ${segment.streamId}: media handler failed:`, error);
      }
    }

    /** @param {Message} message */
    #receiveGlobal(message) {
      const payload = message.payload;
      if (message.type === 'welcome') {
        // The welcome's fields are the server's (docs/protocol.md); only its being an object is checked.
        this.serverInfo = /** @type {ServerInfo} */ (isObject(payload) ? payload : {});
        this.welcomed = true;
        for (const waiter of this.#welcomeWaiters.splice(0)) waiter();
        this.#log('debug', `instance ${this.instanceId}: server connection ${this.serverInfo.connectionId}`);
        this.emit('welcome', this.serverInfo);
      } else if (message.type === 'pong') {
        const id = isObject(payload) ? payload.id : undefined;
        const sentAt = typeof id === 'number' ? this.#pendingPings.get(id) : undefined;
        if (typeof id === 'number' && sentAt !== undefined) {
          this.#pendingPings.delete(id);
          this.#latencies.push(this.#clock.now() - sentAt);
          if (this.#latencies.length > 20) this.#latencies.shift();
        }
      } else if (message.type === 'error') {
        this.#log('warn', `server error: ${payload} (${message.code})`);
        this.emit('error', { message: String(payload), code: message.code });
      }
    }

    /** @param {string} streamId */
    #renegotiate(streamId) {
      const handlers = this.streamHandlers.get(streamId);
      const renegotiate = handlers && (handlers.onReconnect || handlers.reconnect);
      if (!renegotiate) return;
      try {
        renegotiate({ streamId });
      } catch (error) {
        this.#log('error', `stream ${streamId}: renegotiation failed to start:`, error);
      }
    }

    // --- the browser's shared socket (shared-socket-worker.js) ------------------------------

    #wantsShared() {
      if (this.#sharedOption === false || this.#linkFailed) return false;
      if (this.#platform) return true;
      if (this.#sharedOption === true) this.#log('info', 'no SharedWorker or Web Locks here: this page opens its own socket');
      return false;
    }

    #workerScriptUrl() {
      if (this.#workerUrl) return this.#workerUrl;
      const own = OWN_SCRIPT_URL || `${root.location.origin}/static/js/websocket-manager.js`;
      const url = new URL('shared-socket-worker.js', own);
      url.search = new URL(own).search; // the same release's worker: `?v=` of this script
      return url.href;
    }

    /** @returns {Promise<void>} */
    async #openShared() {
      let link = this.#link;
      if (!link) {
        const platform = /** @type {SharedSocketPlatform} */ (this.#platform);
        /** @type {SharedSocketLink|null} */
        let created = null;
        try {
          const opening = new SharedSocketLink(platform, this.#workerScriptUrl(), (m) => this.#fromWorker(m), () => this.#workerLost(opening));
          created = opening;
          await opening.open();
        } catch (error) {
          if (created) created.close();
          this.#linkFailed = true;
          this.#log('warn', `instance ${this.instanceId}: no shared socket (${/** @type {Error} */ (error).message}); this page opens its own`);
          return this.#open();
        }
        this.#link = link = /** @type {SharedSocketLink} */ (created);
      }
      const requestId = this.#nextRequest++;
      /** @type {Promise<void>} */
      const done = new Promise((resolve, reject) => this.#requests.set(requestId, { resolve, reject }));
      link.post({
        op: 'connect', requestId, url: this.#baseUrl(), token: this.#token ?? null,
        streams: [...this.streamHandlers.keys()],
        settings: { logLevel: this.#logLevel, pingInterval: this.#pingInterval, maxQueue: this.#maxQueue },
      });
      this.#usingShared = true;
      this.#flush();
      this.#log('debug', `instance ${this.instanceId}: signaling through the shared worker as tab ${link.tabId}`);
      return done;
    }

    /** @param {WorkerToTab} message */
    #fromWorker(message) {
      if (message.op === 'connected' || message.op === 'connectFailed') {
        const request = this.#requests.get(message.requestId);
        this.#requests.delete(message.requestId);
        if (request && message.op === 'connected') request.resolve();
        else if (request && message.op === 'connectFailed') request.reject(new Error(message.message));
        return;
      }
      if (!this.#usingShared) return; // disconnected meanwhile
      switch (message.op) {
        case 'event':
          this.connected = message.connected;
          this.reconnecting = message.reconnecting;
          if (message.name === 'disconnected') this.welcomed = false;
          this.#log(message.name === 'disconnected' ? 'warn' : 'debug', `instance ${this.instanceId}: shared socket ${message.name}`);
          this.emit(message.name, message.data);
          break;
        case 'welcome': {
          const first = !this.welcomed;
          this.serverInfo = message.serverInfo;
          this.welcomed = true;
          for (const waiter of this.#welcomeWaiters.splice(0)) waiter();
          if (first) this.emit('welcome', this.serverInfo);
          break;
        }
        case 'message':
          this.#messagesReceived += 1;
          this.emit('message', message.message);
          if (typeof message.message.streamId === 'string') this.#routeToStream(message.message.streamId, message.message);
          break;
        case 'media':
          this.#routeMedia(message.segment);
          break;
        case 'reconnect':
          this.#renegotiate(message.streamId);
          break;
        case 'metrics':
          this.#sharedMetrics = message.metrics;
          break;
      }
    }

    /**
     * The shared worker died (its lock came free): open a new one and renegotiate every stream,
     * as after a reconnect.
     * @param {SharedSocketLink} link
     */
    #workerLost(link) {
      if (this.#link !== link) return;
      this.#link = null;
      link.close();
      for (const request of this.#requests.values()) request.reject(new Error('the shared worker ended'));
      this.#requests.clear();
      if (!this.#usingShared) return;
      this.#usingShared = false;
      const wasConnected = this.connected;
      this.connected = false;
      this.welcomed = false;
      const willReconnect = this.#wanted && this.streamHandlers.size > 0;
      this.#log('warn', `instance ${this.instanceId}: the shared worker ended${willReconnect ? '; starting another' : ''}`);
      if (wasConnected) this.emit('disconnected', { code: 1006, reason: 'the shared worker ended', willReconnect });
      if (!willReconnect) return;
      this.reconnecting = true;
      this.connect()
        .then(() => this.#renegotiateAll())
        .catch((error) => this.#log('warn', `instance ${this.instanceId}: reconnecting to a new worker failed:`, error));
    }

    #startPings() {
      this.#stopPings();
      if (!this.#pingInterval) return;
      const tick = () => {
        this.ping();
        this.#pingTimer = this.#clock.setTimeout(tick, this.#pingInterval);
      };
      tick();
    }

    #stopPings() {
      if (this.#pingTimer !== null) {
        this.#clock.clearTimeout(this.#pingTimer);
        this.#pingTimer = null;
      }
    }

    /** @param {LogLevel} level @param {...unknown} args */
    #log(level, ...args) {
      if (LEVELS[level] < LEVELS[this.#logLevel]) return;
      const method = level === 'debug' ? 'log' : level;
      // eslint-disable-next-line no-console
      (console[/** @type {'log'|'info'|'warn'|'error'} */ (method)] || console.log)('[MediaStream]', ...args);
    }
  }

  root.WebSocketManager = WebSocketManager;
  root.MediaStreamEmitter = MediaStreamEmitter;
  if (typeof module === 'object' && module.exports) module.exports = { WebSocketManager, MediaStreamEmitter, backoffDelay };
})(typeof window !== 'undefined' ? window : globalThis);
