// @ts-check
/**
 * MediaStream — the browser's one signaling socket, held by a SharedWorker for every tab of
 * the origin. Pages never load this script themselves: websocket-manager.js starts it (by URL,
 * beside itself, with its own `?v=` version) when the browser has SharedWorker and Web Locks.
 *
 * The peer connections stay in the tabs (workers can't hold them); only signaling passes here.
 * The worker runs ordinary WebSocketManagers (the same script the page runs, imported with the
 * same version): reconnect, backoff, queues and pings work exactly as on a page of its own.
 *
 * Routing. Each tab's streams are registered here under the tab; a server message for a stream
 * goes to the tab that registered it. The server has one session per streamId per socket and
 * looks a streamId up as the stream's name (docs/protocol.md), so two tabs playing the same
 * camera can't share one socket without a change to the protocol. Instead a socket is a *lane*:
 * a stream goes on the first lane that doesn't carry its streamId yet, and a new lane (socket)
 * opens only for a camera that already plays in another tab. Tabs with different cameras — the
 * usual case — share one socket; nothing on the wire changes.
 *
 * Tabs that use another server URL or another token get their own group of lanes (a token is a
 * grant: a tab never rides on another tab's). A token refresh of the only tab of a group keeps
 * its sockets and is used at their next (re)connect, as on a page of its own; otherwise the tab's
 * next offers move to a socket with its new token.
 *
 * Tab lifetime. A worker can't see a port close. Each tab holds a Web Lock for its lifetime and
 * names it in its `hello`; the worker asks for that lock and gets it the moment the tab is gone
 * (closed, crashed, discarded, navigated away) — then it ends the tab's sessions (a `close` per
 * stream). Heartbeats would need a timeout longer than a background tab's throttled timers
 * (Chrome runs them once a minute after five minutes hidden), so they would either end live
 * sessions of a hidden tab or leave a dead tab's sessions running for a minute and more.
 */
/** @typedef {import('./websocket-manager.js').Message} Message */
/** @typedef {import('./websocket-manager.js').TabToWorker} TabToWorker */
/** @typedef {import('./websocket-manager.js').WorkerToTab} WorkerToTab */
/** @typedef {import('./websocket-manager.js').LaneSettings} LaneSettings */
/** @typedef {import('./websocket-manager.js').SharedSocketMetrics} SharedSocketMetrics */
/** @typedef {InstanceType<typeof import('./websocket-manager.js').WebSocketManager>} WebSocketManager */
/**
 * What the router needs to open a socket: a WebSocketManager of its own (not shared).
 * @typedef {(options: {url: string, token: string|undefined} & LaneSettings) => WebSocketManager} CreateManager
 */
/**
 * One tab, as the worker knows it.
 * @typedef {object} Tab
 * @property {string} id
 * @property {(message: WorkerToTab, transfer?: Transferable[]) => void} post
 * @property {string|null} key its group: server URL and token (null before its first connect)
 * @property {string} url
 * @property {string|null} token
 * @property {LaneSettings} settings
 * @property {Map<string, Lane>} streams its streams, and the lane each one is on
 * @property {boolean} toldConnected whether the tab was last told "connected"
 * @property {number} connecting its connect requests not answered yet (its lanes must stay)
 * @property {string} lastMetrics the figures it was last sent (JSON), so unchanged ones aren't sent again
 */
/**
 * One socket of a group.
 * @typedef {object} Lane
 * @property {number} id
 * @property {Group} group
 * @property {WebSocketManager} manager
 * @property {Map<string, Tab>} owners the tab that plays each of the lane's streams
 * @property {number|null} connectedAt when its socket opened (wall clock, ms), while open
 * @property {(() => void)[]} unsubscribe
 */
/**
 * The sockets of one server URL and token.
 * @typedef {object} Group
 * @property {string} key
 * @property {string} url
 * @property {string|null} token
 * @property {Lane[]} lanes
 */

(function (root) {
  'use strict';

  const METRICS_INTERVAL_MS = 1000;

  /** @param {string} url @param {string|null} token */
  function groupKey(url, token) {
    return token ? `${url} token:${token}` : url;
  }

  /**
   * The worker's routing, without I/O: tabs, their streams, and the lanes (sockets) that carry
   * them. The worker script below feeds it the tabs' messages; the unit tests do the same.
   */
  class SharedSocketRouter {
    /** @type {Map<string, Tab>} */ #tabs = new Map();
    /** @type {Map<string, Group>} */ #groups = new Map();
    /** @type {CreateManager} */ #createManager;
    /** @type {(message: string) => void} */ #warn;
    #nextLane = 1;

    /**
     * @param {{createManager: CreateManager, warn?: (message: string) => void}} options
     */
    constructor({ createManager, warn }) {
      this.#createManager = createManager;
      this.#warn = warn || ((message) => console.warn('[MediaStream worker]', message));
    }

    /**
     * A tab said hello.
     * @param {string} tabId
     * @param {(message: WorkerToTab, transfer?: Transferable[]) => void} post
     */
    attach(tabId, post) {
      this.#tabs.set(tabId, {
        id: tabId, post, key: null, url: '', token: null,
        settings: { logLevel: 'warn', pingInterval: 10000, maxQueue: 1000 },
        streams: new Map(), toldConnected: false, connecting: 0, lastMetrics: '',
      });
    }

    /**
     * One message of a tab.
     * @param {string} tabId
     * @param {TabToWorker} message
     */
    receive(tabId, message) {
      const tab = this.#tabs.get(tabId);
      if (!tab) {
        this.#warn(`a "${message.op}" from tab ${tabId}, which is gone or never said hello: ignored`);
        return;
      }
      switch (message.op) {
        case 'connect':
          this.#connect(tab, message.requestId, message.url, message.token, message.streams, message.settings);
          break;
        case 'configure':
          this.#setGroup(tab, message.url, message.token);
          break;
        case 'register':
          if (tab.key !== null) this.#register(tab, message.streamId);
          break;
        case 'unregister':
          this.#unregister(tab, message.streamId);
          break;
        case 'send':
          for (const m of message.messages) this.#send(tab, m);
          break;
        case 'disconnect':
          for (const streamId of [...tab.streams.keys()]) this.#unregister(tab, streamId);
          tab.toldConnected = false;
          this.#dropUnusedLanes();
          break;
        case 'hello':
          break; // handled by the worker script before the tab is attached
      }
    }

    /**
     * The tab is gone: end its sessions on the server (a `close` per stream) and forget it.
     * @param {string} tabId
     */
    forget(tabId) {
      const tab = this.#tabs.get(tabId);
      if (!tab) return;
      for (const streamId of [...tab.streams.keys()]) this.#unregister(tab, streamId);
      this.#tabs.delete(tabId);
      this.#dropUnusedLanes();
    }

    /** Send each tab the figures of its sockets, where they changed. */
    publishMetrics() {
      for (const tab of this.#tabs.values()) {
        const group = tab.key === null ? undefined : this.#groups.get(tab.key);
        if (!group) continue;
        /** @type {SharedSocketMetrics} */
        const metrics = { messagesSent: 0, messagesReceived: 0, averageLatency: null, connectedAt: null, sockets: 0, tabs: 0 };
        for (const lane of group.lanes) {
          const m = lane.manager.getMetrics();
          metrics.messagesSent += m.messagesSent;
          metrics.messagesReceived += m.messagesReceived;
          if (metrics.averageLatency === null) metrics.averageLatency = m.averageLatency;
          if (lane.manager.connected && lane.connectedAt !== null) {
            metrics.sockets += 1;
            if (metrics.connectedAt === null || lane.connectedAt < metrics.connectedAt) metrics.connectedAt = lane.connectedAt;
          }
        }
        metrics.tabs = [...this.#tabs.values()].filter((t) => t.key === tab.key).length;
        const text = JSON.stringify(metrics);
        if (text === tab.lastMetrics) continue;
        tab.lastMetrics = text;
        tab.post({ op: 'metrics', metrics });
      }
    }

    /** What the worker holds: tabs, sockets (lanes) and the streams on them. */
    statistics() {
      const lanes = [...this.#groups.values()].flatMap((g) => g.lanes);
      return {
        tabs: this.#tabs.size,
        groups: this.#groups.size,
        sockets: lanes.length,
        streams: lanes.reduce((sum, lane) => sum + lane.owners.size, 0),
      };
    }

    // --- internals -------------------------------------------------------------------------

    /**
     * @param {Tab} tab @param {number} requestId @param {string} url @param {string|null} token
     * @param {string[]} streams @param {LaneSettings} settings
     */
    #connect(tab, requestId, url, token, streams, settings) {
      tab.settings = settings;
      this.#setGroup(tab, url, token);
      for (const streamId of streams) this.#register(tab, streamId);
      const lanes = this.#lanesOf(tab, true);
      tab.connecting += 1;
      Promise.all(lanes.map((lane) => lane.manager.connect())).finally(() => {
        tab.connecting -= 1;
      }).then(
        () => {
          if (!this.#tabs.has(tab.id)) return;
          this.#tell(tab, 'connected', { url, reconnected: false });
          for (const lane of lanes) this.#welcome(tab, lane);
          tab.post({ op: 'connected', requestId });
        },
        (/** @type {Error & {code?: string}} */ error) => {
          if (error.code === 'aborted' && this.#tabs.has(tab.id) && tab.key === groupKey(url, token)) {
            // Its socket was closed on purpose meanwhile (another tab's last stream left it):
            // the tab still wants one.
            this.#connect(tab, requestId, url, token, [...tab.streams.keys()], settings);
            return;
          }
          tab.post({ op: 'connectFailed', requestId, message: error.message });
        },
      );
    }

    /** @param {Tab} tab @param {string} url @param {string|null} token */
    #setGroup(tab, url, token) {
      const key = groupKey(url, token);
      if (tab.key === key) return;
      const old = tab.key === null ? undefined : this.#groups.get(tab.key);
      const previousKey = tab.key;
      Object.assign(tab, { key, url, token });
      if (!old || old.url !== url || this.#groups.has(key)) return;
      const alone = [...this.#tabs.values()].every((t) => t === tab || t.key !== previousKey);
      if (!alone) return; // its next offers move it (see #send)
      // A token refresh of the group's only tab: the sockets stay, and their next (re)connect
      // uses the new token, as on a page of its own.
      this.#groups.delete(old.key);
      Object.assign(old, { key, token });
      this.#groups.set(key, old);
      for (const lane of old.lanes) lane.manager.configure({ token: token ?? '' });
    }

    /** @param {Tab} tab */
    #group(tab) {
      const key = /** @type {string} */ (tab.key);
      let group = this.#groups.get(key);
      if (!group) {
        group = { key, url: tab.url, token: tab.token, lanes: [] };
        this.#groups.set(key, group);
      }
      return group;
    }

    /**
     * The lanes that carry a tab's streams; with none, its group's first lane (created, if
     * `create`, so that a tab can connect before it has streams).
     * @param {Tab} tab @param {boolean} [create]
     * @returns {Lane[]}
     */
    #lanesOf(tab, create = false) {
      const lanes = new Set(tab.streams.values());
      if (lanes.size) return [...lanes];
      if (tab.key === null) return [];
      const group = create ? this.#group(tab) : this.#groups.get(tab.key);
      if (!group) return [];
      if (!group.lanes.length && create) this.#newLane(group, tab.settings);
      return group.lanes.slice(0, 1);
    }

    /** The tabs a lane's socket events concern: those with streams on it, and idle tabs on a group's first lane. @param {Lane} lane */
    #tabsOn(lane) {
      const tabs = new Set(lane.owners.values());
      if (lane.group.lanes[0] === lane) {
        for (const tab of this.#tabs.values()) if (tab.key === lane.group.key && tab.streams.size === 0) tabs.add(tab);
      }
      return tabs;
    }

    /** @param {Group} group @param {LaneSettings} settings */
    #newLane(group, settings) {
      const manager = this.#createManager({ url: group.url, token: group.token ?? undefined, ...settings });
      /** @type {Lane} */
      const lane = { id: this.#nextLane++, group, manager, owners: new Map(), connectedAt: null, unsubscribe: [] };
      const forward = (/** @type {'connected'|'disconnected'|'reconnecting'|'reconnected'|'error'} */ name) =>
        manager.on(name, (/** @type {any} */ data) => {
          for (const tab of this.#tabsOn(lane)) {
            this.#tell(tab, name, name === 'reconnected' ? { streams: tab.streams.size } : data);
          }
        });
      lane.unsubscribe.push(
        manager.on('connected', () => { lane.connectedAt = Date.now(); }),
        manager.on('disconnected', () => { lane.connectedAt = null; }),
        forward('connected'), forward('disconnected'), forward('reconnecting'), forward('reconnected'), forward('error'),
        manager.on('welcome', () => {
          for (const tab of this.#tabsOn(lane)) this.#welcome(tab, lane);
        }),
        manager.on('message', (message) => {
          if (typeof message.streamId !== 'string') return; // the socket's own (welcome, pong; errors come as events)
          const owner = lane.owners.get(message.streamId);
          if (owner) owner.post({ op: 'message', message });
        }),
      );
      group.lanes.push(lane);
      return lane;
    }

    /**
     * Tell a tab about its socket, with its state as the worker sees it. "connected" only when
     * the tab was not connected (a second socket opening for it is no news to the page).
     * @param {Tab} tab
     * @param {'connected'|'disconnected'|'reconnecting'|'reconnected'|'error'} name
     * @param {any} data
     */
    #tell(tab, name, data) {
      const lanes = this.#lanesOf(tab);
      const connected = lanes.length > 0 && lanes.every((l) => l.manager.connected);
      const reconnecting = lanes.some((l) => l.manager.reconnecting);
      if (name === 'connected') {
        if (tab.toldConnected || !connected) return;
        tab.toldConnected = true;
      } else if (name === 'disconnected') {
        if (!tab.toldConnected) return;
        tab.toldConnected = false;
      }
      tab.post({ op: 'event', name, data, connected, reconnecting });
    }

    /** @param {Tab} tab @param {Lane} lane */
    #welcome(tab, lane) {
      if (lane.manager.welcomed) tab.post({ op: 'welcome', serverInfo: lane.manager.serverInfo });
    }

    /**
     * Put a tab's stream on the first lane of its group that doesn't carry that streamId yet.
     * @param {Tab} tab @param {string} streamId
     */
    #register(tab, streamId) {
      const existing = tab.streams.get(streamId);
      if (existing) return existing;
      const group = this.#group(tab);
      const lane = group.lanes.find((l) => !l.owners.has(streamId)) || this.#newLane(group, tab.settings);
      lane.owners.set(streamId, tab);
      tab.streams.set(streamId, lane);
      lane.manager.registerStream(streamId, {
        onReconnect: () => lane.owners.get(streamId)?.post({ op: 'reconnect', streamId }),
        onMedia: (segment) => {
          // A copy of its own to hand over: the socket's buffer holds the framing too.
          const data = segment.data.slice();
          lane.owners.get(streamId)?.post({ op: 'media', segment: { ...segment, data } }, [data.buffer]);
        },
      });
      if (tab.toldConnected && !lane.manager.connected) {
        // A new lane for a tab already playing: open it (its messages wait in its queue).
        lane.manager.connect().catch(() => { /* it retries by itself; the tab hears its events */ });
      }
      if (tab.toldConnected) this.#welcome(tab, lane);
      return lane;
    }

    /** @param {Tab} tab @param {string} streamId */
    #unregister(tab, streamId) {
      const lane = tab.streams.get(streamId);
      if (!lane) return;
      tab.streams.delete(streamId);
      if (lane.owners.get(streamId) === tab) lane.owners.delete(streamId);
      lane.manager.unregisterStream(streamId); // a `close`; the socket closes after its last stream
      this.#dropUnusedLanes();
    }

    /** @param {Tab} tab @param {Message} message */
    #send(tab, message) {
      if (tab.key === null) {
        this.#warn(`tab ${tab.id} sent a "${message.type}" before connecting: dropped`);
        return;
      }
      const streamId = message.streamId;
      if (typeof streamId !== 'string') {
        for (const lane of this.#lanesOf(tab, true)) {
          if (message.type === 'ping') lane.manager.ping();
          else lane.manager.send(message.type, null, message.payload);
        }
        return;
      }
      let lane = tab.streams.get(streamId);
      if (lane && lane.group.key !== tab.key && (message.type === 'offer' || message.type === 'fallback')) {
        // A new session after the tab's token (or server) changed: it goes on a socket of the new group.
        this.#unregister(tab, streamId);
        lane = undefined;
      }
      if (!lane) {
        lane = this.#register(tab, streamId);
        if (!lane.manager.connected) lane.manager.connect().catch(() => { /* retried by the lane */ });
      }
      lane.manager.send(message.type, streamId, message.payload);
    }

    /** Close the lanes nobody uses any more (and forget empty groups). */
    #dropUnusedLanes() {
      for (const group of [...this.#groups.values()]) {
        const idleTabs = [...this.#tabs.values()].some(
          (t) => t.key === group.key && t.streams.size === 0 && (t.toldConnected || t.connecting > 0),
        );
        group.lanes = group.lanes.filter((lane, index) => {
          if (lane.owners.size > 0 || (index === 0 && idleTabs)) return true;
          for (const unsubscribe of lane.unsubscribe) unsubscribe();
          lane.manager.disconnect();
          return false;
        });
        const members = [...this.#tabs.values()].some((t) => t.key === group.key);
        if (!group.lanes.length && !members) this.#groups.delete(group.key);
      }
    }
  }

  /**
   * Serve one tab on its port: its `hello` first (attach it, wait for its lock, answer
   * `ready`), then everything it sends, to the router.
   * @param {SharedSocketRouter} router
   * @param {MessagePort} port
   * @param {{locks: LockManager, workerLock: string, holding: Promise<void>, protocol: number}} worker
   *   the worker's Web Locks, the lock it holds for its lifetime (and when it holds it), its protocol
   */
  function serveTab(router, port, worker) {
    /** @type {string|null} */
    let tabId = null;
    port.onmessage = (/** @type {MessageEvent<TabToWorker>} */ received) => {
      const message = received.data;
      if (tabId !== null) {
        router.receive(tabId, message);
        return;
      }
      if (message.op !== 'hello') return;
      const id = message.tabId;
      tabId = id;
      router.attach(id, (reply, transfer) => port.postMessage(reply, transfer || []));
      worker.holding.then(() => {
        // Granted when the tab is gone: closed, crashed, discarded or navigated away.
        worker.locks.request(message.lock, () => router.forget(id)).catch(() => router.forget(id));
        port.postMessage({ op: 'ready', protocol: worker.protocol, workerLock: worker.workerLock });
      });
    };
  }

  /**
   * The worker itself: one router, the worker's lifetime lock, and a port per tab.
   * @param {any} scope the SharedWorkerGlobalScope (typed loosely: tsconfig has the DOM's lib, not the worker's)
   */
  function runWorker(scope) {
    // This worker's URL carries the page's manager version (`?v=`): load exactly that manager.
    scope.importScripts(`websocket-manager.js${scope.location.search}`);
    /** @type {typeof import('./websocket-manager.js').WebSocketManager} */
    const Manager = scope.WebSocketManager;
    const router = new SharedSocketRouter({ createManager: (options) => new Manager({ ...options, shared: false }) });
    /** @type {LockManager} */
    const locks = scope.navigator.locks;
    // Held for the worker's lifetime: a tab that gets it knows the worker died.
    const workerLock = `mediastream-worker-${Math.random().toString(36).slice(2, 10)}`;
    /** @type {Promise<void>} */
    const holding = new Promise((held) => {
      locks.request(workerLock, () => {
        held();
        return new Promise(() => {});
      });
    });
    scope.setInterval(() => router.publishMetrics(), METRICS_INTERVAL_MS);
    scope.onconnect = (/** @type {MessageEvent} */ event) => {
      serveTab(router, /** @type {MessagePort} */ (event.ports[0]), { locks, workerLock, holding, protocol: Manager.sharedProtocol });
    };
  }

  const scope = /** @type {any} */ (root);
  if (typeof scope.SharedWorkerGlobalScope === 'function' && root instanceof scope.SharedWorkerGlobalScope) runWorker(scope);
  if (typeof module === 'object' && module.exports) module.exports = { SharedSocketRouter, serveTab };
})(globalThis);
